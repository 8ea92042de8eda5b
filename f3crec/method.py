"""Continual-learning terms (§6, §7, §11): Adaptive Replay Memory, Item-wise Temporal Mean, baselines.

Pure tensor functions with a leading client dimension, used unchanged by the simulators (torch is imported by
the functions that use it; ITM also takes numpy arrays, the compiled simulator's server):
  target_ranks / memory_size / kd_terms      ARM on the client (§6)
  item_temporal_mean                         ITM on the server (§7)
  per_sample_grads                           EWC's empirical Fisher (§11, ours)
Which terms a method switches on is `config.method_flags`.
"""
from __future__ import annotations

import math

from .arrays import cat
from .model import Backbone


# ---------------------------------------------------------------------------------- ARM (client, §6)
def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank r_cur of each target item in its row's descending order over ALL items (§6 step 2).

    scores (A, I), targets (A, N) -> (A, N). Nothing is masked; ties go to the lower item id (the order of
    a stable descending sort), so both simulators agree. rank = 1 + #{j: s_j > s_t} + #{j < t: s_j = s_t},
    counted without sorting the catalogue: each item's count of target scores below it (a search in the
    row's sorted target scores) is histogrammed, and the few items equal to a target score are compared
    with the targets directly.
    """
    import torch
    values = scores.gather(1, targets)                                           # (A, N)
    ascending = torch.sort(values, dim=1).values
    below = torch.searchsorted(ascending, scores)                                # (A, I) #targets < s_j
    hist = torch.zeros(scores.shape[0], targets.shape[1] + 2, dtype=torch.long, device=scores.device)
    hist.scatter_add_(1, below, torch.ones_like(below))
    above = hist.flip(1).cumsum(1).flip(1)                                       # above[h] = #{j: below_j ≥ h}
    greater = above.gather(1, torch.searchsorted(ascending, values) + 1)         # #{j: s_j > v_k}
    at = ascending.gather(1, below.clamp(max=targets.shape[1] - 1))               # next target score ≥ s_j
    row, item = torch.nonzero((at == scores) & (below < targets.shape[1]), as_tuple=True)
    equal = (values[row] == scores[row, item, None]) & (item[:, None] < targets[row])   # (E, N)
    ties = torch.zeros_like(greater).index_add_(0, row, equal.long())
    return greater + ties + 1


def memory_size(ranks: torch.Tensor, eps: float, topn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D_u = Σ |r_prev − r_cur| (Spearman footrule over T^u), p_u = exp(−ε D_u), m_u = ⌊N p_u⌋ (§6 4–5).

    ranks (A, N) are r_cur of T^u's items in T^u's order, so r_prev = 1..N. p is computed in float32 as in
    the reference. Returns (D (A,) long, p (A,) float32, m (A,) long).
    """
    import torch
    previous = torch.arange(1, ranks.shape[1] + 1, device=ranks.device)
    discrepancy = (previous - ranks).abs().sum(1)
    consistency = torch.exp(-eps * discrepancy.to(torch.float32))
    return discrepancy, consistency, torch.floor(topn * consistency).long()


def kd_terms(logits: torch.Tensor, previous_logits: torch.Tensor) -> torch.Tensor:
    """Per-item soft-label BCE(σ(s_i), σ(ŷ_i)) in probability form (log clamped at −100), §6 step 7."""
    import torch
    import torch.nn.functional as F
    return F.binary_cross_entropy(torch.sigmoid(logits), torch.sigmoid(previous_logits), reduction="none")


# ---------------------------------------------------------------------------------- ITM (server, §7)
def item_temporal_mean(mean_table, previous, beta: float) -> tuple:
    """Mix every old row back toward Q^{t−1}: q ← (1−w) q′ + w q^{t−1}, w = β / (1 + ‖Δ‖² / √d).

    New rows (index ≥ len(previous)) are left as the plain mean. Returns (table, w (I_prev,)).
    """
    n_old, dim = previous.shape
    old = mean_table[:n_old]
    delta = 1.0 / (1.0 + ((previous - old) ** 2).sum(1) / math.sqrt(dim))     # (I_prev,) in (0, 1]
    weight = beta * delta
    mixed = (1.0 - weight)[:, None] * old + weight[:, None] * previous
    return cat([mixed, mean_table[n_old:]]), weight


# ------------------------------------------------------------------------------------ EWC (§11, ours)
def per_sample_grads(net: Backbone, private: dict[str, torch.Tensor], rows: torch.Tensor,
                     labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of each sample's BCE w.r.t. its client's private tensors and its item row.

    private: tensors (S, ...) (each sample's client state), rows (S, d), labels (S,). Since every sample's
    loss depends only on its own copies, the gradient of the sum is the per-sample gradient.
    """
    import torch
    import torch.nn.functional as F
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in private.items()}
    row_leaf = rows.detach().clone().requires_grad_(True)
    a, c = net.affine(leaves)
    logits = (row_leaf * a).sum(-1) + c
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    grads = torch.autograd.grad(loss, list(leaves.values()) + [row_leaf])
    return dict(zip(leaves, grads[:-1])), grads[-1]
