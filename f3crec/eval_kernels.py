"""The compiled simulator's evaluation kernels (sim_compiled.py, round.top_n, §10): a fused top-K with sparse
exclusions and NDCG/Recall@K per user, and each row's top-N items. numpy + numba only (no torch).

`topk_metrics` scores users against the catalogue one user at a time, keeps a running top-K (ties to the
lower item id, torch.topk's order), masks the exclusions sparsely and returns each user's NDCG@K and
Recall@K as common.metrics.full_sort_metrics computes them (sequential DCG sum, same discounts).
"""
from __future__ import annotations

import numpy as np

from .jit import load_fast

from numba import njit  # noqa: E402  (after .jit, which imports numba with SciPy hidden)

from .intrinsics import count_above  # noqa: E402


@njit(cache=True, fastmath={"reassoc"})
def _row_finite(scores, u):
    """Whether every score of row u is finite: Σ s·0 is NaN exactly when some s is ±inf or NaN (summed in
    SIMD lanes: the order does not matter, every term is ±0 or NaN)."""
    acc = scores[u, 0] * 0
    for i in range(scores.shape[1]):
        acc += scores[u, i] * 0
    return acc == 0


@njit(cache=True, inline="always")
def _insert(top_s, top_i, at, s, i):
    """Put (s, i) into the descending top list at or above position `at`, below every score ≥ s (an equal
    score stays above: ties to the lower item id, torch.topk's order)."""
    while at > 0 and s > top_s[at - 1]:
        top_s[at] = top_s[at - 1]
        top_i[at] = top_i[at - 1]
        at -= 1
    top_s[at] = s
    top_i[at] = i


@njit(cache=True, inline="always")
def _row_top(scores, u, mark, top_s, top_i):
    """The first top_s.size items of row u in a stable descending sort (ties to the lower id), the items
    with mark 2 at −∞; returns how many were filled (fewer when the row is shorter). The scan past the first
    K items compares each score with the K-th best so far and looks at its mark only when it would enter;
    `scores` C-contiguous (its rows are read 64 bytes at a time)."""
    k_max, n_items = top_s.size, scores.shape[1]
    filled, i = 0, 0
    while filled < k_max and i < n_items:
        s = -np.inf if mark[i] == 2 else scores[u, i]
        _insert(top_s, top_i, filled, s, i)
        filled += 1
        i += 1
    if filled < k_max:
        return filled
    threshold = top_s[k_max - 1]
    row = scores[u]
    width = 64 // scores.itemsize
    while i < n_items:
        # 64 bytes of scores at a time: skipped whole when none is above the K-th best (most of a row,
        # once the list holds good items), else visited item by item in order, as the plain scan would
        end = i + width
        if end > n_items:
            end = n_items
        elif count_above(row, i, threshold) == 0:
            i = end
            continue
        for j in range(i, end):
            s = row[j]
            if s > threshold and mark[j] != 2:      # an excluded item (−∞) never enters a full list
                _insert(top_s, top_i, k_max - 1, s, j)
                threshold = top_s[k_max - 1]
        i = end
    return filled


@njit(cache=True)
def topk_metrics(scores, pos_ptr, pos_items, exc_ptr, exc_items, discounts, ndcg, recall):
    """NDCG@K and Recall@K (K = discounts.size) of every row of `scores` (users × items): excluded items at
    −∞ unless positive, a running top-K with ties to the lower item id (torch.topk's order), then the
    metrics as common.metrics.full_sort_metrics computes them (sequential DCG sum, the same discounts).
    Returns False (metrics unset from that row on) at the first row with a non-finite score."""
    n_items = scores.shape[1]
    k_max = discounts.size
    mark = np.zeros(n_items, np.int8)                  # 1 positive, 2 excluded
    top_s = np.empty(k_max, scores.dtype)
    top_i = np.empty(k_max, np.int64)
    ideal = np.empty(k_max, np.float64)
    acc = 0.0
    for k in range(k_max):
        acc += discounts[k]
        ideal[k] = acc
    for u in range(scores.shape[0]):
        if n_items and not _row_finite(scores, u):
            return False
        for j in range(pos_ptr[u], pos_ptr[u + 1]):
            mark[pos_items[j]] = 1
        for j in range(exc_ptr[u], exc_ptr[u + 1]):
            if mark[exc_items[j]] == 0:
                mark[exc_items[j]] = 2
        filled = _row_top(scores, u, mark, top_s, top_i)
        dcg = 0.0
        hits = 0
        for k in range(filled):
            if mark[top_i[k]] == 1:
                dcg += discounts[k]
                hits += 1
        n_pos = pos_ptr[u + 1] - pos_ptr[u]
        ndcg[u] = dcg / ideal[min(n_pos, k_max) - 1]
        recall[u] = hits / n_pos
        for j in range(pos_ptr[u], pos_ptr[u + 1]):
            mark[pos_items[j]] = 0
        for j in range(exc_ptr[u], exc_ptr[u + 1]):
            mark[exc_items[j]] = 0
    return True


@njit(cache=True)
def top_n_rows(scores, out):
    """out[u] = the first out.shape[1] items of row u of `scores` in a stable descending sort (ties to the
    lower id; round.top_n's order), out.shape[1] ≤ items. Returns False (out unset from that row on) at the
    first row with a non-finite score."""
    n = out.shape[1]
    mark = np.zeros(scores.shape[1], np.int8)          # nothing excluded
    top_s = np.empty(n, scores.dtype)
    top_i = np.empty(n, np.int64)
    for u in range(scores.shape[0]):
        if n and not _row_finite(scores, u):
            return False
        _row_top(scores, u, mark, top_s, top_i)
        for k in range(n):
            out[u, k] = top_i[k]
    return True


load_fast(globals())
