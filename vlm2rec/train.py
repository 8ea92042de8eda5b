"""Contrastive SFT with the CF signal (spec §7): user history -> next item, in-batch negatives.

`train_one_epoch` runs one pass over the shuffled training pairs through `accelerate` (one process on a
CPU or one GPU; `accelerate launch` for several, same code path) and logs the collapse diagnostics
every `train.grad_norm_every` steps; `evaluate` scores one split under both protocols and all modality
modes from the embedding cache. No Trainer class.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from common.runs import check_finite

from .diagnostics import branch_grad_norms
from .evaluate import EvalConfig, evaluate_split, state_hash


@dataclass
class TrainConfig:
    epochs: int = 3                      # [S]
    batch_size: int = 32                 # [R] in-batch negatives = batch_size - 1
    lr: float = 1e-4                     # [R]
    weight_decay: float = 0.0            # [R] none on LoRA
    warmup_ratio: float = 0.03           # [R] linear warm-up, then cosine
    schedule: str = "cosine"             # cosine | constant
    grad_clip: float = 1.0
    instances_per_user: int = 0          # 0 = every target i_2..i_{n-2}; 1 = last_per_user (spec §7)
    grad_norm_every: int = 10            # per-branch gradient norms every N steps (spec §11.2)
    log_every: int = 10
    max_steps_per_epoch: int = 0         # 0 = full epoch; > 0 bounds CPU budget runs
    hard_negatives: int = 0              # [R] per pair, mined each epoch from the fused item table (0 = off)
    device: str = "auto"                 # auto | cpu | cuda
    mixed_precision: str = "no"          # accelerate's flag; the real backbones already load in bf16


def batches(train: dict, batch_size: int, seed: int, epoch: int, device: torch.device,
            shard: tuple[int, int] = (0, 1)) -> Iterator[dict]:
    """Shuffled training pairs; a scoped generator per (seed, epoch) so order never depends on history.
    `shard` = (process index, process count): each process takes every count-th pair (its own in-batch
    negatives; no cross-device gather, spec §7)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(train["target"]))[shard[0]::shard[1]]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2:                 # one pair has no in-batch negative
            continue
        batch = {"history": torch.as_tensor(train["history"][idx], device=device),
                 "target": torch.as_tensor(train["target"][idx], device=device)}
        if "negatives" in train:
            batch["negatives"] = torch.as_tensor(train["negatives"][idx], device=device)
        yield batch


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
                    epoch: int, step: int, log: Callable[[dict], None]) -> tuple[int, dict[str, float]]:
    """One epoch; returns the global step and the epoch means of the logged statistics."""
    model.train()
    sums: dict[str, float] = {}
    count = 0
    shard = (accelerator.process_index, accelerator.num_processes)
    for i, batch in enumerate(batches(train, cfg.batch_size, seed, epoch, accelerator.device, shard)):
        if cfg.max_steps_per_epoch and i >= cfg.max_steps_per_epoch:
            break
        want_grads = cfg.grad_norm_every > 0 and step % cfg.grad_norm_every == 0
        loss, stats, named = model(batch)
        check_finite(loss, f"epoch {epoch} step {step}")
        if want_grads:
            for tensor in named.values():
                if tensor.requires_grad:
                    tensor.retain_grad()      # read dL/d(branch) after the one backward (spec §11.2)
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


def evaluate(model, split_data: dict, negs: np.ndarray, num_items: int, cfg: EvalConfig, run_dir: Path | None,
             tag: str) -> dict:
    """Both protocols x modality modes on one split; embeddings cached per (backbone, weights, data)."""
    cache_dir = None
    if run_dir is not None:
        # Keyed by backbone + trained weights + item content (+ the split's queries): reused when equal.
        parts = (model.embedder.identifier, state_hash(model), model.embedder.catalog.fingerprint(),
                 hashlib.sha1(np.ascontiguousarray(split_data["history"]).tobytes()).hexdigest())
        key = f"{tag}_{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:16]}"
        cache_dir = Path(run_dir) / "embeddings" / key
    return evaluate_split(model, split_data, negs, num_items, cfg, cache_dir, tag)
