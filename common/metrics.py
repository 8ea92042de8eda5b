"""Vectorised ranking metrics. Every function returns PER-USER tensors [B], so
callers can concatenate batches and average exactly (`average`). All work on any device.

Two ways in:
- `full_sort_metrics(scores, pos_mask, ...)`: top-k based; one or many positives per row (F3CRec).
- `target_rank(...)` / `sampled_metrics(...)` then `rank_metrics(rank, ...)`: one target per row, from
  its 0-based rank with an explicit tie rule (FLAME, VLM2Rec's 1 + 100 sampled protocol).

Definitions (rank r is 0-based, P the positive set of a row, hits counted in the top k):
  HR@k     = 1 if any positive is in the top k                 (= Recall@k for one target)
  Recall@k = hits / |P|            (divided by |P|, not min(|P|, k): the F3CRec spec's definition)
  NDCG@k   = sum_{hit at r < k} 1/log2(r + 2)  /  sum_{r < min(|P|, k)} 1/log2(r + 2)
  MRR@k    = 1 / (r_first + 1) if the first positive is in the top k, else 0
Ties: in `full_sort_metrics` tied scores keep `torch.topk`'s order (implementation-defined), so ties
at the cut-off are broken arbitrarily; use `target_rank` when ties matter.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

TIES = ("pessimistic", "optimistic", "average")


def _discounts(length: int, device: torch.device) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(2, length + 2, device=device, dtype=torch.float64))


def full_sort_metrics(scores: torch.Tensor, pos_mask: torch.Tensor, ks: Sequence[int] = (10, 20),
                      exclude_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """HR/Recall/NDCG/MRR@k for every row of `scores` [B, N] given boolean positives [B, N].

    `exclude_mask` [B, N] (history, padding column) is set to -inf, except where a positive is: an
    exclusion never hides a held-out positive.
    """
    if scores.shape != pos_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and pos_mask {tuple(pos_mask.shape)} differ in shape")
    pos_mask = pos_mask.bool()
    num_pos = pos_mask.sum(dim=1)
    if bool((num_pos == 0).any()):
        raise ValueError(f"{int((num_pos == 0).sum())} row(s) have no positive item: drop them before scoring")
    if exclude_mask is not None:
        scores = scores.masked_fill(exclude_mask.bool() & ~pos_mask, float("-inf"))
    k_max = min(max(ks), scores.shape[1])
    top = torch.topk(scores, k_max, dim=1).indices                     # (B, k_max)
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


def target_rank(scores: torch.Tensor, target: torch.Tensor, exclude_mask: torch.Tensor | None = None,
                ties: str = "pessimistic") -> torch.Tensor:
    """0-based rank of `target[b]` in row b of `scores` [B, N], as float [B].

    rank = #(strictly greater) + tie term: `pessimistic` counts every other tied item above the target,
    `optimistic` none, `average` half. Excluded items (never the target) are set to -inf first.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    target = target.long().view(-1, 1)
    if exclude_mask is not None:
        keep_target = torch.zeros_like(exclude_mask, dtype=torch.bool).scatter_(1, target, True)
        scores = scores.masked_fill(exclude_mask.bool() & ~keep_target, float("-inf"))
    target_score = scores.gather(1, target)                            # (B, 1)
    greater = (scores > target_score).sum(dim=1).double()
    tied = (scores == target_score).sum(dim=1).double() - 1.0          # the target ties with itself
    return _apply_ties(greater, tied, ties)


def _apply_ties(greater: torch.Tensor, tied: torch.Tensor, ties: str) -> torch.Tensor:
    if ties == "pessimistic":
        return greater + tied
    if ties == "optimistic":
        return greater
    return greater + 0.5 * tied


def rank_metrics(rank: torch.Tensor, ks: Sequence[int] = (10, 20)) -> dict[str, torch.Tensor]:
    """HR/Recall/NDCG/MRR@k from 0-based ranks of a single target per row."""
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
    """Metrics of one positive [B] ranked against its own sampled negatives [B, n]."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    pos = pos_scores.view(-1, 1)
    greater = (neg_scores > pos).sum(dim=1).double()
    tied = (neg_scores == pos).sum(dim=1).double()
    return rank_metrics(_apply_ties(greater, tied, ties), ks)


def average(per_user: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Exact mean over all users of batches of per-user metric tensors."""
    batches = list(per_user)
    if not batches:
        raise ValueError("no metric batches to average")
    return {key: float(torch.cat([batch[key].double().cpu() for batch in batches]).mean())
            for key in batches[0]}
