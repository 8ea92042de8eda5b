"""ARM's ranking in the compiled round kernels (kernels.py, §6): a client's whole-catalogue scores, the ranks of
its Tᵘ among them, D_u, m_u and the memory draw; and the ranks of every replaying client's first step computed
before the round, a few clients at a time (`replay_ranks`). numpy + numba only (no torch).

A step's scores are the broadcast table's, q_i · v summed column by column in the table's dtype (term by term
in k order), except at the client's local rows (its samples' items and Tᵘ), whose products are summed in
float64 and rounded (`_local_score`). A target's rank is 1 + #{j: s_j > s_t} + #{j < t: s_j = s_t}
(method.target_ranks: a stable descending sort, ties to the lower item id).

At a client's first step its local rows still equal the broadcast ones, so its scores are the broadcast scores
of its p_u, except at its local rows by rounding. `replay_ranks` ranks Tᵘ for several clients per pass over the
catalogue (each chunk of q's columns read once for them all, not once per client: at 100,000 clients the
table is 15.6 MB and each client's pass was a trip through memory) with every item at its broadcast score,
then moves each local row's count from its broadcast score to its local one: the same integer ranks as
ranking the client's own scores (tests/f3crec/test_compiled.py).
"""
from __future__ import annotations

import numpy as np

from .jit import load_fast

from numba import njit  # noqa: E402  (after .jit, which imports numba with SciPy hidden)

from .draw_kernels import _draw_base, largest_client, memory_perm  # noqa: E402
from .intrinsics import COLUMN_VECTORS, as_dtype_of, column_sums, count_below  # noqa: E402

SCORE_CHUNK = 2048   # items per column pass (8 KiB of float32 scores: they stay in L1 across the d passes)
RANK_GROUP = 8       # clients ranked together per pass over the catalogue (replay_ranks)
# replay_ranks where the item table has this many bytes or more: at 1,146 items × 32 (ML-100K, 147 KB) it
# cost 0.3–0.4 ms more per incremental round than each client's own pass (3.7 against 3.35 ms, captured
# rounds), at 12,200 items (1.6 MB) the two were even, at 122,000 items (15.6 MB) it halved the round
RANK_AHEAD_BYTES = 1 << 21


@njit(cache=True, inline="always")
def _broadcast_pass(q_t, v, lo, part):
    """part[i] = q_{lo + i} · v over part.size items, summed column by column in the table's dtype, k in order:
    whole vectors of items by intrinsics.column_sums (the sums held in registers across the d columns), the
    rest item by item, the same operations."""
    n = part.size
    block = COLUMN_VECTORS * 64 // q_t.itemsize
    whole = n // block * block
    column_sums(q_t, v, lo, part, whole)
    for i in range(whole, n):
        s = as_dtype_of(0.0, q_t)
        for k in range(v.size):
            s += q_t[k, lo + i] * v[k]
        part[i] = s


@njit(cache=True, inline="always")
def _local_score(rows, r, v):
    """rows[r] · v as a client's local row is scored: each product in the table's dtype, summed in float64."""
    s = 0.0
    for k in range(v.size):
        s += rows[r, k] * v[k]
    return s


@njit(cache=True, inline="always")
def _client_scores(q_t, local, row_item, n_rows, v, c, scores):
    """scores[i] = q_i·v + c over the whole catalogue, the client's local rows in place of the broadcast ones
    (§6 step 2): the broadcast rows column by column, a chunk of items at a time, then the client's own rows."""
    n_items = scores.size
    for lo in range(0, n_items, SCORE_CHUNK):
        _broadcast_pass(q_t, v, lo, scores[lo:min(lo + SCORE_CHUNK, n_items)])
    for r in range(n_rows):
        scores[row_item[r]] = _local_score(local, r, v)
    if c != 0.0:                                       # x + 0.0 == x: FedMF (c = 0) skips the pass
        for i in range(scores.size):
            scores[i] += c


@njit(cache=True, inline="always")
def _target_scores(local, slot, targets, v, c, scores):
    """The scores of Tᵘ alone (its items are local rows), as _client_scores gives them: what top-N KD reads."""
    for k in range(targets.size):
        i = targets[k]
        scores[i] = _local_score(local, slot[i], v)
        if c != 0.0:
            scores[i] += c


@njit(cache=True, inline="always")
def _rank_setup(values, order, asc, padded):
    """Tᵘ's scores `values` sorted into `asc` (values[order[m]] = asc[m]), and into `padded` (a multiple of 64
    bytes, +inf after them: +inf is below no score); returns the lowest."""
    n = values.size
    order[:] = np.argsort(values, kind="mergesort")
    for k in range(n):
        asc[k] = values[order[k]]
    padded[:] = np.inf
    padded[:n] = asc
    return asc[0]


@njit(cache=True, inline="always")
def _rank_scan(scores, n_items, first, values, targets, asc, padded, lowest, hist, ranks):
    """Count scores[:n_items] (items first, first + 1, …) into hist[b] (#items with exactly b target scores
    below theirs) and ties into ranks; returns the items below every target (hist[0]'s share, not added)."""
    n = values.size
    width = 64 // scores.itemsize
    below = 0
    j = 0
    while j < n_items:
        end = j + width
        if end > n_items:
            end = n_items
        elif count_below(scores, j, lowest) == width:  # below every target: often most items, 64 bytes at once
            below += width
            j = end
            continue
        for j in range(j, end):
            s = scores[j]
            if s < lowest:
                below += 1
                continue
            lo = 0                                     # searchsorted left: #targets < s, 64 bytes at a time
            for b in range(0, padded.size, width):     # (a binary search's branches mispredict)
                lo += count_below(padded, b, s)
            hist[lo] += 1
            if lo < n and asc[lo] == s:                # ties with a target: lower item id ranks first
                for k in range(n):
                    if values[k] == s and first + j < targets[k]:
                        ranks[k] += 1
        j = end
    return below


@njit(cache=True, inline="always")
def _rank_finish(hist, values, asc, ranks):
    """ranks[k] += 1 + #items above target k, from hist (every item counted)."""
    n = values.size
    above = np.zeros(n + 2, np.int64)                  # above[h] = #items with ≥ h target scores below
    for h in range(n, -1, -1):
        above[h] = above[h + 1] + hist[h]
    for k in range(n):
        lo, hi = 0, n                                  # searchsorted right: #targets ≤ v_k
        v = values[k]
        while lo < hi:
            mid = (lo + hi) >> 1
            if asc[mid] <= v:
                lo = mid + 1
            else:
                hi = mid
        ranks[k] += above[lo] + 1                      # items above every target ≤ v_k: strictly greater


@njit(cache=True)
def _target_ranks(scores, targets, ranks):
    """ranks[k] = 1 + #{j: s_j > s_t} + #{j < t: s_j = s_t} of target t = targets[k] (method.target_ranks)."""
    n = targets.size
    values = np.empty(n, scores.dtype)
    for k in range(n):
        values[k] = scores[targets[k]]
    width = 64 // scores.itemsize
    asc, padded = np.empty(n, scores.dtype), np.empty((n + width - 1) // width * width, scores.dtype)
    lowest = _rank_setup(values, np.empty(n, np.int64), asc, padded)
    hist = np.zeros(n + 1, np.int64)
    hist[0] += _rank_scan(scores, scores.size, 0, values, targets, asc, padded, lowest, hist, ranks)
    _rank_finish(hist, values, asc, ranks)


@njit(cache=True, inline="always")
def _memory(scores, targets, ranks, arm_mode, m_of_d, stats, n_stats, step, key, ranked=False):
    """ARM's memory for this (sub-)step: (size m_u, permutation of T^u whose first m_u slots are replayed,
    stats rows written). Top-N KD (arm_mode 2) replays all of T^u in order; ARM ranks T^u against the
    catalogue (unless `ranked`: `ranks` holds them already), D_u = Σ|k − rank_k|, m_u = m_of_d[D_u], and
    draws the m_u slots from the client's memory stream."""
    n_top = targets.size
    if arm_mode == 2:
        return n_top, np.arange(n_top), n_stats
    if not ranked:
        ranks[:] = 0
        _target_ranks(scores, targets, ranks)
    disc = 0
    for k in range(n_top):
        disc += abs(k + 1 - ranks[k])
    size = m_of_d[disc]
    stats[n_stats, 0] = disc
    stats[n_stats, 1] = size
    stats[n_stats, 2] = step
    perm = memory_perm(key, step * n_top, n_top) if size > 0 else np.arange(n_top)
    return size, perm, n_stats + 1


@njit(cache=True, inline="always")
def _move(j, old, new, values, order, asc, targets, ranks):
    """Item j's score changes from `old` to `new`: the ranks of the targets it passes (or ties) change. Only a
    target whose score lies between the two can change (found by bisection of the sorted scores)."""
    low, high = min(old, new), max(old, new)
    lo, hi = 0, asc.size                               # the first target score ≥ low
    while lo < hi:
        mid = (lo + hi) >> 1
        if asc[mid] < low:
            lo = mid + 1
        else:
            hi = mid
    for m in range(lo, asc.size):
        if asc[m] > high:
            break
        k = order[m]
        v, t = values[k], targets[k]
        ranks[k] += (1 if new > v or (new == v and j < t) else 0) - (1 if old > v or (old == v and j < t) else 0)


@njit(cache=True)
def replay_ranks(q, q_t, p_all, users, offsets, counts, positives, exc_ptr, exc_items, n_items, neg_keys, topn,
                 first_ranked, ranks_out, values_out):
    """The first-step ranks of Tᵘ of every client a with first_ranked[a] (FedMF, adaptive ARM, no emb_reg or EWC
    rows, some samples): ranks_out[a] as _target_ranks gives them on the client's first-step scores, and
    values_out[a] those scores at Tᵘ. Clients RANK_GROUP at a time: every chunk of the catalogue is scored and
    counted for the group's clients at their broadcast scores while the chunk of q's columns is in cache; then
    each client's local rows (its samples' items — drawn as fedmf_round_drawn draws them — and Tᵘ) move from
    their broadcast score's count to their local score's."""
    n_rows, dim, n_top = q.shape[0], q.shape[1], topn.shape[1]     # ranked over every row (n_items: the draw's)
    width = 64 // q.itemsize
    n_pad = (n_top + width - 1) // width * width
    group = np.empty(RANK_GROUP, np.int64)
    part = np.empty((RANK_GROUP, SCORE_CHUNK), q.dtype)
    values = np.empty((RANK_GROUP, n_top), q.dtype)
    order = np.empty((RANK_GROUP, n_top), np.int64)
    asc = np.empty((RANK_GROUP, n_top), q.dtype)
    padded = np.empty((RANK_GROUP, n_pad), q.dtype)
    lowest = np.empty(RANK_GROUP, q.dtype)
    hist = np.zeros((RANK_GROUP, n_top + 1), np.int64)
    ranks = np.zeros((RANK_GROUP, n_top), np.int64)
    p = np.empty((RANK_GROUP, dim), q.dtype)                # the clients' p_u in the kernel's dtype
    excluded, base = np.zeros(q.shape[0], np.bool_), np.empty(max(1, largest_client(offsets)), np.int64)
    seen = np.full(q.shape[0], -1, np.int64)
    pos_at = np.zeros(users.size + 1, np.int64)
    for a in range(users.size):
        pos_at[a + 1] = pos_at[a] + counts[a]
    a = 0
    while a < users.size:
        n_group = 0
        while a < users.size and n_group < RANK_GROUP:
            if first_ranked[a]:
                group[n_group] = a
                n_group += 1
            a += 1
        if n_group == 0:
            break
        for g in range(n_group):                           # Tᵘ's first-step scores: local rows
            user = users[group[g]]
            for k in range(dim):
                p[g, k] = p_all[user, k]
            for k in range(n_top):
                values[g, k] = _local_score(q, topn[user, k], p[g])
            lowest[g] = _rank_setup(values[g], order[g], asc[g], padded[g])
            hist[g, :] = 0
            ranks[g, :] = 0
        for lo in range(0, n_rows, SCORE_CHUNK):           # the catalogue at broadcast scores, a chunk at a time
            size = min(SCORE_CHUNK, n_rows - lo)
            for g in range(n_group):
                user = users[group[g]]
                _broadcast_pass(q_t, p[g], lo, part[g, :size])
                hist[g, 0] += _rank_scan(part[g], size, lo, values[g], topn[user], asc[g], padded[g], lowest[g],
                                         hist[g], ranks[g])
        for g in range(n_group):
            c = group[g]
            user = users[c]
            v, targets = p[g], topn[user]
            _rank_finish(hist[g], values[g], asc[g], ranks[g])
            size = offsets[c + 1] - offsets[c]
            _draw_base(neg_keys[c], counts[c], size, positives, pos_at[c], exc_items, exc_ptr[c], exc_ptr[c + 1],
                       n_items, excluded, base)
            for t in range(size + n_top):                  # each local row once: its count moves
                i = base[t] if t < size else targets[t - size]
                if seen[i] == c:
                    continue
                seen[i] = c
                local = as_dtype_of(_local_score(q, i, v), q)
                broadcast = as_dtype_of(0.0, q)           # _broadcast_pass's sum for item i, term by term
                for k in range(dim):
                    broadcast += q[i, k] * v[k]
                if local != broadcast:
                    _move(i, broadcast, local, values[g], order[g], asc[g], targets, ranks[g])
            ranks_out[c] = ranks[g]
            values_out[c] = values[g]


load_fast(globals())
