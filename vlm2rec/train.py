"""Contrastive SFT with the CF signal (§7): history -> next item, in-batch negatives.

`fit` runs the epochs through `accelerate` (one process on a CPU or one GPU; `accelerate launch` for
several, same code path): it builds the optimiser and schedule, resumes from last.pt, validates every
epoch, keeps the best epoch by `eval.select_on` and writes best.pt / last.pt, and ends at the best
weights. `train_one_epoch` is one pass over the shuffled pairs, logging the collapse diagnostics every
`train.grad_norm_every` steps (§11.2). No Trainer class. With `train.num_workers` > 0 (a VLM whose
processor runs every step: no visual cache), `PreparedLoader`'s DataLoader workers build each batch's
prompts, tokens and pixels on the CPU, in the order of `batches`.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from common.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from common.config import config_to_dict
from common.io import atomic_write
from common.progress import duration
from common.runs import check_finite, log_metrics, truncate_metrics
from common.selection import Selection

from .config import Config, TrainConfig

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
from .console import bar, say
from .diagnostics import branch_grad_norms
from .evaluate import evaluate, flat, selection_score


def batches(train: dict, batch_size: int, seed: int, epoch: int, device: torch.device,
            shard: tuple[int, int] = (0, 1)) -> Iterator[dict]:
    """Shuffled training pairs; a scoped generator per (seed, epoch) so order never depends on history.
    `shard` = (process index, process count): the global batch is batch_size x count consecutive pairs
    of the permutation and each process takes every count-th of them (model.py gathers them back, §7),
    so every rank sees the same number of batches. A global batch with fewer than max(2, count) pairs
    is skipped (one pair has no in-batch negative; every rank needs a row)."""
    for idx in batch_indices(len(train["target"]), batch_size, seed, epoch, shard):
        batch = {"history": torch.as_tensor(train["history"][idx], device=device),
                 "target": torch.as_tensor(train["target"][idx], device=device)}
        if "negatives" in train:
            batch["negatives"] = torch.as_tensor(train["negatives"][idx], device=device)
        yield batch


def steps_per_epoch(num_pairs: int, batch_size: int, processes: int = 1, cap: int = 0) -> int:
    """How many batches batch_indices gives (a last chunk under max(2, processes) pairs is dropped), at most
    `cap` (train.max_steps_per_epoch) when it is set."""
    chunk, least = batch_size * processes, max(2, processes)
    steps = (num_pairs // chunk if chunk >= least else 0) + (1 if num_pairs % chunk >= least else 0)
    return min(steps, cap) if cap else steps


def batch_indices(num_pairs: int, batch_size: int, seed: int, epoch: int,
                  shard: tuple[int, int] = (0, 1)) -> Iterator[np.ndarray]:
    """The pair indices of each batch of `batches` (this process's share), in order."""
    rank, count = shard
    order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
    for start in range(0, len(order), batch_size * count):
        chunk = order[start:start + batch_size * count]
        if len(chunk) < max(2, count):
            continue
        yield chunk[rank::count]


class _EpochPairs:
    """The DataLoader's sampler: it runs in the main process and hands each worker one batch's pair arrays
    (history, target[, negatives]) of the epoch set by `PreparedLoader.epoch`, so persistent workers see
    every epoch's order and freshly mined negatives."""

    def __init__(self, batch_size: int, max_steps: int):
        self.batch_size, self.max_steps = batch_size, max_steps
        self.plan: tuple | None = None

    def __iter__(self) -> Iterator[dict]:
        train, seed, epoch, shard = self.plan
        keys = [k for k in ("history", "target", "negatives") if k in train]
        for i, idx in enumerate(batch_indices(len(train["target"]), self.batch_size, seed, epoch, shard)):
            if self.max_steps and i >= self.max_steps:
                return
            yield {k: train[k][idx] for k in keys}


class _Given(torch.utils.data.Dataset):
    """The 'dataset' of a PreparedLoader: the sampler's item is the batch itself."""

    def __getitem__(self, pairs: dict) -> dict:
        return pairs


class PrepareBatch:
    """Collate function of a PreparedLoader (runs in a worker): a batch's pair tensors plus, under
    "prepared", the CPU inputs of each embedder pass the model's forward makes (`VLM2Rec.passes`). It holds
    a Preparer (tokenizer, processor, catalogue, prompts) and never the model's weights."""

    def __init__(self, preparer, passes: list[tuple[str, str]], negative_passes: list[tuple[str, str]]):
        self.preparer, self.passes, self.negative_passes = preparer, passes, negative_passes

    def __call__(self, pairs: dict) -> dict:
        batch = {k: torch.as_tensor(v) for k, v in pairs.items()}
        prepared = {}
        for source, what in self.negative_passes if "negatives" in batch else self.passes:
            ids = batch[source].reshape(-1) if source == "negatives" else batch[source]
            prepared[f"{source}:{what}"] = self.preparer.prepare(what, ids)
        batch["prepared"] = prepared
        return batch


class PreparedLoader:
    """`batches` through a DataLoader whose `num_workers` persistent workers prepare each batch's embedder
    inputs (PrepareBatch). The same batches in the same order: the sampler walks `batch_indices`, and the
    DataLoader returns them in order. It draws nothing from torch's global generator (its own seeds the
    workers), so the model's dropout sees the same random numbers as without workers."""

    def __init__(self, core, cfg: TrainConfig, device: torch.device):
        import copy
        # A copy: evaluation swapping the embedder's catalogue (robustness scenarios) never reaches it.
        preparer = copy.copy(core.embedder.cpu_preparer())
        self.device = device
        self.sampler = _EpochPairs(cfg.batch_size, cfg.max_steps_per_epoch)
        self.loader = torch.utils.data.DataLoader(
            _Given(), batch_size=None, sampler=self.sampler,
            collate_fn=PrepareBatch(preparer, core.passes(False), core.passes(True)), num_workers=cfg.num_workers,
            persistent_workers=True, prefetch_factor=2, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed))

    def epoch(self, train: dict, seed: int, epoch: int, shard: tuple[int, int] = (0, 1)) -> Iterator[dict]:
        """The batches of `batches(train, ..., seed, epoch, device, shard)` with their prepared inputs
        (left on the CPU: the embedder moves them); at most train.max_steps_per_epoch of them."""
        self.sampler.plan = (train, seed, epoch, shard)
        for batch in self.loader:
            yield {k: v if k == "prepared" else v.to(self.device) for k, v in batch.items()}

    def close(self) -> None:
        """Stop the workers (dropping the last reference to the DataLoader's iterator shuts them down)."""
        self.loader = None


def prepared_loader(core, cfg: TrainConfig, device: torch.device) -> tuple[PreparedLoader | None, str]:
    """A PreparedLoader when train.num_workers > 0 and the embedder has CPU work a worker can do, else None
    and why num_workers is ignored ("" when it is 0): the two-tower stand-in prepares nothing (cached
    features), and with the visual cache on the preparation is the tokenizer and a lookup that needs the
    cache the model fills (4-5 % of a step, README)."""
    if cfg.num_workers == 0:
        return None, ""
    preparer = getattr(core.embedder, "cpu_preparer", lambda: None)()
    if preparer is None:
        why = ("the visual cache is on (the tower is frozen)" if getattr(core.embedder, "visual_cache", None)
               is not None else f"the {type(core.embedder).__name__} embedder has no CPU preparation")
        return None, f"train.num_workers={cfg.num_workers} ignored: {why}"
    return PreparedLoader(core, cfg, device), ""


@torch.no_grad()
def mine_hard_negatives(table: torch.Tensor, train: dict, k: int, chunk: int = 2048) -> np.ndarray:
    """[N, k] items most similar to each pair's target in the fused item table [I+1, d], never the
    target, the padding row or an item of the pair's history (they would be false negatives)."""
    out = []
    for start in range(0, len(train["target"]), chunk):
        target = torch.as_tensor(train["target"][start:start + chunk])
        history = torch.as_tensor(train["history"][start:start + chunk])
        sims = table[target] @ table.T                                     # (n, I+1)
        sims[:, 0] = float("-inf")
        sims.scatter_(1, target.view(-1, 1), float("-inf"))
        sims.scatter_(1, history, float("-inf"))                           # history padding hits column 0
        out.append(sims.topk(k, dim=1).indices.numpy())
    return np.concatenate(out)


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    warmup = max(1, int(round(warmup_ratio * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_one_epoch(model, optimizer, scheduler, accelerator, train: dict, cfg: TrainConfig, seed: int,
                    epoch: int, step: int, log: Callable[[dict], None],
                    loader: PreparedLoader | None = None, also=None) -> tuple[int, dict[str, float]]:
    """One epoch; returns the global step and the epoch means of the logged statistics. With `loader`
    the batches (the same ones) come with their inputs prepared by its workers. Its steps report progress
    (console.bar); `also(seconds per step)` adds to the first estimate line (the whole run's estimate)."""
    model.train()
    sums: dict[str, float] = {}
    count = 0
    shard = (accelerator.process_index, accelerator.num_processes)
    pairs = (batches(train, cfg.batch_size, seed, epoch, accelerator.device, shard) if loader is None
             else loader.epoch(train, seed, epoch, shard))
    steps = steps_per_epoch(len(train["target"]), cfg.batch_size, shard[1], cfg.max_steps_per_epoch)
    pairs = bar(pairs, f"epoch {epoch}", total=steps, unit="step", enabled=accelerator.is_main_process,
                also=also, estimate=also is not None)
    for i, batch in enumerate(pairs):
        if cfg.max_steps_per_epoch and i >= cfg.max_steps_per_epoch:
            break
        want_grads = cfg.grad_norm_every > 0 and step % cfg.grad_norm_every == 0
        loss, stats, named = model(batch)
        check_finite(loss, f"epoch {epoch} step {step}")
        if want_grads:
            for tensor in named.values():
                if tensor.requires_grad:
                    tensor.retain_grad()      # read dL/d(branch) after the one backward (§11.2)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if want_grads:
            stats.update(branch_grad_norms(named))
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
        if want_grads or step % cfg.log_every == 0:
            log({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **stats})
        step += 1
    return step, {key: value / max(1, count) for key, value in sums.items() if not key.startswith("grad_")}


def make_accelerator(cfg: TrainConfig, device: torch.device):
    """One process per device; unused heads (e.g. the internal-fusion projection under external fusion)
    must not stall DDP, hence find_unused_parameters."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    # A collective waits at most COLLECTIVE_TIMEOUT for a peer, so a rank that died fails the others.
    return Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                                        InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])


def make_optimiser(model, num_pairs: int, cfg: TrainConfig, processes: int):
    """AdamW over the trainable weights and the warm-up + cosine/constant schedule over all epochs."""
    params = [p for p in model.parameters() if p.requires_grad]
    # A tuned two-tower's encoder weights may take their own rate (backbone.two_tower.tower_lr, §15.1).
    tower = {id(p) for p in getattr(model.embedder, "tower_parameters", list)()}
    groups = [{"params": [p for p in params if id(p) not in tower]}]
    if tower:
        groups.append({"params": [p for p in params if id(p) in tower], "lr": model.embedder.cfg.tower_lr or cfg.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, num_pairs // (cfg.batch_size * processes))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps_per_epoch * cfg.max_epochs, cfg.warmup_ratio, cfg.schedule))
    return optimizer, scheduler


@dataclass
class Progress:
    """Where training stands: the next epoch, the global step and the best validation epoch so far (the best
    of all train.max_epochs epochs: no early stopping for the VLM)."""
    epoch: int = 0
    step: int = 0
    select: Selection = field(default_factory=Selection)
    best_state: dict | None = None
    zero_shot_valid: dict | None = None   # the untrained embedder's validation results (kept for results.json)


def resume_progress(core, optimizer, scheduler, folder: Path, writes: bool) -> Progress:
    """Restore weights, optimiser, schedule and RNG from folder/last.pt (and the best weights), and cut
    metrics.jsonl back to what that checkpoint had logged: the records of the epoch a kill interrupted
    (a half-written last line included) are dropped, so a resumed run leaves the records of one that
    never stopped."""
    ckpt = load_checkpoint(Path(folder) / "last.pt")
    core.load_trainable_state(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    best = load_checkpoint(Path(folder) / "best.pt")["model"] if ckpt["best_epoch"] >= 0 else None
    if writes:
        # the zero-shot line is epoch -1; a line a kill cut short is dropped
        truncate_metrics(Path(folder), lambda record: record.get("epoch", -1) <= ckpt["epoch"])
    print(f"resumed from {Path(folder) / 'last.pt'} after epoch {ckpt['epoch']}")
    return Progress(ckpt["epoch"] + 1, ckpt["step"], Selection(best=ckpt["best_val"], best_at=ckpt["best_epoch"]),
                    best, ckpt.get("zero_shot_valid"))


def save_epoch(core, optimizer, scheduler, cfg: Config, progress: Progress, epoch: int, score: float,
               run_dir: Path | None) -> None:
    """Update the best epoch (strictly better validation score wins) and write best.pt / last.pt."""
    improved = progress.select.update(score, epoch)
    state = {"model": core.trainable_state(), "config": config_to_dict(cfg), "epoch": epoch,
             "step": progress.step, "backbone": core.embedder.identifier,
             "best_val": progress.select.best, "best_epoch": progress.select.best_at}
    if progress.zero_shot_valid is not None:
        state["zero_shot_valid"] = progress.zero_shot_valid
    if improved:
        progress.best_state = state["model"]
        if run_dir is not None:
            save_checkpoint(run_dir / "best.pt", state)
    if run_dir is not None:
        save_checkpoint(run_dir / "last.pt", {**state, "optimizer": optimizer.state_dict(),
                                               "scheduler": scheduler.state_dict(), "rng": rng_state()})


def fit(model, accelerator, split: dict, negs: dict, num_items: int, cfg: Config, run_dir: Path | None,
        resume_from: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """Train for train.max_epochs, validating each epoch; returns the unwrapped model at its best
    validation weights and {best_epoch, best_valid[, zero_shot_valid]}. Only a process with a
    run_dir writes (logs, checkpoints, caches)."""
    optimizer, scheduler = make_optimiser(model, len(split["train"]["target"]), cfg.train,
                                          accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    progress = (Progress() if resume_from is None
                else resume_progress(core, optimizer, scheduler, resume_from, run_dir is not None))
    if cfg.zero_shot and progress.epoch == 0:
        progress.zero_shot_valid = evaluate(core, split["valid"], negs["valid"], num_items, cfg.eval, run_dir, "valid")
        if run_dir is not None:
            log_metrics(run_dir, {"step": 0, "epoch": -1, **flat(progress.zero_shot_valid, "valid")})

    def log(record: dict) -> None:
        if run_dir is None:
            return
        log_metrics(run_dir, record)
        if record.get("step", 0) % (cfg.train.log_every * 5) == 0:
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    loader, ignored = prepared_loader(core, cfg.train, accelerator.device)
    if ignored and run_dir is not None:
        say(ignored)
    try:                                      # the workers stop however the epochs end (an error, Ctrl-C)
        epochs = cfg.train.max_epochs - progress.epoch
        steps = steps_per_epoch(len(split["train"]["target"]), cfg.train.batch_size, accelerator.num_processes,
                                cfg.train.max_steps_per_epoch)
        whole = lambda per_step: (f"; {epochs} epochs of {steps} steps: ~{duration(per_step * steps * epochs)} "  # noqa: E731
                                  "of training, plus validation each epoch and the test")
        for epoch in bar(range(progress.epoch, cfg.train.max_epochs), "epochs", leave=True, unit="epoch",
                         enabled=accelerator.is_main_process):
            if cfg.train.hard_negatives > 0:   # re-mined every epoch from the current fused item table
                table = core.item_table(num_items, "both", cfg.eval.batch_size).cpu()
                split["train"]["negatives"] = mine_hard_negatives(table, split["train"], cfg.train.hard_negatives)
            progress.step, means = train_one_epoch(model, optimizer, scheduler, accelerator, split["train"], cfg.train,
                                                   cfg.train.seed, epoch, progress.step, log, loader,
                                                   also=whole if epoch == cfg.train.max_epochs - epochs else None)
            valid = evaluate(core, split["valid"], negs["valid"], num_items, cfg.eval, run_dir, "valid")
            score = selection_score(valid, cfg.eval.select_on)
            log({"step": progress.step, "epoch": epoch, "select": score, **{f"train_{k}": v for k, v in means.items()},
                 **flat(valid, "valid")})
            say(f"epoch {epoch}: loss {means.get('loss', float('nan')):.4f} valid {cfg.eval.select_on} {score:.4f}")
            save_epoch(core, optimizer, scheduler, cfg, progress, epoch, score, run_dir)
    finally:
        if loader is not None:
            loader.close()
    if progress.best_state is not None:       # test once, at the best validation epoch (§13)
        core.load_trainable_state(progress.best_state)
    summary = {} if progress.zero_shot_valid is None else {"zero_shot_valid": progress.zero_shot_valid}
    return core, {**summary, "best_epoch": progress.select.best_at, "best_valid": progress.select.best}
