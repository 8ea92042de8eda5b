"""FLAME data parallel on the CPU (gloo, 2 ranks on 127.0.0.1 started by torchrun, bounded timeouts):
2 ranks × B/2 rows end with the 1-process parameters at batch B (SASRec and FLAME, dropout 0), only rank 0
writes, --resume works under 2 ranks, and a failing rank makes torchrun stop the other one (no hang) and
exit non-zero, naming the rank, with the rank's own one-line error in the output."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flame.main import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "flame" / "configs" / "smoke.yaml")
# dropout 0: the ranks' dropout streams cannot match one process'; 60 users: 13 steps per epoch with a
# last partial batch of odd size, so the ranks' shards differ in size
EXACT = ["--config", SMOKE, "backbone.dropout=0", "data.synthetic_users=60"]


def launch(args, tmp_path, timeout=150, module="flame.main"):
    """`torchrun --standalone --nproc-per-node 2 -m <module> <args>` (torchrun is torch.distributed.run; the
    standalone rendezvous takes a free port on this machine)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.heavy
def test_two_ranks_train_exactly_like_one_process_and_resume(tmp_path):
    """Stage 1 (SASRec) then FLAME on 2 ranks, each 2 epochs, against the same in one process; then both
    resumed to 3 epochs (2 ranks, 1 process)."""
    args = [*EXACT, "flame.frozen_source=own", "train.max_epochs=2"]
    done = launch([*args, f"run_root={tmp_path / 'dp'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = main([*args, f"run_root={tmp_path / 'one'}"])
    runs = {name: sorted(p for p in (tmp_path / name / "flame" / "synthetic").iterdir()) for name in ("dp", "one")}
    assert [p.name for p in runs["dp"]][-1] == "stage1" and len(runs["dp"]) == 2  # one FLAME folder: rank 0's
    dp_flame, one_flame = runs["dp"][0], Path(one["run_dir"])
    dp_stage1 = next((tmp_path / "dp" / "flame" / "synthetic" / "stage1").glob("seed42_*/"))
    one_stage1 = next((tmp_path / "one" / "flame" / "synthetic" / "stage1").glob("seed42_*/"))
    assert max_diff(params(dp_stage1 / "last.pt"), params(one_stage1 / "last.pt")) < 1e-5  # SASRec
    assert max_diff(params(dp_flame / "last.pt"), params(one_flame / "last.pt")) < 1e-5  # FLAME
    for got, want in zip(records(dp_flame), records(one_flame), strict=True):  # two lines: rank 0 wrote alone
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)  # the ranks' shares summed
        assert got["train/wcl"] == pytest.approx(want["train/wcl"], rel=1e-5)
        assert got["valid/NDCG@20"] == pytest.approx(want["valid/NDCG@20"], abs=1e-6)
    assert len(list(dp_flame.glob("*.tmp"))) == 0 and "[flame] run dir" in done.stdout

    done = launch(["--resume", str(dp_flame), "train.max_epochs=3"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    main(["--resume", str(one_flame), "train.max_epochs=3"])
    assert max_diff(params(dp_flame / "last.pt"), params(one_flame / "last.pt")) < 1e-5
    assert [r["epoch"] for r in records(dp_flame)] == [1, 2, 3]


@pytest.mark.heavy
def test_per_rank_negatives_are_a_different_objective(tmp_path):
    """The same step with flame.gather_negatives=false: each rank's L_wcl sees only its own rows, so the
    parameters leave the 1-process ones (what the gather is for)."""
    from flame.config import BackboneConfig, DataConfig
    from flame.data import build_data, load_raw
    from flame.model import SASRec, sasrec_state

    data = build_data(load_raw(DataConfig(name="synthetic", synthetic_users=60, synthetic_items=40)),
                      DataConfig(max_len=10))
    torch.manual_seed(0)
    frozen = tmp_path / "frozen.pt"
    torch.save(sasrec_state(SASRec(BackboneConfig(d=16), data.num_items, max_len=10)), frozen)
    args = [*EXACT, f"flame.frozen={frozen}", "train.max_epochs=1"]
    done = launch([*args, "flame.gather_negatives=false", "--run-dir", str(tmp_path / "dp")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    main([*args, "--run-dir", str(tmp_path / "one")])
    assert max_diff(params(tmp_path / "dp" / "last.pt"), params(tmp_path / "one" / "last.pt")) > 1e-4


@pytest.mark.heavy
def test_a_failing_rank_stops_the_launch(tmp_path):
    """Rank 1 fails after joining the group while rank 0 waits in a collective: torchrun stops rank 0
    (well inside the 60-s bound, against the group's 10-minute collective timeout), exits non-zero and
    names rank 1 as the root cause; rank 1's one-line error is in the output, and rank 0 says in one line
    that a peer failed instead of printing gloo's traceback."""
    (tmp_path / "failing_rank.py").write_text(
        "import torch.distributed as dist\nfrom common.cli import run_cli\n\n"
        "def main():\n    dist.init_process_group('gloo')\n"
        "    if dist.get_rank() == 1:\n        raise ValueError('rank one cannot read its shard')\n"
        "    dist.barrier()  # rank 0 would wait here for good\n\nrun_cli(main)\n")
    done = launch([], tmp_path, timeout=60, module="failing_rank")
    assert done.returncode != 0, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert "error: rank one cannot read its shard" in lines, done.stderr
    root_cause = done.stderr[done.stderr.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause) and re.search(r"exitcode\s*: 2 ", root_cause)
    assert "[rank0]: Traceback" not in done.stderr


def small_flame(mutual=False, ml_loss="wcl"):
    from flame.config import BackboneConfig, FlameConfig
    from flame.ensemble import FLAME
    from flame.model import SASRec
    torch.manual_seed(0)
    backbone = BackboneConfig(d=16, dropout=0.0)
    return FLAME(SASRec(backbone, 40, 10), SASRec(backbone, 40, 10), FlameConfig(), mutual=mutual,
                 ml_loss=ml_loss)


@pytest.mark.parametrize("mutual, ml_loss", [(False, "wcl"), (True, "wcl"), (True, "kl")])
def test_the_parallel_split_is_the_loss_with_its_shares_and_gather_between_the_halves(mutual, ml_loss):
    """parallel.loss_terms in one process (no extra) is model.loss_terms bit for bit; with shares, the
    per-row terms are scaled by "share", L_wcl and α by "gathered_share", and "gather" sees the stacked
    path outputs between the two halves."""
    from flame import parallel
    model = small_flame(mutual, ml_loss)
    g = torch.Generator().manual_seed(3)
    batch = {"seq": torch.randint(0, 41, (12, 10), generator=g), "target": torch.randint(1, 41, (12,), generator=g),
             "lam": 0.7}
    whole = model.loss_terms(batch)
    alone = parallel.loss_terms(model, batch, {})
    assert list(alone) == list(whole) and all(torch.equal(alone[k], whole[k]) for k in whole)
    seen = []
    extra = {"share": 0.5, "gather": lambda t: seen.append(tuple(t.shape)) or t, "gathered_share": 0.25}
    split = parallel.loss_terms(model, batch, extra)
    assert list(split) == list(whole)
    for key in whole:
        scale = 0.25 if key == "wcl" or key.startswith("alpha/") else 0.5
        want = whole[key] * scale if key != "loss" else \
            sum(whole[k] * 0.5 for k in ("rec", "rec_b", "kl") if k in whole) + 0.7 * 0.25 * whole.get("wcl", 0.0)
        assert torch.allclose(split[key], want, rtol=1e-6, atol=0), key
    assert seen == ([] if ml_loss == "kl" else [(4, 12, 16)])  # the 4 paths' (B, d) outputs, stacked
