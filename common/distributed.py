"""The collectives that exact data parallelism needs, the same for every paper (identity in one process).

    rows = gather_rows(x, sizes)   # every rank's rows of x, in rank order, gradients to this rank's own

An all-gather whose backward sums the ranks' gradients of the stacked result and returns this rank's
slice: when every rank computes the same global loss from the gathered rows (in-batch negatives, batch
statistics), each rank's rows get exactly the 1-process gradient of that loss.
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


def gather_rows(x: torch.Tensor, sizes: list[int], dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank r holds sizes[r] rows there) in rank order; with a
    gradient to this rank's rows when `x` has one, a plain all-gather otherwise."""
    if len(sizes) == 1:
        return x
    pad = max(sizes) - x.shape[dim]
    if pad:  # all_gather needs one shape: pad, then cut every rank's padding off again
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    if x.requires_grad:
        parts = _AllGather.apply(x)
    else:
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x.contiguous())
        parts = torch.stack(parts)
    return torch.cat([parts[r].narrow(dim, 0, n) for r, n in enumerate(sizes)], dim=dim)
