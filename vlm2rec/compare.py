"""Plain contrastive SFT vs +WPCL vs +CRTR vs VLM2Rec (both): four configs of one trainer, over seeds.

    python -m vlm2rec.compare --config vlm2rec/configs/ml-100k.yaml --seeds 0 1 2 [key=value ...]
    make vlm2rec-compare DATA=ml-100k SEEDS="0 1 2"

Each (variant, seed) is one `run(cfg)`; the table gives mean ± std over seeds of the test metrics for
both protocols and every modality mode, the text/image gradient-norm ratios (first vs last epoch), the
effective ranks of the item embeddings and the SASRec-from-embeddings result. Writes summary.md (the
tables), summary.csv (one row per run, common/results.py) and summary.json (every run's results) into
--out, default <run root>/vlm2rec/compare/<config stem>/, beside the runs `<method>_seed<seed>/`.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common.config import dry_run_plan, load_config, parse_with_overrides
from common.io import git_sha, save_json
from common.results import write_summary
from common.runs import default_run_root, read_metrics, run_name, run_or_reuse
from common.cli import run_cli

from .config import Config, check_config
from .main import method_name, run

VARIANTS = {
    "plain SFT": ["wpcl.enabled=false", "crtr.enabled=false"],
    "+WPCL": ["wpcl.enabled=true", "crtr.enabled=false"],
    "+CRTR": ["wpcl.enabled=false", "crtr.enabled=true"],
    "VLM2Rec (both)": ["wpcl.enabled=true", "crtr.enabled=true"],
}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def grad_ratios(run_dir: str) -> dict[str, float]:
    """Mean text/image gradient-norm ratio over the first and the last epoch's logged steps."""
    records = [r for r in read_metrics(run_dir) if "grad_ratio_u" in r]
    if not records:
        return {}
    first, last = min(r["epoch"] for r in records), max(r["epoch"] for r in records)
    out = {}
    for side in ("u", "e"):
        for name, epoch in (("first", first), ("last", last)):
            values = [r[f"grad_ratio_{side}"] for r in records if r["epoch"] == epoch]
            out[f"grad_ratio_{side}_{name}"] = statistics.mean(values)
    return out


def summarise(runs: dict[str, list[dict]]) -> str:
    """Markdown tables from {variant: [results per seed]}."""
    lines = []
    for protocol, label in (("sampled", "P1 sampled (1 + 100 negatives, pessimistic ties)"),
                            ("full", "P2 full ranking (history masked)")):
        lines += [f"\n**Test, {label}** — direct retrieval, NDCG@10 / HR@10 by modality mode\n",
                  "| variant | both NDCG@10 | both HR@10 | text NDCG@10 | image NDCG@10 | image HR@10 |",
                  "|---|---|---|---|---|---|"]
        for variant, results in runs.items():
            cell = lambda mode, metric: _mean_std([r["test"]["clean"][protocol][mode][metric] for r in results])
            lines.append(f"| {variant} | {cell('both', 'NDCG@10')} | {cell('both', 'HR@10')} | "
                         f"{cell('text', 'NDCG@10')} | {cell('image', 'NDCG@10')} | {cell('image', 'HR@10')} |")
    lines += ["\n**Collapse diagnostics** (training log; test item embeddings)\n",
              "| variant | grad ratio u T/V (first → last epoch) | grad ratio e T/V (first → last) | "
              "erank text | erank image | alignment |", "|---|---|---|---|---|---|"]
    for variant, results in runs.items():
        ratios = [r["grad_ratios"] for r in results if r["grad_ratios"]]
        pick = lambda key: _mean_std([x[key] for x in ratios]) if ratios else "n/a"
        geo = lambda key: _mean_std([r["test"]["clean"]["geometry"][key] for r in results])
        lines.append(f"| {variant} | {pick('grad_ratio_u_first')} → {pick('grad_ratio_u_last')} | "
                     f"{pick('grad_ratio_e_first')} → {pick('grad_ratio_e_last')} | {geo('erank_text')} | "
                     f"{geo('erank_image')} | {geo('alignment')} |")
    lines += ["\n**Robustness** (test, P2 full, both modes fused, NDCG@10) and **SASRec** initialised from the "
              "fused item table (test, P2 NDCG@10 / P1 NDCG@10)\n",
              "| variant | clean | missing image | missing title | noisy image | SASRec P2 | SASRec P1 |",
              "|---|---|---|---|---|---|---|"]
    for variant, results in runs.items():
        robust = lambda scenario: _mean_std([r["test"][scenario]["full"]["both"]["NDCG@10"] for r in results
                                             if scenario in r["test"]]) if all(scenario in r["test"] for r in results) else "n/a"
        seq = lambda p: _mean_std([r["seqrec"]["test"][p]["NDCG@10"] for r in results]) if all("seqrec" in r for r in results) else "n/a"
        lines.append(f"| {variant} | {robust('clean')} | {robust('missing_image')} | {robust('missing_title')} | "
                     f"{robust('noisy_image')} | {seq('full')} | {seq('sampled')} |")
    return "\n".join(lines)


def compare(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the runs and summary.md/.csv/.json (default: <run root>/vlm2rec/compare/<config stem>)")
    parser.add_argument("--dry-run", action="store_true", help="check the config, print the plan and exit 0")
    parser.add_argument("overrides", nargs="*", help="dotted overrides passed to every run (anywhere)")
    args = parse_with_overrides(parser, argv)
    base = load_config(Config, args.config, args.overrides)
    out_dir = args.out or Path(base.run_root or default_run_root()) / "vlm2rec" / "compare" / Path(args.config).stem
    if args.dry_run:
        for variant in args.variants:  # every variant's config resolves and passes its checks
            check_config(load_config(Config, args.config, [*VARIANTS[variant], *args.overrides]))
        dry_run_plan(Config, load_config(Config, args.config, args.overrides), args.config,
                     f"compare {args.variants} x seeds {args.seeds} into {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            slug = variant.split()[0].strip("+()").lower()  # = main.method_name of the variant's config
            cfg = load_config(Config, args.config, [*VARIANTS[variant], f"train.seed={seed}", f"tag={slug}",
                                                    *args.overrides])
            run_dir = out_dir / run_name(method_name(cfg), seed)
            results = run_or_reuse(run, cfg, run_dir)
            results["grad_ratios"] = grad_ratios(str(run_dir))
            runs.setdefault(variant, []).append(results)
    table = summarise(runs)
    header = f"seeds {args.seeds}, commit {git_sha()}, config {args.config} {' '.join(args.overrides)}"
    write_summary(out_dir, [r for results in runs.values() for r in results], header + "\n" + table + "\n")
    save_json(out_dir / "summary.json", {"seeds": args.seeds, "git_sha": git_sha(), "config": args.config,
                                         "overrides": args.overrides, "runs": runs})
    print(header)
    print(table)
    return runs


if __name__ == "__main__":
    run_cli(compare)
