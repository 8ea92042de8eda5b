"""F3CRec entry point: config → seed → blocks → base block (cached, shared by methods) → D¹..D³ → results.

    python -m f3crec.main --config f3crec/configs/ml-100k.yaml method.name=ft
    python -m f3crec.main --config f3crec/configs/ml-100k.yaml "methods=[ft,arm,itm,f3crec]"
    python -m f3crec.main --resume runs/f3crec/ml-100k/<run>        # continue at the next block boundary
    cd f3crec && python main.py --config configs/smoke.yaml

A checkpoint (last.pt, a plain dict) is written at every block boundary; the end-of-D⁰ state is cached
under `train.base_cache`, keyed by everything that affects D⁰, so every method reuses one base block (§8).
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script: `cd f3crec && python main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "f3crec"

import torch

from common.config import config_to_dict, parse_cli
from common.runs import load_checkpoint, log_metrics, save_checkpoint, start_run, write_results
from common.utils import get_device, run_cli, seed_everything

from .clients import ClientStates
from .data import build_blocks, fingerprint, load_blocks, prepare_blocks, synthetic_stream, write_blocks
from .federated import ReferenceSimulator
from .method import MethodConfig, method_flags
from .model import ModelConfig
from .server import Server
from .train import end_block, grow, restart, run_block, summarise, test_row
from .vectorised import VectorisedSimulator

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "smoke.yaml"


@dataclass
class DataConfig:
    name: str = "synthetic"          # ml-100k | ml-latest-small | hetrec2011 | lastfm-2k | synthetic (§12)
    blocks: str | None = None        # folder with block_0..3.json (e.g. the released reference blocks, §2)
    root: str | None = None          # raw-data root (default $REPRO_DATA, then data/raw)
    core: int = 10                   # k of the k-core filter (§1.1 step 3)
    synthetic_users: int = 60        # synthetic stream size (tests, smoke)
    synthetic_items: int = 50
    synthetic_interactions: int = 2400


@dataclass
class FederationConfig:
    simulator: Literal["vectorised", "reference"] = "vectorised"  # §13: same semantics, tested equal
    rounds: int = 100                # R per block (§9)
    patience: int = 30               # early-stopping rounds without strict improvement (§8.3)
    batch_size: int = 512            # local mini-batch (§5)
    num_neg: int = 4                 # negatives per positive (§5)
    ldp_scale: float = 0.0           # Laplace b of the optional LDP noise on uploads (§3); 0 = off


@dataclass
class EvalConfig:
    select_metric: Literal["ndcg", "recall"] = "ndcg"   # validation metric for selection (§8.3)


@dataclass
class QuirkConfig:
    """[Q] flags (§0): None follows `fidelity` (reference behaviour when true, clean when false)."""
    handoff: Literal["last", "best"] | None = None          # §8.6 (fidelity: last for FedMF, best otherwise)
    old_block_mask: Literal["current", "cumulative"] | None = None  # §10
    metric_decimals: int | None = -1                        # §8.2; -1 follows fidelity (5 / unrounded)
    neg_exclude: Literal["block_train", "all_known"] | None = None  # §5
    target_scores: Literal["latest", "matched"] | None = None       # §6
    emb_init: Literal["reference", "small"] | None = None           # §4
    private_init_round0: Literal["shared", "own"] | None = None     # §4


@dataclass
class TrainConfig:
    seed: int = 42                   # reference default (§9); compare.py overrides it per seed
    stop_after_block: int | None = None   # stop after this block (e.g. 0: train only the shared base)
    base_cache: str | None = "runs/f3crec/base-cache"   # where end-of-D⁰ states are shared; None = off
    device: str = "cpu"              # auto | cpu | cuda: where the vectorised simulator keeps its tensors


@dataclass
class Config:
    """F3CRec: federated continual recommendation (CIKM 2025)."""
    fidelity: bool = True
    methods: list[str] = field(default_factory=list)   # several methods in one command (shared base)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quirks: QuirkConfig = field(default_factory=QuirkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def resolve(cfg: Config) -> tuple[Config, dict]:
    """Concrete model config and run flags: every unset [Q] flag follows `fidelity`."""
    q, fid = cfg.quirks, cfg.fidelity
    model = replace(cfg.model, emb_init=q.emb_init or ("reference" if fid else "small"),
                    private_init_round0=q.private_init_round0 or ("shared" if fid else "own"))
    flags = method_flags(cfg.method)
    fed_handoff = "last" if fid and cfg.model.backbone == "fedmf" else "best"
    flags.update(batch_size=cfg.federation.batch_size, replay_size=cfg.method.replay_size,
                 handoff=q.handoff or fed_handoff,
                 old_block_mask=q.old_block_mask or ("current" if fid else "cumulative"),
                 metric_decimals=(5 if fid else None) if q.metric_decimals == -1 else q.metric_decimals,
                 neg_exclude=q.neg_exclude or ("block_train" if fid else "all_known"),
                 target_scores=q.target_scores or ("latest" if fid else "matched"))
    return replace(cfg, model=model), flags


def get_blocks(cfg: Config) -> tuple[list, str]:
    """The four blocks and their fingerprint: released files, our pipeline on raw data, or synthetic."""
    d = cfg.data
    if d.blocks:
        path = Path(d.blocks)
    elif d.name == "synthetic":
        from common.data import cache_root
        path = cache_root() / "f3crec" / f"synthetic-{d.synthetic_users}-{d.synthetic_items}-" \
            f"{d.synthetic_interactions}-core{d.core}-seed{cfg.train.seed}"
        if not (path / "block_3.json").is_file():
            stream = synthetic_stream(d.synthetic_users, d.synthetic_items, d.synthetic_interactions, cfg.train.seed)
            write_blocks(path, build_blocks(stream, cfg.train.seed, core=d.core), {"dataset": "synthetic"})
    else:
        path = prepare_blocks(d.name, cfg.train.seed, d.root, d.core)
    return load_blocks(path), fingerprint(path)


def make_sim(cfg: Config, flags: dict, items: torch.Tensor, private: dict):
    # The per-client reference simulator is the readable ground truth: it always runs on the CPU.
    device = get_device(cfg.train.device) if cfg.federation.simulator == "vectorised" else torch.device("cpu")
    items, private = items.to(device), {k: v.to(device) for k, v in private.items()}
    server = Server(items, cfg.method.beta, itm=flags["itm"])
    states = ClientStates(private, cfg.method.topn)
    cls = VectorisedSimulator if cfg.federation.simulator == "vectorised" else ReferenceSimulator
    return cls(server, states)


def sim_state(sim) -> dict:
    return {"server": sim.server.state_dict(), "clients": sim.states().state_dict()}


def load_sim(cfg: Config, flags: dict, state: dict):
    sim = make_sim(cfg, flags, state["server"]["items"], dict(state["clients"]["private"]))
    device = sim.server.items.device
    sim.server.load_state_dict(_to(state["server"], device))
    states = ClientStates(dict(sim.states().private), cfg.method.topn)
    states.load_state_dict(_to(state["clients"], device))
    sim.load_states(states)
    return sim


def _to(value, device: torch.device):
    """A checkpoint's nested dict with every tensor moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def base_key(cfg: Config, flags: dict, blocks_id: str) -> str:
    """Everything that changes D⁰ training (not the method: ARM/ITM are off in D⁰, §8)."""
    # The code is part of the key: a cached base state from older code must never be reused silently.
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))))
    relevant = {"blocks": blocks_id, "model": config_to_dict(cfg)["model"], "fed": config_to_dict(cfg)["federation"],
                "eval": config_to_dict(cfg)["eval"], "seed": cfg.train.seed, "quirks": config_to_dict(cfg)["quirks"],
                "fidelity": cfg.fidelity, "device": cfg.train.device, "code": code.hexdigest(),
                "flags": {k: flags[k] for k in ("metric_decimals", "neg_exclude")}}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def run(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """The block loop of §8 with block-boundary checkpoints; returns the results dict."""
    cfg, flags = resolve(cfg)
    seed_everything(cfg.train.seed)
    blocks, blocks_id = get_blocks(cfg)
    log = lambda record: (log_metrics(run_dir, record), print(json.dumps(record)))  # noqa: E731
    sim, rows, info, start = None, [], [], 0
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        sim, rows, info, start = load_sim(cfg, flags, ckpt["sim"]), ckpt["rows"], ckpt["info"], ckpt["block"] + 1
    cache = Path(cfg.train.base_cache) / f"{base_key(cfg, flags, blocks_id)}.pt" if cfg.train.base_cache else None
    for t in range(start, len(blocks)):
        if t == 0 and cache is not None and cache.is_file():
            base = load_checkpoint(cache)
            sim, rows, info = load_sim(cfg, flags, base["sim"]), base["rows"], base["info"]
            print(f"[f3crec] base block loaded from {cache}")
        else:
            sim = grow(sim, lambda items, private: make_sim(cfg, flags, items, private), cfg, blocks, t,
                       cfg.train.seed)
            if flags["full_retrain"] and t > 0 and not cfg.method.full_retrain_warm:
                restart(sim, cfg, blocks, t)
            info.append(run_block(sim, cfg, blocks, t, flags, log))
            rows.append(test_row(sim, blocks, t, cfg.model.backbone, flags["old_block_mask"],
                                 flags["metric_decimals"]))
            if t == 0 and cache is not None:
                save_checkpoint(cache, {"sim": sim_state(sim), "rows": rows, "info": info, "key_config": config_to_dict(cfg)})
        end_block(sim, cfg, blocks, t, flags)
        save_checkpoint(run_dir / "last.pt", {"sim": sim_state(sim), "rows": rows, "info": info, "block": t,
                                              "config": config_to_dict(cfg)})
        print(f"[f3crec] block {t}: " + format_row(summarise(rows)))
        if cfg.train.stop_after_block is not None and t >= cfg.train.stop_after_block:
            break
    return {"summary": summarise(rows), "blocks": info, "flags": flags, "seed": cfg.train.seed,
            "method": cfg.method.name, "backbone": cfg.model.backbone, "blocks_sha": blocks_id,
            "simulator": cfg.federation.simulator, "fidelity": cfg.fidelity}


def format_row(summary: dict) -> str:
    parts = []
    for metric, label in (("ndcg", "N@20"), ("recall", "R@20")):
        last = summary[metric]["per_block"][-1]
        parts.append(f"{label} LA {last['LA']:.4f} RA {last['RA']:.4f} H {last['H']:.4f}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    cfg, options = parse_cli(argv, Config, DEFAULT_CONFIG)
    methods = cfg.methods or [cfg.method.name]
    results = {}
    for name in methods:
        one = replace(cfg, method=replace(cfg.method, name=name), methods=[])
        if options.resume is not None:
            run_dir = start_run(one, "f3crec", cfg.data.name, run_dir=options.resume)
        else:
            sub = None if options.run_dir is None else (options.run_dir / name if len(methods) > 1 else options.run_dir)
            run_dir = start_run(one, "f3crec", cfg.data.name, tag=f"{name}-s{cfg.train.seed}", run_dir=sub)
        results[name] = write_results(run_dir, run(one, run_dir, resume=options.resume is not None))
    print("\nmethod        | " + "NDCG@20 LA / RA / H          | Recall@20 LA / RA / H")
    for name, res in results.items():
        print(f"{name:13s} | {format_row(res['summary'])}")
    return results if len(methods) > 1 else results[methods[0]]


if __name__ == "__main__":
    run_cli(main)
