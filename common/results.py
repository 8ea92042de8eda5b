"""Every run under the run root in one CSV and one markdown table per paper; the summaries of `compare`.

    python -m common.results                      # (make results) reads <run root> = $REPRO_RUNS or ./runs
    python -m common.results --root runs --out runs/results

A run is a folder with a results.json (RESULT_KEYS below, written by common/runs.py write_results: paper, dataset, method, variant, seed,
metrics as fractions, commit, ...). Writes into --out (default `<run root>/results/`):
  results.csv                one row per run, every paper, every metric key as a column
  <paper>.csv, <paper>.md    that paper's runs; the .md has mean ± std over seeds per (dataset, method,
                             variant) on the paper's headline metrics, then one row per run
It only reads run folders: nothing is written inside one. Folders that an --overwrite set aside
(`previous-<time>/`) are not runs of today and are left out; a results.json that cannot be read is named on
the console and left out. A results.json from before the common layout (no `schema`) gives a row with what
it has (paper from its place under the root), without metrics.

`write_summary(out_dir, runs, markdown)` is what each paper's compare writes: summary.csv (one row per run,
the same columns as results.csv) and summary.md (the compare's own table).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from pathlib import Path
from typing import Iterable, Optional

from common.io import atomic_write, default_run_root

# Identity columns of every CSV row (then "metric keys", sorted), and each paper's headline metrics for its
# markdown table (the metric keys its README's tables report; RESULT_KEYS below explains the key grammar).
IDENTITY = ("paper", "dataset", "method", "variant", "seed", "threads", "device", "commit", "config_digest",
            "started", "finished", "run_dir")
HEADLINE = {
    "flame": ("test/ndcg@20", "test/hr@20", "test/ndcg@10", "test/neg_inf/ndcg@20", "valid/ndcg@20"),
    "vlm2rec": ("test/ndcg@10", "test/hr@10", "test/full/ndcg@10", "test/full/hr@10", "test/seqrec/full/ndcg@10"),
    "f3crec": ("test/ndcg@20", "test/la/ndcg@20", "test/ra/ndcg@20", "test/recall@20", "valid/ndcg@20"),
}
ASIDE = "previous-"  # prefix of the folders that --overwrite moves an earlier run's records into (common/run_folder.py)


# The keys every results.json starts with, the same in the three papers (common/runs.py write_results):
#   schema         RESULTS_SCHEMA, the version of this layout
#   paper, dataset, method, variant (None, or what tells two runs of one method apart), seed
#   metrics        {"<split>[/<qualifier>...]/<metric>@<k>": fraction in [0, 1]}, lower-case metric names, e.g.
#                  "test/ndcg@20", "valid/recall@10", "test/neg_inf/ndcg@20"; the unqualified "test/..." keys
#                  are the protocol the paper's own tables report (each paper's README says which)
#   threads        torch's intra-op threads, device, versions ({"python", "torch", "numpy", and
#                  "transformers", "accelerate", "peft", "flwr" when the run imported them})
#   commit         git sha (+ "+dirty"), config_digest (sha256/16 of config.yaml), started, finished
# What follows them is the paper's own detail (its tables, per-block rows, diagnostics), in its own units.
RESULTS_SCHEMA = 1
RESULT_KEYS = ("schema", "paper", "dataset", "method", "variant", "seed", "metrics", "threads", "device",
               "versions", "commit", "config_digest", "started", "finished")


def flat_metrics(tree: dict, prefix: str, scale: float = 1.0) -> dict[str, float]:
    """{"<prefix>/<path>/<metric>@<k>": value * scale} of the ranking metrics in a nested dict (leaves whose
    key holds "@", e.g. "NDCG@20"; metric names lower-cased; other leaves, like diagnostics, left out).
    flat_metrics({"NDCG@20": 47.1}, "valid", 0.01) == {"valid/ndcg@20": 0.471}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}/{key}", scale))
        elif "@" in str(key) and isinstance(value, (int, float)):
            out[f"{prefix}/{str(key).lower()}"] = float(value) * scale
    return out

def row_of(results: dict, run_dir: Path | str, paper: Optional[str] = None) -> dict:
    """One CSV row of a results.json: the identity columns, then its metrics by key."""
    row = {key: results.get(key) for key in IDENTITY}
    row["paper"] = results.get("paper") or paper
    row["commit"] = results.get("commit") or results.get("git_sha")  # older results.json
    row["run_dir"] = str(run_dir)
    metrics = results.get("metrics") if isinstance(results.get("metrics"), dict) else {}
    row.update({key: value for key, value in metrics.items() if isinstance(value, (int, float))})
    return row


def find_runs(root: Path) -> Iterable[Path]:
    """Every results.json under `root`, sorted, outside set-aside folders (previous-<time>/)."""
    for path in sorted(root.rglob("results.json")):
        if not any(part.startswith(ASIDE) for part in path.relative_to(root).parts[:-1]):
            yield path


def gather(root: Path) -> tuple[list[dict], list[str]]:
    """(rows, problems): one row per readable results.json under `root`; a line per unreadable one."""
    rows, problems = [], []
    for path in find_runs(root):
        try:
            results = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{path}: not readable ({type(err).__name__}), left out")
            continue
        if not isinstance(results, dict):
            problems.append(f"{path}: not a results mapping, left out")
            continue
        rows.append(row_of(results, path.parent, path.relative_to(root).parts[0]))
    return rows, problems


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV: identity columns, then every metric key (sorted); empty cells where a run has none."""
    metric_keys = sorted({key for row in rows for key in row if key not in IDENTITY})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*IDENTITY, *metric_keys])
    for row in rows:
        writer.writerow([_cell(row.get(key)) for key in (*IDENTITY, *metric_keys)])
    return buffer.getvalue()


def mean_std(values: list[float]) -> str:
    """"0.0714 ± 0.0012 (3)" over the runs that have the metric; "–" when none has."""
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f} ({len(values)})"


def paper_markdown(paper: str, rows: list[dict]) -> str:
    """A paper's table: mean ± std over seeds per (dataset, method, variant), then one row per run."""
    columns = HEADLINE.get(paper) or tuple(sorted({k for row in rows for k in row if k not in IDENTITY}))[:5]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((str(row["dataset"]), str(row["method"]), str(row["variant"] or "")), []).append(row)
    lines = [f"## {paper}", "", "Test and validation metrics as fractions; mean ± std (runs) over seeds.", "",
             "| dataset | method | variant | seeds | " + " | ".join(columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    for (dataset, method, variant), members in sorted(groups.items()):
        seeds = ", ".join(sorted({str(r["seed"]) for r in members}))
        cells = [mean_std([float(r[c]) for r in members if isinstance(r.get(c), (int, float))]) for c in columns]
        lines.append(f"| {dataset} | {method} | {variant} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "| run folder | seed | commit | finished | " + " | ".join(columns) + " |",
              "|---|---|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), (int, float)) else "–" for c in columns]
        lines.append(f"| {row['run_dir']} | {_cell(row['seed'])} | {_cell(row['commit'])} | "
                     f"{_cell(row['finished'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def write_summary(out_dir: Path, runs: list[dict], markdown: str) -> list[Path]:
    """A compare's outputs in `out_dir`: summary.csv (one row per run in `runs`, results dicts with their
    run_dir) and summary.md (`markdown`, the compare's own table). Returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row_of(r, r.get("run_dir", "")) for r in runs]
    _write(out_dir / "summary.csv", csv_text(rows))
    _write(out_dir / "summary.md", markdown if markdown.endswith("\n") else markdown + "\n")
    return [out_dir / "summary.csv", out_dir / "summary.md"]


def write_tables(root: Path, out: Path) -> list[Path]:
    """results.csv, <paper>.csv and <paper>.md in `out` from every run under `root` (see the docstring)."""
    root = root.expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"run root {root} does not exist (set $REPRO_RUNS or give --root)")
    rows, problems = gather(root)
    for line in problems:
        print(line)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.csv"]
    _write(written[0], csv_text(rows))
    for paper in sorted({str(row["paper"]) for row in rows}):
        mine = [row for row in rows if str(row["paper"]) == paper]
        _write(out / f"{paper}.csv", csv_text(mine))
        _write(out / f"{paper}.md", paper_markdown(paper, mine))
        written += [out / f"{paper}.csv", out / f"{paper}.md"]
    print(f"{len(rows)} run(s) under {root}: " + ", ".join(str(path) for path in written))
    return written


def main(argv: Optional[list[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="run root (default: $REPRO_RUNS, else ./runs)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run root>/results)")
    args = parser.parse_args(argv)
    root = args.root or default_run_root()
    return write_tables(root, args.out or root / "results")


if __name__ == "__main__":
    from common.cli import run_cli
    run_cli(main)
