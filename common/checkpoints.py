"""Checkpoints: save_checkpoint / load_checkpoint and the global RNG state (rng_state / set_rng_state).

    save_checkpoint(run_dir / "last.pt", {"model": model.state_dict(), "epoch": 1, "rng": rng_state()})
    state = load_checkpoint(run_dir / "last.pt")      # a dict; pickled objects are refused

Two formats, one loader:
- a torch checkpoint (torch.save's zip) when the state holds any torch tensor (or no array at all); read back with
  torch.load(weights_only=True), so a pickled object in a foreign file is refused, never run;
- a numpy checkpoint when every array in the state is a numpy array: an uncompressed .npz (a zip of .npy files)
  whose first member, `__state__`, is the state's structure as JSON, each array replaced by {"__array__": i},
  and whose other members are those arrays (a0, a1, ...); loaded with allow_pickle=False, without torch.
load_checkpoint tells them apart by the file's first zip member name (`__state__` right after the first local
header: a numpy checkpoint; anything else goes to torch.load). torch is imported only when a torch checkpoint is
written or read, or by rng_state / set_rng_state: the compiled F3CRec path (numpy state) never imports it.

Both are written atomically (temp file + rename); a last.pt in the folder of a run started by common.runs.start_run
carries that run's identity (its config digest, checked on --resume).
"""
from __future__ import annotations

import errno as errnos
import io
import json
import random
import sys
from pathlib import Path

import numpy as np

from common.io import atomic_write, setting_for


ARRAY_STATE = "__state__"   # the member of a numpy checkpoint holding its JSON (written first: the file's first name)


def _is_tensor(value) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _array_kinds(value) -> set[str]:
    """Which kinds of array a nested dict / list holds: {"numpy", "torch"} or part of it."""
    if isinstance(value, dict):
        return set().union(*map(_array_kinds, value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*map(_array_kinds, value)) if value else set()
    return {"numpy"} if isinstance(value, np.ndarray) else {"torch"} if _is_tensor(value) else set()


def _to_json(value, arrays: list):
    """`value` with every numpy array replaced by {"__array__": its index in `arrays`} (appended there)."""
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {"__array__": len(arrays) - 1}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"a numpy checkpoint's dict keys are strings, not {sorted(map(repr, value))[:3]}")
        return {key: _to_json(item, arrays) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item, arrays) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"a numpy checkpoint holds arrays, numbers, strings, lists and dicts, not a {type(value).__name__}")


def _from_json(value, arrays):
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return arrays[f"a{value['__array__']}"]
        return {key: _from_json(item, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item, arrays) for item in value]
    return value


def _write_arrays(handle, state: dict) -> None:
    """A numpy checkpoint: an uncompressed .npz (a zip of .npy files) whose first member is the state's
    structure as JSON and the others its arrays; no pickle anywhere, so loading it runs no code."""
    arrays: list[np.ndarray] = []
    text = json.dumps(_to_json(state, arrays), allow_nan=True).encode()
    np.savez(handle, **{ARRAY_STATE: np.frombuffer(text, dtype=np.uint8)},
             **{f"a{i}": array for i, array in enumerate(arrays)})


def _is_array_head(head: bytes) -> bool:
    """Whether a file starting with `head` is a numpy checkpoint: a zip's first local header is 30 bytes, then
    the first member's name."""
    return head[:4] == b"PK\x03\x04" and head[30:30 + len(ARRAY_STATE)] == ARRAY_STATE.encode()


def _is_array_checkpoint(path: Path) -> bool:
    with open(path, "rb") as handle:
        return _is_array_head(handle.read(30 + len(ARRAY_STATE)))


def _read_arrays(path) -> dict:
    """A numpy checkpoint's state from a path or a binary file object."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    return _from_json(json.loads(arrays.pop(ARRAY_STATE).tobytes()), arrays)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save a plain dict of tensors and primitives, atomically (temp file + rename): a write that
    fails (a full disk) leaves the previous file and no temp file. A last.pt in the folder of a run started
    by common.runs.start_run carries that run's identity (`run_identity`: its config digest and inputs). A
    state whose arrays are all numpy arrays (no tensor) is written without torch, as a numpy checkpoint
    (`_write_arrays`); load_checkpoint reads both kinds."""
    runs = sys.modules.get("common.runs")   # not imported (runs imports this module): no run started here
    path = Path(path)
    run = runs._RUNS.get(path.parent.resolve()) if runs is not None and path.name == "last.pt" else None
    if run is not None:
        state = {**state, "run_identity": {"config_sha256": run["config_sha256"], "paper": run["paper"],
                                           "inputs": run["inputs"]}}
    numpy_only = _array_kinds(state) == {"numpy"}
    try:
        with atomic_write(path, "wb") as handle:
            if numpy_only:
                _write_arrays(handle, state)
            else:
                import torch
                torch.save(state, handle)
    except (RuntimeError, OSError) as err:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
        text = " ".join(str(err).split())
        if isinstance(err, OSError) and not numpy_only or isinstance(err, RuntimeError) and "writ" not in text.lower():
            raise
        where = setting_for(path, getattr(runs, "CURRENT_RUN", None))
        raise OSError(getattr(err, "errno", None) or errnos.EIO, f"cannot write checkpoint {path} ({text[:160]}); "
                      "the previous one is kept" + (f" ({where})" if where else ""), str(path)) from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by save_checkpoint; refuses pickled objects (torch's weights_only=True; a
    numpy checkpoint holds none and is read without torch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if _is_array_checkpoint(path):
            state = _read_arrays(path)
        else:
            import torch
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle that weights_only refuses
        reason = " ".join(str(err).split())[:120]
        raise ValueError(f"{path}: not a readable checkpoint (truncated or foreign file: {reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint of this project (a {type(state).__name__}, not a dict)")
    return state


def to_bytes(state: dict) -> bytes:
    """`state` in save_checkpoint's formats, in memory (torch.save's when it holds a torch tensor, else a numpy
    checkpoint): what a Flower node keeps in its Context.state and journal."""
    buffer = io.BytesIO()
    if "torch" not in _array_kinds(state):
        _write_arrays(buffer, state)
    else:
        import torch
        torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    """The state to_bytes wrote (pickled objects refused, as load_checkpoint; no torch for a numpy one)."""
    if _is_array_head(data[:30 + len(ARRAY_STATE)]):
        return _read_arrays(io.BytesIO(data))
    import torch
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every global RNG's state as weights_only-safe values (for last.pt and --resume)."""
    import torch
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
    import torch
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
