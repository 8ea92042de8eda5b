"""Optional experiment tracking through accelerate's tracker classes: TensorBoard, W&B or MLflow.

    tracker = open_tracker("tensorboard", run_dir, paper="flame", config=resolved)   # None when kind is None
    tracker.log(record)       # the record metrics.jsonl gets: its numbers, at the record's step
    tracker.close()

A paper selects one with its `train.track` key (null = off, the default); common.runs.start_run opens it and
common.runs.log_metrics hands it every record it appends to metrics.jsonl, so the tracker shows the same scalars
as the file, under the same names (a nested dict's keys joined with "/"). Strings, booleans and lists stay in
metrics.jsonl only. The x-axis is the record's `step`, else its `epoch`, else its line number in metrics.jsonl
(F3CRec's rounds restart in every block). Where each one writes:
- tensorboard: <run>/tensorboard/ (`tensorboard --logdir runs/` shows every run); a resumed run purges the
  steps its resume replays, so the curves match metrics.jsonl;
- wandb: project "repro-<paper>" (or $WANDB_PROJECT), run named after the run folder, files under <run>/;
- mlflow: experiment "repro-<paper>" (or $MLFLOW_EXPERIMENT_NAME) at $MLFLOW_TRACKING_URI (default ./mlruns).
The resolved config goes to W&B's and MLflow's run configuration (flattened); TensorBoard has config.yaml
beside it. Only the process that writes the run folder tracks (start_run runs on rank 0 alone).
The packages are optional extras: a tracker whose package is missing is a one-line error naming the pip line,
raised before the run folder is claimed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

from common.config import ConfigError, flatten

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # kind -> its package (pip name)
STEP_KEYS = ("step", "epoch")  # the first one a record holds (as an int) is its x-axis value


def check_tracker(kind: Optional[str]) -> None:
    """A tracker that cannot start here is a one-line error naming the pip line (before anything is written)."""
    if kind is None:
        return
    if kind not in PACKAGES:
        raise ConfigError(f"train.track={kind}: not a tracker; choose null, {', '.join(PACKAGES)}")
    missing = [name for name in ("accelerate", PACKAGES[kind]) if importlib.util.find_spec(name) is None]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise ConfigError(f"train.track={kind} needs the {' and '.join(missing)} package{plural}: "
                          f"pip install {' '.join(missing)}")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, nested dicts flattened with "/" (booleans, strings, lists and
    None left out); a non-finite number stays (a tracker shows NaN as NaN)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{inner}": number for inner, number in scalars(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = value
    return out


class Tracker:
    """One run's tracker: accelerate's tracker class, started on the first record (so a resume knows the
    first step it replays), fed the scalars of every record, finished by close()."""

    def __init__(self, kind: str, run_dir: Path, paper: str, config: dict) -> None:
        self.kind, self.run_dir, self.paper, self.config = kind, Path(run_dir), paper, config
        self.lines: Optional[int] = None  # records in metrics.jsonl so far (the fallback x-axis)
        self.impl: Any = None

    def _start(self, first_step: int) -> None:
        from accelerate import PartialState, tracking
        # accelerate's trackers log through its logger, which wants the process state first: one process,
        # or the process group a launcher (torchrun) and the paper already set up, which it joins as is
        PartialState()
        name = self.run_dir.name
        if self.kind == "tensorboard":
            # purge_step: events of an earlier (interrupted) attempt at or after the first step logged now are
            # dropped when read, so a resumed run's curves are those of metrics.jsonl (truncated likewise)
            impl = tracking.TensorBoardTracker("tensorboard", str(self.run_dir), purge_step=first_step)
        elif self.kind == "wandb":
            impl = tracking.WandBTracker(os.environ.get("WANDB_PROJECT") or f"repro-{self.paper}", name=name,
                                         dir=str(self.run_dir), resume="allow", id=_run_id(self.run_dir))
        else:
            impl = tracking.MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"repro-{self.paper}",
                                          run_name=name)
        impl.main_process_only = False  # log on the rank that calls it: start_run runs on the writing rank only
        impl.start()
        if self.kind != "tensorboard":
            impl.store_init_configuration({key: value if isinstance(value, (int, float, str, bool)) else str(value)
                                           for key, value in flatten(self.config).items()})
        self.impl = impl

    def log(self, record: dict) -> None:
        """Track `record`, which log_metrics has just appended to metrics.jsonl."""
        if self.lines is None:  # counted once the run has cut its metrics.jsonl back (a resume) and appended
            path = self.run_dir / "metrics.jsonl"
            self.lines = sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 1
        else:
            self.lines += 1
        step = next((record[key] for key in STEP_KEYS if isinstance(record.get(key), int)
                     and not isinstance(record.get(key), bool)), self.lines)
        values = scalars(record)
        if not values:
            return
        if self.impl is None:
            self._start(step)
        self.impl.log(values, step=step)

    def close(self) -> None:
        if self.impl is not None:
            impl, self.impl = self.impl, None
            impl.finish()


def _run_id(run_dir: Path) -> str:
    """A W&B run id that is the same for a run folder and its resumes (W&B ids: letters, digits, - and _)."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


def open_tracker(kind: Optional[str], run_dir: str | os.PathLike, paper: str, config: dict) -> Optional[Tracker]:
    """The run's tracker (None when `kind` is None); `config`: the resolved config, for W&B / MLflow."""
    if kind is None:
        return None
    check_tracker(kind)
    return Tracker(kind, Path(run_dir), paper, config)
