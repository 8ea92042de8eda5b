"""VLM2Rec data parallelism (vlm2rec/docs/method.md §7): 2 CPU processes started by torchrun (gloo, 127.0.0.1)
at batch 4 each end with the parameters of 1 process at batch 8 (dropout 0, to 1e-5), only rank 0 writes, and a
failing rank makes torchrun stop its peer (instead of leaving it waiting in a collective) and exit non-zero."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config", str(ROOT / "vlm2rec/configs/smoke.yaml"), "zero_shot=false", "train.max_epochs=1",
        "train.max_steps_per_epoch=3", "backbone.lora.dropout=0", "eval.protocols=[full]",
        "eval.modality_modes=[both]", "eval.scenarios=[]", "seqrec.enabled=false", "train.grad_norm_every=0"]


def torchrun(args: list[str], module: str = "vlm2rec.main", pythonpath: str = "", timeout: int = 300):
    """`torchrun --standalone --nproc-per-node 2 -m module args` from the repository root, one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.heavy
def test_two_processes_train_the_one_process_objective(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = subprocess.run([sys.executable, "-m", "vlm2rec.main", *ARGS, "train.batch_size=8",
                          f"run_root={tmp_path / 'one'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun([*ARGS, "train.batch_size=4", f"run_root={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-2000:]
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
def test_a_failing_rank_stops_the_launch(tmp_path):
    """Rank 1 fails while rank 0 waits in a barrier (its timeout: 120 s): torchrun stops rank 0 within the
    60-s bound and names rank 1 as the root cause; each rank's error is one line, no traceback of ours."""
    (tmp_path / "rank_fails.py").write_text(RANK_FAILS)
    done = torchrun([], module="rank_fails", pythonpath=str(tmp_path), timeout=60)
    assert done.returncode != 0
    assert "error: rank one cannot read its shard" in done.stderr.splitlines(), done.stderr
    root_cause = done.stderr[done.stderr.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause) and re.search(r"exitcode\s*: 2 ", root_cause)
    assert "[rank0]: Traceback" not in done.stderr
