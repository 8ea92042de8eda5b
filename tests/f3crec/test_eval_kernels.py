"""The compiled simulator's evaluation pieces against brute force: eval_kernels.topk_metrics (NDCG@K / Recall@K
with sparse exclusions, ties to the lower item id), eval_kernels.top_n_rows (the end-of-block T^u), round.top_n
with and without the kernel, and sim_compiled.exact_sum (the exact rational sum of float64 values)."""
import sys
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("numba")
from f3crec import eval_kernels  # noqa: E402
from f3crec.round import top_n  # noqa: E402
from f3crec.sim_compiled import discounts, exact_sum  # noqa: E402


def _brute_metrics(scores, positives, excluded, k):
    """Per row: excluded non-positives at −inf, a stable descending sort (ties to the lower id), the first
    k, then NDCG (sequential DCG sum over the ideal DCG) and Recall = hits / |positives|."""
    weights = discounts(k)
    ndcg, recall = [], []
    for row, pos, exc in zip(scores, positives, excluded):
        s = row.astype(np.float64).copy()
        s[[i for i in exc if i not in set(pos)]] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        dcg, hits = 0.0, 0
        for rank, item in enumerate(top.tolist()):
            if item in set(pos):
                dcg += weights[rank]
                hits += 1
        ideal = 0.0
        for rank in range(min(len(pos), k)):
            ideal += weights[rank]
        ndcg.append(dcg / ideal)
        recall.append(hits / len(pos))
    return np.array(ndcg), np.array(recall)


def _case(rng, users, n_items, dtype, levels=None):
    scores = rng.normal(size=(users, n_items))
    if levels:   # few distinct values: many ties
        scores = np.round(scores * levels) / levels
    positives = [rng.choice(n_items, size=rng.integers(1, min(6, n_items) + 1), replace=False) for _ in range(users)]
    excluded = [rng.choice(n_items, size=rng.integers(0, n_items), replace=False) for _ in range(users)]
    for pos, exc in zip(positives, excluded):   # some exclusions hit a positive (it stays ranked)
        if exc.size and rng.random() < 0.5:
            exc[0] = pos[0]
    return scores.astype(dtype), positives, excluded


def _csr(lists):
    ptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    flat = np.concatenate([np.asarray(x, np.int64) for x in lists] + [np.zeros(0, np.int64)])
    return ptr, flat


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_items,levels", [(300, None), (300, 2), (1003, None), (1003, 8), (12, None), (25, 1)])
def test_topk_metrics_equals_brute_force(dtype, n_items, levels):
    rng = np.random.default_rng(n_items + (levels or 0))
    scores, positives, excluded = _case(rng, 40, n_items, dtype, levels)
    k = min(20, n_items)
    ndcg, recall = np.full(40, np.nan), np.full(40, np.nan)
    assert eval_kernels.topk_metrics(scores, *_csr(positives), *_csr(excluded), discounts(k), ndcg, recall)
    want_ndcg, want_recall = _brute_metrics(scores, positives, excluded, k)
    assert np.array_equal(ndcg, want_ndcg) and np.array_equal(recall, want_recall)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_topk_metrics_and_top_n_rows_refuse_a_non_finite_score(bad):
    rng = np.random.default_rng(1)
    scores, positives, excluded = _case(rng, 5, 50, np.float32)
    scores[3, int(excluded[3][-1]) if excluded[3].size else 7] = bad     # an excluded item's score counts too
    ndcg, recall = np.empty(5), np.empty(5)
    assert not eval_kernels.topk_metrics(scores, *_csr(positives), *_csr(excluded), discounts(20), ndcg, recall)
    assert not eval_kernels.top_n_rows(scores, np.empty((5, 30), np.int64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_items,n,levels", [(200, 30, None), (200, 30, 3), (30, 30, None), (7, 7, 1)])
def test_top_n_rows_is_a_stable_descending_sort(dtype, n_items, n, levels):
    rng = np.random.default_rng(n_items * n)
    scores = rng.normal(size=(60, n_items))
    if levels:
        scores = np.round(scores * levels) / levels
    scores = scores.astype(dtype)
    out = np.full((60, n), -1, np.int64)
    assert eval_kernels.top_n_rows(scores, out)
    assert np.array_equal(out, np.argsort(-scores, axis=1, kind="stable")[:, :n])


def test_round_top_n_is_the_same_with_the_kernel_and_with_numpy(monkeypatch):
    rng = np.random.default_rng(5)
    scores = (np.round(rng.normal(size=(80, 150)) * 4) / 4).astype(np.float32)
    with_kernel = top_n(scores, 30)
    monkeypatch.delitem(sys.modules, "f3crec.eval_kernels")          # the numpy path (no compiled run loaded)
    assert np.array_equal(top_n(scores, 30), with_kernel)
    scores[2, 5] = np.nan                                        # a non-finite row: the numpy path answers
    monkeypatch.setitem(sys.modules, "f3crec.eval_kernels", eval_kernels)
    assert np.array_equal(top_n(scores, 30)[[0, 1, 3]], with_kernel[[0, 1, 3]])


def test_exact_sum_is_the_fraction_sum_for_any_exponents_signs_and_sizes():
    rng = np.random.default_rng(3)
    for values in (rng.random(5000) ** 3,
                   rng.normal(size=3000) * 2.0 ** rng.integers(-60, 60, 3000),           # many exponents, signs
                   np.array([0.0, -0.0, 5e-324, 1e-310, 1.0, 2.0 ** 52 + 1, -3.5]),         # subnormals, zeros
                   np.full(70_000, 1.0 - 2.0 ** -53),                                      # sums past 2^53 per exponent
                   np.zeros(0)):
        assert exact_sum(values) == sum(map(Fraction, values.tolist()), Fraction(0))
