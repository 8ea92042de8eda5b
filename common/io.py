"""Files and places, with no torch: the repository root, the data and cache roots, atomic writes, JSON, git.

    with atomic_write(path) as handle:      # temp file beside `path`, renamed into place on success
        handle.write(text)
    save_json(run_dir / "results.json", results)

Everything that writes an artefact a later run may trust goes through `atomic_write`, so a crash or a
Ctrl-C leaves either the old file or the new one, never half of one. This module is the bottom layer of
`common/`: it imports only the standard library.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent  # the folder that holds common/ (and the paper folders)


def installed() -> bool:
    """Whether common/ was installed as a package (pip install without -e: site-packages, a --target folder)
    rather than being part of a source tree (a clone, an editable install, a copied-out paper + common/):
    pip puts a *.dist-info folder beside the packages it installs, a source tree has none."""
    return any(REPO.glob("*.dist-info")) or REPO.name in ("site-packages", "dist-packages")


def project_root() -> Path:
    """Where runs/ and data/ go by default: the source tree that holds common/ (the same from any current
    directory in it), or the current directory when common/ is an installed package (never site-packages)."""
    return Path.cwd() if installed() else REPO


_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Where raw files live: explicit override (a paper's `data.root`) > $REPRO_DATA > <project>/data/raw."""
    return Path(override or os.environ.get("REPRO_DATA") or project_root() / "data" / "raw").expanduser()


def default_run_root() -> Path:
    """$REPRO_RUNS, else <project>/runs: the source tree's runs/ from any current directory in it, or ./runs
    when common/ is an installed package (project_root; never inside site-packages)."""
    return Path(os.environ.get("REPRO_RUNS") or project_root() / "runs").expanduser()


def cache_root() -> Path:
    """Where processed artefacts go: $REPRO_CACHE > <project>/data/processed (never the data root).
    A $REPRO_CACHE that names a file is a one-line error naming the variable."""
    path = Path(os.environ.get("REPRO_CACHE") or project_root() / "data" / "processed").expanduser()
    if path.exists() and not path.is_dir():
        setting = f"$REPRO_CACHE={os.environ['REPRO_CACHE']}" if os.environ.get("REPRO_CACHE") else "the cache"
        raise NotADirectoryError(f"{setting}: {path} is a file, not a folder (set $REPRO_CACHE to a folder)")
    return path


def setting_for(path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> str:
    """The setting that chose `path`, for an error message: the run folder in progress (`run_dir`) or the
    run root, the cache or the data root (and their variables); '' when `path` is under none of them."""
    try:
        target = Path(os.path.abspath(os.fspath(path)))
    except (TypeError, ValueError):
        return ""
    runs = "the run folder: --run-dir, run_root or $REPRO_RUNS"
    places = ([(Path(run_dir), runs)] if run_dir is not None else []) + [
        (Path(os.environ.get("REPRO_RUNS") or project_root() / "runs").expanduser(), runs),
        (Path(os.environ.get("REPRO_CACHE") or project_root() / "data" / "processed").expanduser(),
         "the cache: $REPRO_CACHE"),
        (data_root(), "the data root: data.root or $REPRO_DATA")]
    for base, setting in places:
        base = Path(os.path.abspath(base))
        if target == base or base in target.parents:
            return setting
    return ""


def check_writable(folder: str | os.PathLike, what: str, setting: str) -> Path:
    """`folder` is (or can be created as) a folder this process can write to: its nearest existing
    ancestor is a folder where a probe file can be created and removed. Creates no folder. One-line
    errors name `what` (e.g. "run folder"), the path and `setting` (what to change)."""
    folder = Path(folder).expanduser()
    probe = folder
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise NotADirectoryError(f"{what} {folder} cannot be created: a file is in the way "
                                     f"({probe} is a file; {setting})")
        fd, name = tempfile.mkstemp(dir=probe, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        if not err.errno:  # ours, above
            raise
        raise PermissionError(f"{what} {folder} is not writable ({err.strerror} at {probe}; {setting})") from None
    return folder


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Yield a handle on a temp file beside `path`; rename it onto `path` only if the block succeeds.

    The temp name is unique (mkstemp), so concurrent writers never share a temp file; the last rename
    wins. On any exception (Ctrl-C included) the temp file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600: give the mode open() would (logs, results alike)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno and err.filename is None:  # a failed write names no file
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path` (and an older build) whole.

    A reader sees the old folder or the complete new one, never a half-written mix; on failure the temp
    folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():  # move the old build aside first: os.replace cannot replace a non-empty folder
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / "x")
            shutil.rmtree(old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, waiting: str = "", remove: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of artefact `path` across processes (an fcntl.flock on `<path>.lock` beside
    it, released when the holder ends, even by kill -9). A second process blocks until the first is done
    (printing `waiting` first, if given), then sees what it built: one builder per artefact.
    `remove`: the holder deletes the lock file when done (a folder keeps no trace of the lock); a waiter that
    then holds the lock of a deleted file takes the lock again on the current one (git-style lock files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f"{path.name}.lock"
    told = False
    while True:
        handle = open(lock, "a")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting and not told:
                    print(waiting, flush=True)
                    told = True
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(lock).st_ino
            except FileNotFoundError:
                current = None
            if remove and current != os.fstat(handle.fileno()).st_ino:
                continue  # the holder we waited for removed this file: lock the current one
            try:
                yield
            finally:
                if remove:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock)
                fcntl.flock(handle, fcntl.LOCK_UN)
            return
        finally:
            handle.close()


_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def safe_filename(text: str, max_len: int = 100) -> str:
    """A file name for an id that comes from downloaded data: the id itself when it is 1..max_len
    characters of [A-Za-z0-9_.-], starting with neither '.' nor '-' (every Amazon ASIN), else
    'id-<sha256 of the id, 32 hex>': never a separator, '..', a hidden name or an overlong name."""
    text = str(text)
    if 0 < len(text) <= max_len and set(text) <= _SAFE and text[0] not in ".-":
        return text
    return "id-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _json_default(value: Any) -> Any:
    """numpy / torch scalars and arrays (anything with .item and .tolist), and paths."""
    if hasattr(value, "item") and hasattr(value, "tolist"):
        return value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic, indented JSON (numpy and torch values converted)."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def load_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a malformed one is a one-line ValueError that names the file."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); "
                         "delete or fix the file") from None


def git_sha(path: str | os.PathLike = REPO) -> str:
    """Short commit of the checkout holding `path`, '+dirty' if it has local changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")
