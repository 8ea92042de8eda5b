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

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "f3crec" / "configs" / "smoke.yaml"
FAST = ["federation.rounds=2", "federation.patience=2"]


def test_smoke_writes_results_and_loadable_checkpoints(tmp_path, results_schema):
    res = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), *FAST,
                f"train.base_cache={tmp_path / 'base'}", "train.share_base=true"])
    saved = results_schema(tmp_path / "run" / "results.json", "f3crec")   # the layout of all three papers
    last = saved["summary"]["ndcg"]["per_block"][-1]
    assert (saved["method"], saved["variant"], saved["seed"], saved["threads"]) == ("f3crec", "fedmf", 1, 1)
    assert saved["metrics"]["test/ndcg@20"] == last["H"] and saved["metrics"]["test/ra/ndcg@20"] == last["RA"]
    assert saved["metrics"]["valid/ndcg@20"] == saved["blocks"][-1]["best_val"]
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
    # The second folder tells the whole story: block 0's round records, copied from the entry, marked reused.
    (entry,) = (tmp_path / "base").glob("*.pt")
    trained, reused = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                       for name in ("ft", "itm"))
    base_trained = [r for r in trained if r["block"] == 0]
    base_reused = [r for r in reused if r["block"] == 0]
    assert len(base_trained) == 2 and not any("reused" in r for r in trained)
    assert reused[:2] == base_reused == [{**r, "reused": True, "reused_from": entry.name} for r in base_trained]
    assert {r["block"] for r in reused} == {0, 1, 2, 3} and not any("reused" in r for r in reused[2:])
    saved = json.loads((tmp_path / "itm" / "results.json").read_text())
    assert saved["blocks"][0]["reused_from"] == str(entry) and "reused_from" not in saved["blocks"][1]
    assert saved["threads"] == 1


def test_thread_count_is_part_of_the_base_entry_and_restored_after_the_run(tmp_path):
    before = torch.get_num_threads()
    common = ["--config", str(SMOKE), *FAST, f"train.base_cache={tmp_path / 'base'}", "train.share_base=true",
              "train.stop_after_block=0"]
    main([*common, "--run-dir", str(tmp_path / "one")])
    two = main([*common, "train.threads=2", "--run-dir", str(tmp_path / "two")])
    assert len(list((tmp_path / "base").glob("*.pt"))) == 2       # a 1-thread entry never serves a 2-thread run
    assert two["threads"] == 2 and torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["null", "off", "none", "''"])
def test_base_cache_that_reads_as_off_is_refused_naming_the_switch(tmp_path, value):
    with pytest.raises(ValueError, match=r"train\.base_cache=.*ambiguous.*train\.share_base=false") as err:
        main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "x"), *FAST, "train.share_base=true",
              f"train.base_cache={value}"])
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()


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
    # the command exits without the interpreter's teardown: everything printed reached stdout and log.txt
    last = f"run folder: {tmp_path / 'run'}"
    assert out.stdout.rstrip().endswith(last) and (tmp_path / "run" / "log.txt").read_text().rstrip().endswith(last)


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
    from f3crec.bench import report, whole_run
    start = time.perf_counter()
    ours = {**whole_run(["--config", str(SMOKE)], 2), "torch_import_s": 0.0}
    outside = time.perf_counter() - start
    assert ours["rounds"] == [2, 2, 2, 2] and 0 < ours["base_round_s"] <= ours["base_block_s"]
    assert 0 < ours["fixed_s"] < ours["whole_s"] and 0 < ours["whole_cpu_s"]
    # The phases are timed inside the process the bench starts: together they fit in what we timed around it.
    assert ours["base_block_s"] + ours["incremental_blocks_s"] < ours["whole_s"] <= outside
    alone = report(ours)           # no reference timed in this sitting: no ratio anywhere
    assert alone.count("\n") == 10 and "×" not in alone          # 9 rows: + CPU after the imports
    table = report(ours, {"whole_cpu_s": 10 * ours["whole_cpu_s"]})
    (line,) = [row for row in table.splitlines() if row.startswith("| whole process, CPU")]
    assert "| 10.0× |" in line and table.count("×") == 1


def test_bench_children_run_one_thread_with_the_bytecode_cache_on(monkeypatch):
    """The timed processes (ours and the official code's) get one thread and a default Python's bytecode cache,
    whatever PYTHONDONTWRITEBYTECODE the shell that starts the bench has."""
    from f3crec.bench import child_env
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    env = child_env()
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["PATH"] == __import__("os").environ["PATH"]
