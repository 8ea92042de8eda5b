"""F3CRec under concurrent runs: two runs needing one base block train it once (the second waits on the
cache entry's lock, then loads it), and two processes writing one block folder leave valid files."""
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import load_config
from f3crec.config import Config, resolve
from f3crec.data import get_blocks, load_blocks
from f3crec.train import base_cache_path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "f3crec" / "configs" / "smoke.yaml")


def env() -> dict:
    """The subprocesses' environment (built per test: it carries the test's $REPRO_CACHE)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _wait_for(predicate, what: str, procs, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        failed = [p for p in procs if p.poll() not in (None, 0)]
        assert not failed and time.time() < deadline, f"{what}: " + " | ".join(
            p.communicate()[1].decode()[-800:] for p in failed)
        time.sleep(0.02)


def _log(run: Path) -> str:
    return (run / "log.txt").read_text() if (run / "log.txt").exists() else ""


@pytest.mark.heavy
def test_two_runs_needing_one_base_block_train_it_once(tmp_path):
    overrides = ["federation.rounds=2", "federation.patience=2", "train.share_base=true",
                 f"train.base_cache={tmp_path / 'base'}", "train.stop_after_block=0"]
    cfg, flags = resolve(load_config(Config, SMOKE, overrides))
    entry = base_cache_path(cfg, flags, get_blocks(cfg.data, cfg.train.seed)[1])
    entry.parent.mkdir(parents=True)
    runs = [tmp_path / "ft", tmp_path / "itm"]
    with open(entry.parent / f"{entry.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # this test is "another run" training the base block
        procs = [subprocess.Popen([sys.executable, "-m", "f3crec.main", "--config", SMOKE, "--run-dir", str(run),
                                   *overrides, f"method.name={run.name}"], env=env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for run in runs]
        try:
            _wait_for(lambda: all("being trained by another run: waiting" in _log(r) for r in runs),
                      "both runs wait for the lock", procs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)   # now one of them trains it and the other must load it
        for proc in procs:
            assert proc.wait(timeout=120) == 0, proc.communicate()[1].decode()[-2000:]
    records = {r: [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs}
    trained = [r for r in runs if records[r] and not any(rec.get("reused") for rec in records[r])]
    loaded = [r for r in runs if "base block loaded from" in _log(r)]
    assert len(trained) == 1 and loaded == [r for r in runs if r not in trained], (trained, loaded)
    # the loading run's metrics.jsonl holds the trained run's block-0 records, each marked as reused
    assert [{k: v for k, v in rec.items() if k not in ("reused", "reused_from")} for rec in records[loaded[0]]] \
        == records[trained[0]] and all(rec["reused_from"] == entry.name for rec in records[loaded[0]])
    first, second = (json.loads((r / "results.json").read_text())["summary"]["ndcg"]["a"] for r in runs)
    assert first == second                                  # one base block, shared
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, f"{entry.name}.lock"])


WRITER = """
import sys
from pathlib import Path
from f3crec.data import build_blocks, synthetic_stream, write_blocks
blocks = build_blocks(synthetic_stream(60, 50, 2400, 1), 1, core=3)
for _ in range(int(sys.argv[2])):
    write_blocks(Path(sys.argv[1]), blocks, {"dataset": "synthetic"})
"""


@pytest.mark.heavy
def test_two_block_writers_leave_valid_files(tmp_path):
    folder = tmp_path / "blocks"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), "40"], env=env(), stderr=subprocess.PIPE)
             for _ in range(2)]
    reads = 0
    while any(p.poll() is None for p in procs):           # a reader never sees half a file
        if (folder / "block_3.json").is_file():
            assert len(load_blocks(folder)) == 4
            reads += 1
    for proc in procs:
        assert proc.wait() == 0, proc.communicate()[1].decode()[-2000:]
    assert reads > 0 and len(load_blocks(folder)) == 4
    assert sorted(p.name for p in folder.iterdir()) == [f"block_{t}.json" for t in range(4)]   # no temp file left
