"""Methods × seeds on one config: a markdown table of LA / RA / H-mean (mean ± std) and optional plots.

    python -m f3crec.compare --config f3crec/configs/ml-100k.yaml --seeds 1 2 3 \
        --methods ft arm itm f3crec data.blocks=$REPRO_DATA/f3crec-ml-100k-blocks
    (make f3crec-compare DATA=ml-100k SEEDS="1 2 3")

Every (seed, method) run writes its own run directory `<method>_seed<seed>/` under --out (default
<run root>/f3crec/compare/<config stem>/, which also gets summary.md, summary.csv and the plots); the base
block is trained once per seed and reused through the base cache (§8.6). Results are the values after the last block (t = 3) [D].
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path
from typing import get_args

from common.config import dry_run_plan, load_config, parse_with_overrides
from common.results import write_summary
from common.runs import default_run_root, run_name, run_or_reuse

from .config import Config, MethodName
from .main import run

DEFAULT_METHODS = ("ft", "arm", "itm", "f3crec")


def _cell(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def table(results: dict[str, list[dict]]) -> str:
    """Markdown table: one row per method, LA/RA/H after the last block for NDCG@20 and Recall@20."""
    head = "| method | N@20 LA | N@20 RA | N@20 H | R@20 LA | R@20 RA | R@20 H | seeds |"
    lines = [head, "|" + "---|" * 8]
    for method, runs in results.items():
        cells = [_cell([r["summary"][m]["per_block"][-1][k] for r in runs])
                 for m in ("ndcg", "recall") for k in ("LA", "RA", "H")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def a_matrix_figure(results: dict[str, list[dict]], metric: str = "ndcg", label: str = "NDCG@20"):
    """The a_{t,i} heat-maps, one panel per method in a grid (at most 3 columns), all on ONE colour scale
    (shared vmin/vmax, one colorbar) so the methods can be compared cell by cell; each cell is also written
    out as a number. Returns the matplotlib figure (the caller saves and closes it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    grids = {}
    for method, runs in results.items():
        size = len(runs[0]["summary"][metric]["a"])
        grid = np.full((size, size), np.nan)
        for t in range(size):
            grid[t, : t + 1] = np.mean([r["summary"][metric]["a"][t] for r in runs], axis=0)
        grids[method] = grid
    values = np.concatenate([g[np.isfinite(g)] for g in grids.values()] or [np.zeros(1)])
    norm = matplotlib.colors.Normalize(vmin=float(values.min()), vmax=float(values.max()))
    cols = min(3, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.2, 3.2 * rows + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for ax, (method, grid) in zip(axes.flat, grids.items()):
        image = ax.imshow(grid, cmap="viridis", norm=norm)
        size = grid.shape[0]
        ax.set(title=method, xlabel="evaluated on block i", ylabel="after training block t",
               xticks=range(size), yticks=range(size))
        if size <= 6:
            middle = (norm.vmin + norm.vmax) / 2
            for t in range(size):
                for i in range(t + 1):
                    ax.text(i, t, f"{grid[t, i]:.3f}", ha="center", va="center", fontsize=7,
                            color="black" if grid[t, i] > middle else "white")
    for ax in list(axes.flat)[len(grids):]:
        ax.set_visible(False)
    seeds = max(len(runs) for runs in results.values())
    fig.suptitle(f"a(t,i): test {label} on block i after block t, mean over {seeds} seed(s)")
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"test {label}")
    return fig


def plots(results: dict[str, list[dict]], out: Path) -> list[Path]:
    """a_{t,i} heat-map per method and LA/RA per block (NDCG@20), averaged over seeds. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    written = []
    fig = a_matrix_figure(results)
    written.append(out / "a_matrix_ndcg20.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, layout="constrained")
    for method, runs in results.items():
        for ax, key in zip(axes, ("LA", "RA")):
            curve = np.mean([[b[key] for b in r["summary"]["ndcg"]["per_block"]] for r in runs], axis=0)
            ax.plot(range(len(curve)), curve, marker="o", label=method)
            ax.set(title=f"{key} (NDCG@20)", xlabel="after block t", xticks=range(len(curve)))
    axes[0].set_ylabel("test NDCG@20 (mean over seeds)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    written.append(out / "la_ra_per_block.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--out", type=Path, default=None, help="default <run root>/f3crec/compare/<config stem>")
    parser.add_argument("--dry-run", action="store_true", help="check the config, print the plan and exit 0")
    parser.add_argument("overrides", nargs="*", help="dotted overrides passed to every run (anywhere)")
    args = parse_with_overrides(parser, argv)
    unknown = sorted(set(args.methods) - set(get_args(MethodName)))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(get_args(MethodName))}")
    base = load_config(Config, args.config, args.overrides)
    out = args.out or Path(base.run_root or default_run_root()) / "f3crec" / "compare" / Path(args.config).stem
    if args.dry_run:
        dry_run_plan(Config, base, args.config, f"compare {args.methods} x seeds {args.seeds} into {out}")
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            run_dir = out / run_name(method, seed)
            cfg = replace(base, train=replace(base.train, seed=seed), method=replace(base.method, name=method))
            # finished earlier with this config: reused; stopped: resumed; another config's: refused
            results[method].append({**run_or_reuse(run, cfg, run_dir), "run_dir": str(run_dir)})
    text = table(results)
    for path in write_summary(out, [r for runs in results.values() for r in runs], text):
        print(f"summary: {path}")
    print(text)
    try:
        for path in plots(results, out):
            print(f"plot: {path}")
    except ImportError:
        print("matplotlib not installed: plots skipped (pip install '.[plot]')")
    return text


if __name__ == "__main__":
    main()
