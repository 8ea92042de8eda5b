"""Per-user random streams (§13 "Per-user random streams"): every random number a client uses comes from
its own stream, keyed by (seed, block, round, user, purpose), so one client can draw alone and a vectorised
simulator can draw every client's numbers at once, bit-identically, without a loop over users.

A stream is counter-based [D]: value j of the stream with key k is SplitMix64's output mix(k + (j+1)·γ)
(γ the 64-bit golden ratio, mix its finaliser); keys chain the same mix over the fields. All arithmetic is
wrapping uint64 on numpy arrays, so a value depends only on its (key, counter), never on what else is drawn
or in which order.
"""
from __future__ import annotations

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

# purposes: one stream per kind of draw, so adding draws of one kind never shifts another
NEGATIVES, SHUFFLE, MEMORY, LDP = 1, 2, 3, 4


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _field(x: np.ndarray, value) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(x + np.asarray(value, dtype=np.int64).astype(np.uint64) * GAMMA + GAMMA)


_MASK = (1 << 64) - 1


def _field_int(x: int, value: int) -> int:
    """_field on one Python integer (the same wrapping uint64 arithmetic, without numpy's per-call cost)."""
    x = (x + (value & _MASK) * int(GAMMA) + int(GAMMA)) & _MASK
    x = ((x ^ (x >> 30)) * int(_M1)) & _MASK
    x = ((x ^ (x >> 27)) * int(_M2)) & _MASK
    return x ^ (x >> 31)


def keys(seed: int, block: int, round_idx: int, users: np.ndarray, purpose: int) -> np.ndarray:
    """(len(users),) uint64 stream keys of (seed, block, round, user, purpose); round −1 is the block end."""
    head = 0
    for value in (seed, block, round_idx + 1, purpose):   # the fields shared by every user: Python integers
        head = _field_int(head, int(value))
    head = np.full(1, head, dtype=np.uint64)
    return _field(np.broadcast_to(head, np.shape(users)), np.asarray(users, dtype=np.int64))


def values(key: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """uint64 value number `counter` of the streams `key` (broadcast together)."""
    with np.errstate(over="ignore"):
        return _mix(key + (np.asarray(counter).astype(np.uint64) + np.uint64(1)) * GAMMA)


def below(raw: np.ndarray, n: int) -> np.ndarray:
    """Integers in [0, n) from uint64 values (multiply-shift on the high 32 bits; n < 2³², bias < n/2³²)."""
    return ((raw >> np.uint64(32)) * np.uint64(n) >> np.uint64(32)).astype(np.int64)


def unit(raw: np.ndarray) -> np.ndarray:
    """Floats in the open interval (0, 1) from uint64 values (53 bits)."""
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def laplace(raw: np.ndarray, scale: float) -> np.ndarray:
    """Laplace(0, scale) by inversion of unit values."""
    centred = unit(raw) - 0.5
    return -scale * np.sign(centred) * np.log1p(-2.0 * np.abs(centred))
