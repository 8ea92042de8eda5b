"""SASRec vs FLAME (and optionally the other baselines) over several seeds: table and curves (§12 of
docs/method.md).

    python -m flame.compare --config flame/configs/amazon-toys.yaml [key=value ...] --seeds 1 2 3
                            [--models sasrec flame mutual]
    python -m flame.compare --runs runs/flame/amazon-toys/<sasrec run> runs/flame/amazon-toys/<flame run> ...
The second form tabulates finished run folders of one dataset (runs made in parallel, or on another
machine): each FLAME/B3 run gets its convergence figures against the SASRec run of its seed, written
back into its results.json.
For each seed, SASRec runs first; every other model gets it as train.sasrec_run (convergence target)
and, when the frozen net is our own (flame.frozen_source=own), FLAME freezes exactly that SASRec
instead of training a second copy of it. Writes summary.md (mean ± std), summary.csv (one row per run,
common/results.py) and curves.png (validation NDCG@20 vs epoch and vs training seconds) into
<run root>/flame/compare/<config stem>/ (--runs: <run root>/flame/compare/<dataset>/), the same place as the
other papers' compare; a second compare of the same config reuses the finished runs there.
key=value are config overrides; they go before a list option such as --seeds, or after `--`.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

from common.config import dry_run_plan, load_config, parse_with_overrides
from common.io import load_json, save_json
from common.results import write_summary as summary_files
from common.runs import default_run_root, read_metrics, run_name, run_or_reuse

from .config import Config
from .evaluate import convergence_against
from .main import run

COLUMNS = [("test NDCG@20", ("test", "reference", "NDCG@20")), ("test HR@20", ("test", "reference", "HR@20")),
           ("test NDCG@10", ("test", "reference", "NDCG@10")), ("test NDCG@20 neg_inf", ("test", "neg_inf", "NDCG@20")),
           ("best epoch", ("best_epoch",)), ("s to best", ("time_to_best_s",)),
           ("epochs to SASRec best", ("convergence", "epochs_to_sasrec_best")),
           ("s to SASRec best", ("convergence", "seconds_to_sasrec_best")),
           ("rel. test NDCG@20 gain", ("convergence", "test_ndcg20_gain_rel"))]


def method_of(results: dict) -> str:
    """The method of a results.json (folders written before method.name call it "model")."""
    return results["method"] if "method" in results else results["model"]


def run_root(value: str | None) -> Path:
    """A config's run_root as a folder: None = the default run root."""
    return Path(value).expanduser() if value is not None else default_run_root()


def lookup(results: dict, path: tuple) -> float | None:
    value = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None  # "not reached" -> None


def mean_std(values: list[float | None]) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "n/a"
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    missing = f" ({len(values) - len(kept)} n/a)" if len(kept) < len(values) else ""
    return f"{statistics.mean(kept):.4g} ± {std:.2g}{missing}"


def table(all_results: dict[str, list[dict]], seeds: list[int]) -> str:
    lines = [f"seeds {seeds}; test metrics x100 under the reference seen mask unless marked", "",
             "| method | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for method, runs in all_results.items():
        lines.append(f"| {method} | " + " | ".join(mean_std([lookup(r, p) for r in runs]) for _, p in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(all_results: dict[str, list[dict]], path: Path) -> None:
    """Validation NDCG@20 vs epoch and vs cumulative training seconds, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]'); the table is written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for color, (model, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], all_results.items()):
        for i, r in enumerate(runs):
            records = read_metrics(r["run_dir"])
            if not records:  # the ensemble trains nothing in its own run
                continue
            ndcg = [rec["valid/NDCG@20"] for rec in records]
            label = model if i == 0 else None
            axes[0].plot([rec["epoch"] for rec in records], ndcg, color=color, label=label)
            axes[1].plot([rec["train/cumulative_seconds"] for rec in records], ndcg, color=color, label=label)
    for ax, xlabel in zip(axes, ("epoch", "training seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("valid NDCG@20 (x100)")
        ax.legend()
    first = next(iter(all_results.values()))
    if first:
        fig.suptitle(f"{first[0]['dataset']}, seeds {sorted({r['seed'] for r in first})}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def from_runs(run_dirs: list[Path]) -> dict[str, list[dict]]:
    """Finished run folders grouped by method (SASRec first), with convergence filled in (§12)."""
    loaded = []
    for folder in run_dirs:
        if not (folder / "results.json").is_file():
            raise FileNotFoundError(f"{folder / 'results.json'} not found: --runs takes finished run folders")
        loaded.append({**load_json(folder / "results.json"), "run_dir": str(folder)})
    datasets = sorted({r["dataset"] for r in loaded})
    if len(datasets) > 1:
        raise ValueError(f"--runs mixes datasets {datasets}: give the runs of one dataset")
    baselines = {r["seed"]: Path(r["run_dir"]) for r in loaded if method_of(r) == "sasrec"}
    for r in loaded:
        if method_of(r) not in ("flame", "mutual") or r["seed"] not in baselines:
            continue
        frozen_run = Path(r["frozen"]).parent if r.get("frozen") else None  # our own stage 1, if any
        stage1 = frozen_run if frozen_run and (frozen_run / "results.json").is_file() else None
        r["convergence"] = convergence_against(read_metrics(r["run_dir"]), r["select"], r["seed"],
                                               r["test"]["reference"]["NDCG@20"], baselines[r["seed"]], stage1)
        save_json(Path(r["run_dir"]) / "results.json", {k: v for k, v in r.items() if k != "run_dir"})
    methods = sorted({method_of(r) for r in loaded}, key=lambda m: (m != "sasrec", m))
    return {m: sorted((r for r in loaded if method_of(r) == m), key=lambda r: r["seed"]) for m in methods}


def write_summary(all_results: dict[str, list[dict]], seeds: list[int], out_dir: Path) -> None:
    text = table(all_results, seeds)
    for path in summary_files(out_dir, [r for rs in all_results.values() for r in rs], text):
        print(f"summary: {path}")
    print("\n" + text)
    plot(all_results, out_dir / "curves.png")


def run_seeds(base: Config, seeds: list[int], methods: list[str], out_dir: Path) -> dict[str, list[dict]]:
    """Per seed, SASRec first; every other method gets it as train.sasrec_run, and FLAME with its own
    frozen net (flame.frozen_source=own) freezes exactly that SASRec instead of a second stage 1."""
    all_results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        sasrec_dir = None
        for method in methods:
            train = dataclasses.replace(base.train, seed=seed)
            flame = base.flame
            if sasrec_dir is not None:
                train = dataclasses.replace(train, sasrec_run=str(sasrec_dir))
                if method == "flame" and base.flame.frozen_source == "own" and not base.flame.frozen:
                    flame = dataclasses.replace(flame, frozen=str(sasrec_dir / "frozen.pt"))  # = stage 1 of this seed
            cfg = dataclasses.replace(base, method=dataclasses.replace(base.method, name=method), train=train,
                                      flame=flame)
            results = run_or_reuse(run, cfg, out_dir / run_name(method, seed))
            all_results[method].append(results)
            if method == "sasrec":
                sasrec_dir = Path(results["run_dir"])
    return all_results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="dataset YAML (train and compare)")
    parser.add_argument("--runs", type=Path, nargs="+", help="finished run folders of one dataset (no training)")
    parser.add_argument("--out", type=Path, help="output folder (default: <run root>/flame/compare/<config stem>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="+", default=["sasrec", "flame"],
                        choices=["sasrec", "flame", "mutual", "ensemble"], help="values of method.name")
    parser.add_argument("--dry-run", action="store_true", help="check the config, print the plan and exit 0")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (anywhere), e.g. train.lr=3e-4")
    args = parse_with_overrides(parser, argv)
    if args.runs and args.dry_run:
        print(f"dry run: tabulate {len(args.runs)} finished run folder(s); nothing read or run")
        raise SystemExit(0)
    if args.runs:
        all_results = from_runs(args.runs)
        first = next(iter(all_results.values()))[0]
        out_dir = args.out or run_root(first["config"]["run_root"]) / "flame" / "compare" / first["dataset"]
        write_summary(all_results, sorted({r["seed"] for rs in all_results.values() for r in rs}), out_dir)
        return all_results
    if args.config is None:
        parser.error("give --config (train and compare) or --runs (tabulate finished runs)")
    base = load_config(Config, args.config, args.overrides)
    out_dir = args.out or run_root(base.run_root) / "flame" / "compare" / args.config.stem
    methods = ["sasrec"] + [m for m in args.models if m != "sasrec"]
    if args.dry_run:
        dry_run_plan(Config, base, args.config, f"compare {methods} x seeds {args.seeds} into {out_dir}")
    all_results = run_seeds(base, args.seeds, methods, out_dir)
    write_summary(all_results, args.seeds, out_dir)
    return all_results


if __name__ == "__main__":
    main()
