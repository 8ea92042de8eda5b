"""Who may write a run folder (common/runs.py writes its records): one owner, and never a mix with what was there.

- claim_run_dir: a new run's folder under the run root; mkdir is the claim, so two runs started in the same
  second (in two processes) never share a folder;
- lock_run / release_run: the owner's exclusive lock on `<run>/.run.lock` (fcntl.flock, released when the
  process ends, even by kill -9): a second process given the same folder fails in one line (RunFolderBusy)
  instead of mixing its records in;
- refused_folder / held_records / set_aside: a fresh run refuses a folder that holds anything (an earlier
  run's records, a user's files) unless `--overwrite`: then what was there moves into `previous-<time>/`
  inside it, never deleted;
- remove_stale_temps: the temp files a killed writer left in a folder this process holds.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import time
from pathlib import Path
from typing import Any

from common.results import ASIDE

LOCK_NAME = ".run.lock"           # the run folder's owner lock (see the module docstring)
_HELD: dict[Path, Any] = {}       # run folder (resolved) -> the open lock file this process holds on it


def _named(err: OSError, path: Any) -> OSError:
    """`err` with `path` as its file name (a write error knows no file name), and the setting that chose it."""
    if err.filename is not None:
        return err
    named = OSError(err.errno, err.strerror or str(err), str(path))
    return named


class RunFolderBusy(FileExistsError):
    """Another process holds the run folder's lock."""


def lock_run(run_dir: str | Path) -> None:
    """Take the run folder's exclusive lock for this process's life (or until release_run); a folder that
    another process holds is a one-line RunFolderBusy naming it and its holder."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:
        return
    try:
        handle = open(run_dir / LOCK_NAME, "a+")
    except OSError as err:
        raise _named(err, run_dir / LOCK_NAME) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = " ".join(handle.read().split()) or "another process"
        handle.close()
        raise RunFolderBusy(f"run folder {run_dir} is in use by another run ({owner}): wait for it to end, "
                            "or give another --run-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    handle.flush()
    _HELD[key] = handle


def release_run(run_dir: str | Path | None = None) -> None:
    """Give up the lock of `run_dir` (of every run folder this process holds when None)."""
    keys = list(_HELD) if run_dir is None else [Path(run_dir).resolve()]
    for key in keys:
        handle = _HELD.pop(key, None)
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


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


def _ours(name: str) -> bool:
    """Entries of a run folder that are no record: its lock, atomic_write's temp files, set-aside folders."""
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(".tmp")) or name.startswith(ASIDE)


def held_records(run_dir: str | Path) -> list[str]:
    """What a folder holds that a fresh run would mix with or overwrite (sorted names; [] when absent)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(entry.name for entry in run_dir.iterdir() if not _ours(entry.name))


def _aside_folder(run_dir: Path) -> Path:
    """A new, empty `previous-<time>[-n]/` folder inside `run_dir` (mkdir is the claim)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in range(10_000):
        aside = run_dir / (f"{ASIDE}{stamp}" if suffix == 0 else f"{ASIDE}{stamp}-{suffix}")
        try:
            aside.mkdir()
            return aside
        except FileExistsError:
            continue
    raise FileExistsError(f"{run_dir}: no free {ASIDE}<time> folder name")


def set_aside(run_dir: str | Path) -> Path | None:
    """Move everything a folder holds (held_records) into a new `previous-<time>/` inside it and return
    that folder (None when there was nothing): an earlier run's records are never deleted."""
    run_dir = Path(run_dir)
    held = held_records(run_dir)
    if not held:
        return None
    aside = _aside_folder(run_dir)
    for name in held:
        os.replace(run_dir / name, aside / name)
    return aside


def refused_folder(run_dir: str | Path, overwrite: bool = False) -> None:
    """The check start_run makes on a fresh run's explicit folder, made early (before data and training):
    a folder another process holds, or one that holds files without `overwrite`, is a one-line error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    lock = run_dir / LOCK_NAME
    if lock.is_file() and run_dir.resolve() not in _HELD:
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
            except BlockingIOError:
                handle.seek(0)
                owner = " ".join(handle.read().split()) or "another process"
                raise RunFolderBusy(f"run folder {run_dir} is in use by another run ({owner}): wait for it to "
                                    "end, or give another --run-dir") from None
    held = held_records(run_dir)
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise FileExistsError(f"run folder {run_dir} is not empty ({shown}): give a new --run-dir, "
                              f"--resume {run_dir} to continue its run, or --overwrite to move what it holds "
                              f"into {run_dir}/{ASIDE}<time>/")


def remove_stale_temps(run_dir: str | Path) -> list[str]:
    """Remove the temp files (`.<name>.<random>.tmp`) a killed writer left in a folder this process holds
    the lock of (no live writer can own them). Returns their names."""
    removed = []
    for entry in Path(run_dir).glob(".*.tmp"):
        if entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry.name)
    return removed
