"""FLAME entry point: config -> seed -> data -> (stage 1) -> model -> fit -> test -> results.json.

    python -m flame.main --config flame/configs/amazon-toys.yaml [key=value ...]
    python -m flame.main --config flame/configs/amazon-toys.yaml model=sasrec
    python -m flame.main --resume runs/flame/amazon-toys/<run>       # continue from last.pt
    cd flame && python main.py --config configs/smoke.yaml
model=flame (default) | sasrec (B1) | ensemble (B2) | mutual (B3), spec §11. Multi-GPU: the same
command under `accelerate launch`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

if __package__ in (None, ""):  # run as a script: `cd flame && python main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "flame"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common.config import config_to_dict, parse_cli  # noqa: E402
from common.data import data_root  # noqa: E402
from common.runs import read_metrics, save_checkpoint, start_run, write_results  # noqa: E402
from common.utils import get_device, load_json, run_cli, seed_everything  # noqa: E402

from .data import DataConfig, build_data, load_raw  # noqa: E402
from .ensemble import FLAME, FlameConfig  # noqa: E402
from .model import AveragedLogits, ModelConfig, SASRec, lambda_schedule, load_frozen, sasrec_state  # noqa: E402
from .train import REPORT, check_graph_options, evaluate, fit, make_optimizer  # noqa: E402

PAPER_DIR = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    """Optimisation and early stopping (spec §2, §7.5)."""
    lr: float = 1e-3  # Adam, betas (0.9, 0.999), eps 1e-8, no weight decay / schedule / clipping
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 30  # stop when e > best_epoch + patience
    select: Literal["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"] = "NDCG@20"
    seed: int = 42
    deterministic: bool = False  # torch.use_deterministic_algorithms; off: some CUDA kernels lack it
    device: str = "auto"  # auto = cuda when available, else cpu
    bf16: bool = False  # bf16 autocast in training (speed option; reproduction runs use fp32, §7.5)
    compile: bool = False  # torch.compile the loss (speed option; changes dropout's random stream)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    cuda_graph: bool = False  # capture the whole step as one CUDA graph (speed option; GPU only, changes dropout's stream)
    sasrec_run: Optional[str] = None  # SASRec run dir (same seed) for convergence; None = stage-1 run


@dataclass
class EvalConfig:
    """Evaluation protocol (spec §9)."""
    seen_mask: Literal["reference", "zero", "neg_inf", "none"] = "reference"  # quirks 7-8
    rank: Literal["argsort", "strict"] = "argsort"  # quirk 15
    batch_size: int = 256


@dataclass
class BaselineConfig:
    """Options of the baselines of spec §11."""
    ensemble_n: int = 4  # B2: members with seeds seed, seed+1, ...
    ensemble_members: list[str] = field(default_factory=list)  # B2 from given SASRecs instead: run
    # folders (frozen.pt + results.json) or 36-key checkpoint files (e.g. the shipped frozen nets)
    ml_loss: Literal["wcl", "kl"] = "wcl"  # B3: FLAME's path loss, or classic deep mutual learning


@dataclass
class Config:
    """FLAME (SIGIR 2026) and its baselines on one sequential-recommendation dataset."""
    model: Literal["flame", "sasrec", "ensemble", "mutual"] = "flame"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: ModelConfig = field(default_factory=ModelConfig)  # the spec's `model:` section (§13)
    flame: FlameConfig = field(default_factory=FlameConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    run_root: str = "runs"  # runs/flame/<dataset>/<stamp>_<tag>; stage-1 cache under .../stage1/


def stage1_dir(cfg: Config, seed: int) -> tuple[Config, Path]:
    """Config and cache folder of the plain SASRec with `seed` (§6): keyed by everything that
    changes its result (data, backbone, train, eval), so a changed setting never reuses a stale net."""
    train = dataclasses.replace(cfg.train, seed=seed, sasrec_run=None)
    sub = dataclasses.replace(cfg, model="sasrec", train=train, flame=FlameConfig(), baselines=BaselineConfig())
    keyed = {k: v for k, v in config_to_dict(sub).items() if k in ("data", "backbone", "train", "eval")}
    keyed["train"] = {k: v for k, v in keyed["train"].items() if k != "device"}
    key = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
    return sub, Path(cfg.run_root) / "flame" / cfg.data.dataset / "stage1" / f"seed{seed}_{key}"


def pretrain_sasrec(cfg: Config, seed: int) -> Path:
    """Stage 1 (§6): train a plain SASRec selected on validation, or reuse the cached run."""
    sub, run_dir = stage1_dir(cfg, seed)
    if (run_dir / "results.json").exists() and (run_dir / "frozen.pt").exists():
        print(f"[stage 1] reusing {run_dir}")
        return run_dir
    print(f"[stage 1] training SASRec (seed {seed}) into {run_dir}")
    run(sub, run_dir, resume=(run_dir / "last.pt").exists())
    return run_dir


def resolve_frozen(cfg: Config) -> tuple[Path, Optional[Path]]:
    """The frozen checkpoint (§6): flame.frozen, else shipped weights, else our own stage 1."""
    if cfg.flame.frozen:
        return Path(cfg.flame.frozen), None
    if cfg.flame.frozen_source == "shipped":
        path = data_root(cfg.data.root) / "flame" / "frozen_weights" / f"{cfg.data.dataset}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"shipped frozen weights not found: {path} "
                                    f"(use flame.frozen_source=own to pretrain them)")
        return path, None
    run_dir = pretrain_sasrec(cfg, cfg.train.seed)
    return run_dir / "frozen.pt", run_dir


def ensemble_members(cfg: Config) -> list[tuple[Path, Optional[dict]]]:
    """B2's members (§11) as (36-key checkpoint, results.json or None): baselines.ensemble_members
    when given, else stage-1 runs with seeds seed, seed+1, ... (trained or reused from the cache)."""
    if not cfg.baselines.ensemble_members:
        dirs = [pretrain_sasrec(cfg, cfg.train.seed + i) for i in range(cfg.baselines.ensemble_n)]
        return [(d / "frozen.pt", load_json(d / "results.json")) for d in dirs]
    members = []
    for entry in map(Path, cfg.baselines.ensemble_members):
        if entry.is_dir():
            record = entry / "results.json"
            members.append((entry / "frozen.pt", load_json(record) if record.is_file() else None))
        elif entry.is_file():
            members.append((entry, None))  # a bare checkpoint: its training record is unknown
        else:
            raise FileNotFoundError(f"baselines.ensemble_members: {entry} is neither a run folder nor a checkpoint")
    if len(members) < 2:
        raise ValueError(f"baselines.ensemble_members: an ensemble needs at least 2 members, got {len(members)}")
    return members


def build_model(cfg: Config, num_items: int, frozen_path: Optional[Path],
                member_files: list[Path]) -> torch.nn.Module:
    """The learnable network is built first, then the second one, from the same seed (§6, §11)."""
    if cfg.model == "sasrec":  # flame.frozen given: start from it (max_epochs=0 just evaluates it)
        model = SASRec(cfg.backbone, num_items)
        return load_frozen(model, cfg.flame.frozen) if cfg.flame.frozen else model
    if cfg.model == "ensemble":
        return AveragedLogits([load_frozen(SASRec(cfg.backbone, num_items), f) for f in member_files])
    learnable = SASRec(cfg.backbone, num_items)
    other = SASRec(cfg.backbone, num_items)
    if cfg.model == "flame":
        load_frozen(other, frozen_path)
    return FLAME(learnable, other, cfg.flame, mutual=cfg.model == "mutual", ml_loss=cfg.baselines.ml_loss)


def setup_device(cfg: Config) -> tuple[torch.device, bool]:
    """Single process: get_device. Under `accelerate launch` (WORLD_SIZE > 1): one rank per device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return accelerator.device, accelerator.is_main_process
    return get_device(cfg.train.device), True


def convergence(cfg: Config, run_dir: Path, baseline_dir: Optional[Path], test_ndcg: float,
                stage1: Optional[Path]) -> dict:
    """Epochs and seconds to reach SASRec's best validation NDCG@20, relative test gain (§12)."""
    if baseline_dir is None:
        return {"note": "no SASRec run given (train.sasrec_run) and no stage-1 run"}
    return convergence_against(read_metrics(run_dir), cfg.train.select, cfg.train.seed, test_ndcg,
                               Path(baseline_dir), stage1)


def convergence_against(records: list[dict], select: str, seed: int, test_ndcg: float, baseline_dir: Path,
                        stage1: Optional[Path] = None) -> dict:
    """The §12 figures of one run's metrics.jsonl records against a finished SASRec run folder."""
    base = load_json(baseline_dir / "results.json")
    target = base["best_valid"]
    first = next((r for r in records if r[f"valid/{select}"] >= target), None)
    out = {"sasrec_run": str(baseline_dir), "sasrec_seed": base["seed"], "sasrec_best_valid": target,
           "sasrec_best_epoch": base["best_epoch"], "sasrec_time_to_best_s": base["time_to_best_s"],
           "epochs_to_sasrec_best": "not reached", "seconds_to_sasrec_best": "not reached",
           "test_ndcg20_gain_rel": (test_ndcg - base["test"]["reference"]["NDCG@20"])
           / base["test"]["reference"]["NDCG@20"]}
    if base["seed"] != seed:
        print(f"warning: the SASRec run has seed {base['seed']}, this run {seed}")
    if first is not None:
        seconds = first["train/cumulative_seconds"]
        out.update(epochs_to_sasrec_best=first["epoch"], seconds_to_sasrec_best=seconds,
                   speedup_epochs=base["best_epoch"] / first["epoch"],
                   speedup_seconds=base["time_to_best_s"] / max(seconds, 1e-9))
        if stage1 is not None:  # FLAME's time including the whole stage-1 run (§12)
            out["seconds_to_sasrec_best_with_stage1"] = seconds + load_json(stage1 / "results.json")["train_seconds"]
    return out


def print_table(results: dict) -> None:
    """Test metrics under both masks, and the convergence numbers when there are any."""
    print(f"\n{results['model']} on {results['dataset']} (seed {results['seed']}), best epoch "
          f"{results['best_epoch']}, valid {results['select']} {results['valid'][results['select']]:.2f}")
    print("| mask | " + " | ".join(REPORT) + " |\n|---|" + "---|" * len(REPORT))
    for mask, metrics in results["test"].items():
        print(f"| {mask} | " + " | ".join(f"{metrics[k]:.2f}" for k in REPORT) + " |")
    for key, value in results.get("convergence", {}).items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


def run(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False) -> dict:
    """One training run of cfg.model; returns the results dict also written to results.json."""
    cfg.backbone.max_len = cfg.data.max_len  # the position table has one row per input slot
    device, is_main = setup_device(cfg)
    check_graph_options(cfg.train, cfg.flame if cfg.model in ("flame", "mutual") else None, device)
    data = build_data(load_raw(cfg.data), cfg.data)
    frozen_path, stage1, members = None, None, []
    if cfg.model == "flame" or (cfg.model == "sasrec" and cfg.flame.frozen):
        frozen_path, stage1 = resolve_frozen(cfg)
    elif cfg.model == "ensemble":
        members = ensemble_members(cfg)
    if is_main:
        run_dir = start_run(cfg, "flame", cfg.data.dataset, f"{cfg.model}_seed{cfg.train.seed}", run_dir,
                            cfg.run_root)
    if dist.is_available() and dist.is_initialized():  # every rank uses rank 0's run folder
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg, data.num_items, frozen_path, [f for f, _ in members]).to(device)
    for name in ("train_seq", "train_target"):  # the whole training set on the device (no loader)
        setattr(data, name, getattr(data, name).to(device))
    horizon = cfg.flame.lambda_horizon or cfg.train.max_epochs  # quirk 10
    lam_fn = lambda e: lambda_schedule(e, cfg.flame.lambda0, cfg.flame.lambdaR, horizon)  # noqa: E731
    if cfg.model == "ensemble":
        records = [r for _, r in members]
        known = all(r is not None for r in records)  # a bare checkpoint: training cost unknown
        valid = evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, cfg.eval.seen_mask,
                         cfg.eval.rank, cfg.eval.batch_size, device)
        cost = sum(r["train_seconds"] for r in records) if known else None
        summary = {"best_valid": valid[cfg.train.select],
                   "best_epoch": max(r["best_epoch"] for r in records) if known else None,
                   "time_to_best_s": cost, "train_seconds": cost,
                   "members": [str(f) for f, _ in members]}
    else:
        optimizer = make_optimizer(model, cfg.train)
        summary = fit(model, data, optimizer, cfg, run_dir, device, lam_fn, resume, is_main)
    if cfg.model == "sasrec" and is_main:  # the 36-key layout of §5: usable as a frozen net
        save_checkpoint(run_dir / "frozen.pt", sasrec_state(model))
    valid = evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, cfg.eval.seen_mask,
                     cfg.eval.rank, cfg.eval.batch_size, device)  # the restored state, for the record
    test = {}
    for mask in dict.fromkeys((cfg.eval.seen_mask, "reference", "neg_inf")):  # both on test (§9)
        test[mask] = evaluate(model, data.test_seq, data.test_target, data.test_hist, mask, cfg.eval.rank,
                              cfg.eval.batch_size, device)
    results = {"model": cfg.model, "dataset": cfg.data.dataset, "seed": cfg.train.seed,
               "select": cfg.train.select, **summary, "valid": valid, "test": test,
               "num_users": data.num_users, "num_items": data.num_items,
               "train_samples": int(len(data.train_target)),
               "frozen": str(frozen_path) if frozen_path else None, "config": config_to_dict(cfg)}
    if cfg.model == "mutual":  # side number: mean of both networks' logits (§11, B3)
        pair = AveragedLogits([model.learnable, model.frozen])
        results["test_mean_ab"] = evaluate(pair, data.test_seq, data.test_target, data.test_hist,
                                           cfg.eval.seen_mask, cfg.eval.rank, cfg.eval.batch_size, device)
    if is_main:
        if cfg.model in ("flame", "mutual"):  # trained against B1 (§12); B2 trains nothing here
            baseline = Path(cfg.train.sasrec_run) if cfg.train.sasrec_run else stage1
            results["convergence"] = convergence(cfg, run_dir, baseline, test["reference"]["NDCG@20"], stage1)
        results = write_results(run_dir, results)
        print_table(results)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # other ranks may read frozen.pt / results.json of this run next
    results["run_dir"] = str(run_dir)
    return results


def main(argv: list[str] | None = None) -> dict:
    cfg, options = parse_cli(argv, Config, default_config=PAPER_DIR / "configs" / "smoke.yaml")
    run_dir = options.resume or options.run_dir
    if options.resume is not None and not (options.resume / "last.pt").exists():
        raise FileNotFoundError(f"nothing to resume: {options.resume / 'last.pt'} does not exist")
    return run(cfg, run_dir, resume=options.resume is not None)


if __name__ == "__main__":
    run_cli(main)
