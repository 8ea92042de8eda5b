"""Data parallelism for VLM2Rec (§7): N processes x B/N pairs per rank optimise the 1-process objective at batch B.

Under `accelerate launch`, torchrun or `python -m vlm2rec.launch` (one process group, gloo on CPUs,
nccl on GPUs) every rank embeds its own rows of the global batch; `gather` then concatenates every
rank's branch embeddings u^m, e^m, the fused u, e, the targets (and mined negatives) in rank order, with
gradients flowing back to each rank's own rows. Every rank thus computes the same global objective:
in-batch negatives over all B pairs, WPCL's batch statistics (c^m, the weak modality, rho, gamma, its EMA)
and CRTR's in-batch topology over all B rows. The all-gather's backward sums the N ranks' (identical)
gradients of that loss, and DDP averages the parameter gradients over the ranks, so each parameter gets
exactly the gradient of the 1-process loss (the equality test checks 1e-5). What stays per rank: the
per-branch gradient norms of the diagnostics (§11.2, each rank's own rows; rank 0 logs), and dropout's
draws.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


class _AllGather(torch.autograd.Function):
    """Forward: every rank's (same-shape) tensor, stacked in rank order. Backward: the stack's gradient
    summed over the ranks (each holds one copy of the global loss' gradient); this rank's slice flows
    back to its own tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def row_counts(n: int) -> list[int]:
    """Every rank's number of rows (the tail batch may give ranks one row more or less)."""
    if world() == 1:
        return [n]
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world())]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long))
    return [int(c) for c in counts]


def gather(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's rows of `x` (rank r holds counts[r]) concatenated in rank order along dim 0; with a
    gradient when `x` has one (to this rank's rows), a plain all-gather otherwise."""
    if len(counts) == 1:
        return x
    pad = max(counts) - x.shape[0]
    if pad:   # all_gather needs one shape: pad, then cut every rank's padding off again
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    if x.requires_grad:
        parts = _AllGather.apply(x)
    else:
        parts = [torch.empty_like(x) for _ in counts]
        dist.all_gather(parts, x.contiguous())
        parts = torch.stack(parts)
    return torch.cat([parts[r][:n] for r, n in enumerate(counts)])
