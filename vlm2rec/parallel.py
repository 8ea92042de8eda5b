"""Data parallelism for VLM2Rec (§7): N processes x B/N pairs per rank optimise the 1-process objective at batch B.

Under `torchrun -m vlm2rec.main` or `accelerate launch -m vlm2rec.main` (one process group, gloo on CPUs,
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

from common.distributed import gather_rows as gather, rank, world  # noqa: F401  (gather, rank: for model.py)


def row_counts(n: int) -> list[int]:
    """Every rank's number of rows (the tail batch may give ranks one row more or less)."""
    if world() == 1:
        return [n]
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world())]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long))
    return [int(c) for c in counts]
