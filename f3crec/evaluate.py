"""The evaluation protocol (§10): full ranking over every item known so far, NDCG@20 and Recall@20, the
a_{t,i} matrix and LA / RA / H-mean.

`oracle_scores` is the simulation-only evaluation oracle (§3): it assembles every user's scores from the
clients' state and the server's table; the server itself never sees them. NDCG@20 and Recall@20 are
per-user means, so a federated evaluation (each client reports a sum and a count) gives the same values:
a user's score row does not depend on who else is scored with it (`user_scores`), and sums are exact
rationals (`metric_sums`), so the mean of merged sums equals the mean over all users bit for bit.
`evaluate` is the one entry point for a metric pair; `test_row` and `summarise` build the protocol on it.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from .arrays import cat, zeros
from .data import SPLITS, Block
from .model import Backbone, score_matrix


SCORE_ROWS = 64  # users per score product: every product has this many rows (the last one zero-padded)
EVAL_CHUNK = 16 * SCORE_ROWS  # at most this many users scored, masked and ranked at once
EVAL_BUDGET = 1 << 22  # ... and at most about this many score entries (users × items) at once
K = 20


def eval_chunk(n_items: int | None, budget: int | None = None) -> int:
    """Users per evaluation chunk: EVAL_CHUNK, fewer on a large catalogue so that chunk × items stays near
    `budget` (a multiple of SCORE_ROWS, at least one product): memory O(budget), not O(users × items)."""
    if not n_items:
        return EVAL_CHUNK
    return min(EVAL_CHUNK, max(SCORE_ROWS, (budget or EVAL_BUDGET) // n_items // SCORE_ROWS * SCORE_ROWS))


def oracle_scores(sim, users, net: Backbone):
    """Scores (len(users), |I|) of the given users (simulation-only, §3)."""
    items = sim.server.broadcast()
    private = {k: v[users.to(items.device)] for k, v in sim.private_matrix().items()}
    return user_scores(net, private, items).cpu()


def user_scores(net: Backbone, private: dict, items):
    """score_matrix in products of exactly SCORE_ROWS users: a matrix product's rows depend on its shape
    (BLAS picks kernels by size), so one fixed shape makes a user's row the same whoever else is scored
    with it — a client scoring its own users gets the oracle's row bit for bit (tests/f3crec/test_flower.py).
    Tensors, or numpy arrays (the compiled simulator)."""
    count = next(iter(private.values())).shape[0]
    rows = []
    for lo in range(0, count, SCORE_ROWS):
        chunk = {k: v[lo:lo + SCORE_ROWS] for k, v in private.items()}
        short = SCORE_ROWS - next(iter(chunk.values())).shape[0]
        if short:
            chunk = {k: cat([v, zeros(v, (short, *v.shape[1:]))]) for k, v in chunk.items()}
        rows.append(score_matrix(net, chunk, items)[: SCORE_ROWS - short])
    return cat(rows) if rows else zeros(items, (0, items.shape[0]))


def _mask(users: list[int], parts: list[dict[int, np.ndarray]], n_items: int):
    import torch
    mask = torch.zeros(len(users), n_items, dtype=torch.bool)
    for row, user in enumerate(users):
        for part in parts:
            if user in part:
                mask[row, torch.from_numpy(part[user])] = True
    return mask


def evaluate(scores, users: list[int], positives: dict[int, np.ndarray],
             exclude: list[dict[int, np.ndarray]], decimals: int | None,
             masks: tuple | None = None) -> dict[str, float]:
    """NDCG@20 and Recall@20 (Recall = hits / |test|) over `users`, excluded items at −∞ (§10).

    `masks` = (positives, excluded) as built by `eval_masks`, to reuse them across rounds.
    """
    return finish(metric_sums(scores, users, positives, exclude, masks), decimals)


def metric_sums(scores, users: list[int], positives: dict[int, np.ndarray],
                exclude: list[dict[int, np.ndarray]], masks: tuple | None = None) -> dict[str, tuple[Fraction, int]]:
    """(exact sum, count) of each user's NDCG@20 and Recall@20: what a client reports for its users.

    A float64 is a dyadic rational, so the Fraction sum is exact and merging sums in any order or grouping
    gives the same total (the mean is rounded once, in `finish`)."""
    from common.metrics import full_sort_metrics
    if not users:
        return {"ndcg": (Fraction(0), 0), "recall": (Fraction(0), 0)}
    pos_mask, exclude_mask = masks or eval_masks(users, positives, exclude, scores.shape[1])
    metrics = full_sort_metrics(scores, pos_mask, ks=(20,), exclude_mask=exclude_mask)
    return {name: (sum(map(Fraction, metrics[key].tolist()), Fraction(0)), len(users))
            for name, key in (("ndcg", "NDCG@20"), ("recall", "Recall@20"))}


def sparse_masks(users: list[int], positives: dict[int, np.ndarray], exclude: list[dict[int, np.ndarray]],
                 chunk: int | None = None, n_items: int | None = None) -> list[tuple]:
    """Per chunk of `users`: (lo, hi, positive (row, item) pairs, excluded (row, item) pairs), rows local to the
    chunk. Built once per block; O(interactions) memory, where dense masks were O(users × items). The chunk is
    `chunk` users, else `eval_chunk(n_items)`."""
    import torch
    chunk = chunk or eval_chunk(n_items)
    out = []
    for lo in range(0, len(users), chunk):
        pairs = []
        for parts in ([positives], exclude):
            rows, cols = [], []
            for row, user in enumerate(users[lo:lo + chunk]):
                for part in parts:
                    if user in part:
                        rows.append(np.full(len(part[user]), row, np.int64))
                        cols.append(np.asarray(part[user], np.int64))
            pairs.append(torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]) if rows
                                          else np.zeros((2, 0), np.int64)))
        out.append((lo, min(lo + chunk, len(users)), *pairs))
    return out


def oracle_sums(sim, net: Backbone, users: list[int], masks: list, n_items: int) -> dict[str, tuple[Fraction, int]]:
    """metric_sums of `users` (simulation-only oracle, §3), fused per chunk of `masks`: score the chunk's users
    against the first `n_items` items, set the excluded pairs to −∞ in place, take the top K and look the
    top items up among the positive pairs. Memory O(chunk × items), no dense mask. Each user's row and
    metric do not depend on the chunk it is in (fixed-shape products, per-row top-K) and the sums are
    exact, so the result equals one dense evaluation (`metric_sums`) bit for bit (tested)."""
    import torch
    parts = []
    for lo, hi, pos, exc in masks:
        index = torch.tensor(users[lo:hi], dtype=torch.long)
        parts.append(sparse_metric_sums(oracle_scores(sim, index, net)[:, :n_items], pos, exc))
    return merge_sums(parts) if parts else metric_sums(torch.zeros(0, 0), [], {}, [])


def sparse_metric_sums(scores, pos, exc, k: int = K) -> dict[str, tuple[Fraction, int]]:
    """metric_sums from sparse (row, item) pairs; `scores` (rows, items) is overwritten (excluded → −∞).

    The same arithmetic as common.metrics.full_sort_metrics (an exclusion never hides a positive; ties as
    torch.topk orders them; the same discounts, cumulative sums and divisions), so equal bit for bit."""
    import torch

    from common.metrics import _check_finite, _discounts
    rows, n_items = scores.shape
    if not bool(torch.isfinite(scores.sum())):   # one pass, no mask: a NaN/inf entry makes the sum non-finite
        _check_finite("full_sort_metrics", scores=scores)    # (an overflowing sum of finite ones passes here)
    positive = torch.unique(pos[0] * n_items + pos[1])                           # sorted (row, item) keys
    num_pos = torch.bincount(positive // n_items, minlength=rows)
    if bool((num_pos == 0).any()):
        raise ValueError(f"{int((num_pos == 0).sum())} row(s) have no positive item: drop them before scoring")
    kept = scores[positive // n_items, positive % n_items]
    scores[exc[0], exc[1]] = float("-inf")
    scores[positive // n_items, positive % n_items] = kept                       # never hide a positive
    k_max = min(k, n_items)
    top = torch.topk(scores, k_max, dim=1).indices                              # (rows, k)
    keys = torch.arange(rows, device=top.device)[:, None] * n_items + top
    where = torch.searchsorted(positive, keys).clamp(max=positive.numel() - 1)
    hits = (positive[where] == keys).double()
    discounts = _discounts(k_max, scores.device)
    dcg, hit_count, ideal = torch.cumsum(hits * discounts, dim=1), torch.cumsum(hits, dim=1), torch.cumsum(discounts, 0)
    ndcg = dcg[:, k_max - 1] / ideal[torch.clamp(num_pos, max=k_max) - 1]
    recall = hit_count[:, k_max - 1] / num_pos.double()
    return {name: (sum(map(Fraction, values.tolist()), Fraction(0)), rows)
            for name, values in (("ndcg", ndcg), ("recall", recall))}


def merge_sums(parts: list[dict[str, tuple[Fraction, int]]]) -> dict[str, tuple[Fraction, int]]:
    """The sums of several groups of users (e.g. every node's report) as one."""
    return {name: (sum((p[name][0] for p in parts), Fraction(0)), sum(p[name][1] for p in parts))
            for name in ("ndcg", "recall")}


def finish(sums: dict[str, tuple[Fraction, int]], decimals: int | None) -> dict[str, float]:
    """Means from exact sums, rounded once to float (then to `decimals` when set, Q5)."""
    out = {k: float(total / count) if count else float("nan") for k, (total, count) in sums.items()}
    return {k: round(v, decimals) if decimals is not None else v for k, v in out.items()}


def eval_masks(users: list[int], positives: dict[int, np.ndarray], exclude: list[dict[int, np.ndarray]],
               n_items: int) -> tuple:
    return _mask(users, [positives], n_items), _mask(users, exclude, n_items)


def oracle_test_sums(sim, blocks: list[Block], t: int, net: Backbone, old_block_mask: str
                     ) -> list[dict[str, tuple[Fraction, int]]]:
    """The exact sums of a_{t,i}, i = 0..t, over the test users `sim` holds (a Flower node: its own, §14)."""
    out = []
    for i in range(t + 1):
        users = sorted(blocks[i].test)
        masks = sparse_masks(users, blocks[i].test, test_exclude(blocks, t, i, old_block_mask), n_items=blocks[t].n_items)
        out.append(oracle_sums(sim, net, users, masks, blocks[t].n_items))
    return out


def test_exclude(blocks: list[Block], t: int, i: int, old_block_mask: str) -> list[dict[int, np.ndarray]]:
    """What a_{t,i} masks: D^t's train+valid [Q4], or every known interaction but D^i's test [D]."""
    if old_block_mask == "current":
        return [blocks[t].train, blocks[t].valid]
    return [b.split(s) for j, b in enumerate(blocks[: t + 1]) for s in SPLITS if s != "test" or j != i]


def la_ra_h(matrix: list[list[float]]) -> dict[str, float]:
    """LA_t = mean_i a_{i,i}, RA_t = mean_i a_{t,i} (base block included), H = harmonic mean (§10)."""
    t = len(matrix) - 1
    learning = sum(matrix[i][i] for i in range(t + 1)) / (t + 1)
    retained = sum(matrix[t][i] for i in range(t + 1)) / (t + 1)
    harmonic = 0.0 if learning + retained == 0 else 2 * learning * retained / (learning + retained)
    return {"LA": learning, "RA": retained, "H": harmonic}


def summarise(rows: list[list[dict[str, float]]]) -> dict:
    """a-matrices and LA/RA/H after every block, for NDCG@20 and Recall@20."""
    out = {}
    for metric in ("ndcg", "recall"):
        matrix = [[cell[metric] for cell in row] for row in rows]
        out[metric] = {"a": matrix, "per_block": [la_ra_h(matrix[: t + 1]) for t in range(len(matrix))]}
    return out
