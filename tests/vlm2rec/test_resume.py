"""VLM2Rec kill-and-resume (vlm2rec/docs/method.md §16): a smoke run SIGKILLed in the middle of an epoch and
resumed with --resume leaves the same results.json (provenance and timings aside) and the same
metrics.jsonl as a run that was never interrupted."""
import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import sigkill_when_logged

from vlm2rec.main import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "vlm2rec/configs/smoke.yaml")
# Full epochs (about ten steps each) widen the window in which the kill lands inside epoch 1.
QUICK = ["eval.scenarios=[]", "seqrec.enabled=false", "train.max_steps_per_epoch=0"]
PROVENANCE = {"run_dir", "plot", "git_sha", "commit", "config_digest", "versions", "device", "python", "started", "finished"}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def results(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "results.json").read_text()).items() if k not in PROVENANCE}


@pytest.mark.heavy
def test_sigkill_in_the_middle_of_an_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    main(["--config", SMOKE, "--run-dir", str(tmp_path / "full"), *QUICK])
    cut = tmp_path / "cut"
    status, stderr = sigkill_when_logged("vlm2rec.main", ["--config", SMOKE, "--run-dir", str(cut), *QUICK], cut,
                                         lambda line: '"epoch": 1,' in line and '"lr"' in line)
    assert status == -signal.SIGKILL, stderr[-2000:]
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 0 and not (cut / "results.json").exists()
    assert any(r.get("epoch") == 1 for r in records(cut))       # the kill left part of epoch 1 behind

    resumed = main(["--resume", str(cut)])
    assert records(cut) == records(tmp_path / "full")            # epoch 1's partial records were dropped
    assert results(cut) == results(tmp_path / "full")
    assert "zero_shot_valid" in resumed and resumed["best_epoch"] >= 0
