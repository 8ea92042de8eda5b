"""Run directories: config.yaml, log.txt, metrics.jsonl, results.json and checkpoints, the same in every paper.

    run_dir = start_run(cfg, "flame", "amazon-toys", tag=run_name("flame", 42))
    log_metrics(run_dir, {"epoch": 1, "valid/NDCG@20": 3.1})
    save_checkpoint(run_dir / "last.pt", {"model": model.state_dict(), "epoch": 1, "rng": rng_state()})
    write_results(run_dir, {"dataset": "amazon-toys", "method": "flame", "seed": 42,
                            "metrics": {"test/ndcg@20": 0.071}, "test": {...}})   # results.json, common.results.RESULT_KEYS first

A config with a `train.track` key (null | tensorboard | wandb | mlflow) also sends every metrics.jsonl record to
that experiment tracker (common/tracking.py): start_run opens it, log_metrics feeds it, write_results closes it.
Checkpoints (save_checkpoint, load_checkpoint, rng_state, set_rng_state) live in common/checkpoints.py.

Runs go under `<run root>/<paper>/<dataset>/<stamp>_<method>_seed<seed>[_<tag>]/` (run_name); the run
root is a paper's `run_root` key, else $REPRO_RUNS, else `<repo>/runs` (the folder that holds common/),
whatever the current directory; when common/ is an installed package (not a source tree), `./runs` under
the current directory.

A run folder has one owner and one identity:
- a fresh run refuses a folder that holds anything (an earlier run's records, a user's files) unless
  `overwrite=True` (`--overwrite`): then what was there moves into `previous-<time>/` inside it, never deleted;
- the run holds an exclusive lock on `<run>/.run.lock` (fcntl.flock, released when the process ends, even by
  kill -9): a second process given the same folder fails in one line instead of mixing its records in;
- `resume=True` runs the folder's saved config.yaml (not rewritten): a changed key is refused unless the
  config class lists it in RESUME_FREE (recorded in log.txt and results.json), and last.pt must carry the
  digest of that config.yaml (common.checkpoints.save_checkpoint writes it into every last.pt of a run
  started here).
The claiming, lock and set-aside of the folder are in common/run_folder.py.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from common.checkpoints import load_checkpoint
from common.config import ConfigError, changed_from_defaults, config_to_dict, resume_changes
from common.io import atomic_write, default_run_root, git_sha, save_json
from common.results import RESULTS_SCHEMA
from common.run_folder import (_aside_folder, _named, _usable, claim_run_dir, held_records, lock_run, refused_folder,
                               release_run, remove_stale_temps, set_aside)
from common.tracking import check_tracker, open_tracker
from common.utils import package_versions


class _Tee:
    """Copy everything written to a stream into the run's log.txt."""

    def __init__(self, stream: Any, log_file: Any) -> None:
        self.stream, self.log_file = stream, log_file

    def write(self, text: str) -> int:
        try:
            self.log_file.write(text)
            self.log_file.flush()
        except OSError as err:  # a full disk: say which file, not "[Errno 28]" alone
            raise _named(err, self.log_file.name) from None
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
_RUNS: dict[Path, dict] = {}      # run folder (resolved) -> its identity, written into every last.pt
_HINTS: list[str] = []            # what Ctrl-C should say instead of naming CURRENT_RUN (interrupt_hint)
_TRACKERS: dict[Path, Any] = {}   # run folder (resolved) -> its open experiment tracker (train.track)


@contextlib.contextmanager
def interrupt_hint(text: str) -> Iterator[None]:
    """While inside, Ctrl-C / SIGTERM says `text` (e.g. FLAME's stage 1: rerun the same command) instead of
    naming the run folder in progress."""
    _HINTS.append(text)
    try:
        yield
    except KeyboardInterrupt:  # kept for run_cli, which prints it once the interrupt has unwound
        raise
    except BaseException:
        _HINTS.remove(text)
        raise
    _HINTS.remove(text)


def interrupt_hint_text() -> str:
    """What run_cli adds to 'interrupted': how to continue. Names --resume RUN only when RUN holds a last.pt."""
    if _HINTS:
        return f"; {_HINTS[-1]}"
    run = CURRENT_RUN
    if run is None:
        return ""
    if (Path(run) / "last.pt").is_file():
        return f"; its last checkpoint is kept: resume with --resume {run}"
    return (f"; it stopped before its first checkpoint, so there is nothing to resume: start it again "
            f"({run} keeps its log; to reuse that folder add --run-dir {run} --overwrite)")


# yaml.safe_load's loader with libyaml's parser where PyYAML has it (the same safe constructor and resolver:
# the same values, 8× faster on a config.yaml), else safe_load's own
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def config_digest(tree: Any) -> str:
    """The identity of a run: sha256 (16 hex) of its config as a canonical JSON text."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def saved_config(run_dir: str | Path) -> dict:
    """The run folder's config.yaml as a mapping; a missing or unreadable one is a one-line error."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: not a run folder (no config.yaml); "
                                "--resume takes a folder that a run wrote")
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not readable YAML ({' '.join(str(err).split())[:120]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a config mapping; --resume takes a folder that a run wrote")
    return saved


def checkpoint_identity(run_dir: str | Path) -> dict | None:
    """The identity that `run_dir`/last.pt carries, checked against the folder's config.yaml; None when
    there is no last.pt. A last.pt of another run (another seed's, copied in) or of no recorded run is
    refused in one line: resuming it would report its numbers under this folder's config."""
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    if not last.is_file():
        return None
    want = config_digest(saved_config(run_dir))
    state = load_checkpoint(last)
    identity = state.get("run_identity")
    if not isinstance(identity, dict) or "config_sha256" not in identity:
        raise ValueError(f"{last}: this checkpoint carries no run identity (written by an older version, or "
                         f"copied in): it cannot be told to belong to {run_dir}'s config.yaml; start a new run")
    if identity["config_sha256"] != want:
        raise ValueError(f"{last}: this checkpoint belongs to another run (config digest "
                         f"{identity['config_sha256']}, {run_dir / 'config.yaml'} has {want}): refusing to resume "
                         "it; start a new run")
    return identity


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
    if slot == "run" and held_records(run_dir):  # the same config's attempt killed before a checkpoint
        lock_run(run_dir)
        aside = set_aside(run_dir)
        release_run(run_dir)
        print(f"{run_dir}: an attempt stopped before its first checkpoint; its files moved to {aside}")
    return run(cfg, run_dir, resume=slot == "resume")


def start_run(cfg: Any, paper: str, dataset: str, tag: str = "", run_dir: str | Path | None = None,
              root: str | Path | None = None, resume: bool = False, overwrite: bool = False,
              inputs: dict | None = None, preface: tuple[str, ...] = ()) -> Path:
    """Claim and lock the run directory, write the resolved config.yaml, print the git sha and the config.

    `root` None = default_run_root(); a relative root is relative to the current directory. A fresh run in
    an explicit `run_dir` that holds anything is refused (one line) unless `overwrite`: then what was there
    moves into `previous-<time>/`. `resume` keeps config.yaml and checks the command's config against it
    (changes outside the config class's RESUME_FREE refused) and last.pt against it (checkpoint_identity).
    `inputs`: files the run builds on (FLAME's frozen net), recorded in last.pt so a resume uses the same.
    The tracker named by `cfg.train.track` (if any) is checked first and opened for log_metrics.
    `preface`: lines the run printed before its folder could be claimed (its plan), written to log.txt first."""
    track = getattr(getattr(cfg, "train", None), "track", None)
    check_tracker(track)  # a missing package: one line, before any folder exists
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(root).expanduser() if root is not None else default_run_root()
        run_dir = claim_run_dir(base / paper / dataset, f"{stamp}_{tag}" if tag else stamp)
    run_dir = Path(run_dir)
    with _usable(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    release_run()  # one run at a time per process: an earlier run of this process is over
    lock_run(run_dir)  # before anything in the folder is read, moved or written
    resolved = config_to_dict(cfg)
    changed, aside = {}, None
    try:
        if resume:
            saved = saved_config(run_dir)
            changed = resume_changes(saved, resolved, getattr(type(cfg), "RESUME_FREE", ()), run_dir)
            identity = checkpoint_identity(run_dir)
            digest = config_digest(saved)
            inputs = (identity or {}).get("inputs") or inputs
            if (run_dir / "results.json").is_file():  # a finished run continued (more epochs, blocks): its
                aside = _aside_folder(run_dir)         # results.json is kept, not overwritten
                os.replace(run_dir / "results.json", aside / "results.json")
        else:
            refused_folder(run_dir, overwrite)
            aside = set_aside(run_dir)
            with atomic_write(run_dir / "config.yaml") as handle:
                yaml.safe_dump(resolved, handle, sort_keys=True)
            digest = config_digest(yaml.load((run_dir / "config.yaml").read_text(), Loader=SAFE_LOADER))
        stale = remove_stale_temps(run_dir)
    except BaseException:
        release_run(run_dir)
        raise
    global CURRENT_RUN
    CURRENT_RUN = run_dir
    _RUNS[run_dir.resolve()] = {"config_sha256": digest, "paper": paper, "inputs": dict(inputs or {}),
                                "resume_changes": changed, "dataset": dataset,
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if preface:
        with open(run_dir / "log.txt", "a") as handle:
            handle.writelines(line + "\n" for line in preface)
    _tee_stdout(run_dir / "log.txt")
    close_tracker(run_dir)
    tracker = open_tracker(track, run_dir, paper, resolved)
    if tracker is not None:
        _TRACKERS[run_dir.resolve()] = tracker
    # the checkout's commit as the run starts (the code it imported), asked of git once: results.json reuses it
    _RUNS[run_dir.resolve()]["commit"] = commit = git_sha()
    print(f"[{paper}] run dir {run_dir} | git {commit}" + (" | resumed" if resume else ""))
    if aside is not None and resume:
        print(f"the finished run's results.json moved to {aside} (this resume writes a new one)")
    elif aside is not None:
        print(f"--overwrite: what {run_dir} held moved to {aside}")
    if stale:
        print(f"removed temp files a stopped writer left: {', '.join(stale)}")
    if changed:
        print("resumed with changed settings (allowed: they do not change the run's numbers): "
              + "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items()))
    print(config_line(cfg, run_dir))
    return run_dir


def config_line(cfg: Any, run_dir: Path) -> str:
    """What the console shows of a run's config: the keys that differ from the paper's defaults, one per line
    (the full resolved config is in `run_dir`/config.yaml)."""
    changed = changed_from_defaults(cfg)
    where = f"all keys in {Path(run_dir) / 'config.yaml'}"
    if not changed:
        return f"config: the paper's defaults ({where})"
    return "\n".join([f"config: {len(changed)} key(s) differ from the paper's defaults ({where}):"]
                     + [f"  {key} = {value!r}" for key, value in changed.items()])


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
    """Append one JSON object (one evaluation, epoch or round) to metrics.jsonl, and send its numbers to the
    run's experiment tracker when it has one (train.track)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
    except OSError as err:  # a cut-short last line is what read_metrics leaves out
        raise _named(err, path) from None
    if _TRACKERS:
        tracker = _TRACKERS.get(Path(run_dir).resolve())
        if tracker is not None:
            tracker.log(record)


def close_tracker(run_dir: str | Path | None = None) -> None:
    """Finish the experiment tracker of `run_dir` (of every run when None): its files flushed and closed."""
    keys = list(_TRACKERS) if run_dir is None else [Path(run_dir).resolve()]
    for key in keys:
        tracker = _TRACKERS.pop(key, None)
        if tracker is not None:
            tracker.close()


atexit.register(close_tracker)


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


def run_name(method: str, seed: int, tag: str = "") -> str:
    """The tag part of every run folder's name, `<stamp>_<method>_seed<seed>[_<tag>]` (one scheme for the
    three papers; a comparison's cells are `<method>_seed<seed>`)."""
    return f"{method}_seed{seed}" + (f"_{tag}" if tag else "")


def device_name() -> str:
    """The accelerator's name, else the CPU's (platform.processor, or "cpu"); a process that never imported
    torch ran on the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or "cpu"


def write_results(run_dir: str | Path, results: dict) -> dict:
    """Write results.json atomically: the keys of common.results.RESULT_KEYS first (from `results` where it has them:
    dataset, method, variant, seed, metrics, threads; the provenance filled in here), then the paper's own
    detail (the rest of `results`)."""
    run = _RUNS.get(Path(run_dir).resolve()) or {}
    head = {"schema": RESULTS_SCHEMA, "paper": run.get("paper"), "dataset": run.get("dataset"), "method": None,
            "variant": None, "seed": None, "metrics": {},
            "threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
            "device": device_name(), "versions": {"python": platform.python_version(), **package_versions()},
            "commit": run.get("commit") or git_sha(), "config_digest": run.get("config_sha256"), "started": run.get("started"),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for key in ("paper", "dataset", "method", "variant", "seed", "metrics", "threads"):
        if results.get(key) is not None:
            head[key] = results[key]
    bad = sorted(key for key, value in head["metrics"].items()
                 if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0)
    if bad:  # percents or counts never enter the cross-paper record; the run's own detail still has them
        print(f"results.json: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} left out of `metrics` "
              "(not a fraction in [0, 1])")
        head["metrics"] = {key: value for key, value in head["metrics"].items() if key not in bad}
    full = {**head, **{key: value for key, value in results.items() if key not in head}}
    if run.get("resume_changes"):
        full["resume_changes"] = {key: list(pair) for key, pair in run["resume_changes"].items()}
    save_json(Path(run_dir) / "results.json", full)
    close_tracker(run_dir)
    release_run(run_dir)  # the run's last record: the folder is free again
    return full


def check_finite(value, where: str, what: str = "loss") -> None:
    """Stop on a NaN/inf `what` (a loss, an aggregated table: a number, numpy scalar or one-element tensor)
    with one clear line instead of going on."""
    number = float(value.detach()) if hasattr(value, "detach") else float(value)
    if not math.isfinite(number):
        raise FloatingPointError(f"non-finite {what} ({number}) at {where}: lower the learning rate or check the data")
