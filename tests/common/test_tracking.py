"""Experiment tracking through accelerate's trackers (common/tracking.py, `train.track`): off by default; with
tensorboard the event file read back holds every number of every metrics.jsonl record at the record's step; a
resumed run's replayed steps are purged; a tracker whose package is missing is one line naming the pip line,
before any run folder exists."""
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from common.runs import log_metrics, read_metrics, start_run, write_results
from common.tracking import Tracker, check_tracker, scalars

ROOT = Path(__file__).resolve().parents[2]
PAPERS = ("flame", "vlm2rec", "f3crec")


def events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard itself reads the event files of `folder`."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    reader = accumulator.EventAccumulator(str(folder), size_guidance={accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


@dataclass
class _Train:
    track: Optional[Literal["tensorboard", "wandb", "mlflow"]] = None


@dataclass
class _Cfg:
    train: _Train = field(default_factory=_Train)


def test_scalars_are_the_numbers_of_a_record():
    record = {"epoch": 3, "train/loss": 0.5, "valid": {"ndcg@20": 0.25, "name": "x"}, "best": True,
              "ks": [10, 20], "note": "s", "lr": None}
    assert scalars(record) == {"epoch": 3, "train/loss": 0.5, "valid/ndcg@20": 0.25}


@pytest.mark.parametrize("paper", PAPERS)
def test_every_paper_has_the_key_off_by_default_and_free_on_resume(paper):
    config = __import__(f"{paper}.config", fromlist=["Config"]).Config
    assert config().train.track is None
    assert "train.track" in config.RESUME_FREE


def test_off_by_default_writes_no_tracker_files(tmp_path):
    run = start_run(_Cfg(), "paper", "data", root=tmp_path)
    log_metrics(run, {"epoch": 1, "loss": 1.0})
    write_results(run, {})
    assert not (run / "tensorboard").exists()


def test_tensorboard_gets_every_record_at_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    run = start_run(_Cfg(_Train("tensorboard")), "paper", "data", root=tmp_path)
    logged = [{"round": r, "block": r // 2, "val_ndcg": 0.1 * r, "reused": r == 0} for r in range(4)]
    logged.append({"step": 40, "epoch": 1, "loss": 2.5})   # `step` wins over the line number
    for record in logged:
        log_metrics(run, record)
    write_results(run, {})
    got = events(run / "tensorboard")
    assert set(got) == {"round", "block", "val_ndcg", "step", "epoch", "loss"}   # the boolean stays out
    assert got["val_ndcg"] == [(line, pytest.approx(0.1 * r)) for line, r in zip(range(1, 5), range(4))]
    assert got["loss"] == [(40, 2.5)] and got["epoch"] == [(40, 1.0)]


def test_a_resume_purges_the_steps_it_replays(tmp_path):
    """An interrupted attempt logged steps 1-3; the resume (from the checkpoint after step 1) logs 2-3 again
    with other values: TensorBoard shows 1, 2, 3 once each, the resumed values for 2 and 3."""
    pytest.importorskip("tensorboard")
    first = Tracker("tensorboard", tmp_path, "paper", {})
    for step in (1, 2, 3):
        first.log({"epoch": step, "loss": float(step)})
    first.close()
    again = Tracker("tensorboard", tmp_path, "paper", {})
    for step in (2, 3):
        again.log({"epoch": step, "loss": 10.0 * step})
    again.close()
    assert events(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 20.0), (3, 30.0)]


@pytest.mark.heavy
def test_f3crec_smoke_run_tracks_its_metrics(tmp_path):
    """A whole run with train.track=tensorboard: the event file holds metrics.jsonl's numbers, record by
    record (F3CRec's records carry no step: their line number is the x-axis)."""
    pytest.importorskip("tensorboard")
    from f3crec.main import main
    results = main(["--config", str(ROOT / "f3crec/configs/smoke.yaml"), f"run_root={tmp_path}",
                    "train.track=tensorboard"])
    run = next((tmp_path / "f3crec").glob("*/*/"))
    records = read_metrics(run)
    got = events(run / "tensorboard")
    assert records and results
    for line, record in enumerate(records, start=1):
        for tag, value in scalars(record).items():
            assert (line, pytest.approx(value, rel=1e-6)) in got[tag], (tag, line)
    assert sum(len(points) for points in got.values()) == sum(len(scalars(r)) for r in records)


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_line_naming_the_pip_line(kind, tmp_path):
    if importlib.util.find_spec(kind) is not None:
        pytest.skip(f"{kind} is installed here")
    with pytest.raises(ValueError, match=f"train.track={kind} needs the {kind} package: pip install {kind}$"):
        check_tracker(kind)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "f3crec.main", "--config", "f3crec/configs/smoke.yaml",
                           f"run_root={tmp_path}", f"train.track={kind}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: train.track={kind} needs the {kind} package: pip install {kind}"]
    assert not (tmp_path / "f3crec").exists()   # refused before the run folder was claimed


@pytest.mark.parametrize("paper", PAPERS)
def test_a_dry_run_already_names_the_missing_package(paper, capsys):
    """Each paper's check_config checks train.track, so `--dry-run` (and a real run, before any data) says it."""
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    main = __import__(f"{paper}.main", fromlist=["main"]).main
    with pytest.raises(ValueError, match="train.track=mlflow needs the mlflow package: pip install mlflow$"):
        main(["--config", str(ROOT / paper / "configs" / "smoke.yaml"), "train.track=mlflow", "--dry-run"])


def test_every_missing_package_is_in_the_pip_line(monkeypatch):
    """Without accelerate (a copied-out FLAME folder has only its core), tensorboard alone is not enough."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("accelerate", "tensorboard")
                        else real(name, *a))
    with pytest.raises(ValueError, match=r"needs the accelerate and tensorboard packages: "
                                         r"pip install accelerate tensorboard$"):
        check_tracker("tensorboard")


def test_an_unknown_tracker_is_refused_by_the_config():
    from common.config import ConfigError, load_config
    from flame.config import Config
    with pytest.raises(ConfigError, match="train.track"):
        load_config(Config, None, ["train.track=tensorbored"])
    assert check_tracker(None) is None   # off: nothing to check
