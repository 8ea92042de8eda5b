"""F3CRec on a real Flower deployment (method.md §14): a SuperLink and 2–3 SuperNodes as separate processes on
127.0.0.1 give the in-process grid's and the reference simulator's metrics on the smoke stream; a SuperNode
killed by its pid mid-run stops the run in one line below federation.min_reply_fraction, its block-boundary
checkpoint intact, and --resume on a fresh deployment ends with the uninterrupted run's results. Every
process started is gone afterwards. The two deployments take ~35 s and ~100 s on 2 busy cores (each starts
4–7 Python processes), so they run only with REPRO_FLOWER_DEPLOY=1:

    REPRO_FLOWER_DEPLOY=1 .venv/bin/python -m pytest -q tests/test_f3crec_flower_deploy.py
"""
import json
import os
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

flwr = pytest.importorskip("flwr")

from common.config import load_config  # noqa: E402
from common.runs import load_checkpoint  # noqa: E402
from f3crec.config import Config  # noqa: E402
from f3crec.flower import deploy  # noqa: E402
from f3crec.flower.deploy import Deployment  # noqa: E402
from f3crec.main import run  # noqa: E402

deployment = pytest.mark.skipif(os.environ.get("REPRO_FLOWER_DEPLOY") != "1",
                                reason="starts a SuperLink and SuperNodes (~2 min): set REPRO_FLOWER_DEPLOY=1")
SMOKE = Path(__file__).resolve().parents[1] / "f3crec" / "configs" / "smoke.yaml"
SHORT = ["federation.rounds=2", "federation.patience=1", "train.stop_after_block=1"]   # 2 blocks, 2 rounds each


def _records(run_dir: Path) -> list[dict]:
    keep = ("block", "round", "val_ndcg", "val_recall", "D_mean", "m_mean", "m_hist", "D_hist", "itm_w", "lost_users")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _oracle(tmp_path: Path, simulator: str, nodes: int, extra=()) -> dict:
    cfg = load_config(Config, SMOKE, [*SHORT, f"federation.simulator={simulator}", f"federation.nodes={nodes}",
                                      f"federation.node_state_dir={tmp_path / f'nodes-{simulator}'}", *extra])
    out_dir = tmp_path / f"oracle-{simulator}-{nodes}"
    results = run(cfg, out_dir)
    return {"results": results, "records": _records(out_dir)}


def _gone(pids) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.slow
@deployment
def test_deployment_gives_the_in_process_and_reference_metrics(tmp_path, capsys):
    out = tmp_path / "deployed"
    outcome = deploy.main(["--config", str(SMOKE), "--nodes", "2", "--logs", str(tmp_path / "logs"),
                           "--run-dir", str(out), "--timeout", "300", *SHORT,
                           f"federation.node_state_dir={tmp_path / 'nodes'}"])
    assert outcome["ok"] and Path(outcome["run_dir"]) == out.resolve()
    assert _gone(outcome["pids"]) and len(outcome["pids"]) >= 5         # link, 2 nodes, 2 executors (+ tasks)
    deployed = json.loads((out / "results.json").read_text())
    for simulator in ("flower", "reference"):
        oracle = _oracle(tmp_path, simulator, 2)
        assert deployed["summary"] == oracle["results"]["summary"], simulator       # a-matrices, LA/RA/H
        assert _records(out) == oracle["records"], simulator                          # every round's record
    assert "run folder:" in capsys.readouterr().out


@pytest.mark.slow
@deployment
def test_node_killed_mid_run_stops_in_one_line_and_resume_continues(tmp_path):
    fed = ["federation.simulator=flower", "federation.nodes=3", "federation.reply_timeout=10",
           f"federation.node_state_dir={tmp_path / 'nodes'}"]
    cfg = load_config(Config, SMOKE, [*SHORT, *fed])
    run_dir = tmp_path / "run"
    killed: list[int] = []

    def kill_in_block_1(d: Deployment) -> None:
        records = run_dir / "metrics.jsonl"
        if not killed and records.exists() and any(r["block"] == 1 for r in _records(run_dir)):
            killed.append(d.kill_node(1))

    with Deployment(3, tmp_path / "logs-1") as first:
        with pytest.raises(ConnectionError) as err:
            first.run(cfg, run_dir, on_wait=kill_in_block_1, timeout=300)
    assert killed and _gone([killed[0]]) and first.leftover() == []
    line = str(err.value)
    assert "\n" not in line and "min_reply_fraction=1.0" in line and "--resume" in line, line
    assert load_checkpoint(run_dir / "last.pt")["block"] == 0            # block 0's checkpoint, intact
    with Deployment(3, tmp_path / "logs-2") as second:
        resumed = second.run(replace(cfg), run_dir, resume=True, timeout=300)
    assert second.leftover() == []
    oracle = _oracle(tmp_path, "flower", 3, fed[2:3])
    assert resumed["summary"] == oracle["results"]["summary"]
    expected = [r for r in oracle["records"] if r["block"] == 1]
    assert [r for r in _records(run_dir) if r["block"] == 1][-len(expected):] == expected


def _empty_run(tmp_path: Path) -> Path:
    folder = tmp_path / "no-checkpoint"
    folder.mkdir()
    (folder / "config.yaml").write_text("data:\n  name: synthetic\n")
    return folder


def test_deploy_bad_input_is_one_line_before_any_process(tmp_path, user_error):
    logs = tmp_path / "logs"
    assert "--nodes 0" in user_error(deploy.main, ["--config", str(SMOKE), "--nodes", "0", "--logs", str(logs)])
    assert "--nodes" in user_error(deploy.main, ["--config", str(SMOKE), "--nodes", "two"])
    assert "federation.rounds" in user_error(deploy.main, ["--config", str(SMOKE), "federation.rounds=x"])
    assert "last.pt" in user_error(deploy.main, ["--nodes", "2", "--resume", str(_empty_run(tmp_path))])
    assert not logs.exists()
