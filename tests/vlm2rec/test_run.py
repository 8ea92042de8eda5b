"""VLM2Rec end to end (vlm2rec/docs/method.md §16): the smoke config trains and evaluates in-process (kill-and-resume:
tests/vlm2rec/test_resume.py), runs as a script from inside vlm2rec/ and from a copy of vlm2rec/ + common/; the paper's default
config fails fast offline with one message."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlm2rec.main import main

ROOT = Path(__file__).resolve().parents[2]


SMOKE = str(ROOT / "vlm2rec/configs/smoke.yaml")


@pytest.mark.heavy
def test_smoke_in_process_writes_every_artifact(tmp_path, results_schema):
    results = main(["--config", SMOKE, "--run-dir", str(tmp_path / "run")])
    run = tmp_path / "run"
    saved = results_schema(run / "results.json", "vlm2rec")   # the layout of all three papers
    assert {k: results[k] for k in ("commit", "paper", "metrics")} == {k: saved[k] for k in ("commit", "paper", "metrics")}
    test, metrics = saved["test"], saved["metrics"]
    assert (saved["method"], saved["variant"], saved["seed"]) == ("vlm2rec", "tiny", 0) and "transformers" in saved["versions"]
    assert metrics["test/ndcg@10"] == test["clean"]["sampled"]["both"]["NDCG@10"]        # P1, fused: the paper's
    assert metrics["test/full/text/hr@20"] == test["clean"]["full"]["text"]["HR@20"]
    assert metrics["test/missing_image/full/ndcg@10"] == test["missing_image"]["full"]["both"]["NDCG@10"]
    assert metrics["valid/full/ndcg@10"] == saved["best_valid"]          # select_on full/both/NDCG@10
    for name in ("config.yaml", "metrics.jsonl", "results.json", "best.pt", "last.pt", "item_embeddings.pt"):
        assert (run / name).exists(), name
    # the plan line, printed before the feature cache and the run folder existed, is the log's first line
    assert (run / "log.txt").read_text().startswith("plan: vlm2rec (tiny) on ")
    for name in ("best.pt", "last.pt", "item_embeddings.pt"):    # plain dicts: weights_only loading works
        assert isinstance(torch.load(run / name, map_location="cpu", weights_only=True), dict)
    clean = results["test"]["clean"]
    for protocol in ("sampled", "full"):
        assert set(clean[protocol]) == {"both", "text", "image"}
        for metrics in clean[protocol].values():
            assert 0 <= metrics["NDCG@10"] <= metrics["HR@10"] <= 1
    assert set(results["test"]) == {"clean", "missing_image", "missing_title", "noisy_image"}
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("grad_ratio_u" in r and "loss_image" in r and "gamma" in r for r in steps)
    assert "seqrec" in results and "full" in results["seqrec"]["test"]
    assert json.loads((run / "results.json").read_text())["best_epoch"] == results["best_epoch"]
    # the best epoch's adapters, also in peft's format (what PeftModel.from_pretrained reads)
    from safetensors.torch import load_file
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]
    assert len(adapter) == len(best) > 0
    for key, value in adapter.items():
        name = "embedder.model." + key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        torch.testing.assert_close(value, best[name])


def test_old_run_folders_and_inconsistent_configs_fail_in_one_line(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("seed: 0\nmodel:\n  kind: offline\ntrain:\n  epochs: 3\n")
    with pytest.raises(ValueError, match=r"seed -> train\.seed, model -> backbone") as err:
        main(["--resume", str(old)])
    assert "train.epochs -> train.max_epochs" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="eval.select_on uses protocol 'full'") as err:   # before any training
        main(["--config", SMOKE, "--run-dir", str(tmp_path / "r"), "eval.protocols=[sampled]"])
    assert "\n" not in str(err.value) and not (tmp_path / "r").exists()


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.heavy
def test_smoke_as_script_from_inside_the_folder(tmp_path):
    proc = _run([sys.executable, "main.py", "--config", "configs/smoke.yaml", "--run-dir", str(tmp_path / "r"),
                 "eval.scenarios=[]"], ROOT / "vlm2rec")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r" / "results.json").exists()
    # A calm console: no bar when stderr is not a terminal, and the run ends with its table and folder.
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[-10].split() == ["test", "HR@10", "NDCG@10", "HR@20", "NDCG@20"]   # 6 modes + 2 SASRec rows
    assert [line.split()[:2] for line in lines[-9:-1]] == [[p, m] for p in ("sampled", "full")
                                                          for m in ("text", "image", "both")] + [
        ["sampled", "SASRec"], ["full", "SASRec"]]
    assert lines[-1].endswith(f"run folder: {tmp_path / 'r'}") and sum("epoch 1: loss" in x for x in lines) == 1


@pytest.mark.heavy
def test_smoke_from_a_copy_of_the_folder(tmp_path):
    for name in ("vlm2rec", "common"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = _run([sys.executable, "-m", "vlm2rec.main", "--config", "vlm2rec/configs/smoke.yaml", "--run-dir", "run",
                 "eval.scenarios=[]", "seqrec.enabled=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "results.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the offline, GPU-less failure path")
def test_default_config_fails_fast_with_one_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("REPRO_DATA", str(tmp_path))         # no Amazon data there
    start = time.time()
    with pytest.raises(FileNotFoundError) as err:
        main([])
    message = str(err.value)
    assert time.time() - start < 10
    assert "GPU" in message and "Qwen/Qwen2.5-VL-3B-Instruct" in message and "amazon" in message
    assert "configs/ml-100k.yaml" in message and "\n" not in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_benchmark_of_a_3b_sized_qwen_runs():
    from vlm2rec.bench import bench_gpu_qwen
    out = bench_gpu_qwen(batch_size=4, steps=2, image_pixels=50176)
    assert out["train_pairs_per_s"] > 0 and out["params"] > 3e9


@pytest.mark.heavy
def test_cpu_benchmark_reports_throughput_and_memory():
    from vlm2rec.bench import bench_cpu
    start = time.perf_counter()
    out = bench_cpu("tiny", batch_size=4, steps=2)
    outside = time.perf_counter() - start
    assert out["items_encoded"] == 64 and out["pairs_per_step"] == 4 and out["steps"] == 2  # the run's own counts
    # The timed phases happen inside the call: their durations fit in the time measured around it.
    encode_s = out["items_encoded"] / out["encode_items_per_s"]
    train_s = out["steps"] * out["pairs_per_step"] / out["train_pairs_per_s"]
    assert 0 < encode_s + train_s <= outside
    assert 0 < out["encode_items_per_s"] < 1e6 and 0 < out["train_pairs_per_s"] < 1e6
    assert out["peak_memory_mb"] > 100                      # the process holds torch and a model: not a stub
