"""The results table as one batched program (§10.2): datasets x seeds x {SASRec, FLAME} (+ B2 from the SASRec
pairs), each method's runs of a dataset trained as one stack (flame/stack_train.py), every run in its own run folder.

    python -m flame.table --out runs/flame/table                          # the five datasets, seeds 1 2 3
    python -m flame.table --configs flame/configs/smoke.yaml --seeds 1 2 --out /tmp/t   # seconds on a CPU
    python -m flame.table --out runs/flame/table --resume                 # finish what a stopped table left
    python -m flame.table --out runs/flame/table train.cuda_graph=true    # the stacked step as one CUDA graph

Per dataset: the SASRec runs of all seeds as one stack, and beside them (same epoch loop) the FLAME runs
when the frozen net is shipped; with our own frozen net (flame.frozen_source=own) FLAME runs after SASRec
and freezes the SASRec run of its seed (as flame.compare). A run stops on its own early-stopping rule and
leaves the stack (the stack is rebuilt without it, so it costs nothing more). Each run folder
<out>/<dataset>/<method>_seed<seed>/ holds what a plain `flame.main` run writes there (config.yaml,
metrics.jsonl, best.pt, last.pt, results.json, log.txt; frozen.pt for SASRec); its last.pt is in the plain
layout, so `python -m flame.main --resume <folder>` can also finish it alone. B2 (the 2-SASRec ensemble,
nothing to train) is one plain run per pair of seeds. Writes <out>/<dataset>/summary.md and curves.png
(flame.compare's) and <out>/table.md (flame/README.md's tables, mean ± std over the seeds).
key=value are config overrides for every dataset; they go before a list option such as --seeds, or after `--`.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any, Optional

import torch

from common.config import load_config
from common.io import atomic_write, load_json
from common.progress import Progress as Report
from common.runs import comparison_slot, run_or_reuse

from . import stage1
from .compare import plot
from .config import Config, check_config
from .data import build_data, load_raw
from .evaluate import REPORT
from .fast import keep_freed_memory
from .stack_train import Slot, Stack, finish, open_slot
from .train import setup_device

PAPER_DIR = Path(__file__).resolve().parent
DATASETS = ("amazon-beauty", "amazon-games", "amazon-sports", "amazon-toys", "yelp")
METHODS = ("sasrec", "flame")


# ------------------------------------------------------------------------------------ stacks in one epoch loop


def _adam_step_count(state: Optional[dict]) -> int:
    steps = [int(s["step"]) for s in (state or {}).get("state", {}).values()]
    return steps[0] if steps else 0


def train_stacks(slots: list[Slot], models: list[torch.nn.Module], data: Any, device: torch.device) -> None:
    """Train the runs: one stack per (method, Adam step count), all stacks in one epoch loop."""
    groups: dict[tuple, list[int]] = {}
    for i, slot in enumerate(slots):
        if slot.finished_training():
            continue
        groups.setdefault((slot.method, _adam_step_count(slot.optimizer_state)), []).append(i)
    stacks = [Stack([slots[i] for i in idx], [models[i] for i in idx], data, device) for idx in groups.values()]
    live = [slot for stack in stacks for slot in stack.slots]
    if not live:
        return
    # One unit = one pass of the epoch loop over every stack; early stopping may end it before the total.
    total, done = max(s.cfg.train.max_epochs for s in live), min(s.progress.epoch for s in live)
    with Report(total, f"flame table: {len(live)} runs", unit="epoch", initial=done) as report:
        while any(stack.slots for stack in stacks):
            for stack in stacks:
                if stack.slots:
                    stack.epoch()
            report.update()


# ------------------------------------------------------------------------------------ one dataset


def run_dataset(base: Config, name: str, seeds: list[int], methods: list[str], out: Path, resume: bool,
                pairs: bool = True) -> dict[str, list[dict]]:
    """Every run of one dataset: SASRec (and FLAME beside it with a shipped frozen net), FLAME after SASRec
    with our own frozen net, then B2 per pair of seeds. Returns {method: [results]} in seed order."""
    folder = out / name
    device, _ = setup_device(base.train.device)
    data = build_data(load_raw(base.data), base.data)
    data.training_to(device)
    results: dict[str, list[dict]] = {m: [] for m in methods}

    def cfg_of(method: str, seed: int, sasrec_dir: Optional[Path]) -> Config:
        baseline = str(sasrec_dir) if sasrec_dir and method != "sasrec" else base.train.sasrec_run
        train = dataclasses.replace(base.train, seed=seed, sasrec_run=baseline)
        flame = base.flame
        if method == "flame" and base.flame.frozen_source == "own" and not base.flame.frozen:
            flame = dataclasses.replace(flame, frozen=str(sasrec_dir / "frozen.pt"))  # = stage 1 of this seed
        cfg = dataclasses.replace(base, method=dataclasses.replace(base.method, name=method), train=train, flame=flame)
        check_config(cfg)
        return cfg

    sasrec_dirs = {seed: folder / f"sasrec_seed{seed}" for seed in seeds} if "sasrec" in methods else {}
    own = base.flame.frozen_source == "own" and not base.flame.frozen
    if "flame" in methods and own and "sasrec" not in methods:
        raise ValueError("FLAME with flame.frozen_source=own freezes the SASRec run of its seed: add sasrec to "
                         "--methods (or give flame.frozen)")
    phases = [["sasrec"], ["flame"]] if own else [[m for m in methods if m in METHODS]]
    for phase in phases:
        slots, models, done = [], [], []
        for method in phase:
            if method not in methods:
                continue
            for seed in seeds:
                cfg = cfg_of(method, seed, sasrec_dirs.get(seed))
                run_dir = folder / f"{method}_seed{seed}"
                state = comparison_slot(run_dir, cfg)
                if state == "reuse":
                    print(f"reusing the finished run {run_dir}")
                    done.append((method, {**load_json(run_dir / "results.json"), "run_dir": str(run_dir)}))
                    continue
                if not resume and (run_dir / "last.pt").exists():
                    raise FileExistsError(f"{run_dir} holds a stopped run: rerun with --resume, or give another --out")
                frozen, stage1_dir = stage1.frozen_checkpoint(cfg)
                slot = Slot(cfg, run_dir, frozen, stage1_dir)
                models.append(open_slot(slot, data, state == "resume", device))
                slots.append(slot)
        train_stacks(slots, models, data, device)
        finished = {id(s): finish(s, data, device) for s in sorted(slots, key=lambda s: s.method != "sasrec")
                    if s.failed is None}
        for method, record in done:
            results[method].append(record)
        for slot in slots:
            if id(slot) in finished:
                results[slot.method].append(finished[id(slot)])
    for method in results:
        results[method].sort(key=lambda r: r["seed"])
    if pairs and "sasrec" in methods and len(seeds) > 1:
        results["ensemble"] = ensemble_pairs(base, seeds, folder, results["sasrec"])
    return results


def ensemble_pairs(base: Config, seeds: list[int], folder: Path, sasrec: list[dict]) -> list[dict]:
    """B2 = the mean logits of two SASRec runs, one per pair of consecutive seeds (cyclic), nothing trained."""
    from .main import run
    dirs = {r["seed"]: r["run_dir"] for r in sasrec}
    out = []
    pairs = [(a, b) for a, b in zip(seeds, seeds[1:] + seeds[:1]) if a in dirs and b in dirs]
    for a, b in pairs[: len(seeds) if len(seeds) > 2 else 1]:
        method = dataclasses.replace(base.method, name="ensemble", ensemble_members=[dirs[a], dirs[b]])
        cfg = dataclasses.replace(base, method=method, train=dataclasses.replace(base.train, seed=a))
        out.append(run_or_reuse(run, cfg, folder / f"ensemble_seed{a}"))
    return out


# ------------------------------------------------------------------------------------ the tables


def _ms(values: list[Optional[float]], digits: int = 2, suffix: str = "") -> str:
    kept = [v for v in values if isinstance(v, (int, float))]
    if not kept:
        return "—"
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    more = f" ({len(values) - len(kept)} n/a)" if len(kept) < len(values) else ""
    return f"{statistics.mean(kept):.{digits}f}{suffix} ± {std:.{digits}f}{more}"


LABELS = {"sasrec": "SASRec (B1)", "flame": "FLAME", "ensemble": "B2, 2 SASRecs"}


def table_markdown(all_results: dict[str, dict[str, list[dict]]]) -> str:
    """flame/README.md's two tables (test metrics, convergence), each cell mean ± std over the seeds."""
    seeds = sorted({r["seed"] for per in all_results.values() for rs in per.values() for r in rs})
    lines = [f"Test metrics x100 under the reference seen mask, mean ± std over seeds {seeds} "
             f"(B2: over the seed pairs).", "",
             "| dataset | model | best epoch / epochs run | valid NDCG@20 | " + " | ".join(REPORT) + " |",
             "|---|---|---|---|" + "---|" * len(REPORT)]
    for name, per in all_results.items():
        for method, runs in per.items():
            if not runs:
                continue
            epochs = [len(_records(r)) for r in runs] if method != "ensemble" else []
            best = [r.get("best_epoch") for r in runs]
            ran = f"{_ms(best, 0)} / {_ms(epochs, 0)}" if method != "ensemble" else "—"
            cells = [_ms([r["test"]["reference"][k] for r in runs]) for k in REPORT]
            lines.append(f"| {name} | {LABELS.get(method, method)} | {ran} | "
                         f"{_ms([r['valid']['NDCG@20'] for r in runs])} | " + " | ".join(cells) + " |")
    lines += ["", "| dataset | FLAME epochs to SASRec's best | SASRec epochs to its best | faster (epochs) | "
              "FLAME s to SASRec's best | SASRec s to its best | faster (seconds) | rel. test NDCG@20 gain |",
              "|---|---|---|---|---|---|---|---|"]
    for name, per in all_results.items():
        conv = [r.get("convergence", {}) for r in per.get("flame", [])]
        if not conv:
            continue
        num = lambda key: [c.get(key) if isinstance(c.get(key), (int, float)) else None for c in conv]  # noqa: E731
        gain = [100 * g if g is not None else None for g in num("test_ndcg20_gain_rel")]
        lines.append(f"| {name} | {_ms(num('epochs_to_sasrec_best'), 1)} | {_ms(num('sasrec_best_epoch'), 1)} | "
                     f"{_ms(num('speedup_epochs'), 2, '×')} | {_ms(num('seconds_to_sasrec_best'), 0)} | "
                     f"{_ms(num('sasrec_time_to_best_s'), 0)} | {_ms(num('speedup_seconds'), 2, '×')} | "
                     f"{_ms(gain, 2, '%')} |")
    return "\n".join(lines) + "\n"


def _records(result: dict) -> list:
    from common.runs import read_metrics
    return read_metrics(result["run_dir"])


def write_tables(all_results: dict[str, dict[str, list[dict]]], out: Path) -> str:
    from .compare import table
    text = table_markdown(all_results)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "table.md") as handle:
        handle.write(text)
    for name, per in all_results.items():
        per = {m: rs for m, rs in per.items() if rs}
        seeds = sorted({r["seed"] for rs in per.values() for r in rs})
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "summary.md").write_text(table(per, seeds))
        plot({m: rs for m, rs in per.items() if m != "ensemble"}, out / name / "curves.png")
    print("\n" + text)
    return text


# ------------------------------------------------------------------------------------ command line


def parse(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[Config]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, nargs="+",
                        default=[PAPER_DIR / "configs" / f"{d}.yaml" for d in DATASETS],
                        help="one YAML per dataset (default: the five FLAME datasets)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-pairs", action="store_true", help="no B2 runs from the SASRec pairs")
    parser.add_argument("--out", type=Path, required=True, help="the table's folder (run folders inside)")
    parser.add_argument("--resume", action="store_true", help="resume every unfinished run under --out")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: tabulate the finished run folders under --out (e.g. several table "
                             "processes, one per dataset, or run folders unpacked from a GPU campaign's bundle)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every dataset")
    args = parser.parse_intermixed_args(argv)
    bases = [load_config(Config, path, args.overrides) for path in args.configs]
    names = [b.data.name for b in bases]
    if len(set(names)) < len(names):
        raise ValueError(f"--configs name one dataset twice ({names})")
    for base in bases:
        check_config(base)
        if base.method.name not in METHODS:
            pass  # the table sets method.name itself
        fc = base.flame
        if fc.split != "embed_encoder" or fc.path_mixing != "tiled" or fc.num_paths:
            raise ValueError("flame.table runs the reference's FLAME (flame.split=embed_encoder, path_mixing=tiled, "
                             "num_paths=0); run other settings with flame.main or flame.compare")
    return args, bases


def collect(out: Path) -> dict[str, dict[str, list[dict]]]:
    """The finished runs under a table folder: {dataset: {method: [results.json + run_dir], seed order}}."""
    from .compare import method_of
    order = {"sasrec": 0, "flame": 1, "ensemble": 2}
    found: dict[str, dict[str, list[dict]]] = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        runs = [(run, load_json(run / "results.json")) for run in sorted(folder.glob("*_seed*"))
                if (run / "results.json").is_file()]
        if not runs:
            continue
        per: dict[str, list[dict]] = {}
        for run, record in runs:
            per.setdefault(method_of(record), []).append({**record, "run_dir": str(run)})
        found[folder.name] = {m: sorted(per[m], key=lambda r: r["seed"])
                              for m in sorted(per, key=lambda m: (order.get(m, 9), m))}
    return found


def main(argv: Optional[list[str]] = None) -> dict:
    keep_freed_memory()  # as flame.main: freed tensors stay in the process instead of coming back as fresh pages
    args, bases = parse(argv)
    out = args.out.expanduser().resolve()
    if args.report:
        found = collect(out)
        if not found:
            raise FileNotFoundError(f"--report: no finished run folder under {out}")
        write_tables(found, out)
        return found
    all_results = {}
    for base in bases:
        all_results[base.data.name] = run_dataset(base, base.data.name, args.seeds, args.methods, out, args.resume,
                                                  not args.no_pairs)
    write_tables(all_results, out)
    return all_results


if __name__ == "__main__":
    from common.cli import run_cli
    run_cli(main)
