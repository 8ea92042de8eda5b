"""F3CRec end to end on the smoke config: results.json, three ways to launch, checkpoints, resume, base cache."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from f3crec.main import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "f3crec" / "configs" / "smoke.yaml"
FAST = ["federation.rounds=2", "federation.patience=2"]


def test_smoke_writes_results_and_loadable_checkpoints(tmp_path):
    res = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), *FAST,
                f"train.base_cache={tmp_path / 'base'}", "train.share_base=true"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(res["summary"]))
    ndcg = saved["summary"]["ndcg"]
    assert len(ndcg["a"]) == 4 and [len(row) for row in ndcg["a"]] == [1, 2, 3, 4]
    assert saved["flags"]["handoff"] == "last" and saved["fidelity"] is True
    for path in [tmp_path / "run" / "last.pt", *sorted((tmp_path / "base").glob("*.pt"))]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(state["sim"]["server"]["items"], torch.Tensor)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["block"] for r in records} == {0, 1, 2, 3} and all("round" in r for r in records)


def test_base_block_shared_between_methods(tmp_path, capsys):
    common = [*FAST, f"train.base_cache={tmp_path / 'base'}", "train.share_base=true"]
    first = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "ft"), *common, "method.name=ft"])
    second = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "itm"), *common, "method.name=itm"])
    assert "base block loaded" in capsys.readouterr().out
    assert first["summary"]["ndcg"]["a"][0] == second["summary"]["ndcg"]["a"][0]
    assert first["summary"]["ndcg"]["a"][3] != second["summary"]["ndcg"]["a"][3]


def test_resume_at_block_boundary_equals_uninterrupted(tmp_path):
    full = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "full"), *FAST])
    main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "cut"), *FAST, "train.stop_after_block=1"])
    resumed = main(["--resume", str(tmp_path / "cut"), "train.stop_after_block=null"])
    assert resumed["summary"] == full["summary"]


@pytest.mark.parametrize("how", ["script", "copied"])
@pytest.mark.heavy
def test_launch_as_script_and_from_a_copy(tmp_path, how):
    if how == "script":
        cmd, cwd = [sys.executable, "main.py", "--config", "configs/smoke.yaml"], ROOT / "f3crec"
    else:
        for name in ("f3crec", "common"):
            shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "runs"))
        cmd, cwd = [sys.executable, "-m", "f3crec.main", "--config", "f3crec/configs/smoke.yaml"], tmp_path
    out = subprocess.run([*cmd, "--run-dir", str(tmp_path / "run"), *FAST], cwd=cwd, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "results.json").is_file() and "LA" in out.stdout


def test_bad_config_fails_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"method\.name.*'nope'") as err:
        main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "x"), "method.name=nope"])
    assert "\n" not in str(err.value)


def test_old_run_folder_fails_in_one_line_naming_the_rename(tmp_path):
    main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "old"), *FAST, "train.stop_after_block=0"])
    saved = (tmp_path / "old" / "config.yaml").read_text().replace("backbone:\n  dim", "model:\n  dim")
    (tmp_path / "old" / "config.yaml").write_text(saved)
    with pytest.raises(ValueError, match=r"model\.\*.*backbone\.\*") as err:
        main(["--resume", str(tmp_path / "old")])
    assert "\n" not in str(err.value)


@pytest.mark.heavy
def test_bench_whole_run_reports_every_phase():
    """`make bench-f3crec`'s whole-run mode on the smoke stream: the phases add up to the process."""
    from f3crec.bench import REFERENCE, report, whole_run
    start = time.perf_counter()
    ours = {**whole_run(["--config", str(SMOKE)], 2), "torch_import_s": 0.0}
    outside = time.perf_counter() - start
    assert ours["rounds"] == [2, 2, 2, 2] and 0 < ours["base_round_s"] <= ours["base_block_s"]
    assert 0 < ours["fixed_s"] < ours["whole_s"]
    # The phases are timed inside the process the bench starts: together they fit in what we timed around it.
    assert ours["base_block_s"] + ours["incremental_blocks_s"] < ours["whole_s"] <= outside
    table = report(ours)
    assert str(REFERENCE["whole_s"]) in table and table.count("\n") == 8
