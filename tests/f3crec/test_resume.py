"""F3CRec kill-and-resume: a smoke run SIGKILLed in the middle of block 1 and resumed with --resume leaves
the same results.json (provenance and timings aside) and the same metrics.jsonl (timings aside) as a run
that was never interrupted; a fresh start into a folder empties its stale records."""
import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import sigkill_when_logged

from f3crec.main import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "f3crec" / "configs" / "smoke.yaml")
# More rounds than the smoke config widen the window in which the kill lands inside block 1.
ROUNDS = ["federation.rounds=8", "federation.patience=8"]
PROVENANCE = {"git_sha", "commit", "config_digest", "versions", "device", "python", "started", "finished"}


def untimed(value):
    """`value` without its wall-clock fields (`seconds` of rounds and blocks) and provenance."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k != "seconds" and k not in PROVENANCE}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def records(run: Path) -> list[dict]:
    return [untimed(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def results(run: Path) -> dict:
    return untimed(json.loads((run / "results.json").read_text()))


@pytest.mark.heavy
def test_sigkill_in_the_middle_of_a_block_then_resume_equals_an_uninterrupted_run(tmp_path):
    main(["--config", SMOKE, "--run-dir", str(tmp_path / "full"), *ROUNDS])
    cut = tmp_path / "cut"
    status, stderr = sigkill_when_logged("f3crec.main", ["--config", SMOKE, "--run-dir", str(cut), *ROUNDS], cut,
                                         lambda line: line.startswith('{"block": 1,'))
    assert status == -signal.SIGKILL, stderr[-2000:]
    assert torch.load(cut / "last.pt", weights_only=True)["block"] == 0 and not (cut / "results.json").exists()
    logged = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    assert any(r["block"] == 1 for r in logged)                   # the kill left part of block 1 behind
    with open(cut / "metrics.jsonl", "a") as handle:              # and, as a kill may, a cut-short line
        handle.write('{"block": 1, "round": 7, "val_nd')

    main(["--resume", str(cut)])
    assert records(cut) == records(tmp_path / "full")            # block 1's partial records were dropped
    assert results(cut) == results(tmp_path / "full")


def test_a_fresh_start_into_a_used_folder_keeps_no_stale_record(tmp_path):
    run = tmp_path / "run"
    main(["--config", SMOKE, "--run-dir", str(run), "federation.rounds=2", "federation.patience=2"])
    first = (run / "metrics.jsonl").read_bytes()
    # --overwrite (without it the folder is refused, tests/common/test_trust.py): the earlier run moves aside
    main(["--config", SMOKE, "--run-dir", str(run), "federation.rounds=1", "train.stop_after_block=0", "--overwrite"])
    assert [(r["block"], r["round"]) for r in records(run)] == [(0, 0)]
    assert [(p / "metrics.jsonl").read_bytes() for p in run.glob("previous-*")] == [first]
