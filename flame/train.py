"""Training loop, evaluation and early stopping shared by SASRec, FLAME and the baselines (spec §7.5, §9).

    stats = train_one_epoch(model, data, optimizer, batch_size=256, lam=0.944, device=dev)
    metrics = evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, seen_mask="reference")
    summary = fit(model, data, optimizer, cfg, run_dir)   # early stopping, best.pt / last.pt, resume
"""
from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from common.metrics import rank_metrics
from common.runs import check_finite, load_checkpoint, log_metrics, read_metrics, rng_state, \
    save_checkpoint, set_rng_state

REPORT = ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")  # §9, x100


def synchronize(device: torch.device) -> None:
    """Device-synchronised wall-clock (§7.5): wait for queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool, cache: bool = True):
    if not bf16:
        return contextlib.nullcontext()
    # cache=False under CUDA-graph capture: autocast's cast cache must not outlive the captured region
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


def compiled_loss(model: torch.nn.Module, tc: Any) -> Optional[Callable[[dict], dict]]:
    """model.loss_terms under torch.compile when train.compile is on (None: eager).
    compile_mode=reduce-overhead adds CUDA graphs on a GPU (launch-bound small models)."""
    if not tc.compile:
        return None
    return torch.compile(model.loss_terms, mode=None if tc.compile_mode == "default" else tc.compile_mode)


class GraphStep:
    """The whole training step of one full batch (gather, forward, backward, Adam, loss statistics)
    captured once as a CUDA graph and replayed: one launch per step instead of ~700 (spec §10: at
    d = 64 the eager step is bound by kernel launches). train.cuda_graph=true.

    Inputs live in static buffers (the batch's sample indices, λ as a device scalar); the running
    sums of the loss terms are accumulated inside the graph. The first `warmup` calls are real
    training steps run eagerly on a side stream (cuBLAS handles, Adam's state), the next one is
    captured and replayed, so no step is spent outside the data. Requirements, checked by
    check_graph_options: a CUDA device, Adam with capturable=True, every path each step
    (flame.num_paths=0), no torch.compile, a single process. Dropout draws from the graph-safe
    Philox stream, so the random stream differs from eager mode (as with train.compile).

    capture=False runs the identical static-buffer step eagerly: what the CPU tests exercise.
    """

    def __init__(self, model: torch.nn.Module, data: Any, optimizer: torch.optim.Optimizer, batch_size: int,
                 device: torch.device, bf16: bool = False, capture: bool = True, warmup: int = 3):
        self.model, self.data, self.optimizer, self.device, self.bf16 = model, data, optimizer, device, bf16
        if capture and warmup < 1:
            raise ValueError("GraphStep needs at least one eager warm-up step before the capture")
        self.capture, self.warmup = capture, warmup
        self.index = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.lam = torch.zeros((), dtype=torch.float32, device=device)
        self.keys: Optional[tuple] = None
        self.sums: Optional[torch.Tensor] = None
        self.graph = None
        self.stream = None
        self.calls = 0  # since construction: warm-up, then capture
        self.steps = 0  # since reset(): the steps behind self.sums

    def _step(self) -> None:
        batch = {"seq": self.data.train_seq[self.index], "target": self.data.train_target[self.index],
                 "lam": self.lam}
        with _autocast(self.device, self.bf16, cache=not self.capture):
            terms = self.model.loss_terms(batch)
        terms["loss"].backward()
        self.optimizer.step()
        keys, values = _stacked_terms(terms)
        if self.keys is None:
            self.keys, self.sums = keys, torch.zeros_like(values)
        elif keys != self.keys:
            raise RuntimeError("the loss terms changed between steps: CUDA graphs need a fixed set of paths")
        self.sums += values

    def reset(self) -> None:
        """Start an epoch's statistics (outside the graph, so replays keep adding to the same buffer)."""
        self.steps = 0
        if self.sums is not None:
            self.sums.zero_()

    def __call__(self, index: torch.Tensor, lam: float) -> None:
        self.index.copy_(index)
        self.lam.fill_(lam)
        self.calls += 1
        self.steps += 1
        if not self.capture:
            self.optimizer.zero_grad(set_to_none=True)
            self._step()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls <= self.warmup:  # on the capture's stream: per-stream library handles exist before it
            self.stream = self.stream or torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        else:  # capture records without running: replay once for this batch
            self.optimizer.zero_grad(set_to_none=True)  # the backward allocates .grad in the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, stream=self.stream):
                    self._step()
            except RuntimeError as err:  # an op of this torch/GPU pair that cannot be captured
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise RuntimeError(f"train.cuda_graph: capturing the training step failed ({first}); "
                                   f"run with train.cuda_graph=false") from err
            self.graph.replay()

    def zero_grad(self) -> None:
        """Before an eager step between replays (the last partial batch): zero the static .grad
        buffers in place instead of dropping them, so the captured Adam step keeps reading them."""
        self.optimizer.zero_grad(set_to_none=self.graph is None)

    def accumulated(self) -> dict[tuple, list]:
        """This epoch's statistics in train_one_epoch's form: {key tuple: [summed values, steps]}."""
        return {self.keys: [self.sums, self.steps]} if self.keys is not None and self.steps else {}


def _stacked_terms(terms: dict[str, torch.Tensor]) -> tuple[tuple, torch.Tensor]:
    """The loss terms as (names, one stacked detached tensor): one running sum, not one per key."""
    keys = tuple(terms)  # the α keys vary when flame.num_paths samples paths
    return keys, torch.stack([terms[k].detach().float() for k in keys])  # detached (quirk 11)


def make_optimizer(model: torch.nn.Module, tc: Any) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (§7.5: betas (0.9, 0.999), eps 1e-8, nothing else);
    capturable under train.cuda_graph, which keeps the step count on the GPU (same arithmetic)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(trainable, lr=tc.lr, betas=(0.9, 0.999), eps=1e-8, capturable=tc.cuda_graph)


def check_graph_options(tc: Any, flame_cfg: Any, device: torch.device) -> None:
    """One-line errors for train.cuda_graph=true in a setting a captured step cannot serve."""
    if not tc.cuda_graph:
        return
    if device.type != "cuda":
        raise ValueError(f"train.cuda_graph=true needs a CUDA device, this run uses {device.type}")
    if tc.compile:
        raise ValueError("train.cuda_graph=true and train.compile=true exclude each other "
                         "(compile_mode=reduce-overhead is the compiled way to CUDA graphs)")
    if flame_cfg is not None and flame_cfg.num_paths:
        raise ValueError("train.cuda_graph=true needs flame.num_paths=0: a graph cannot sample paths per step")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("train.cuda_graph=true runs in a single process, not under accelerate launch")


def _average_gradients(params: list[torch.Tensor]) -> None:
    """Data parallelism under `accelerate launch`: every rank holds a shard of the batch."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def train_one_epoch(model: torch.nn.Module, data: Any, optimizer: torch.optim.Optimizer, batch_size: int,
                    lam: float, device: torch.device, bf16: bool = False,
                    loss_fn: Optional[Callable[[dict], dict]] = None, max_steps: Optional[int] = None,
                    graph: Optional[GraphStep] = None) -> dict:
    """One pass over the shuffled samples, last partial batch kept (§3.4). Returns mean loss terms.

    The training tensors are expected on `device` already; only index slices are taken here.
    `graph`: full batches go through this captured step; the last partial batch stays eager.
    """
    model.train()  # the whole model, frozen net included (§7.5, quirk 4)
    loss_fn = loss_fn or model.loss_terms
    params = [p for p in model.parameters() if p.requires_grad]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    perm = torch.randperm(len(data.train_target)).to(device)  # global RNG: restored on resume
    sums: dict[tuple, list] = {}  # key tuple -> [stacked running sum, steps]: 2 launches a step, not one per key
    steps = 0
    if graph is not None:
        graph.reset()
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(perm), batch_size):
        index = perm[first: first + batch_size]
        if graph is not None and len(index) == batch_size:
            graph(index, lam)  # its statistics accumulate inside the graph
        else:
            if distributed:
                index = index[dist.get_rank():: dist.get_world_size()]
            batch = {"seq": data.train_seq[index], "target": data.train_target[index], "lam": lam}
            if graph is not None:
                graph.zero_grad()
            else:
                optimizer.zero_grad(set_to_none=True)
            if len(index) == 0:  # last batch smaller than the world size: this rank adds zero gradients
                for p in params:
                    p.grad = torch.zeros_like(p)
                _average_gradients(params)
                optimizer.step()
                continue
            with _autocast(device, bf16):
                terms = loss_fn(batch)
            terms["loss"].backward()
            if distributed:
                _average_gradients(params)
            optimizer.step()
            keys, values = _stacked_terms(terms)
            if keys in sums:
                sums[keys][0] += values
                sums[keys][1] += 1
            else:
                sums[keys] = [values, 1]
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for keys, (values, n) in [*(graph.accumulated() if graph is not None else {}).items(), *sums.items()]:
        for key, value in zip(keys, values.tolist()):
            totals[key] = totals.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + n
    stats = {key: total / counts[key] for key, total in totals.items()}
    check_finite(stats["loss"], f"the epoch's mean training loss ({steps} steps)")
    return {**stats, "train_seconds": seconds, "steps": steps,
            "samples": min(len(perm), steps * batch_size)}


def seen_adjust(scores: torch.Tensor, hist: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply eval.seen_mask to item logits (B, I) given 0-padded histories (B, H) (§9, quirks 7-8).

    reference: items seen exactly once get logit 0 (duplicates add up in the reference's count
    matrix, then `== 1` is tested, so items seen twice keep their raw logit); zero: every seen item
    gets 0; neg_inf: every seen item gets -inf (the clean protocol); none: no change.
    """
    if mode == "none":
        return scores
    counts = torch.zeros(scores.shape[0], scores.shape[1] + 1, device=scores.device)
    counts.scatter_add_(1, hist, torch.ones_like(hist, dtype=counts.dtype))
    counts = counts[:, 1:]  # column c = item c+1; the padding id 0 drops out
    if mode == "reference":
        return scores.masked_fill(counts == 1, 0.0)
    if mode == "zero":
        return scores.masked_fill(counts > 0, 0.0)
    if mode == "neg_inf":
        return scores.masked_fill(counts > 0, float("-inf"))
    raise ValueError(f"eval.seen_mask={mode!r}: expected reference, zero, neg_inf or none")


def target_ranks(scores: torch.Tensor, target: torch.Tensor, rank: str) -> torch.Tensor:
    """0-based rank of column target-1 (§9). strict: the number of strictly greater logits.
    argsort: the target's position in a descending unstable sort, as the reference's double argsort;
    it differs from strict only where the target's logit is tied, so only those rows are sorted."""
    column = (target - 1).unsqueeze(1)
    chosen = scores.gather(1, column)  # (B, 1)
    greater = (scores > chosen).sum(1)
    if rank == "strict":
        return greater
    if rank != "argsort":
        raise ValueError(f"eval.rank={rank!r}: expected argsort or strict")
    tied = ((scores == chosen).sum(1) > 1).nonzero().flatten()
    if len(tied):
        order = torch.argsort(scores[tied], dim=1, descending=True)
        greater[tied] = (order == column[tied]).int().argmax(1)
    return greater


@torch.no_grad()
def evaluate(model: torch.nn.Module, seq: torch.Tensor, target: torch.Tensor, hist: torch.Tensor,
             seen_mask: str = "reference", rank: str = "argsort", batch_size: int = 256,
             device: Optional[torch.device] = None) -> dict[str, float]:
    """Full-ranking leave-one-out metrics x100 (§9) over all users, in batches."""
    model.eval()
    device = device or seq.device
    seq, target, hist = seq.to(device), target.to(device), hist.to(device)  # one copy, not one per batch
    ranks = []
    for first in range(0, len(target), batch_size):
        part = slice(first, first + batch_size)
        scores = model.score_all({"seq": seq[part]})[:, 1:].float()  # (B, I): drop padding
        scores = seen_adjust(scores, hist[part], seen_mask)
        ranks.append(target_ranks(scores, target[part], rank))
    per_user = rank_metrics(torch.cat(ranks).cpu(), ks=(1, 5, 10, 20))
    return {key: 100.0 * float(per_user[key].mean()) for key in REPORT}


def fit(model: torch.nn.Module, data: Any, optimizer: torch.optim.Optimizer, cfg: Any, run_dir: Path,
        device: torch.device, lam_fn: Callable[[int], float], resume: bool = False,
        is_main: bool = True) -> dict:
    """Early-stopped training (§7.5): strict improvement of validation cfg.train.select, patience,
    best state restored at the end. best.pt on improvement, last.pt every epoch (resumable)."""
    tc, ec = cfg.train, cfg.eval
    loss_fn = compiled_loss(model, tc)
    graph: Optional[GraphStep] = None
    best, best_epoch, start_epoch, train_time, time_to_best = 0.0, 0, 1, 0.0, 0.0
    best_state = copy.deepcopy(model.state_dict())
    if resume and (run_dir / "last.pt").exists():
        ckpt = load_checkpoint(run_dir / "last.pt")
        model.load_state_dict(ckpt["model"])
        for group, saved in zip(optimizer.param_groups, ckpt["optimizer"]["param_groups"]):
            saved["capturable"] = group.get("capturable", False)  # this run's choice, not the saved one
        optimizer.load_state_dict(ckpt["optimizer"])
        best, best_epoch, train_time = ckpt["best_val"], ckpt["best_epoch"], ckpt["train_time"]
        time_to_best, start_epoch = ckpt["time_to_best"], ckpt["epoch"] + 1
        if best_epoch > 0:
            best_state = load_checkpoint(run_dir / "best.pt")["model"]
        set_rng_state(ckpt["rng"])
        if is_main:  # drop records a crash left behind after the checkpoint
            kept = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= ckpt["epoch"]]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        print(f"resumed from {run_dir / 'last.pt'} after epoch {ckpt['epoch']}")
    for epoch in range(start_epoch, tc.max_epochs + 1):
        if epoch > best_epoch + tc.patience:
            print(f"early stop: no improvement of valid {tc.select} for {tc.patience} epochs")
            break
        lam = lam_fn(epoch)
        if tc.cuda_graph and graph is None:  # built after a resume has loaded the states it captures
            graph = GraphStep(model, data, optimizer, tc.batch_size, device, tc.bf16)
        stats = train_one_epoch(model, data, optimizer, tc.batch_size, lam, device, tc.bf16, loss_fn,
                                graph=graph)
        train_time += stats["train_seconds"]
        valid = evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, ec.seen_mask, ec.rank,
                         ec.batch_size, device)
        improved = valid[tc.select] > best  # strict improvement (§7.5)
        if improved:
            best, best_epoch, time_to_best = valid[tc.select], epoch, train_time
            best_state = copy.deepcopy(model.state_dict())
        record = {"epoch": epoch, "lambda": lam, **{f"train/{k}": v for k, v in stats.items()},
                  "train/cumulative_seconds": train_time, **{f"valid/{k}": v for k, v in valid.items()}}
        print(f"epoch {epoch:3d} | loss {stats['loss']:.4f} | {stats['train_seconds']:.1f}s | "
              f"valid NDCG@20 {valid['NDCG@20']:.2f} HR@20 {valid['HR@20']:.2f}" + (" *" if improved else ""))
        if is_main:
            log_metrics(run_dir, record)
            if improved:
                save_checkpoint(run_dir / "best.pt", {"model": best_state, "epoch": epoch, "best_val": best})
            save_checkpoint(run_dir / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best_val": best, "best_epoch": best_epoch, "train_time": train_time,
                "time_to_best": time_to_best, "rng": rng_state()})
    model.load_state_dict(best_state)
    return {"best_valid": best, "best_epoch": best_epoch, "time_to_best_s": time_to_best,
            "train_seconds": train_time}
