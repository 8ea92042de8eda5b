"""The few array operations that the shared state code (client_state.py, server.py, the block-end scores in
round.py) needs on both kinds of arrays: torch tensors (reference, vectorised and Flower simulators) and numpy
arrays (the compiled simulator, which never imports torch). Each helper dispatches on the kind of array it
is given and imports nothing: a tensor can only reach it once torch is imported.
"""
from __future__ import annotations

import sys

import numpy as np


def is_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_dtype(name: str | None, like):
    return like.dtype if name is None else getattr(sys.modules["torch"], name)


def zeros(like, shape: tuple, dtype: str | None = None):
    """Zeros of `shape` of like's kind and device; dtype "int64" / "bool" / None (like's dtype)."""
    if is_tensor(like):
        return sys.modules["torch"].zeros(shape, dtype=_torch_dtype(dtype, like), device=like.device)
    return np.zeros(shape, dtype=like.dtype if dtype is None else dtype)


def clone(x):
    return x.clone() if is_tensor(x) else x.copy()


def cat(parts: list):
    return sys.modules["torch"].cat(parts) if is_tensor(parts[0]) else np.concatenate(parts)


def stack(parts: list):
    return sys.modules["torch"].stack(parts) if is_tensor(parts[0]) else np.stack(parts)


def where(cond, a, b):
    return sys.modules["torch"].where(cond, a, b) if is_tensor(a) else np.where(cond, a, b)


def take_along(x, index):
    """x[r, index[r, j]] for every row r (torch.gather / numpy.take_along_axis along dim 1)."""
    return x.gather(1, index) if is_tensor(x) else np.take_along_axis(x, index, 1)


def numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if is_tensor(x) else np.asarray(x)


def like(x, ref):
    """x (a numpy array or tensor) as an array of ref's kind, dtype and device."""
    if is_tensor(ref):
        return sys.modules["torch"].as_tensor(x).to(ref)
    return numpy(x).astype(ref.dtype, copy=False)


def convert(value, tensor: bool, device=None):
    """A nested dict / list of arrays with every array (numpy or torch) made a torch tensor on `device`
    (tensor=True; this imports torch) or a numpy array (tensor=False); other values unchanged."""
    if isinstance(value, dict):
        return {k: convert(v, tensor, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(convert(v, tensor, device) for v in value)
    if isinstance(value, np.ndarray) or is_tensor(value):
        if not tensor:
            return numpy(value)
        import torch
        return torch.as_tensor(value, device=device)
    return value
