"""The one training loop of SASRec, FLAME and the baselines (§7.5); § numbers refer to docs/method.md.

    step = make_step(model, data, optimizer, cfg.train, device)            # eager, or fast.GraphStep
    stats = train_one_epoch(model, data, step, batch_size=256, lam=0.944, device=device)
    summary = fit(model, data, optimizer, cfg, run_dir, device)   # early stopping, best.pt / last.pt, resume
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from tqdm import tqdm

from common.checkpoints import rng_state, save_checkpoint, set_rng_state
from common.progress import Progress as Report, duration
from common.runs import check_finite, log_metrics, truncate_metrics
from common.selection import Selection

from . import parallel
from .checks import LAST_KEYS, read_checkpoint
from .evaluate import evaluate
from .fast import GraphStep, autocast, compiled_loss, stacked_terms
from .model import lambda_schedule


class Step(Protocol):
    """One training step on the samples `index` with loss weight `lam`, and the epoch's statistics."""

    def __call__(self, index: torch.Tensor, lam: float) -> None: ...

    def reset(self) -> None: ...

    def accumulated(self) -> list[tuple[tuple, torch.Tensor, int]]: ...


def setup_device(name: str) -> tuple[torch.device, bool]:
    """Single process: get_device(train.device). Under torchrun or
    `accelerate launch` (WORLD_SIZE > 1): one rank per device (parallel.init). Returns (device, whether
    this is the process that writes the run folder)."""
    return parallel.init(name)


def synchronize(device: torch.device) -> None:
    """Device-synchronised wall-clock (§7.5): wait for queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module, tc: Any) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (§7.5: betas (0.9, 0.999), eps 1e-8, nothing else);
    capturable under train.cuda_graph, which keeps the step count on the GPU (same arithmetic)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(trainable, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8, capturable=tc.cuda_graph)


class EagerStep:
    """The plain training step (§7.5): zero_grad, loss, backward, Adam. The loss terms are summed on the
    device (no host sync inside a step). Under data parallelism each rank takes its rows of the batch,
    its loss terms are scaled to its share and the gradients summed over the ranks (parallel.py), so
    the step is the 1-process step; gather: flame.gather_negatives (L_wcl over the whole batch)."""

    def __init__(self, model: torch.nn.Module, data: Any, optimizer: torch.optim.Optimizer,
                 device: torch.device, bf16: bool = False, loss_fn: Optional[Callable[[dict], dict]] = None,
                 gather: bool = False, row_terms: Optional[Callable] = None):
        """loss_fn: model.loss_terms or its compiled version; row_terms: model.row_terms or its compiled
        version, the first half of a FLAME loss under data parallelism (parallel.loss_terms)."""
        self.model, self.data, self.optimizer, self.device, self.bf16 = model, data, optimizer, device, bf16
        self.loss_fn = loss_fn or model.loss_terms
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.distributed, self.gather = parallel.world() > 1, gather
        # FLAME under data parallelism: the loss in two halves, scaled and gathered between them
        self.split = self.distributed and hasattr(model, "row_terms")
        self.row_terms = row_terms
        # sampled paths (flame.num_paths) must be the same on every rank: rank 0's are broadcast
        self.sampled = self.distributed and bool(getattr(getattr(model, "cfg", None), "num_paths", 0))
        self.sums: dict[tuple, list] = {}  # key tuple -> [stacked running sum, steps]

    def reset(self) -> None:
        self.sums = {}

    def __call__(self, index: torch.Tensor, lam: float) -> None:
        index, extra = parallel.shard(index, self.gather)
        self.optimizer.zero_grad(set_to_none=True)
        batch = {"seq": self.data.train_seq[index], "target": self.data.train_target[index], "lam": lam}
        if not self.split:
            batch.update(extra)  # a SASRec scales its L_rec by "share" itself
        if self.sampled:
            batch["paths"] = parallel.broadcast(self.model.sample_paths())
        with autocast(self.device, self.bf16):
            terms = parallel.loss_terms(self.model, batch, extra, self.row_terms) if self.split else \
                self.loss_fn(batch)
        terms["loss"].backward()
        parallel.sum_gradients(self.params)
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
              device: torch.device, gather: bool = False) -> Step:
    """The step of train.cuda_graph (fast.GraphStep), else the eager step (with train.compile's loss);
    gather: all-gather the path representations under data parallelism (flame.gather_negatives)."""
    if tc.cuda_graph:
        return GraphStep(model, data, optimizer, tc.batch_size, device, tc.bf16)
    split = parallel.world() > 1 and hasattr(model, "row_terms")
    return EagerStep(model, data, optimizer, device, tc.bf16, compiled_loss(model, tc), gather,
                     compiled_loss(model, tc, model.row_terms) if split else None)


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
                    device: torch.device, max_steps: Optional[int] = None, progress: Optional[dict] = None) -> dict:
    """One pass over the shuffled samples, last partial batch kept (§3.4). Returns mean loss terms.
    The training tensors are on `device` already; only index slices are taken here. `progress`: options of
    common.progress.Progress (desc, also, ...) to report the steps (a bar, or lines in a log; none by default)."""
    model.train()  # the whole model, frozen net included (§7.5, quirk 4)
    perm = torch.randperm(len(data.train_target)).to(device)  # global RNG: restored on resume
    parallel.broadcast_tensor(perm)  # every rank shards the same permutation (rank 0's)
    step.reset()
    steps = 0
    total = -(-len(perm) // batch_size) if max_steps is None else min(max_steps, -(-len(perm) // batch_size))
    report = Report(total, unit="step", **progress) if progress is not None else None
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(perm), batch_size):
        step(perm[first: first + batch_size], lam)
        steps += 1
        if report is not None:  # the clock only, no device sync: the bar runs ahead of queued kernels
            report.update()
        if max_steps is not None and steps >= max_steps:
            break
    if report is not None:
        report.close()
    synchronize(device)
    seconds = time.perf_counter() - start
    accumulated = step.accumulated()
    for _, values, _ in accumulated:  # each rank holds its share of every term: their sum is the term
        parallel.sum_over_ranks(values)
    stats = _epoch_means(accumulated)
    check_finite(stats["loss"], f"the epoch's mean training loss ({steps} steps)")
    return {**stats, "train_seconds": seconds, "steps": steps, "samples": min(len(perm), steps * batch_size)}


@dataclass
class Progress:
    """Where early stopping stands after `epoch` finished epochs (the fields of last.pt). The rule is
    common.selection's (§7.5): a strict improvement of the validation score is the new best, and training
    stops after `patience` epochs without one. FLAME's reference starts from a best of 0.0 at epoch 0 (a
    score of 0 is no improvement; best_epoch 0 = the initial network)."""
    epoch: int = 0
    select: Selection = field(default_factory=lambda: Selection(best=0.0, best_at=0))
    train_time: float = 0.0
    time_to_best: float = 0.0

    @classmethod
    def start(cls, patience: int) -> "Progress":
        return cls(select=Selection(patience=patience, best=0.0, best_at=0))

    @classmethod
    def from_checkpoint(cls, ckpt: dict, patience: int) -> "Progress":
        """last.pt's fields; every epoch is one evaluation, so the epochs since the best are its count."""
        select = Selection(patience=patience, best=ckpt["best_val"], best_at=ckpt["best_epoch"],
                           stale=ckpt["epoch"] - ckpt["best_epoch"])
        return cls(ckpt["epoch"], select, ckpt["train_time"], ckpt["time_to_best"])

    @property
    def best(self) -> float:
        return self.select.best

    @property
    def best_epoch(self) -> int:
        return self.select.best_at

    def record(self, epoch: int, score: float, train_seconds: float) -> bool:
        """One finished epoch and its validation score; True when it is the new best."""
        self.epoch, self.train_time = epoch, self.train_time + train_seconds
        improved = self.select.update(score, epoch)  # strict improvement (§7.5)
        if improved:
            self.time_to_best = self.train_time
        return improved


def _resume(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            is_main: bool, patience: int) -> tuple[Progress, Optional[dict]]:
    """Load last.pt (model, optimizer, RNG, progress) and best.pt's state; drop newer metric records."""
    ckpt = read_checkpoint(run_dir / "last.pt", LAST_KEYS)
    try:
        model.load_state_dict(ckpt["model"])
        for group, saved in zip(optimizer.param_groups, ckpt["optimizer"]["param_groups"]):
            saved["capturable"] = group.get("capturable", False)  # this run's choice, not the saved one
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:  # another method's, dataset's or size's checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{run_dir / 'last.pt'} does not fit this run's network ({first[:160]})") from None
    progress = Progress.from_checkpoint(ckpt, patience)
    best_state = read_checkpoint(run_dir / "best.pt", ("model",))["model"] if progress.best_epoch > 0 else None
    set_rng_state(ckpt["rng"])
    if is_main:  # records a crash left behind after the checkpoint
        truncate_metrics(run_dir, lambda record: record.get("epoch", 0) <= progress.epoch)
    if is_main:
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
    progress, best_state = Progress.start(tc.patience), copy.deepcopy(model.state_dict())
    if resume and (run_dir / "last.pt").exists():
        progress, resumed_best = _resume(run_dir, model, optimizer, is_main, tc.patience)
        best_state = resumed_best or best_state
    elif is_main and (run_dir / "metrics.jsonl").exists():  # a fresh start: no record of an earlier try
        truncate_metrics(run_dir, lambda record: False)
    step = make_step(model, data, optimizer, tc, device, parallel.gather_default(fc.gather_negatives))
    horizon = fc.lambda_horizon or tc.max_epochs  # quirk 10
    # Epochs and, within each, steps: a bar on a terminal; in a log, a line every 30 s or 10 % with the time
    # left (common.progress), besides the line per epoch. The first steps give the whole run's estimate.
    bar = Report(tc.max_epochs, cfg.method.name, "epoch", initial=progress.epoch, enabled=is_main)
    steps = -(-len(data.train_target) // tc.batch_size)
    whole = lambda per_step: (f"; up to {tc.max_epochs - progress.epoch} epochs of {steps} steps: "  # noqa: E731
                              f"~{duration(per_step * steps * (tc.max_epochs - progress.epoch))} of training, "
                              "plus validation each epoch (early stopping may end sooner)")
    first = progress.epoch + 1
    for epoch in range(first, tc.max_epochs + 1):
        if progress.select.should_stop:
            if is_main:
                tqdm.write(f"early stop: no improvement of valid {tc.select} for {tc.patience} epochs")
            break
        lam = lambda_schedule(epoch, fc.lambda0, fc.lambdaR, horizon)
        report = {"desc": f"{cfg.method.name} epoch {epoch}", "enabled": is_main, "estimate": epoch == first,
                  "also": whole if epoch == first else None}
        stats = train_one_epoch(model, data, step, tc.batch_size, lam, device, progress=report)
        valid = evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, ec.seen_mask, ec.rank,
                         ec.batch_size, device)
        improved = progress.record(epoch, valid[tc.select], stats["train_seconds"])
        if improved:
            best_state = copy.deepcopy(model.state_dict())
        bar.update(1)
        if is_main:  # tqdm.write keeps the line above the bar (plain print when there is no bar)
            left = bar.left(bar.clock()) if epoch < tc.max_epochs else None  # at most: early stopping may end sooner
            tqdm.write(f"epoch {epoch:3d} | loss {stats['loss']:.4f} | {stats['train_seconds']:.1f}s | "
                       f"valid NDCG@20 {valid['NDCG@20']:.2f} HR@20 {valid['HR@20']:.2f}" + (" *" if improved else "")
                       + (f" | ≤ {duration(left)} left" if left else ""))
            log_metrics(run_dir, {"epoch": epoch, "lambda": lam, **{f"train/{k}": v for k, v in stats.items()},
                                  "train/cumulative_seconds": progress.train_time,
                                  **{f"valid/{k}": v for k, v in valid.items()}})
            if improved:
                save_checkpoint(run_dir / "best.pt", {"model": best_state, "epoch": epoch, "best_val": progress.best})
            _save_last(run_dir, model, optimizer, progress)
    bar.close()
    model.load_state_dict(best_state)
    return {"best_valid": progress.best, "best_epoch": progress.best_epoch,
            "time_to_best_s": progress.time_to_best, "train_seconds": progress.train_time}
