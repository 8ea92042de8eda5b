"""torch-side helpers: seeding, device choice, package versions, and the CLI error wrapper."""
from __future__ import annotations

import importlib.metadata
import os
import random
import sys
from typing import Any, Callable

import numpy as np
import torch

from common.io import atomic_write, git_sha, load_json, save_json  # noqa: F401  (transitional re-export)


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


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide numerical results, for results.json."""
    versions = {}
    for name in ("torch", "numpy", "scipy", "transformers", "accelerate", "peft"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, ConnectionError, PermissionError,
               NotADirectoryError, IsADirectoryError)  # ConfigError is a ValueError


def run_cli(main: Callable[[], Any]) -> None:
    """Entry point for `python -m <paper>.main`: a bad config, file or value is one line on stderr and
    exit status 2, not a traceback; Ctrl-C is one line naming the run to resume, exit status 130.
    Set REPRO_DEBUG=1 to see the traceback."""
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("REPRO_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("REPRO_DEBUG"):
            raise
        runs = sys.modules.get("common.runs")  # set by start_run when a run folder exists
        run_dir = getattr(runs, "CURRENT_RUN", None)
        hint = f"; its last checkpoint is kept: resume with --resume {run_dir}" if run_dir else ""
        print(f"interrupted{hint}", file=sys.stderr)
        sys.exit(130)
