"""F3CRec on Flower's simulation runtime (method.md §14): `flwr run` against a local simulation SuperLink with
2 virtual nodes on Ray gives the in-process grid's summary and every round record on the smoke stream, and
afterwards no process it started is left — the SuperLink, the simulation process, and Ray's GCS, raylet and
workers (found both by pid and by their Ray session folder). Skipped
without Ray (extra fl-sim); the run is bounded by --timeout. Bad input is one line before any process starts.
"""
import json
from pathlib import Path

import psutil
import pytest

pytest.importorskip("flwr")

from common.config import load_config  # noqa: E402
from f3crec.config import Config  # noqa: E402
from f3crec.flower import simulate  # noqa: E402
from f3crec.flower.deploy import alive  # noqa: E402
from f3crec.main import run  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "f3crec" / "configs" / "smoke.yaml"
SHORT = ["federation.rounds=2", "federation.patience=1", "train.stop_after_block=1"]   # 2 blocks, 2 rounds each


def _records(run_dir: Path) -> list[dict]:
    keep = ("block", "round", "val_ndcg", "val_recall", "D_mean", "m_mean", "m_hist", "D_hist", "itm_w", "lost_users")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _mentioning(folder: Path) -> list[str]:
    """Processes whose command line names `folder` (Ray's processes carry their session folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(folder) in " ".join(proc.info["cmdline"] or []):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'])[:120]}")
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_simulation_runtime_gives_the_in_process_grid_metrics_and_leaves_no_process(tmp_path, capsys):
    pytest.importorskip("ray", reason="Flower's simulation runtime needs Ray (extra fl-sim)")
    out, logs = tmp_path / "simulated", tmp_path / "logs"
    outcome = simulate.main(["--config", str(SMOKE), "--nodes", "2", "--logs", str(logs), "--run-dir", str(out),
                             "--timeout", "300", *SHORT, f"federation.node_state_dir={tmp_path / 'nodes'}"])
    assert outcome["ok"] and Path(outcome["run_dir"]) == out.resolve()
    assert not alive(outcome["pids"]) and not outcome["leftover"]
    assert len(outcome["pids"]) >= 5                  # link, superexec, flwr run, flwr-simulation, Ray's processes
    assert not _mentioning(Path(outcome["ray_tmp"]))  # no Ray process of this run's session survives
    assert not Path(outcome["ray_tmp"]).exists()
    simulated = json.loads((out / "results.json").read_text())
    cfg = load_config(Config, SMOKE, [*SHORT, "federation.simulator=flower", "federation.nodes=2",
                                      f"federation.node_state_dir={tmp_path / 'nodes-grid'}"])
    grid = run(cfg, tmp_path / "grid")
    assert simulated["summary"] == grid["summary"]                  # a-matrix, LA/RA/H
    assert _records(out) == _records(tmp_path / "grid")               # every round's record
    assert [b["best_round"] for b in simulated["blocks"]] == [b["best_round"] for b in grid["blocks"]]
    assert "run folder:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, names", [
    (["--nodes", "0"], "--nodes 0"),
    (["--cpus", "0"], "--cpus 0"),
    (["--cpus", "two"], "--cpus two"),
    (["--nodes"], "--nodes needs a value"),
    (["--resume", "runs/x"], "--resume"),
    (["methods=[ft,f3crec]"], "one method"),
])
def test_bad_simulation_input_is_one_line_before_any_process(user_error, tmp_path, argv, names, monkeypatch):
    monkeypatch.setattr(simulate.Simulation, "start", lambda self, timeout=120.0: pytest.fail("started"))
    line = user_error(simulate.main, ["--config", str(SMOKE), f"run_root={tmp_path}", *argv])
    assert names in line


def test_without_ray_the_simulation_says_which_extra_in_one_line(user_error, tmp_path, monkeypatch):
    monkeypatch.setattr(simulate, "ray_available", lambda: False)
    monkeypatch.setattr(simulate.Simulation, "start", lambda self, timeout=120.0: pytest.fail("started"))
    line = user_error(simulate.main, ["--config", str(SMOKE), f"run_root={tmp_path}"])
    assert "Ray" in line and "fl-sim" in line
    assert not (tmp_path / "f3crec").exists()          # no run folder claimed


def test_a_crashed_simulation_names_the_first_exception_of_its_log(tmp_path):
    (tmp_path / "flwr-run-3.log").write_text(
        "\x1b[91mERROR \x1b[0m:     An exception occured!! socket path too long\n"
        "Traceback (most recent call last):\n    raise OSError(\n"
        "OSError: validate_socket_filename failed: AF_UNIX path length cannot exceed 107 bytes\n"
        "RuntimeError: Simulation Runtime crashed.\n")
    assert simulate._first_exception(tmp_path) == \
        "OSError: validate_socket_filename failed: AF_UNIX path length cannot exceed 107 bytes"
    assert simulate._first_exception(tmp_path / "none") is None
