"""Run directories: config.yaml, log.txt, metrics.jsonl, results.json and checkpoints, the same in every paper.

    run_dir = start_run(cfg, "flame", "amazon-toys", tag="seed42")
    log_metrics(run_dir, {"epoch": 1, "valid/NDCG@20": 3.1})
    save_checkpoint(run_dir / "last.pt", {"model": model.state_dict(), "epoch": 1, "rng": rng_state()})
    write_results(run_dir, {"test": {...}, "seed": 42})

Runs go under `<run root>/<paper>/<dataset>/<stamp>_<tag>/`; the run root is a paper's `run_root` key,
else $REPRO_RUNS, else `<repo>/runs` (the folder that holds common/), whatever the current directory.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common.config import config_to_dict
from common.io import REPO, atomic_write, git_sha, save_json
from common.utils import package_versions


class _Tee:
    """Copy everything written to a stream into the run's log.txt."""

    def __init__(self, stream: Any, log_file: Any) -> None:
        self.stream, self.log_file = stream, log_file

    def write(self, text: str) -> int:
        self.log_file.write(text)
        self.log_file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _tee_stdout(log_path: Path) -> None:
    """Tee sys.stdout to `log_path` until the run (or the next run in this process) ends."""
    if isinstance(sys.stdout, _Tee):  # a second run in the same process: close the previous log
        sys.stdout.log_file.close()
        sys.stdout = sys.stdout.stream
    log_file = open(log_path, "a")
    sys.stdout = _Tee(sys.stdout, log_file)

    def restore() -> None:
        if isinstance(sys.stdout, _Tee) and sys.stdout.log_file is log_file:
            sys.stdout = sys.stdout.stream
        log_file.close()
    atexit.register(restore)


CURRENT_RUN: Path | None = None  # the folder of the run in progress, for run_cli's Ctrl-C message


def default_run_root() -> Path:
    """$REPRO_RUNS, else <repo>/runs: the same place from any current directory."""
    return Path(os.environ.get("REPRO_RUNS") or REPO / "runs").expanduser()


@contextlib.contextmanager
def _usable(folder: Path):
    """Turn OS errors while creating a run folder into one-line user errors naming the folder."""
    try:
        yield
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"run folder {folder} cannot be created: a file is in the way") from None
    except PermissionError:
        raise PermissionError(f"run folder {folder} is not writable (set run_root or $REPRO_RUNS)") from None


def claim_run_dir(parent: Path, name: str) -> Path:
    """Create and return parent/name, or parent/name-1, -2, ...: mkdir is the claim, so two runs started
    in the same second (in two processes) never share a folder."""
    with _usable(parent):
        parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(10_000):
        candidate = parent / (name if suffix == 0 else f"{name}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free run folder name for {name}")


# What a run leaves that a later run must never mix with its own (appended metrics, an old results.json).
RUN_RECORDS = ("metrics.jsonl", "results.json", "last.pt", "best.pt")


def held_records(run_dir: str | Path) -> list[str]:
    return [name for name in RUN_RECORDS if (Path(run_dir) / name).exists()]


def clear_records(run_dir: str | Path) -> None:
    """Remove an earlier run's records (and its log) from a folder that a fresh run starts in."""
    for name in (*RUN_RECORDS, "log.txt"):
        (Path(run_dir) / name).unlink(missing_ok=True)


def comparison_slot(run_dir: str | Path, cfg: Any) -> str:
    """What a comparison script does with one of its run folders, given the config it would run there:
    "run" (absent, or killed before its first checkpoint: start_run clears it), "resume" (stopped after a
    checkpoint), "reuse" (finished). A folder that holds a run of another config is refused in
    one line: reusing it would report that config's numbers under this one's name."""
    run_dir = Path(run_dir)
    if not held_records(run_dir):
        return "run"
    saved = run_dir / "config.yaml"
    try:
        same = saved.is_file() and yaml.safe_load(saved.read_text()) == yaml.safe_load(
            yaml.safe_dump(config_to_dict(cfg), sort_keys=True))
    except yaml.YAMLError:
        same = False
    if not same:
        raise FileExistsError(f"{run_dir} holds a run of another config (its config.yaml differs): remove it, or "
                              "give the comparison another --out")
    if (run_dir / "results.json").is_file():
        return "reuse"
    return "resume" if (run_dir / "last.pt").is_file() else "run"


def run_or_reuse(run: Any, cfg: Any, run_dir: str | Path) -> dict:
    """One cell of a comparison in `run_dir`: run(cfg, run_dir, resume=...) as comparison_slot decides, or
    the results.json of the finished run of the same config (so a stopped comparison picks up where it was)."""
    slot = comparison_slot(run_dir, cfg)
    if slot == "reuse":
        print(f"reusing the finished run {run_dir}")
        return {**json.loads((Path(run_dir) / "results.json").read_text()), "run_dir": str(run_dir)}
    return run(cfg, run_dir, resume=slot == "resume")


def start_run(cfg: Any, paper: str, dataset: str, tag: str = "", run_dir: str | Path | None = None,
              root: str | Path | None = None, resume: bool = False) -> Path:
    """Create the run directory, write the resolved config.yaml, print the git sha and the config.

    `root` None = default_run_root(); a relative root is relative to the current directory. A fresh (not
    `resume`) run in an explicit `run_dir` that holds an earlier run starts clean: that run's records
    (RUN_RECORDS, log.txt) are removed, so nothing is appended to its metrics and no old results.json or
    last.pt outlives a failure of this one."""
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(root).expanduser() if root is not None else default_run_root()
        run_dir = claim_run_dir(base / paper / dataset, f"{stamp}_{tag}" if tag else stamp)
    run_dir = Path(run_dir)
    with _usable(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write-test").touch()
        (run_dir / ".write-test").unlink()
    if not resume:
        clear_records(run_dir)
    global CURRENT_RUN
    CURRENT_RUN = run_dir
    resolved = config_to_dict(cfg)
    with atomic_write(run_dir / "config.yaml") as handle:
        yaml.safe_dump(resolved, handle, sort_keys=True)
    _tee_stdout(run_dir / "log.txt")
    print(f"[{paper}] run dir {run_dir} | git {git_sha()}")
    print(yaml.safe_dump(resolved, sort_keys=True).rstrip())
    return run_dir


def paper_of(run_dir: str | Path) -> str | None:
    """The paper that wrote a run folder, from the `[paper] run dir ...` line start_run logs; None when the
    folder has no such log (then a paper may still tell by the sections of its config.yaml)."""
    log = Path(run_dir) / "log.txt"
    if log.is_file():
        with open(log, errors="replace") as handle:
            for line in handle:
                if line.startswith("[") and "] run dir " in line:
                    return line[1: line.index("]")]
    return None


def check_resume_folder(run_dir: str | Path, paper: str, label: str, writer: Any = paper_of) -> Path:
    """--resume RUN_DIR must name an existing run folder that `paper` wrote (`label`: "a FLAME", say;
    writer(run_dir) tells which paper wrote a folder). One-line errors, before anything is read from it."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"nothing to resume: {run_dir} does not exist")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"--resume {run_dir}: a file, not a run folder")
    other = writer(run_dir)
    if other is not None and other != paper:
        raise ValueError(f"--resume {run_dir}: this folder is a {other} run, not {label} run "
                         f"(resume it with python -m {other}.main)")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {run_dir}: not a run folder (no config.yaml); "
                                "--resume takes a folder that a run wrote")
    return run_dir


def log_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one JSON object (one evaluation, epoch or round) to metrics.jsonl."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record, default=float) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl. A last line that does not parse is the one a kill cut short and is
    left out; a bad line before it is a damaged file (one-line ValueError naming file and line)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record; the file is damaged") from None
    return records


def truncate_metrics(run_dir: str | Path, keep: Any) -> list[dict]:
    """Rewrite metrics.jsonl with the records for which keep(record) is true (a resumed run drops what an
    interrupted one logged after its checkpoint, and a cut-short last line), atomically; returns them."""
    kept = [record for record in read_metrics(run_dir) if keep(record)]
    with atomic_write(Path(run_dir) / "metrics.jsonl") as handle:
        handle.write("".join(json.dumps(record, default=float) + "\n" for record in kept))
    return kept


def write_results(run_dir: str | Path, results: dict) -> dict:
    """Add provenance (git sha, package versions, device, time) and write results.json atomically."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    full = {**results, "git_sha": git_sha(), "versions": package_versions(), "device": device,
            "python": platform.python_version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json(Path(run_dir) / "results.json", full)
    return full


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save a plain dict of tensors and primitives, atomically (temp file + rename)."""
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by save_checkpoint; refuses pickled objects (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle that weights_only refuses
        reason = " ".join(str(err).split())[:120]
        raise ValueError(f"{path}: not a readable checkpoint (truncated or foreign file: {reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint of this project (a {type(state).__name__}, not a dict)")
    return state


def rng_state() -> dict:
    """Every global RNG's state as weights_only-safe values (for last.pt and --resume)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(value: float | torch.Tensor, where: str, what: str = "loss") -> None:
    """Stop on a NaN/inf `what` (a loss, an aggregated table) with one clear line instead of going on."""
    number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(number):
        raise FloatingPointError(f"non-finite {what} ({number}) at {where}: lower the learning rate or check the data")
