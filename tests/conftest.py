"""Shared pytest fixtures: where the real (never committed) data lives, and skip rules."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# F3CRec's Flower App and the short smoke run its deployment and simulation tests share.
FLOWER_APP, FLOWER_PACKAGES = ROOT / "f3crec" / "flower" / "app", ["f3crec", "common"]
F3CREC_SMOKE = ROOT / "f3crec" / "configs" / "smoke.yaml"
FLOWER_SHORT = ["federation.rounds=2", "federation.patience=1", "train.stop_after_block=1"]   # 2 blocks, 2 rounds each


def shared_data_root() -> Path | None:
    """REPRO_DATA if set, else ../shared/data beside the checkout; None when neither exists."""
    for candidate in (os.environ.get("REPRO_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


@pytest.fixture
def shared_data() -> Path:
    """Path to the real-data folder; the test is skipped cleanly when it is absent."""
    root = shared_data_root()
    if root is None:
        pytest.skip("real data not available (set REPRO_DATA or place ../shared/data)")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Processed-data caches go to a per-session temp folder, never into the checkout."""
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny models on a 2-core CI box: extra intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def user_error(capsys):
    """Run `main(argv)` as the CLI does (through run_cli) and check the bad-input contract: exit status 2,
    exactly one line on stderr, no traceback. Returns that line for the test to check what it names."""
    from common.cli import run_cli

    def check(main, argv, code: int = 2) -> str:
        capsys.readouterr()
        os.environ.pop("REPRO_DEBUG", None)
        with pytest.raises(SystemExit) as info:
            run_cli(lambda: main(list(argv)))
        err = capsys.readouterr().err
        assert info.value.code == code, f"exit status {info.value.code}, stderr {err!r}"
        assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
        return err.strip()
    return check


def sigkill_when_logged(module: str, argv: list, run_dir: Path, logged, timeout: float = 120.0):
    """Run `python -m module argv` writing into `run_dir` and SIGKILL it as soon as a metrics.jsonl line
    satisfies logged(line) (a kill in the middle of an epoch or block). Returns (exit status, stderr)."""
    import signal
    import subprocess
    import sys
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            path = run_dir / "metrics.jsonl"
            if any(logged(line) for line in (path.read_text().splitlines() if path.exists() else [])):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        stderr = proc.communicate()[1].decode()
    return proc.returncode, stderr


def late_joiner_blocks(folder: Path, seed: int = 1) -> Path:
    """The smoke stream with a third of the users entering only in the last 40 % of the time line, so
    every incremental block brings new users (the released ML-100K blocks bring ~110 per block, §1.2)."""
    from f3crec.data import build_blocks, synthetic_stream, write_blocks
    import numpy as np
    stream = synthetic_stream(60, 50, 2400, seed)
    late = stream["user"] % 3 == 0
    stream["timestamp"] = np.where(late, stream["timestamp"] // 2 + 2 * stream["timestamp"].max(),
                                   stream["timestamp"])
    write_blocks(folder, build_blocks(stream, seed, core=3), {"dataset": "synthetic-late-joiners"})
    return folder


def flower_records(run_dir: Path) -> list[dict]:
    """The round records of a run's metrics.jsonl that two F3CRec federations must agree on."""
    import json
    keep = ("block", "round", "val_ndcg", "val_recall", "D_mean", "m_mean", "m_hist", "D_hist", "itm_w", "lost_users")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture
def results_schema():
    """check(results.json, paper): the layout every paper's results.json starts with (common/runs.py
    RESULT_KEYS, the same keys in the same order for the three papers), its provenance filled in, and its
    metrics as fractions under keys like test/ndcg@20. Returns the parsed file."""
    import json
    import re

    from common.results import HEADLINE
    from common.results import RESULT_KEYS, RESULTS_SCHEMA
    from common.runs import config_digest, saved_config

    def check(path: Path, paper: str) -> dict:
        saved = json.loads(Path(path).read_text())
        assert tuple(saved)[: len(RESULT_KEYS)] == RESULT_KEYS
        assert saved["schema"] == RESULTS_SCHEMA and saved["paper"] == paper
        for key in ("dataset", "method", "seed", "device", "commit", "started", "finished"):
            assert saved[key] not in (None, ""), key
        assert isinstance(saved["threads"], int) and saved["threads"] >= 1
        assert {"python", "torch", "numpy"} <= set(saved["versions"]) and saved["started"] <= saved["finished"]
        assert saved["config_digest"] == config_digest(saved_config(Path(path).parent))
        metrics = saved["metrics"]
        assert HEADLINE[paper][0] in metrics
        for key, value in metrics.items():
            assert re.fullmatch(r"(test|valid)(/[a-z0-9_]+)*/[a-z]+@\d+", key), key
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
        return saved
    return check
