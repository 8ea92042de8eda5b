"""torch-side helpers: seeding, device choice, package versions (torch is imported by the helpers that use it,
so a run that never touches torch never pays for its import)."""
from __future__ import annotations

import importlib.metadata
import os
import sys
import random

import numpy as np


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all CUDA devices too); optionally force deterministic kernels."""
    if deterministic:
        # Must be set before the first cuBLAS call for deterministic GEMMs on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def get_device(name: str = "auto") -> "torch.device":
    """'auto' picks CUDA when available, else CPU; any other name is passed to torch.device."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available (use device=cpu or auto)")
    return device


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide numerical results, for results.json: torch and numpy always;
    transformers, accelerate, peft, flwr and numba when this process imported them (the run used them)."""
    versions = {}
    for name in ("torch", "numpy", "transformers", "accelerate", "peft", "flwr", "numba"):
        if name not in ("torch", "numpy") and name not in sys.modules:
            continue
        try:
            versions[name] = _version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _version(name: str) -> str:
    """importlib.metadata.version(name), read from the metadata's header lines (a plain scan: the email
    parser that version() uses costs ≈ 20 ms of imports and parsing per run)."""
    dist = importlib.metadata.distribution(name)
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    for line in text.splitlines():
        if not line.strip():          # the end of the header block
            break
        if line.startswith("Version:"):
            return line[len("Version:"):].strip()
    return dist.version
