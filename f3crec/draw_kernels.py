"""The plan's draws compiled (sim_compiled.py, §3): the same SplitMix64 stream values as streams.py, so the same
samples and permutations as round.RoundPlan, bit for bit. numpy + numba only (no torch).

`draw_plan` draws every participant's shuffled samples of a round (RoundPlan.items / .labels), client by client
(`_draw_client`: its positives, its negatives drawn below |I| and redrawn while excluded, all in the stable order
of its SHUFFLE stream values, sorted by `_sort_uniform` in expected linear time); kernels.fedmf_round_drawn draws
the same values inside its training loop, one client ahead. `memory_perm` is ARM's memory draw
(RoundPlan.memory_perm), used by the round kernels (kernels._memory).
"""
from __future__ import annotations

import numpy as np

from .jit import load_fast

from numba import njit  # noqa: E402  (after .jit, which imports numba with SciPy hidden)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def memory_perm(key, counter0, n):
    """The permutation of 0..n−1 in the order of values counter0 .. counter0+n−1 of stream `key`
    (round.RoundPlan.memory_perm: a stable argsort of streams.values)."""
    vals = np.empty(n, np.uint64)
    for k in range(n):
        vals[k] = _mix(key + (np.uint64(counter0 + k) + np.uint64(1)) * _GAMMA)
    return np.argsort(vals, kind="mergesort")


@njit(cache=True, inline="always")
def _sort_uniform(keys, n, start, out):
    """out[:n] = the distinct uint64 keys[:n], whose top bits are uniform (stream values), sorted in expected
    linear time: a counting pass on the top ⌈log2 n⌉ bits, then an insertion sort of the few keys sharing a
    bucket. `start` (≥ 2^⌈log2 n⌉ + 1 entries) is scratch."""
    if n < 2:
        for j in range(n):
            out[j] = keys[j]
        return
    bits = 1
    while (1 << bits) < n:
        bits += 1
    shift = np.uint64(64 - bits)
    for b in range((1 << bits) + 1):
        start[b] = 0
    for j in range(n):
        start[np.int64(keys[j] >> shift) + 1] += 1
    for b in range(1 << bits):
        start[b + 1] += start[b]
    for j in range(n):
        b = np.int64(keys[j] >> shift)
        out[start[b]] = keys[j]
        start[b] += 1
    for j in range(1, n):                              # only keys of one bucket are out of order
        key = out[j]
        at = j
        while at > 0 and out[at - 1] > key:
            out[at] = out[at - 1]
            at -= 1
        out[at] = key


@njit(cache=True, inline="always")
def largest_client(offsets):
    """The most samples of one client (client a's are offsets[a]:offsets[a + 1])."""
    largest = 0
    for a in range(offsets.size - 1):
        largest = max(largest, offsets[a + 1] - offsets[a])
    return largest


@njit(cache=True, inline="always")
def _draw_scratch(offsets, n_items):
    """The draw's scratch, sized for the round's largest client: (excluded marks over the catalogue, base,
    packed, sorted, counting-sort starts)."""
    largest = max(1, largest_client(offsets))
    bits = 1
    while (1 << bits) < largest:
        bits += 1
    return (np.zeros(n_items, np.bool_), np.empty(largest, np.int64), np.empty(largest, np.uint64),
            np.empty(largest, np.uint64), np.empty((1 << bits) + 1, np.int64))


@njit(cache=True, inline="always")
def _draw_client(neg_key, shuffle_key, n, size, positives, pos_lo, exc_items, e0, e1, n_items, excluded, base,
                 packed, out, start, items, labels, at):
    """One client's shuffled samples into items[at:at + size], labels[at:at + size]: its samples in _draw_base's
    order, put in the stable order of its SHUFFLE stream values >> 21 (round.RoundPlan.items / .labels of this
    client)."""
    _draw_base(neg_key, n, size, positives, pos_lo, exc_items, e0, e1, n_items, excluded, base)
    # a stable sort on the top 43 bits = a sort of (value >> 21) << 21 | position (size < 2²¹)
    for j in range(size):
        value = _mix(shuffle_key + (np.uint64(j) + np.uint64(1)) * _GAMMA) >> np.uint64(21)
        packed[j] = (value << np.uint64(21)) | np.uint64(j)
    _sort_uniform(packed, size, start, out)
    for j in range(size):
        k = np.int64(out[j] & np.uint64(0x1FFFFF))
        items[at + j] = base[k]
        labels[at + j] = 1.0 if k < n else 0.0


@njit(cache=True, inline="always")
def _draw_base(neg_key, n, size, positives, pos_lo, exc_items, e0, e1, n_items, excluded, base):
    """One client's samples, unshuffled, into base[:size]: its n positives positives[pos_lo:pos_lo + n], then its
    negatives — slot s, attempt k is value s + k·2³² of its NEGATIVES stream, `below` |I|, redrawn while in
    exc_items[e0:e1] (marked in `excluded` meanwhile, all False again on return)."""
    for j in range(e0, e1):
        excluded[exc_items[j]] = True
    for j in range(n):
        base[j] = positives[pos_lo + j]
    for slot in range(size - n):
        attempt = 0
        while True:
            counter = np.uint64(slot) + (np.uint64(attempt) << np.uint64(32))
            v = _mix(neg_key + (counter + np.uint64(1)) * _GAMMA)
            item = np.int64(((v >> np.uint64(32)) * np.uint64(n_items)) >> np.uint64(32))
            if not excluded[item]:
                break
            attempt += 1
        base[n + slot] = item
    for j in range(e0, e1):
        excluded[exc_items[j]] = False


@njit(cache=True)
def draw_plan(neg_keys, shuffle_keys, offsets, counts, positives, exc_ptr, exc_items, n_items, items, labels):
    """Every participant's shuffled samples of one round (round.RoundPlan.items / .labels, drawn client by
    client by _draw_client) into items, labels. The per-client arrays are scratch of the largest client's
    size, allocated once. (fedmf_round_drawn draws the same values client by client inside its training loop.)"""
    excluded, base, packed, out, start = _draw_scratch(offsets, n_items)
    pos_at = 0
    for a in range(counts.size):
        _draw_client(neg_keys[a], shuffle_keys[a], counts[a], offsets[a + 1] - offsets[a], positives, pos_at,
                     exc_items, exc_ptr[a], exc_ptr[a + 1], n_items, excluded, base, packed, out, start, items,
                     labels, offsets[a])
        pos_at += counts[a]


load_fast(globals())
