"""Data parallelism (§10): N processes × B/N samples per rank optimise exactly the 1-process objective at batch B.

    device, is_main = init("auto")                 # one process, or one rank of `torchrun -m flame.main`
    local, batch_extra = shard(index, gather=True)  # this rank's rows and how its loss terms are scaled
    sum_gradients(params)                           # one all-reduce (sum) of every gradient per step

How exactness is kept (the invariants the tests check to 1e-5 against one process):
- every rank takes rows rank, rank+N, ... of the same global batch (the epoch's permutation and any
  sampled paths come from rank 0);
- a per-rank term (L_rec, B3's KL: means over the rank's rows) is scaled by share = rows here / rows in
  the batch, so the sum over ranks is the global mean;
- with flame.gather_negatives the path representations are all-gathered with gradients flowing back to
  each rank's own rows: every rank computes the same global L_wcl (in-batch negatives, the pair weights
  α) and scales it by 1/N, and the all-gather's backward sums the N copies' gradients;
- gradients are summed (not averaged) over the ranks, so they are the gradients of the global loss;
- a batch with fewer rows than ranks is computed whole by every rank, each scaled by 1/N.
"""
from __future__ import annotations

import datetime
import os
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from common.distributed import gather_rows, rank, world  # noqa: F401  (world, rank: for callers)
from common.utils import get_device

from .model import scaled

TIMEOUT = datetime.timedelta(minutes=10)  # a collective waits at most this long for a peer, then fails


def init(device_name: str) -> tuple[torch.device, bool]:
    """The device and whether this process writes the run folder. Single process: get_device. Under a
    launcher that sets WORLD_SIZE > 1 (torchrun, accelerate launch): join the process group
    (gloo on CPU, nccl on GPUs), one GPU per local rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return get_device(device_name), True
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return device, dist.get_rank() == 0


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (identity in one process)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor (same shape on every rank) on every rank, in place."""
    if world() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def shard(index: torch.Tensor, gather: bool) -> tuple[torch.Tensor, dict]:
    """This rank's rows of a global batch, and the batch entries that scale its loss terms
    ("share", "gather", "gathered_share"; see the module docstring and loss_terms). One process: (index, {})."""
    n, size = len(index), world()
    if size == 1:
        return index, {}
    if n < size:  # every rank computes the whole (small) batch: each is one N-th of it
        return index, {"share": 1.0 / size, "gathered_share": 1.0 / size}
    me = rank()
    sizes = [len(range(r, n, size)) for r in range(size)]
    extra = {"share": sizes[me] / n}
    if gather:
        extra.update(gather=partial(gather_rows, sizes=sizes, dim=1), gathered_share=1.0 / size)
    return index[me::size], extra


def loss_terms(model: Any, batch: dict, extra: dict, row_terms: Optional[Callable] = None) -> dict:
    """FLAME's loss terms on this rank's rows (its share of each: their sum over ranks is the term), in the
    model's two halves with the data-parallel steps between them: the per-row terms are scaled by
    "share"; the path outputs are all-gathered ("gather") and L_wcl, α scaled by "gathered_share", or
    kept local and scaled by "share". extra: from shard(); row_terms: model.row_terms, or its compiled
    version. The paths are skipped when λ is the float 0, as model.loss_terms decides."""
    lam = batch["lam"]
    skip_paths = not torch.is_tensor(lam) and float(lam) == 0.0
    terms, z = (row_terms or model.row_terms)(batch["seq"], batch["target"], skip_paths, batch.get("paths"))
    share = extra.get("share", 1.0)
    terms = {k: scaled(v, share) for k, v in terms.items()}
    if z is not None:
        scale, gather = share, extra.get("gather")
        if gather is not None:  # every rank: the same L_wcl over the whole batch's rows
            names = list(z)
            z = dict(zip(names, gather(torch.stack([z[p] for p in names])).unbind(0)))
            scale = extra["gathered_share"]
        terms.update({k: scaled(v, scale) for k, v in model.pair_terms(z).items()})
    return model.total(terms, lam)


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum every gradient over the ranks with one all-reduce (a missing gradient counts as zero)."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone() if p.grad is None else \
            p.grad.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over the ranks (the epoch's loss statistics: each rank holds its share of every term)."""
    if world() > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_default(option: Optional[bool]) -> bool:
    """flame.gather_negatives: None = on under more than one process."""
    return world() > 1 if option is None else option
