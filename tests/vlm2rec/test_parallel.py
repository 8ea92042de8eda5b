"""VLM2Rec data parallelism (vlm2rec/docs/method.md §7): 2 CPU processes (gloo, 127.0.0.1) at batch 4 each end
with the parameters of 1 process at batch 8 (dropout 0, to 1e-5), only rank 0 writes, and a failing rank
ends the launch in one line instead of leaving its peer waiting in a collective."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm2rec.launch import launch

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config", str(ROOT / "vlm2rec/configs/smoke.yaml"), "zero_shot=false", "train.max_epochs=1",
        "train.max_steps_per_epoch=3", "backbone.lora.dropout=0", "eval.protocols=[full]",
        "eval.modality_modes=[both]", "eval.scenarios=[]", "seqrec.enabled=false", "train.grad_norm_every=0"]


@pytest.mark.heavy
def test_two_processes_train_the_one_process_objective(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = subprocess.run([sys.executable, "-m", "vlm2rec.main", *ARGS, "train.batch_size=8",
                          f"run_root={tmp_path / 'one'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert one.returncode == 0, one.stderr[-2000:]
    assert launch(2, [*ARGS, "train.batch_size=4", f"run_root={tmp_path / 'two'}"], "vlm2rec.main", grace_s=5) == 0
    runs = {name: list((tmp_path / name).glob("vlm2rec/*/*")) for name in ("one", "two")}
    assert len(runs["two"]) == 1 and len(runs["one"]) == 1           # rank 1 claimed no folder of its own
    a, b = (torch.load(runs[n][0] / "last.pt", weights_only=True)["model"] for n in ("one", "two"))
    assert a.keys() == b.keys() and a
    moved = [k for k in a if "lora_B" in k and a[k].abs().max() > 1e-3]
    assert moved                                                    # three steps moved the adapters off zero
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)
    # the logged global statistics (loss, WPCL's gamma, CRTR) are those of the one process
    logs = [[json.loads(line) for line in (runs[n][0] / "metrics.jsonl").read_text().splitlines()] for n in runs]
    steps = [[(r["loss"], r["gamma"], r["loss_crtr"]) for r in log if "loss" in r] for log in logs]
    assert len(steps[0]) == len(steps[1]) > 0
    for x, y in zip(*steps):
        assert all(abs(p - q) < 1e-5 for p, q in zip(x, y)), (x, y)


RANK_FAILS = """
import os, sys, datetime
import torch.distributed as dist
from common.cli import run_cli
def main(argv=None):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    if dist.get_rank() == 1:
        raise ValueError("rank one cannot read its shard")
    dist.barrier()                      # rank 0 would wait here for the dead peer
run_cli(main)
"""


@pytest.mark.heavy
def test_a_failing_rank_ends_the_launch_in_one_line(tmp_path, monkeypatch, capfd):
    (tmp_path / "rank_fails.py").write_text(RANK_FAILS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    status = launch(2, [], "rank_fails", grace_s=2)
    err = capfd.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "rank one cannot read its shard" in err[0] and "rank 1 of 2" in err[0]
