"""Runs of one method trained as one stacked network (§10.2), for flame.table: a run's slot (config, run folder,
early-stopping state, own random generator), its opening as flame.main would open it (open_slot), the stack's
epoch (every run trained in one stacked step with one Adam, validated in the same batches, logged and
checkpointed in its own folder in the plain layout; a run that stops leaves the stack), and its finish (the best
state tested once, results.json). The stacked networks themselves are in flame/stack.py; which runs to stack,
and the tables, in flame/table.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from common.checkpoints import rng_state, save_checkpoint
from common.config import config_to_dict
from common.metrics import rank_metrics
from common.runs import check_finite, log_metrics, start_run, truncate_metrics, write_results
from common.utils import seed_everything

from .checks import LAST_KEYS, read_checkpoint
from .config import Config
from .ensemble import build_model
from .evaluate import (REPORT, convergence, final_metrics, print_table, results_metrics, seen_adjust,
                       leave_one_out_ranks)
from .fast import GraphStep, stacked_terms
from .model import lambda_schedule, sasrec_state
from .stack import StackedFLAME, StackedSASRec
from .train import Progress, synchronize


@dataclass
class Slot:
    """One run of the table: its config, folder, early-stopping state and own random generator."""
    cfg: Config
    run_dir: Path
    frozen: Optional[Path] = None
    stage1: Optional[Path] = None
    progress: Optional[Progress] = None   # Progress.start(cfg.train.patience) unless given
    best_state: Optional[dict] = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    optimizer_state: Optional[dict] = None  # the plain-layout Adam state of a resumed run
    failed: Optional[str] = None

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = Progress.start(self.cfg.train.patience)

    @property
    def method(self) -> str:
        return self.cfg.method.name

    def finished_training(self) -> bool:
        return self.failed is not None or self.progress.epoch + 1 > self.cfg.train.max_epochs or \
            self.progress.select.should_stop


# ------------------------------------------------------------------------------------ one run's start


def open_slot(slot: Slot, data: Any, resume: bool, device: torch.device) -> torch.nn.Module:
    """Build run `slot`'s plain network exactly as flame.main does (seed, then the model), open its run
    folder through common.runs, and resume it from last.pt when asked. Its generator starts from the
    global RNG state a plain run has after building its model, so data order and dropout keys follow
    the plain run's stream; a resumed run continues last.pt's RNG state."""
    cfg = slot.cfg
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg, data.num_items, slot.frozen).to(device)
    slot.generator.set_state(torch.get_rng_state())
    resume = resume and (slot.run_dir / "last.pt").exists()
    start_run(cfg, "flame", cfg.data.name, f"{slot.method}_seed{cfg.train.seed}", slot.run_dir, root=cfg.run_root,
              resume=resume)
    if resume:
        ckpt = read_checkpoint(slot.run_dir / "last.pt", LAST_KEYS)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"{slot.run_dir / 'last.pt'} does not fit this run's network ({first[:160]})") from None
        slot.progress = Progress.from_checkpoint(ckpt, cfg.train.patience)
        slot.optimizer_state = ckpt["optimizer"]
        slot.generator.set_state(ckpt["rng"]["torch"])
        if slot.progress.best_epoch > 0:
            slot.best_state = read_checkpoint(slot.run_dir / "best.pt", ("model",))["model"]
        truncate_metrics(slot.run_dir, lambda record: record.get("epoch", 0) <= slot.progress.epoch)
        print(f"resumed {slot.run_dir} after epoch {slot.progress.epoch}")
    if slot.best_state is None:
        slot.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model


# ------------------------------------------------------------------------------------ a stack of runs


class Stack:
    """Runs of one method and one Adam step count trained as one stacked network with one Adam."""

    def __init__(self, slots: list[Slot], models: list[torch.nn.Module], data: Any, device: torch.device):
        self.slots, self.data, self.device = slots, data, device
        tc = slots[0].cfg.train
        self.tc, self.ec = tc, slots[0].cfg.eval
        if slots[0].method == "sasrec":
            self.net: torch.nn.Module = StackedSASRec.from_nets(models).to(device)
        else:
            self.net = StackedFLAME.from_models(models).to(device)
        self.optimizer = self._optimizer([s.optimizer_state for s in slots])
        self.step: Optional[GraphStep] = None

    def _optimizer(self, states: list[Optional[dict]]) -> torch.optim.Optimizer:
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.tc.lr, betas=(0.9, 0.999), eps=1e-8,
                                     capturable=self.tc.cuda_graph)
        if states[0] is not None and states[0].get("state"):
            stacked = {}
            for i in range(len(params)):
                per_run = [s["state"][i] for s in states]
                stacked[i] = {"step": per_run[0]["step"].clone(),
                              **{key: torch.stack([r[key] for r in per_run]) for key in ("exp_avg", "exp_avg_sq")}}
            group = {**optimizer.state_dict()["param_groups"][0]}
            optimizer.load_state_dict({"state": stacked, "param_groups": [group]})
        return optimizer

    def plain_optimizer_state(self, k: int) -> dict:
        """Run k's Adam state in the layout of a plain run's optimizer.state_dict() (same parameter order)."""
        full = self.optimizer.state_dict()
        state = {i: {"step": s["step"].clone(), "exp_avg": s["exp_avg"][k].clone(),
                     "exp_avg_sq": s["exp_avg_sq"][k].clone()} for i, s in full["state"].items()}
        return {"state": state, "param_groups": full["param_groups"]}

    def generators(self) -> Optional[list[torch.Generator]]:
        return [s.generator for s in self.slots]

    def keep(self, indices: list[int]) -> None:
        """Drop the runs not in `indices`: parameters and Adam state sliced, the CUDA graph recaptured."""
        states = [self.plain_optimizer_state(k) for k in indices]
        self.slots = [self.slots[k] for k in indices]
        self.net = self.net.select(indices)
        self.optimizer = self._optimizer(states if states[0]["state"] else [None] * len(indices))
        self.step = None

    # -------------------------------------------------------------------------------- training

    def train_epoch(self) -> tuple[list[dict], float]:
        """One epoch of every run (each its own permutation and λ(e)): per-run mean terms, wall seconds."""
        net, data, device, bs = self.net, self.data, self.device, self.tc.batch_size
        net.train()
        lams = []
        for slot in self.slots:
            fc, tc = slot.cfg.flame, slot.cfg.train
            lams.append(lambda_schedule(slot.progress.epoch + 1, fc.lambda0, fc.lambdaR, fc.lambda_horizon or tc.max_epochs))
        lam = torch.tensor(lams, dtype=torch.float32, device=device)
        size = len(data.train_target)
        perms = torch.stack([torch.randperm(size, generator=s.generator) for s in self.slots]).to(device)
        sums: dict[tuple, list] = {}
        graph = self.tc.cuda_graph
        if graph and self.step is None:
            self.step = GraphStep(net, data, self.optimizer, bs, device, runs=len(self.slots))
        if graph:
            self.step.reset()
        synchronize(device)
        start = time.perf_counter()
        steps = 0
        for first in range(0, size, bs):
            index = perms[:, first: first + bs]
            steps += 1
            if graph:
                self.step(index, lam)
                continue
            self.optimizer.zero_grad(set_to_none=True)
            batch = {"seq": data.train_seq[index], "target": data.train_target[index], "lam": lam}
            terms = net.loss_terms(batch, self.generators())
            terms["loss"].sum().backward()
            self.optimizer.step()
            keys, values = stacked_terms(terms)
            if keys in sums:
                sums[keys][0] += values
                sums[keys][1] += 1
            else:
                sums[keys] = [values, 1]
        synchronize(device)
        seconds = time.perf_counter() - start
        accumulated = self.step.accumulated() if graph else [(k, v, n) for k, (v, n) in sums.items()]
        stats = []
        for k in range(len(self.slots)):
            totals: dict[str, float] = {}
            counts: dict[str, int] = {}
            for keys, values, n in accumulated:
                for key, value in zip(keys, values[:, k].tolist()):
                    totals[key] = totals.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + n
            stats.append({**{key: totals[key] / counts[key] for key in totals}, "train_seconds": seconds,
                          "steps": steps, "samples": size, "stacked_runs": len(self.slots), "lambda": lams[k]})
        return stats, seconds

    @torch.no_grad()
    def validate(self) -> list[dict]:
        """Validation metrics of every run of the stack, all runs scored in the same batches (§9)."""
        return evaluate_stack(self.net, self.data.valid_seq, self.data.valid_target, self.data.valid_hist,
                              self.ec.seen_mask, self.ec.rank, self.ec.batch_size, self.device)

    def epoch(self) -> None:
        """Train and validate every run once; log, checkpoint, and drop the runs that stop."""
        stats, _ = self.train_epoch()
        valid = self.validate()
        for k, slot in enumerate(self.slots):
            p, tc = slot.progress, slot.cfg.train
            try:
                check_finite(stats[k]["loss"], f"the epoch's mean training loss ({stats[k]['steps']} steps)")
            except FloatingPointError as err:
                slot.failed = str(err)
                print(f"{slot.run_dir}: {err}; this run stops, the others go on")
                continue
            epoch = p.epoch + 1
            improved = p.record(epoch, valid[k][tc.select], stats[k]["train_seconds"])
            state = self.net.run_state(k)
            if improved:
                slot.best_state = state
            lam = stats[k].pop("lambda")
            print(f"{slot.cfg.data.name} {slot.method} seed {tc.seed} epoch {epoch:3d} | loss {stats[k]['loss']:.4f} | "
                  f"{stats[k]['train_seconds']:.1f}s ({len(self.slots)} runs) | valid NDCG@20 "
                  f"{valid[k]['NDCG@20']:.2f} HR@20 {valid[k]['HR@20']:.2f}" + (" *" if improved else ""))
            log_metrics(slot.run_dir, {"epoch": epoch, "lambda": lam, **{f"train/{n}": v for n, v in stats[k].items()},
                                       "train/cumulative_seconds": p.train_time,
                                       **{f"valid/{n}": v for n, v in valid[k].items()}})
            if improved:
                save_checkpoint(slot.run_dir / "best.pt", {"model": state, "epoch": epoch, "best_val": p.best})
            rng = {**rng_state(), "torch": slot.generator.get_state()}  # the run's own stream
            save_checkpoint(slot.run_dir / "last.pt", {
                "model": state, "optimizer": self.plain_optimizer_state(k), "epoch": p.epoch, "best_val": p.best,
                "best_epoch": p.best_epoch, "train_time": p.train_time, "time_to_best": p.time_to_best, "rng": rng})
        going = [k for k, slot in enumerate(self.slots) if not slot.finished_training()]
        if len(going) < len(self.slots):
            for slot in self.slots:
                if slot.finished_training() and slot.failed is None:
                    print(f"early stop: {slot.run_dir} (best epoch {slot.progress.best_epoch})")
            if going:
                self.keep(going)
            else:
                self.slots = []


@torch.no_grad()
def evaluate_stack(net: torch.nn.Module, seq: torch.Tensor, target: torch.Tensor, hist: torch.Tensor,
                   seen_mask: str, rank: str, batch_size: int, device: torch.device) -> list[dict[str, float]]:
    """flame.evaluate.evaluate for every run of a stack: (K,) metric dicts, x100."""
    net.eval()
    runs = net.runs
    seq, target, hist = seq.to(device), target.to(device), hist.to(device)
    ranks = []
    for first in range(0, len(target), batch_size):
        part = slice(first, first + batch_size)
        s = seq[part]
        b = len(s)
        scores = net.score_items(s.unsqueeze(0).expand(runs, b, s.shape[1])).float()  # (K, b, I)
        scores = seen_adjust(scores.reshape(runs * b, -1), hist[part].repeat(runs, 1), seen_mask)
        ranks.append(leave_one_out_ranks(scores, target[part].repeat(runs), rank).view(runs, b))
    ranks = torch.cat(ranks, dim=1).cpu()
    out = []
    for k in range(runs):
        per_user = rank_metrics(ranks[k], ks=(1, 5, 10, 20))
        out.append({key: 100.0 * float(per_user[key].mean()) for key in REPORT})
    return out


# ------------------------------------------------------------------------------------ finishing a run


def finish(slot: Slot, data: Any, device: torch.device) -> dict:
    """The restored best state evaluated once on test and results.json written, as flame.main.run does."""
    cfg = slot.cfg
    model = build_model(cfg, data.num_items, slot.frozen).to(device)
    model.load_state_dict(slot.best_state)
    p = slot.progress
    summary = {"best_valid": p.best, "best_epoch": p.best_epoch, "time_to_best_s": p.time_to_best,
               "train_seconds": p.train_time}
    if slot.method == "sasrec":
        save_checkpoint(slot.run_dir / "frozen.pt", sasrec_state(model))
    results = {"method": slot.method, "dataset": cfg.data.name, "seed": cfg.train.seed, "select": cfg.train.select,
               **summary, **final_metrics(model, data, cfg, device), "num_users": data.num_users,
               "num_items": data.num_items, "train_samples": int(len(data.train_target)),
               "frozen": str(slot.frozen) if slot.frozen else None, "config": config_to_dict(cfg)}
    results["metrics"] = results_metrics(results)
    if slot.method == "flame":
        results["convergence"] = convergence(cfg, slot.run_dir, results["test"]["reference"]["NDCG@20"], slot.stage1)
    results = write_results(slot.run_dir, results)
    print_table(results)
    return {**results, "run_dir": str(slot.run_dir)}
