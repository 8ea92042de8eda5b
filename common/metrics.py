"""Vectorised ranking metrics. Every function returns PER-USER tensors [B], so
callers can concatenate batches and average exactly (`average`). All work on any device.

Three ways in:
- `full_sort_metrics(scores, pos_mask, ...)`: every item scored; one or many positives per row (F3CRec,
  VLM2Rec's full protocol).
- `sampled_metrics(pos_scores, neg_scores, ...)`: one positive against its own sampled negatives (VLM2Rec's
  1 + 100 protocol).
- `rank_metrics(rank, ...)`: one target per row whose 0-based rank the caller computed (FLAME).

Definitions (rank r is 0-based, P the positive set of a row, hits counted in the top k):
  HR@k     = 1 if any positive is in the top k                 (= Recall@k for one target)
  Recall@k = hits / |P|            (divided by |P|, not min(|P|, k): the F3CRec spec's definition)
  NDCG@k   = sum_{hit at r < k} 1/log2(r + 2)  /  sum_{r < min(|P|, k)} 1/log2(r + 2)
  MRR@k    = 1 / (r_first + 1) if the first positive is in the top k, else 0

Ties (items with equal scores), the `ties` argument:
  "topk"         full ranking only: `torch.topk`'s order (implementation-defined; in practice lower item ids
                 first), as RecBole does. The default of `full_sort_metrics`, so results stay comparable.
  "pessimistic"  every tied non-positive is ranked above the positives: a collapsed model scores 0.
  "optimistic"   every tied non-positive is ranked below the positives.
  "average"      the EXPECTED metric over a uniformly random order of each tie group (not the metric of the
                 average rank: with 18 items above the target and 4 others tied with it, HR@20 is 2/5 = 0.4 in
                 expectation, where the average rank 20 would give 0).
Scores must be finite: a NaN or inf score would rank as a hit under some rule, so every function refuses it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

TIES = ("pessimistic", "optimistic", "average")
FULL_TIES = ("topk", *TIES)


def _check_ties(ties: str, allowed: tuple[str, ...], call: str) -> None:
    if ties not in allowed:
        raise ValueError(f"{call}: ties must be one of {allowed}, got {ties!r}")


def _check_finite(call: str, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            raise ValueError(f"{call}: {int(bad.sum())} non-finite value(s) (NaN or inf) in {name}; "
                             "metrics of such scores are meaningless (check the model for a NaN/inf output)")


def _discounts(length: int, device: torch.device) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(2, length + 2, device=device, dtype=torch.float64))


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """[0, v0, v0+v1, ...]: sums over position ranges [a, b) as prefix[b] - prefix[a]."""
    return torch.cat([values.new_zeros(1), torch.cumsum(values, 0)])


def full_sort_metrics(scores: torch.Tensor, pos_mask: torch.Tensor, ks: Sequence[int] = (10, 20),
                      exclude_mask: torch.Tensor | None = None, ties: str = "topk") -> dict[str, torch.Tensor]:
    """HR/Recall/NDCG/MRR@k for every row of `scores` [B, N] given boolean positives [B, N].

    `exclude_mask` [B, N] (history, padding column) is set to -inf, except where a positive is: an
    exclusion never hides a held-out positive. `ties`: see the module docstring (default "topk").
    """
    _check_ties(ties, FULL_TIES, "full_sort_metrics")
    if scores.shape != pos_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and pos_mask {tuple(pos_mask.shape)} differ in shape")
    _check_finite("full_sort_metrics", scores=scores)
    pos_mask = pos_mask.bool()
    num_pos = pos_mask.sum(dim=1)
    if bool((num_pos == 0).any()):
        raise ValueError(f"{int((num_pos == 0).sum())} row(s) have no positive item: drop them before scoring")
    if exclude_mask is not None:
        scores = scores.masked_fill(exclude_mask.bool() & ~pos_mask, float("-inf"))
    if ties == "average":
        return _expected_full(scores, pos_mask, num_pos, ks)
    k_max = min(max(ks), scores.shape[1])
    if ties == "topk":
        top = torch.topk(scores, k_max, dim=1).indices                 # (B, k_max)
    else:
        # Stable sort on the positive flag, then a stable descending sort on the score: inside a tie group
        # the positives come last (pessimistic) or first (optimistic).
        first = torch.argsort(pos_mask.to(torch.int8), dim=1, descending=ties == "optimistic", stable=True)
        order = torch.argsort(scores.gather(1, first), dim=1, descending=True, stable=True)
        top = first.gather(1, order)[:, :k_max]
    hits = pos_mask.gather(1, top).double()                            # (B, k_max), 1 where a positive sits
    discounts = _discounts(k_max, scores.device)                        # (k_max,)
    dcg = torch.cumsum(hits * discounts, dim=1)                         # DCG@1..k_max
    hit_count = torch.cumsum(hits, dim=1)
    ideal = torch.cumsum(discounts, dim=0)                              # IDCG with n positives = ideal[n-1]
    positions = torch.arange(1, k_max + 1, device=scores.device, dtype=torch.float64)
    # Reciprocal rank of the first hit: 1/position where the cumulative hit count first becomes 1.
    first_hit = (hits > 0) & (hit_count == 1)
    reciprocal = (first_hit.double() / positions).cumsum(dim=1)
    out = {}
    for k in ks:
        k_eff = min(k, k_max)
        n_ideal = torch.clamp(num_pos, max=k_eff)
        out[f"HR@{k}"] = (hit_count[:, k_eff - 1] > 0).double()
        out[f"Recall@{k}"] = hit_count[:, k_eff - 1] / num_pos.double()
        out[f"NDCG@{k}"] = dcg[:, k_eff - 1] / ideal[n_ideal - 1]
        out[f"MRR@{k}"] = reciprocal[:, k_eff - 1]
    return out


def _log_choose(n: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """log C(n, r) for 0 <= r <= n (float64)."""
    return torch.lgamma(n + 1) - torch.lgamma(r + 1) - torch.lgamma(n - r + 1)


def _expected_full(scores: torch.Tensor, pos_mask: torch.Tensor, num_pos: torch.Tensor,
                   ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Expected metrics over a uniformly random order inside every tie group (ties="average").

    Per row the descending sort splits into tie groups g with start s_g, size m_g and p_g positives. In a
    random order each member of a group is equally likely at each of its m_g positions, so the expected
    hits and DCG are linear sums over groups. HR needs P(no positive among the q_g = clamp(k - s_g, 0, m_g)
    slots of g above the cut-off) = C(m_g - p_g, q_g) / C(m_g, q_g); MRR needs the law of the first
    positive's position within the first group holding one: P(offset j) = C(m - 1 - j, p - 1) / C(m, p).
    """
    rows, n = scores.shape
    device = scores.device
    ordered, order = torch.sort(scores, dim=1, descending=True, stable=True)
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1                  # (B, N) group id of each position
    ones = torch.ones_like(ordered, dtype=torch.float64)
    size = torch.zeros(rows, n, dtype=torch.float64, device=device).scatter_add_(1, group, ones)
    positives = torch.zeros_like(size).scatter_add_(1, group, pos_mask.gather(1, order).double())
    position = torch.arange(n, device=device, dtype=torch.float64).expand(rows, n)
    start = torch.full_like(size, float(n)).scatter_reduce_(1, group, position, "amin")
    used = size > 0                                                     # groups that exist in the row
    start = torch.where(used, start, torch.full_like(start, float(n)))
    size_safe = size.clamp(min=1)
    discounts = _discounts(n, device)
    cum_disc = _prefix(discounts)
    ideal = torch.cumsum(discounts, dim=0)
    # The first group holding a positive: its start, size and positive count.
    has_pos = positives > 0
    first_group = torch.where(has_pos, torch.arange(n, device=device).expand(rows, n), n).amin(dim=1, keepdim=True)
    s1, m1, p1 = (t.gather(1, first_group).squeeze(1) for t in (start, size, positives))
    out = {}
    for k in ks:
        k_eff = min(k, n)
        end = torch.clamp(start + size, max=k_eff)
        lo = torch.clamp(start, max=k_eff)
        slots = end - lo                                                # q_g: group slots above the cut-off
        hits = (positives * slots / size_safe).sum(dim=1)
        dcg = (positives / size_safe * (cum_disc[end.long()] - cum_disc[lo.long()])).sum(dim=1)
        # log P(no positive of g above the cut-off); -inf where q_g > m_g - p_g (a positive must be above).
        feasible = slots <= size - positives
        log_miss = torch.where(feasible & used, _log_choose(size - positives, torch.where(feasible, slots, 0.0))
                               - _log_choose(size, slots), torch.where(used, float("-inf"), 0.0))
        miss = torch.exp(log_miss.sum(dim=1))
        # MRR: offsets j of the first positive inside its group, j < k - s1 (later ones contribute 0).
        j = torch.arange(k_eff, device=device, dtype=torch.float64).expand(rows, k_eff)
        valid = (j <= (m1 - p1).unsqueeze(1)) & (j < (k_eff - s1).unsqueeze(1))
        m, p = m1.unsqueeze(1), p1.unsqueeze(1)
        law = torch.exp(_log_choose(torch.where(valid, m - 1 - j, p - 1), p - 1) - _log_choose(m, p))
        mrr = torch.where(valid, law / (s1.unsqueeze(1) + j + 1), 0.0).sum(dim=1)
        n_ideal = torch.clamp(num_pos, max=k_eff)
        out[f"HR@{k}"] = 1.0 - miss
        out[f"Recall@{k}"] = hits / num_pos.double()
        out[f"NDCG@{k}"] = dcg / ideal[n_ideal - 1]
        out[f"MRR@{k}"] = mrr
    return out


def tie_metrics(above: torch.Tensor, tied: torch.Tensor, ks: Sequence[int] = (10, 20),
                ties: str = "pessimistic") -> dict[str, torch.Tensor]:
    """Metrics of one target per row from the number of items scored strictly `above` it and the number
    of OTHER items `tied` with it. "average" is the expected metric over the tied items' random order:
    the target's rank is uniform on above .. above + tied."""
    _check_ties(ties, TIES, "tie_metrics")
    above, tied = above.double(), tied.double()
    if ties == "pessimistic":
        return rank_metrics(above + tied, ks)
    if ties == "optimistic":
        return rank_metrics(above, ks)
    width = tied + 1.0
    device = above.device
    out = {}
    for k in ks:
        cum_disc = _prefix(_discounts(k, device))                      # sums over ranks [a, b) within [0, k]
        cum_recip = _prefix(1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float64))
        lo = torch.clamp(above, max=k).long()
        hi = torch.clamp(above + width, max=k).long()
        hit = (hi - lo).double() / width
        out[f"HR@{k}"] = hit
        out[f"Recall@{k}"] = hit
        out[f"NDCG@{k}"] = (cum_disc[hi] - cum_disc[lo]) / width
        out[f"MRR@{k}"] = (cum_recip[hi] - cum_recip[lo]) / width
    return out


def rank_metrics(rank: torch.Tensor, ks: Sequence[int] = (10, 20)) -> dict[str, torch.Tensor]:
    """HR/Recall/NDCG/MRR@k from 0-based ranks of a single target per row."""
    _check_finite("rank_metrics", rank=rank.double())
    rank = rank.double()
    out = {}
    for k in ks:
        hit = (rank < k).double()
        out[f"HR@{k}"] = hit
        out[f"Recall@{k}"] = hit
        out[f"NDCG@{k}"] = hit / torch.log2(rank + 2.0)
        out[f"MRR@{k}"] = hit / (rank + 1.0)
    return out


def sampled_metrics(pos_scores: torch.Tensor, neg_scores: torch.Tensor, ks: Sequence[int] = (10, 20),
                    ties: str = "pessimistic") -> dict[str, torch.Tensor]:
    """Metrics of one positive [B] ranked against its own sampled negatives [B, n].

    Ties are exact float equality: take both scores from ONE computation (e.g. columns of one
    `users @ items.T` product), or identical embeddings may differ in the last bit and never tie."""
    _check_ties(ties, TIES, "sampled_metrics")
    _check_finite("sampled_metrics", pos_scores=pos_scores, neg_scores=neg_scores)
    pos = pos_scores.view(-1, 1)
    above = (neg_scores > pos).sum(dim=1)
    tied = (neg_scores == pos).sum(dim=1)
    return tie_metrics(above, tied, ks, ties)


def average(per_user: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Exact mean over all users of batches of per-user metric tensors."""
    batches = list(per_user)
    if not batches:
        raise ValueError("no metric batches to average")
    return {key: float(torch.cat([batch[key].double().cpu() for batch in batches]).mean())
            for key in batches[0]}
