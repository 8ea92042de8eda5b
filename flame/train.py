"""The one training loop of SASRec, FLAME and the baselines (§7.5); § numbers refer to docs/method.md.

    step = make_step(model, data, optimizer, cfg.train, device)            # eager, or fast.GraphStep
    stats = train_one_epoch(model, data, step, batch_size=256, lam=0.944, device=device)
    summary = fit(model, data, optimizer, cfg, run_dir, device)   # early stopping, best.pt / last.pt, resume
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.distributed as dist

from common.io import atomic_write
from common.runs import check_finite, load_checkpoint, log_metrics, read_metrics, rng_state, \
    save_checkpoint, set_rng_state
from common.utils import get_device

from .evaluate import evaluate
from .fast import GraphStep, autocast, compiled_loss, stacked_terms
from .model import lambda_schedule


class Step(Protocol):
    """One training step on the samples `index` with loss weight `lam`, and the epoch's statistics."""

    def __call__(self, index: torch.Tensor, lam: float) -> None: ...

    def reset(self) -> None: ...

    def accumulated(self) -> list[tuple[tuple, torch.Tensor, int]]: ...


def setup_device(name: str) -> tuple[torch.device, bool]:
    """Single process: get_device(train.device). Under `accelerate launch` (WORLD_SIZE > 1): one rank
    per device. Returns (device, whether this is the process that writes the run folder)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return accelerator.device, accelerator.is_main_process
    return get_device(name), True


def synchronize(device: torch.device) -> None:
    """Device-synchronised wall-clock (§7.5): wait for queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module, tc: Any) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (§7.5: betas (0.9, 0.999), eps 1e-8, nothing else);
    capturable under train.cuda_graph, which keeps the step count on the GPU (same arithmetic)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(trainable, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8, capturable=tc.cuda_graph)


def _average_gradients(params: list[torch.Tensor]) -> None:
    """Data parallelism under `accelerate launch`: every rank holds a slice of the batch."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


class EagerStep:
    """The plain training step (§7.5): zero_grad, loss, backward, Adam. The loss terms are summed on the
    device (no host sync inside a step). Under `accelerate launch` each rank takes its slice of the batch
    and the gradients are averaged over the ranks."""

    def __init__(self, model: torch.nn.Module, data: Any, optimizer: torch.optim.Optimizer,
                 device: torch.device, bf16: bool = False, loss_fn: Optional[Callable[[dict], dict]] = None):
        self.data, self.optimizer, self.device, self.bf16 = data, optimizer, device, bf16
        self.loss_fn = loss_fn or model.loss_terms
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.sums: dict[tuple, list] = {}  # key tuple -> [stacked running sum, steps]

    def reset(self) -> None:
        self.sums = {}

    def __call__(self, index: torch.Tensor, lam: float) -> None:
        if self.distributed:
            index = index[dist.get_rank():: dist.get_world_size()]
        self.optimizer.zero_grad(set_to_none=True)
        if len(index) == 0:  # last batch smaller than the world size: this rank adds zero gradients
            for p in self.params:
                p.grad = torch.zeros_like(p)
            _average_gradients(self.params)
            self.optimizer.step()
            return
        batch = {"seq": self.data.train_seq[index], "target": self.data.train_target[index], "lam": lam}
        with autocast(self.device, self.bf16):
            terms = self.loss_fn(batch)
        terms["loss"].backward()
        if self.distributed:
            _average_gradients(self.params)
        self.optimizer.step()
        keys, values = stacked_terms(terms)
        if keys in self.sums:
            self.sums[keys][0] += values
            self.sums[keys][1] += 1
        else:
            self.sums[keys] = [values, 1]

    def accumulated(self) -> list[tuple[tuple, torch.Tensor, int]]:
        return [(keys, values, n) for keys, (values, n) in self.sums.items()]


def make_step(model: torch.nn.Module, data: Any, optimizer: torch.optim.Optimizer, tc: Any,
              device: torch.device) -> Step:
    """The step of train.cuda_graph (fast.GraphStep), else the eager step (with train.compile's loss)."""
    if tc.cuda_graph:
        return GraphStep(model, data, optimizer, tc.batch_size, device, tc.bf16)
    return EagerStep(model, data, optimizer, device, tc.bf16, compiled_loss(model, tc))


def _epoch_means(accumulated: list[tuple[tuple, torch.Tensor, int]]) -> dict[str, float]:
    """Mean of every loss term over the steps that produced it (one host copy per epoch)."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for keys, values, n in accumulated:
        for key, value in zip(keys, values.tolist()):
            totals[key] = totals.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + n
    return {key: total / counts[key] for key, total in totals.items()}


def train_one_epoch(model: torch.nn.Module, data: Any, step: Step, batch_size: int, lam: float,
                    device: torch.device, max_steps: Optional[int] = None) -> dict:
    """One pass over the shuffled samples, last partial batch kept (§3.4). Returns mean loss terms.
    The training tensors are on `device` already; only index slices are taken here."""
    model.train()  # the whole model, frozen net included (§7.5, quirk 4)
    perm = torch.randperm(len(data.train_target)).to(device)  # global RNG: restored on resume
    step.reset()
    steps = 0
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(perm), batch_size):
        step(perm[first: first + batch_size], lam)
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    stats = _epoch_means(step.accumulated())
    check_finite(stats["loss"], f"the epoch's mean training loss ({steps} steps)")
    return {**stats, "train_seconds": seconds, "steps": steps, "samples": min(len(perm), steps * batch_size)}


@dataclass
class Progress:
    """Where early stopping stands after `epoch` finished epochs (the fields of last.pt)."""
    epoch: int = 0
    best: float = 0.0
    best_epoch: int = 0
    train_time: float = 0.0
    time_to_best: float = 0.0


def _resume(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            is_main: bool) -> tuple[Progress, Optional[dict]]:
    """Load last.pt (model, optimizer, RNG, progress) and best.pt's state; drop newer metric records."""
    ckpt = load_checkpoint(run_dir / "last.pt")
    model.load_state_dict(ckpt["model"])
    for group, saved in zip(optimizer.param_groups, ckpt["optimizer"]["param_groups"]):
        saved["capturable"] = group.get("capturable", False)  # this run's choice, not the saved one
    optimizer.load_state_dict(ckpt["optimizer"])
    progress = Progress(ckpt["epoch"], ckpt["best_val"], ckpt["best_epoch"], ckpt["train_time"],
                        ckpt["time_to_best"])
    best_state = load_checkpoint(run_dir / "best.pt")["model"] if progress.best_epoch > 0 else None
    set_rng_state(ckpt["rng"])
    if is_main:  # records a crash left behind after the checkpoint
        kept = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= progress.epoch]
        with atomic_write(run_dir / "metrics.jsonl") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in kept))
    print(f"resumed from {run_dir / 'last.pt'} after epoch {progress.epoch}")
    return progress, best_state


def _save_last(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, p: Progress) -> None:
    save_checkpoint(run_dir / "last.pt", {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": p.epoch,
        "best_val": p.best, "best_epoch": p.best_epoch, "train_time": p.train_time,
        "time_to_best": p.time_to_best, "rng": rng_state()})


def fit(model: torch.nn.Module, data: Any, optimizer: torch.optim.Optimizer, cfg: Any, run_dir: Path,
        device: torch.device, resume: bool = False, is_main: bool = True) -> dict:
    """Early-stopped training (§7.5): λ(e) of §7.4, strict improvement of validation cfg.train.select,
    patience, best state restored at the end. best.pt on improvement, last.pt every epoch (resumable)."""
    tc, ec, fc = cfg.train, cfg.eval, cfg.flame
    progress, best_state = Progress(), copy.deepcopy(model.state_dict())
    if resume and (run_dir / "last.pt").exists():
        progress, resumed_best = _resume(run_dir, model, optimizer, is_main)
        best_state = resumed_best or best_state
    step = make_step(model, data, optimizer, tc, device)  # after a resume: a graph captures the loaded states
    horizon = fc.lambda_horizon or tc.max_epochs  # quirk 10
    for epoch in range(progress.epoch + 1, tc.max_epochs + 1):
        if epoch > progress.best_epoch + tc.patience:
            print(f"early stop: no improvement of valid {tc.select} for {tc.patience} epochs")
            break
        lam = lambda_schedule(epoch, fc.lambda0, fc.lambdaR, horizon)
        stats = train_one_epoch(model, data, step, tc.batch_size, lam, device)
        progress.epoch, progress.train_time = epoch, progress.train_time + stats["train_seconds"]
        valid = evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, ec.seen_mask, ec.rank,
                         ec.batch_size, device)
        improved = valid[tc.select] > progress.best  # strict improvement (§7.5)
        if improved:
            progress.best, progress.best_epoch, progress.time_to_best = valid[tc.select], epoch, progress.train_time
            best_state = copy.deepcopy(model.state_dict())
        print(f"epoch {epoch:3d} | loss {stats['loss']:.4f} | {stats['train_seconds']:.1f}s | "
              f"valid NDCG@20 {valid['NDCG@20']:.2f} HR@20 {valid['HR@20']:.2f}" + (" *" if improved else ""))
        if is_main:
            log_metrics(run_dir, {"epoch": epoch, "lambda": lam, **{f"train/{k}": v for k, v in stats.items()},
                                  "train/cumulative_seconds": progress.train_time,
                                  **{f"valid/{k}": v for k, v in valid.items()}})
            if improved:
                save_checkpoint(run_dir / "best.pt", {"model": best_state, "epoch": epoch, "best_val": progress.best})
            _save_last(run_dir, model, optimizer, progress)
    model.load_state_dict(best_state)
    return {"best_valid": progress.best, "best_epoch": progress.best_epoch,
            "time_to_best_s": progress.time_to_best, "train_seconds": progress.train_time}
