"""Small shared helpers: seeding, device choice, atomic files, provenance (git sha, versions)."""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all CUDA devices too); optionally force deterministic kernels."""
    if deterministic:
        # Must be set before the first cuBLAS call for deterministic GEMMs on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def get_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; any other name is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available (use device=cpu or auto)")
    return device


def git_sha(path: str | Path = ROOT) -> str:
    """Short commit of the checkout holding `path`, '+dirty' if it has local changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Write to a temp file beside `path` and rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_json(path: str | Path, obj: Any) -> None:
    """Atomic, indented JSON (numpy and torch scalars converted)."""
    def default(value: Any) -> Any:
        if isinstance(value, (np.generic, torch.Tensor)):
            return value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=default)
        handle.write("\n")


def load_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide numerical results, for results.json."""
    versions = {}
    for name in ("torch", "numpy", "scipy", "transformers", "accelerate", "peft"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, ConnectionError)  # ConfigError is a ValueError


def run_cli(main: Callable[[], Any]) -> None:
    """Entry point for `python -m <paper>.main`: a bad config, file or value is one line on stderr and
    exit status 2, not a traceback. Set REPRO_DEBUG=1 to see the traceback."""
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("REPRO_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
