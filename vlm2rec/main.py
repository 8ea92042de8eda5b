"""VLM2Rec entry point: config -> seed -> data -> model -> contrastive SFT -> validation selection ->
test once (both protocols, all modality modes, robustness) -> SASRec downstream -> results.json.

    python -m vlm2rec.main                                     # configs/default.yaml: the paper's setting (GPU)
    python -m vlm2rec.main --config vlm2rec/configs/smoke.yaml # tiny VLM, synthetic data, CPU, seconds
    cd vlm2rec && python main.py --config configs/ml100k_offline.yaml wpcl.enabled=false
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `cd vlm2rec && python main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "vlm2rec"

from dataclasses import dataclass, field

import torch

from common.config import ConfigError, config_to_dict, parse_cli
from common.runs import (load_checkpoint, log_metrics, rng_state, save_checkpoint, set_rng_state, start_run,
                         write_results)
from common.utils import get_device, run_cli, seed_everything

from .data import DataConfig, load_dataset
from .diagnostics import plot_run
from .encoder import Catalog, missing_requirements
from .evaluate import EvalConfig, flat, negatives, scenario_catalog, selection_score, split_sequences
from .losses import CRTRConfig, LossConfig, WPCLConfig
from .model import ModelConfig, VLM2Rec
from .offline import LABEL
from .seqrec import SeqRecConfig, fit_seqrec
from .train import TrainConfig, evaluate, lr_lambda, mine_hard_negatives, train_one_epoch

PAPER_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = PAPER_DIR / "configs" / "default.yaml"
OFFLINE_CONFIGS = "configs/ml100k_offline.yaml (real data, CPU) or configs/smoke.yaml (synthetic, seconds)"


@dataclass
class Config:
    """VLM2Rec: VLM embedder + contrastive SFT with WPCL and CRTR (arXiv 2603.17450)."""
    seed: int = 0
    tag: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="amazon", category="Beauty", image_size=224))
    loss: LossConfig = field(default_factory=LossConfig)
    wpcl: WPCLConfig = field(default_factory=WPCLConfig)
    crtr: CRTRConfig = field(default_factory=CRTRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seqrec: SeqRecConfig = field(default_factory=SeqRecConfig)
    zero_shot: bool = True       # also score the untrained embedder (row 1 of spec §17)


def preflight(cfg: Config) -> dict:
    """Load the data and check the backbone without loading it; ONE message naming all that is missing."""
    missing = missing_requirements(cfg.model, cfg.train.device)
    data = None
    try:
        data = load_dataset(cfg.data)
    except FileNotFoundError as err:
        missing.append(f"the {cfg.data.kind} data ({err})")
    if missing:
        raise SystemExit(f"vlm2rec: cannot run this config: missing {'; '.join(missing)}. "
                         f"Nothing was downloaded. Offline configs: {OFFLINE_CONFIGS}.")
    return data


def test_results(model, split, negs, num_items, cfg: Config, run_dir: Path) -> dict:
    """Test once at the best-validation weights, then the robustness scenarios (test split)."""
    out = {"clean": evaluate(model, split["test"], negs["test"], num_items, cfg.eval, run_dir, "test")}
    clean_catalog = model.embedder.catalog
    for scenario in cfg.eval.scenarios:
        catalog = scenario_catalog(clean_catalog, scenario, cfg.eval.scenario_fraction, cfg.eval.noise_std,
                                   cfg.eval.neg_seed)   # same items hit for every method and seed
        model.embedder.set_catalog(catalog)
        out[scenario] = evaluate(model, split["test"], negs["test"], num_items, cfg.eval, run_dir, f"test-{scenario}")
    model.embedder.set_catalog(clean_catalog)
    return out


def main(argv: list[str] | None = None) -> dict:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    try:
        cfg, options = parse_cli(argv, Config, DEFAULT_CONFIG)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    data = preflight(cfg)
    seed_everything(cfg.seed)
    device = get_device(cfg.train.device)
    # Unused heads (e.g. the internal-fusion projection under external fusion) must not stall DDP.
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.train.mixed_precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    # Under `accelerate launch` every process trains (its shard of the pairs) and evaluates identically;
    # only the main process owns the run directory and writes (logs, checkpoints, caches, results).
    writes = accelerator.is_main_process
    run_dir = start_run(cfg, "vlm2rec", data["name"], cfg.tag, options.run_dir or options.resume) if writes else None

    split = split_sequences(data["sequences"], cfg.data.max_history, cfg.train.instances_per_user)
    num_items = data["num_items"]
    negs, neg_sha = {}, {}
    for name in ("valid", "test"):
        negs[name], neg_sha[name] = negatives(data["sequences"], num_items, cfg.eval.num_negatives,
                                              cfg.eval.neg_seed, name, data["name"])
    catalog = Catalog(data["titles"], data["images"], cfg.data.image_size)
    model = VLM2Rec(cfg.model, catalog, accelerator.device, cfg.loss, cfg.wpcl, cfg.crtr)
    model.embedder.precompute([split[s]["history"][i] for s in ("train", "valid", "test")
                               for i in range(len(split[s]["history"]))])
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"backbone {model.embedder.identifier}: {sum(p.numel() for p in params):,} trainable parameters; "
          f"{len(split['train']['target']):,} training pairs; {len(data['sequences']):,} users; {num_items:,} items")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = max(1, len(split["train"]["target"]) // (cfg.train.batch_size * accelerator.num_processes))
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps_per_epoch * cfg.train.epochs, cfg.train.warmup_ratio, cfg.train.schedule))
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)

    start_epoch, step, best_val, best_epoch, best_state = 0, 0, float("-inf"), -1, None
    if options.resume is not None:
        ckpt = load_checkpoint(Path(options.resume) / "last.pt")
        core.load_trainable_state(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, step, best_val, best_epoch = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_val"], ckpt["best_epoch"]
        best_state = load_checkpoint(Path(options.resume) / "best.pt")["model"] if best_epoch >= 0 else None
    results: dict = {"label": LABEL if cfg.model.kind == "offline" else f"VLM embedder {core.embedder.identifier}"}
    if cfg.zero_shot and start_epoch == 0:
        zero = evaluate(core, split["valid"], negs["valid"], num_items, cfg.eval, run_dir, "valid")
        results["zero_shot_valid"] = zero
        if writes:
            log_metrics(run_dir, {"step": 0, "epoch": -1, **flat(zero, "valid")})

    def log(record: dict) -> None:
        if not writes:
            return
        log_metrics(run_dir, record)
        if record.get("step", 0) % (cfg.train.log_every * 5) == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    for epoch in range(start_epoch, cfg.train.epochs):
        if cfg.train.hard_negatives > 0:   # re-mined every epoch from the current fused item table
            table = core.item_table(num_items, "both", cfg.eval.batch_size).cpu()
            split["train"]["negatives"] = mine_hard_negatives(table, split["train"], cfg.train.hard_negatives)
        step, means = train_one_epoch(model, optimizer, scheduler, accelerator, split["train"], cfg.train,
                                      cfg.seed, epoch, step, log)
        valid = evaluate(core, split["valid"], negs["valid"], num_items, cfg.eval, run_dir, "valid")
        score = selection_score(valid, cfg.eval.select_on)
        log({"step": step, "epoch": epoch, "select": score, **{f"train_{k}": v for k, v in means.items()},
                              **flat(valid, "valid")})
        print(f"epoch {epoch}: loss {means.get('loss', float('nan')):.4f} valid {cfg.eval.select_on} {score:.4f}")
        state = {"model": core.trainable_state(), "config": config_to_dict(cfg), "epoch": epoch, "step": step,
                 "backbone": core.embedder.identifier, "best_val": max(best_val, score),
                 "best_epoch": epoch if score > best_val else best_epoch}
        if score > best_val:
            best_val, best_epoch, best_state = score, epoch, state["model"]
            if writes:
                save_checkpoint(run_dir / "best.pt", state)
        if writes:
            save_checkpoint(run_dir / "last.pt", {**state, "optimizer": optimizer.state_dict(),
                                                   "scheduler": scheduler.state_dict(), "rng": rng_state()})

    if best_state is not None:                # test once, at the best validation epoch (spec §13)
        core.load_trainable_state(best_state)
    results["test"] = test_results(core, split, negs, num_items, cfg, run_dir)
    table = core.item_table(num_items, "both", cfg.eval.batch_size).cpu()
    if writes:
        save_checkpoint(run_dir / "item_embeddings.pt", {"ids": torch.arange(num_items + 1), "emb": table})
    if cfg.seqrec.enabled:
        results["seqrec"] = fit_seqrec(cfg.seqrec, split, table, negs, cfg.eval, cfg.seed, accelerator.device)
    results.update({"best_epoch": best_epoch, "best_valid": best_val, "select_on": cfg.eval.select_on,
                    "seed": cfg.seed, "backbone": core.embedder.identifier, "dataset": data["name"],
                    "data_stats": data.get("stats", {}), "ties": cfg.eval.ties, "negatives_sha1": neg_sha,
                    "run_dir": str(run_dir)})
    if writes:
        results["plot"] = str(plot_run(run_dir))
        write_results(run_dir, results)
        print_summary(results)
    return results


def print_summary(results: dict) -> None:
    clean = results["test"]["clean"]
    for protocol in ("sampled", "full"):
        for mode, metrics in clean.get(protocol, {}).items():
            print(f"test {protocol:7s} {mode:5s} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                             if k.startswith(("HR", "NDCG"))))


if __name__ == "__main__":
    run_cli(main)
