"""F3CRec's Flower App on Flower's simulation runtime (method.md §14): `flwr run` against a SuperLink started with
`--simulation` (common/flower_ops.py deploy --simulation, `make f3crec-sim`) with 2 virtual nodes on Ray gives
the in-process grid's summary and every round record on the smoke stream, and afterwards no process it started
is left (the SuperLink, the simulation process, Ray's). Opt-in like the deployments (REPRO_FLOWER_DEPLOY=1,
`make test-deploy`: it starts Ray), skipped without Ray (extra fl-sim); bounded by a timeout. Without Ray the
launcher says which extra, in one line, before any process starts.
"""
import importlib.util
import json
import os

import pytest

pytest.importorskip("flwr")
pytest.importorskip("psutil")

from common import flower_ops  # noqa: E402
from common.config import load_config  # noqa: E402
from common.flower_ops import alive  # noqa: E402
from f3crec.config import Config  # noqa: E402
from f3crec.main import run  # noqa: E402

from conftest import FLOWER_APP as APP, FLOWER_PACKAGES as PACKAGES, FLOWER_SHORT as SHORT  # noqa: E402
from conftest import F3CREC_SMOKE as SMOKE, flower_records as _records  # noqa: E402


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.skipif(os.environ.get("REPRO_FLOWER_DEPLOY") != "1", reason="starts Ray and a SuperLink: set REPRO_FLOWER_DEPLOY=1")
def test_simulation_runtime_gives_the_in_process_grid_metrics_and_leaves_no_process(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Flower's simulation runtime needs Ray (extra fl-sim)")
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "simulated"
    overrides = " ".join([*SHORT, "federation.nodes=2", f"federation.node_state_dir={tmp_path / 'nodes'}"])
    outcome = flower_ops.deploy(APP, PACKAGES, 2, run_config=f'overrides="{overrides}" run-dir="{out}"',
                                report_key="report", folder=tmp_path / "d", timeout=600, simulation=True)
    assert outcome["ok"] and alive(outcome["pids"]) == []
    simulated = json.loads((out / "results.json").read_text())
    cfg = load_config(Config, SMOKE, [*SHORT, "federation.simulator=flower", "federation.nodes=2",
                                      f"federation.node_state_dir={tmp_path / 'nodes-grid'}"])
    grid = run(cfg, tmp_path / "grid")
    assert simulated["summary"] == grid["summary"]                  # a-matrix, LA/RA/H
    assert _records(out) == _records(tmp_path / "grid")               # every round's record


def test_without_ray_the_simulation_says_which_extra_in_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert flower_ops.main(["deploy", "--simulation", "--app", str(APP), "--nodes", "2",
                            "--folder", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Ray" in err and "fl-sim" in err and not (tmp_path / "d").exists()
