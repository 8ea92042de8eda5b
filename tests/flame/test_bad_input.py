"""FLAME's bad-input corpus: every case through the CLI contract (exit 2, one stderr line, no traceback),
checking what the line names and that nothing is left that a later run would trust. Also: a non-finite
loss, kill -9 and --resume against an uninterrupted run, and two processes needing one stage-1 net."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flame.config import BackboneConfig, DataConfig
from flame.data import build_data, load_raw
from flame.main import main
from flame.model import SASRec, sasrec_state

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "flame" / "configs" / "smoke.yaml")
FAST = ["train.max_epochs=1", "data.synthetic_users=60"]


def random_sasrec(path: Path, num_items: int = 40, max_len: int = 10) -> Path:
    torch.manual_seed(0)
    torch.save(sasrec_state(SASRec(BackboneConfig(d=16), num_items, max_len=max_len)), path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 1-epoch smoke FLAME run (frozen net given); tests copy it before changing it."""
    base = tmp_path_factory.mktemp("finished")
    frozen = random_sasrec(base / "frozen.pt")
    main(["--config", SMOKE, *FAST, f"flame.frozen={frozen}", "--run-dir", str(base / "run")])
    return base / "run"


def foreign_folder(folder: Path, paper: str, sections: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text(f"[{paper}] run dir {folder} | git abc\n")
    import yaml
    (folder / "config.yaml").write_text(yaml.safe_dump(sections))
    torch.save({"epoch": 1}, folder / "last.pt")
    return folder


# (case id, argv builder (tmp_path, finished run copy) -> argv, words the line must name)
def _dup_yaml(tmp):
    (tmp / "dup.yaml").write_text("train:\n  lr: 0.01\ndata:\n  name: synthetic\ntrain:\n  batch_size: 8\n")
    return ["--config", str(tmp / "dup.yaml")]


def _section_shape(tmp):
    (tmp / "shape.yaml").write_text("data:\n  name: synthetic\ntrain: 5\n")
    return ["--config", str(tmp / "shape.yaml")]


def _truncated(tmp, run):
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    return ["--resume", str(run)]


def _foreign_last(tmp, run):
    torch.save({"weights": torch.zeros(3)}, run / "last.pt")
    return ["--resume", str(run)]


def _other_shape_frozen(tmp):
    return ["--config", SMOKE, *FAST, f"flame.frozen={random_sasrec(tmp / 'big.pt', num_items=99)}"]


def _garbage_frozen(tmp):
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint at all")
    return ["--config", SMOKE, *FAST, f"flame.frozen={tmp / 'garbage.pt'}"]


def _foreign_frozen(tmp):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp / "foreign.pt")
    return ["--config", SMOKE, *FAST, f"flame.frozen={tmp / 'foreign.pt'}"]


def _run_root_is_a_file(tmp):
    (tmp / "afile").write_text("x")
    return ["--config", SMOKE, *FAST, f"run_root={tmp / 'afile'}"]


def _malformed_data(tmp):
    (tmp / "data" / "flame").mkdir(parents=True)
    (tmp / "data" / "flame" / "amazon-toys.txt").write_text("1 2 3\nfoo bar\n")
    return ["data.name=amazon-toys", f"data.root={tmp / 'data'}", "flame.frozen_source=own"]


CASES = [
    ("unknown key", lambda t, r: ["--config", SMOKE, "train.lr_typo=1"], ["train.lr_typo"]),
    ("unknown section", lambda t, r: ["--config", SMOKE, "optim.lr=1"], ["optim"]),
    ("wrong type", lambda t, r: ["--config", SMOKE, "train.batch_size=abc"], ["train.batch_size", "integer"]),
    ("batch size 0", lambda t, r: ["--config", SMOKE, "train.batch_size=0"], ["train.batch_size", "[1, inf)"]),
    ("dropout 1", lambda t, r: ["--config", SMOKE, "backbone.dropout=1"], ["backbone.dropout", "[0, 1)"]),
    ("max_len 0", lambda t, r: ["--config", SMOKE, "data.max_len=0"], ["data.max_len"]),
    ("tau 0", lambda t, r: ["--config", SMOKE, "flame.tau=0"], ["flame.tau", "(0, inf)"]),
    ("negative seed", lambda t, r: ["--config", SMOKE, "train.seed=-1"], ["train.seed"]),
    ("one-item catalogue", lambda t, r: ["--config", SMOKE, "data.synthetic_items=1"], ["data.synthetic_items"]),
    ("one-member ensemble", lambda t, r: ["--config", SMOKE, "method.name=ensemble", "method.ensemble_n=1"],
     ["method.ensemble_n"]),
    ("heads do not divide d", lambda t, r: ["--config", SMOKE, "backbone.d=15"], ["backbone.d=15", "backbone.heads"]),
    ("one path", lambda t, r: ["--config", SMOKE, "flame.num_paths=1"], ["flame.num_paths=1", "2..4"]),
    ("lambda horizon 0", lambda t, r: ["--config", SMOKE, "flame.lambda_horizon=0"], ["flame.lambda_horizon"]),
    ("duplicate yaml key", lambda t, r: _dup_yaml(t), ["duplicate key 'train'", "dup.yaml"]),
    ("section not a mapping", lambda t, r: _section_shape(t), ["train", "mapping"]),
    ("missing config file", lambda t, r: ["--config", str(t / "nope.yaml")], ["nope.yaml"]),
    ("unknown dataset", lambda t, r: ["--config", SMOKE, "data.name=movielens"], ["data.name", "movielens"]),
    ("malformed data file", lambda t, r: _malformed_data(t), ["amazon-toys", "sha256"]),
    ("missing frozen checkpoint", lambda t, r: ["--config", SMOKE, f"flame.frozen={t / 'nope.pt'}"],
     ["flame.frozen", "nope.pt"]),
    ("garbage frozen checkpoint", lambda t, r: _garbage_frozen(t), ["garbage.pt", "not a readable checkpoint"]),
    ("foreign frozen checkpoint", lambda t, r: _foreign_frozen(t), ["foreign.pt", "36-key"]),
    ("frozen net of another dataset", lambda t, r: _other_shape_frozen(t), ["big.pt", "item_emb.weight"]),
    ("missing shipped weights", lambda t, r: ["--config", SMOKE, "flame.frozen_source=shipped",
                                              f"data.root={t / 'nodata'}"], ["shipped frozen weights", "smoke"]),
    ("run root is a file", lambda t, r: _run_root_is_a_file(t), ["afile", "is a file"]),
    ("missing sasrec_run", lambda t, r: ["--config", SMOKE, *FAST, f"train.sasrec_run={t / 'b1'}"],
     ["train.sasrec_run", "results.json"]),
    ("ensemble member missing", lambda t, r: ["--config", SMOKE, "method.name=ensemble",
                                              f"method.ensemble_members=[{t / 'a'},{t / 'b'}]"], ["neither"]),
    ("resume missing folder", lambda t, r: ["--resume", str(t / "gone")], ["gone", "does not exist"]),
    ("resume a file", lambda t, r: ["--resume", SMOKE], ["smoke.yaml", "not a run folder"]),
    ("resume a non-run folder", lambda t, r: ["--resume", str(t)], ["not a run folder"]),
    ("resume an f3crec run", lambda t, r: ["--resume", str(foreign_folder(
        t / "f3", "f3crec", {"federation": {"rounds": 3}, "data": {}}))], ["f3crec run, not a FLAME run"]),
    ("resume a vlm2rec run", lambda t, r: ["--resume", str(foreign_folder(
        t / "vl", "vlm2rec", {"wpcl": {}, "crtr": {}}))], ["vlm2rec run, not a FLAME run"]),
    ("resume a truncated last.pt", _truncated, ["last.pt", "truncated"]),
    ("resume a foreign last.pt", _foreign_last, ["last.pt", "not a FLAME checkpoint"]),
    # a resume runs the saved config: another method is refused by its key before any checkpoint is read
    ("resume as another method", lambda t, r: ["--resume", str(r), "method.name=sasrec"],
     ["method.name", "resume runs the saved config"]),
    ("cuda graph on cpu", lambda t, r: ["--config", SMOKE, "train.cuda_graph=true"], ["train.cuda_graph", "CUDA"]),
]


@pytest.mark.parametrize("argv, names", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_line_and_leaves_nothing_trusted(tmp_path, monkeypatch, user_error, finished_run,
                                                          argv, names):
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))  # where a run without run_root would go
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))  # processed data of this case only
    run = tmp_path / "resumed"
    shutil.copytree(finished_run, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    line = user_error(main, argv(tmp_path, run))
    for word in names:
        assert word in line, (word, line)
    # nothing new a later run could trust: no run folder, no stage-1 net, no processed data
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    after = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    changed = {k for k in before if before[k] != after.get(k)} - {"last.pt"}  # (the cases that broke it)
    assert not changed and after.keys() == before.keys(), changed  # a refused resume touches nothing


def test_bad_input_before_stage_one_trains_nothing_and_the_fixed_run_starts_fresh(tmp_path, user_error):
    """An unusable run root is found before stage 1 (which would take hours on real data); after the fix
    the stage-1 net is trained once into the right place."""
    (tmp_path / "afile").write_text("x")
    line = user_error(main, ["--config", SMOKE, *FAST, f"run_root={tmp_path / 'afile'}"])
    assert "afile" in line and not list(tmp_path.rglob("stage1"))
    out = main(["--config", SMOKE, *FAST, f"run_root={tmp_path / 'runs'}"])
    stage1 = Path(out["convergence"]["sasrec_run"])
    assert stage1.parent == tmp_path / "runs" / "flame" / "synthetic" / "stage1"
    assert len((stage1 / "metrics.jsonl").read_text().splitlines()) == 1


def test_non_finite_loss_stops_with_one_line_and_no_checkpoint(tmp_path, user_error):
    frozen = random_sasrec(tmp_path / "frozen.pt")
    line = user_error(main, ["--config", SMOKE, *FAST, f"flame.frozen={frozen}", "backbone.init_std=1e38",
                             "--run-dir", str(tmp_path / "nan")])
    assert line.startswith("error: non-finite loss") and "learning rate" in line
    assert not (tmp_path / "nan" / "last.pt").exists() and not (tmp_path / "nan" / "results.json").exists()
    line = user_error(main, ["--resume", str(tmp_path / "nan")])  # nothing a resume could trust
    assert "nothing to resume" in line


def clean_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


VOLATILE = ("seconds", "time", "git_sha", "commit", "config_digest", "versions", "device", "python", "started", "finished",
            "run_dir")


def stable(value):
    """A record without timings and provenance (what two runs of one seed must share)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not any(word in k for word in VOLATILE)
                and not k.endswith("_s")}
    return [stable(v) for v in value] if isinstance(value, list) else value


@pytest.mark.heavy
def test_kill_9_then_resume_gives_the_uninterrupted_records(tmp_path):
    frozen = random_sasrec(tmp_path / "frozen.pt")
    args = ["--config", SMOKE, f"flame.frozen={frozen}", "train.max_epochs=5", "train.patience=5"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "flame.main", *args, "--run-dir", str(killed)], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    metrics = killed / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "results.json").exists()
    resumed = main(["--resume", str(killed)])
    full = main([*args, "--run-dir", str(tmp_path / "full")])
    assert stable(resumed) == stable(full)
    saved = [stable(json.loads((folder / "results.json").read_text())) for folder in (killed, tmp_path / "full")]
    assert saved[0] == saved[1]
    lines = [[stable(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]
             for folder in (killed, tmp_path / "full")]
    assert lines[0] == lines[1] and [r["epoch"] for r in lines[0]] == [1, 2, 3, 4, 5]


@pytest.mark.heavy
def test_two_processes_needing_one_stage1_net_train_it_once(tmp_path):
    cmd = [sys.executable, "-m", "flame.main", "--config", SMOKE, *FAST,
           f"run_root={tmp_path}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    (stage1,) = (tmp_path / "flame" / "synthetic" / "stage1").glob("seed42_*/")
    assert len((stage1 / "metrics.jsonl").read_text().splitlines()) == 1  # 1 epoch, trained once
    assert (stage1 / "log.txt").read_text().count("[flame] run dir") == 1  # one builder wrote the folder
    waited = [out for out, _ in outs if "being trained by another run" in out]
    reused = [out for out, _ in outs if f"reusing {stage1}" in out]
    assert len(waited) + len(reused) == 1  # the other one waited for it, or found it finished
    results = [json.loads(p.read_text()) for p in (tmp_path / "flame" / "synthetic").glob("*_flame_seed42*/results.json")]
    assert len(results) == 2 and results[0]["test"] == results[1]["test"]  # the same frozen net
