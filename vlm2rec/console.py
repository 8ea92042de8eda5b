"""What a VLM2Rec run prints: progress per phase (epochs, steps, encoding, feature caching), log lines that
never tear a bar, and one results table at the end.

On a terminal, bars on stderr; in a log file, a pipe or CI (nohup, SLURM) plain progress lines with the time
left on stdout, which the run's log.txt copies (common/progress.py).
"""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

from common.progress import track

T = TypeVar("T")
METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")


def bar(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False, unit: str = "batch",
        **options) -> Iterable[T]:
    """Progress over `iterable` (common.progress): a tqdm bar on a terminal; in a log, a line every 30 s or
    10 % with the time left, once the phase has run 10 s (feature caching, encoding, epochs, steps)."""
    return track(iterable, f"vlm2rec {desc}", total=total, unit=unit, leave=leave, **options)


def say(text: str) -> None:
    """Print one log line above any open bar (tqdm clears and redraws it)."""
    tqdm.write(text, file=sys.stdout)


def results_table(results: dict) -> str:
    """The test metrics as one table: rows protocol x mode (clean), then each robustness scenario's
    fused row, then SASRec; columns HR/NDCG at 10 and 20 where computed."""
    test = results.get("test", {})
    rows = [(f"{protocol} {mode}", m) for protocol, by_mode in test.get("clean", {}).items() if protocol != "geometry"
            for mode, m in by_mode.items()]
    for scenario, out in test.items():
        if scenario != "clean":
            rows += [(f"{protocol} both, {scenario}", by_mode["both"]) for protocol, by_mode in out.items()
                     if protocol != "geometry" and "both" in by_mode]
    seqrec = results.get("seqrec", {}).get("test", {})
    rows += [(f"{protocol} SASRec ({results['seqrec']['init']})", m) for protocol, m in seqrec.items()]
    columns = [k for k in METRICS if any(k in m for _, m in rows)]
    width = max([len("test")] + [len(name) for name, _ in rows])
    lines = [f"{'test':<{width}}  " + "  ".join(f"{c:>7}" for c in columns)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{m[c]:7.4f}" if c in m else f"{'-':>7}" for c in columns)
              for name, m in rows]
    return "\n".join(lines)
