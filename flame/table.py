"""The results table as one batched program (§10.2): datasets x seeds x {SASRec, FLAME} (+ B2 from the SASRec
pairs), each method's runs of a dataset trained as one stack (flame/stack.py), every run in its own run folder.

    python -m flame.table --out runs/flame/table                          # the five datasets, seeds 1 2 3
    python -m flame.table --configs flame/configs/smoke.yaml --seeds 1 2 --out /tmp/t   # seconds on a CPU
    python -m flame.table --out runs/flame/table --resume                 # finish what a stopped table left
    python -m flame.table --out runs/flame/table train.cuda_graph=true    # the stacked step as one CUDA graph

Per dataset: the SASRec runs of all seeds as one stack, and beside them (same epoch loop) the FLAME runs
when the frozen net is shipped; with our own frozen net (flame.frozen_source=own) FLAME runs after SASRec
and freezes the SASRec run of its seed (as flame.compare). A run stops on its own early-stopping rule and
leaves the stack (the stack is rebuilt without it, so it costs nothing more). Each run folder
<out>/<dataset>/<method>_seed<seed>/ holds what a plain `flame.main` run writes there (config.yaml,
metrics.jsonl, best.pt, last.pt, results.json, log.txt; frozen.pt for SASRec); its last.pt is in the plain
layout, so `python -m flame.main --resume <folder>` can also finish it alone. B2 (the 2-SASRec ensemble,
nothing to train) is one plain run per pair of seeds. Writes <out>/<dataset>/summary.md and curves.png
(flame.compare's) and <out>/table.md (flame/README.md's tables, mean ± std over the seeds).
key=value are config overrides for every dataset; they go before a list option such as --seeds, or after `--`.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from common.checkpoints import rng_state, save_checkpoint
from common.config import config_to_dict, load_config
from common.io import atomic_write, load_json
from common.metrics import rank_metrics
from common.progress import Progress as Report
from common.runs import (check_finite, comparison_slot, log_metrics, run_or_reuse, start_run, truncate_metrics,
                         write_results)
from common.utils import seed_everything

from . import stage1
from .checks import LAST_KEYS, read_checkpoint
from .compare import plot
from .config import Config, check_config
from .data import build_data, load_raw
from .ensemble import build_model
from .evaluate import (REPORT, convergence, final_metrics, print_table, results_metrics, seen_adjust,
                       leave_one_out_ranks)
from .fast import GraphStep, keep_freed_memory, stacked_terms
from .model import lambda_schedule, sasrec_state
from .stack import StackedFLAME, StackedSASRec
from .train import Progress, setup_device, synchronize

PAPER_DIR = Path(__file__).resolve().parent
DATASETS = ("amazon-beauty", "amazon-games", "amazon-sports", "amazon-toys", "yelp")
METHODS = ("sasrec", "flame")


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


def _adam_step_count(state: Optional[dict]) -> int:
    steps = [int(s["step"]) for s in (state or {}).get("state", {}).values()]
    return steps[0] if steps else 0


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


def train_stacks(slots: list[Slot], models: list[torch.nn.Module], data: Any, device: torch.device) -> None:
    """Train the runs: one stack per (method, Adam step count), all stacks in one epoch loop."""
    groups: dict[tuple, list[int]] = {}
    for i, slot in enumerate(slots):
        if slot.finished_training():
            continue
        groups.setdefault((slot.method, _adam_step_count(slot.optimizer_state)), []).append(i)
    stacks = [Stack([slots[i] for i in idx], [models[i] for i in idx], data, device) for idx in groups.values()]
    live = [slot for stack in stacks for slot in stack.slots]
    if not live:
        return
    # One unit = one pass of the epoch loop over every stack; early stopping may end it before the total.
    total, done = max(s.cfg.train.max_epochs for s in live), min(s.progress.epoch for s in live)
    with Report(total, f"flame table: {len(live)} runs", unit="epoch", initial=done) as report:
        while any(stack.slots for stack in stacks):
            for stack in stacks:
                if stack.slots:
                    stack.epoch()
            report.update()


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


# ------------------------------------------------------------------------------------ one dataset


def run_dataset(base: Config, name: str, seeds: list[int], methods: list[str], out: Path, resume: bool,
                pairs: bool = True) -> dict[str, list[dict]]:
    """Every run of one dataset: SASRec (and FLAME beside it with a shipped frozen net), FLAME after SASRec
    with our own frozen net, then B2 per pair of seeds. Returns {method: [results]} in seed order."""
    folder = out / name
    device, _ = setup_device(base.train.device)
    data = build_data(load_raw(base.data), base.data)
    data.training_to(device)
    results: dict[str, list[dict]] = {m: [] for m in methods}

    def cfg_of(method: str, seed: int, sasrec_dir: Optional[Path]) -> Config:
        baseline = str(sasrec_dir) if sasrec_dir and method != "sasrec" else base.train.sasrec_run
        train = dataclasses.replace(base.train, seed=seed, sasrec_run=baseline)
        flame = base.flame
        if method == "flame" and base.flame.frozen_source == "own" and not base.flame.frozen:
            flame = dataclasses.replace(flame, frozen=str(sasrec_dir / "frozen.pt"))  # = stage 1 of this seed
        cfg = dataclasses.replace(base, method=dataclasses.replace(base.method, name=method), train=train, flame=flame)
        check_config(cfg)
        return cfg

    sasrec_dirs = {seed: folder / f"sasrec_seed{seed}" for seed in seeds} if "sasrec" in methods else {}
    own = base.flame.frozen_source == "own" and not base.flame.frozen
    if "flame" in methods and own and "sasrec" not in methods:
        raise ValueError("FLAME with flame.frozen_source=own freezes the SASRec run of its seed: add sasrec to "
                         "--methods (or give flame.frozen)")
    phases = [["sasrec"], ["flame"]] if own else [[m for m in methods if m in METHODS]]
    for phase in phases:
        slots, models, done = [], [], []
        for method in phase:
            if method not in methods:
                continue
            for seed in seeds:
                cfg = cfg_of(method, seed, sasrec_dirs.get(seed))
                run_dir = folder / f"{method}_seed{seed}"
                state = comparison_slot(run_dir, cfg)
                if state == "reuse":
                    print(f"reusing the finished run {run_dir}")
                    done.append((method, {**load_json(run_dir / "results.json"), "run_dir": str(run_dir)}))
                    continue
                if not resume and (run_dir / "last.pt").exists():
                    raise FileExistsError(f"{run_dir} holds a stopped run: rerun with --resume, or give another --out")
                frozen, stage1_dir = stage1.frozen_checkpoint(cfg)
                slot = Slot(cfg, run_dir, frozen, stage1_dir)
                models.append(open_slot(slot, data, state == "resume", device))
                slots.append(slot)
        train_stacks(slots, models, data, device)
        finished = {id(s): finish(s, data, device) for s in sorted(slots, key=lambda s: s.method != "sasrec")
                    if s.failed is None}
        for method, record in done:
            results[method].append(record)
        for slot in slots:
            if id(slot) in finished:
                results[slot.method].append(finished[id(slot)])
    for method in results:
        results[method].sort(key=lambda r: r["seed"])
    if pairs and "sasrec" in methods and len(seeds) > 1:
        results["ensemble"] = ensemble_pairs(base, seeds, folder, results["sasrec"])
    return results


def ensemble_pairs(base: Config, seeds: list[int], folder: Path, sasrec: list[dict]) -> list[dict]:
    """B2 = the mean logits of two SASRec runs, one per pair of consecutive seeds (cyclic), nothing trained."""
    from .main import run
    dirs = {r["seed"]: r["run_dir"] for r in sasrec}
    out = []
    pairs = [(a, b) for a, b in zip(seeds, seeds[1:] + seeds[:1]) if a in dirs and b in dirs]
    for a, b in pairs[: len(seeds) if len(seeds) > 2 else 1]:
        method = dataclasses.replace(base.method, name="ensemble", ensemble_members=[dirs[a], dirs[b]])
        cfg = dataclasses.replace(base, method=method, train=dataclasses.replace(base.train, seed=a))
        out.append(run_or_reuse(run, cfg, folder / f"ensemble_seed{a}"))
    return out


# ------------------------------------------------------------------------------------ the tables


def _ms(values: list[Optional[float]], digits: int = 2, suffix: str = "") -> str:
    kept = [v for v in values if isinstance(v, (int, float))]
    if not kept:
        return "—"
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    more = f" ({len(values) - len(kept)} n/a)" if len(kept) < len(values) else ""
    return f"{statistics.mean(kept):.{digits}f}{suffix} ± {std:.{digits}f}{more}"


LABELS = {"sasrec": "SASRec (B1)", "flame": "FLAME", "ensemble": "B2, 2 SASRecs"}


def table_markdown(all_results: dict[str, dict[str, list[dict]]]) -> str:
    """flame/README.md's two tables (test metrics, convergence), each cell mean ± std over the seeds."""
    seeds = sorted({r["seed"] for per in all_results.values() for rs in per.values() for r in rs})
    lines = [f"Test metrics x100 under the reference seen mask, mean ± std over seeds {seeds} "
             f"(B2: over the seed pairs).", "",
             "| dataset | model | best epoch / epochs run | valid NDCG@20 | " + " | ".join(REPORT) + " |",
             "|---|---|---|---|" + "---|" * len(REPORT)]
    for name, per in all_results.items():
        for method, runs in per.items():
            if not runs:
                continue
            epochs = [len(_records(r)) for r in runs] if method != "ensemble" else []
            best = [r.get("best_epoch") for r in runs]
            ran = f"{_ms(best, 0)} / {_ms(epochs, 0)}" if method != "ensemble" else "—"
            cells = [_ms([r["test"]["reference"][k] for r in runs]) for k in REPORT]
            lines.append(f"| {name} | {LABELS.get(method, method)} | {ran} | "
                         f"{_ms([r['valid']['NDCG@20'] for r in runs])} | " + " | ".join(cells) + " |")
    lines += ["", "| dataset | FLAME epochs to SASRec's best | SASRec epochs to its best | faster (epochs) | "
              "FLAME s to SASRec's best | SASRec s to its best | faster (seconds) | rel. test NDCG@20 gain |",
              "|---|---|---|---|---|---|---|---|"]
    for name, per in all_results.items():
        conv = [r.get("convergence", {}) for r in per.get("flame", [])]
        if not conv:
            continue
        num = lambda key: [c.get(key) if isinstance(c.get(key), (int, float)) else None for c in conv]  # noqa: E731
        gain = [100 * g if g is not None else None for g in num("test_ndcg20_gain_rel")]
        lines.append(f"| {name} | {_ms(num('epochs_to_sasrec_best'), 1)} | {_ms(num('sasrec_best_epoch'), 1)} | "
                     f"{_ms(num('speedup_epochs'), 2, '×')} | {_ms(num('seconds_to_sasrec_best'), 0)} | "
                     f"{_ms(num('sasrec_time_to_best_s'), 0)} | {_ms(num('speedup_seconds'), 2, '×')} | "
                     f"{_ms(gain, 2, '%')} |")
    return "\n".join(lines) + "\n"


def _records(result: dict) -> list:
    from common.runs import read_metrics
    return read_metrics(result["run_dir"])


def write_tables(all_results: dict[str, dict[str, list[dict]]], out: Path) -> str:
    from .compare import table
    text = table_markdown(all_results)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "table.md") as handle:
        handle.write(text)
    for name, per in all_results.items():
        per = {m: rs for m, rs in per.items() if rs}
        seeds = sorted({r["seed"] for rs in per.values() for r in rs})
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "summary.md").write_text(table(per, seeds))
        plot({m: rs for m, rs in per.items() if m != "ensemble"}, out / name / "curves.png")
    print("\n" + text)
    return text


# ------------------------------------------------------------------------------------ command line


def parse(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[Config]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, nargs="+",
                        default=[PAPER_DIR / "configs" / f"{d}.yaml" for d in DATASETS],
                        help="one YAML per dataset (default: the five FLAME datasets)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-pairs", action="store_true", help="no B2 runs from the SASRec pairs")
    parser.add_argument("--out", type=Path, required=True, help="the table's folder (run folders inside)")
    parser.add_argument("--resume", action="store_true", help="resume every unfinished run under --out")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: tabulate the finished run folders under --out (e.g. several table "
                             "processes, one per dataset, or run folders unpacked from a GPU campaign's bundle)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every dataset")
    args = parser.parse_intermixed_args(argv)
    bases = [load_config(Config, path, args.overrides) for path in args.configs]
    names = [b.data.name for b in bases]
    if len(set(names)) < len(names):
        raise ValueError(f"--configs name one dataset twice ({names})")
    for base in bases:
        check_config(base)
        if base.method.name not in METHODS:
            pass  # the table sets method.name itself
        fc = base.flame
        if fc.split != "embed_encoder" or fc.path_mixing != "tiled" or fc.num_paths:
            raise ValueError("flame.table runs the reference's FLAME (flame.split=embed_encoder, path_mixing=tiled, "
                             "num_paths=0); run other settings with flame.main or flame.compare")
    return args, bases


def collect(out: Path) -> dict[str, dict[str, list[dict]]]:
    """The finished runs under a table folder: {dataset: {method: [results.json + run_dir], seed order}}."""
    from .compare import method_of
    order = {"sasrec": 0, "flame": 1, "ensemble": 2}
    found: dict[str, dict[str, list[dict]]] = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        runs = [(run, load_json(run / "results.json")) for run in sorted(folder.glob("*_seed*"))
                if (run / "results.json").is_file()]
        if not runs:
            continue
        per: dict[str, list[dict]] = {}
        for run, record in runs:
            per.setdefault(method_of(record), []).append({**record, "run_dir": str(run)})
        found[folder.name] = {m: sorted(per[m], key=lambda r: r["seed"])
                              for m in sorted(per, key=lambda m: (order.get(m, 9), m))}
    return found


def main(argv: Optional[list[str]] = None) -> dict:
    keep_freed_memory()  # as flame.main: freed tensors stay in the process instead of coming back as fresh pages
    args, bases = parse(argv)
    out = args.out.expanduser().resolve()
    if args.report:
        found = collect(out)
        if not found:
            raise FileNotFoundError(f"--report: no finished run folder under {out}")
        write_tables(found, out)
        return found
    all_results = {}
    for base in bases:
        all_results[base.data.name] = run_dataset(base, base.data.name, args.seeds, args.methods, out, args.resume,
                                                  not args.no_pairs)
    write_tables(all_results, out)
    return all_results


if __name__ == "__main__":
    from common.cli import run_cli
    run_cli(main)
