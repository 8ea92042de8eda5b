"""The whole FLAME config schema (one comment per key); § numbers refer to docs/method.md.

    cfg = load_config(Config, "flame/configs/amazon-toys.yaml", ["method.name=sasrec", "train.lr=3e-4"])

The defaults are the paper's main setting (§2) on amazon-toys; configs/*.yaml hold only what differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

import yaml

from common.config import ConfigError, NonNegFloat, NonNegInt, PosFloat, PosInt, Range
from common.tracking import check_tracker

DatasetName = Literal["amazon-beauty", "amazon-games", "amazon-sports", "amazon-toys", "yelp", "ml-1m", "synthetic"]
Seed = Annotated[int, Range(0, 2**32 - 1)]  # numpy seeds must fit in 32 bits
Metric = Literal["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]


@dataclass
class DataConfig:
    """Dataset and windowing (§3)."""
    name: DatasetName = "amazon-toys"  # the FLAME files (§3.1), ml-1m built (§3.6), or generated walks
    root: Optional[str] = None  # raw-data root; None = $REPRO_DATA, then <repo>/data/raw
    max_len: PosInt = 50  # L, the input window; also the backbone's number of positions (§2)
    truncate: Literal["reference", "none"] = "reference"  # quirk 9: keep the last L+3 items only
    synthetic_users: PosInt = 300  # size of the generated set (name=synthetic only)
    synthetic_items: Annotated[int, Range(2)] = 60  # its number of items (a ranking needs two)
    synthetic_seed: Seed = 0  # its own seed, independent of train.seed


@dataclass
class BackboneConfig:
    """The SASRec network (§2, §4); its input length is data.max_len."""
    d: PosInt = 64  # hidden size; a multiple of heads (checked before any training)
    heads: PosInt = 2  # attention heads; head h takes features [h*d/heads, (h+1)*d/heads) (§4.3)
    blocks: PosInt = 2  # transformer blocks
    dropout: Annotated[float, Range(0, 1, max_open=True)] = 0.5  # embedding output, attention probabilities, both residual branches
    init_std: PosFloat = 0.02  # N(0, std^2) for every Linear and Embedding weight (§4.5)
    ln_eps: PosFloat = 1e-12  # all five LayerNorms
    mask_value: Annotated[float, Range(-1e30, 0, max_open=True)] = -10000.0  # finite additive mask (§4.2, quirk 12): -inf turns all-pad rows into NaN
    kernels: Literal["fast", "torch"] = "fast"  # fast: dropout masks from a counter-based Philox stream and the last
    # block computed for the read rows only (§10.1); torch: torch's dropout stream and full last block, bit-compatible with runs before it


@dataclass
class FlameConfig:
    """FLAME's frozen net, paths and loss (§6-§8); also the path loss of B3. Defaults = the reference."""
    frozen_source: Literal["shipped", "own"] = "shipped"  # the authors' weights (§5) or our stage 1 (§6)
    frozen: Optional[str] = None  # a 36-key checkpoint file; overrides frozen_source (and seeds method sasrec)
    frozen_mode: Literal["train", "eval"] = "train"  # quirk 4: the reference keeps dropout on in it
    split: Literal["embed_encoder", "per_block"] = "embed_encoder"  # M=2 (§7.1) or M=1+blocks (§8)
    path_mixing: Literal["tiled", "independent"] = "tiled"  # quirk 5: tiled = paths cross-attend
    num_paths: NonNegInt = 0  # paths sampled per step (>= 2); 0 = all 2^M paths, as the reference
    tau: PosFloat = 1.0  # NT-Xent temperature (§7.3)
    lambda0: NonNegFloat = 1.0  # λ at e=0 (§7.4); 0 skips the paths
    lambdaR: NonNegFloat = 1e-5  # λ at e=R
    lambda_horizon: Optional[PosInt] = None  # R; None = train.max_epochs (quirk 10)
    cl_normalize: bool = False  # cosine NT-Xent instead of raw dot products (ablation, quirk 6)
    detach_pair_weights: bool = False  # no gradient through α (ablation, quirk 6)
    gather_negatives: Optional[bool] = None  # data parallel: L_wcl over the whole batch's paths (all-gathered,
    # the 1-process objective) or over each rank's rows; None = on under more than one process (§10)


@dataclass
class MethodConfig:
    """What is trained (§11): FLAME or one of its baselines, with the baselines' options."""
    name: Literal["flame", "sasrec", "ensemble", "mutual"] = "flame"  # sasrec = B1, ensemble = B2, mutual = B3
    ensemble_n: Annotated[int, Range(2)] = 4  # B2: stage-1 SASRecs with seeds seed, seed+1, ...
    ensemble_members: list[str] = field(default_factory=list)  # B2 from given SASRecs instead: run
    # folders (frozen.pt + results.json) or 36-key checkpoint files (e.g. the shipped frozen nets)
    ml_loss: Literal["wcl", "kl"] = "wcl"  # B3: FLAME's path loss, or classic deep mutual learning


@dataclass
class TrainConfig:
    """Optimisation, early stopping (§2, §7.5) and the speed options (§10)."""
    lr: PosFloat = 1e-3  # Adam, betas (0.9, 0.999), eps 1e-8; no weight decay, schedule or clipping
    batch_size: PosInt = 256  # training samples per step
    max_epochs: NonNegInt = 200  # epochs at most; 0 only scores the initial (or flame.frozen) net
    patience: NonNegInt = 30  # stop when epoch > best_epoch + patience
    select: Metric = "NDCG@20"  # validation metric for early stopping, strict improvement
    seed: Seed = 42  # python, numpy and torch seeds
    deterministic: bool = False  # torch.use_deterministic_algorithms; off: some CUDA kernels lack it
    device: str = "auto"  # auto = cuda when available, else cpu; or a torch device name
    bf16: bool = False  # bf16 autocast in training (speed option; reproduction runs use fp32, §7.5)
    compile: bool = False  # torch.compile the loss (speed option; changes dropout's random stream)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"  # torch.compile mode
    cuda_graph: bool = False  # capture the whole step as one CUDA graph (speed option, GPU only; changes dropout's stream)
    sasrec_run: Optional[str] = None  # SASRec run folder (same seed) for §12's convergence; None = stage-1 run
    track: Optional[Literal["tensorboard", "wandb", "mlflow"]] = None  # experiment tracker fed every metrics.jsonl record (common/tracking.py); null = off


@dataclass
class EvalConfig:
    """Evaluation protocol (§9)."""
    seen_mask: Literal["reference", "zero", "neg_inf", "none"] = "reference"  # quirks 7-8
    rank: Literal["argsort", "strict"] = "argsort"  # quirk 15
    batch_size: PosInt = 256  # users scored per batch


@dataclass
class Config:
    """FLAME (SIGIR 2026) and its baselines on one sequential-recommendation dataset."""
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    flame: FlameConfig = field(default_factory=FlameConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_root: Optional[str] = None  # runs go to <run_root>/flame/<dataset>/; None = $REPRO_RUNS, else <repo>/runs
    # What `--resume` may change (recorded in log.txt and results.json): where the run goes and, for more
    # epochs, where it stops, not the numbers of the epochs it shares (float-level device differences aside).
    # max_epochs only where λ's horizon does not follow it (checks.check_more_epochs, quirk 10). A resume
    # finds its frozen net through its last.pt, not the run root. Every other key is the saved run's.
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("train.device", "run_root", "train.max_epochs", "train.track")


def check_config(cfg: Config) -> None:
    """The constraints between keys (each key's own range is checked at load time): one line naming them,
    raised before any data is read or any network is trained."""
    check_tracker(cfg.train.track)  # train.track's package is there, else one line naming the pip line
    bc, fc = cfg.backbone, cfg.flame
    if bc.d % bc.heads:
        raise ConfigError(f"backbone.d={bc.d} must be a multiple of backbone.heads={bc.heads} (§4.3)")
    paths = 2 ** (2 if fc.split == "embed_encoder" else 1 + bc.blocks)  # 2^M (§7.1, §8)
    if fc.num_paths and not 2 <= fc.num_paths <= paths:
        raise ConfigError(f"flame.num_paths={fc.num_paths}: need 0 (all) or 2..{paths} with "
                          f"flame.split={fc.split} and backbone.blocks={bc.blocks}")


# Keys of run folders written by earlier versions of this folder, and what they are called now.
RENAMED = {"model": "method.name", "baselines": "method.*", "data.dataset": "data.name",
           "backbone.max_len": "data.max_len (the backbone takes it from there)"}


def check_saved_config(run_dir: Path) -> None:
    """A run folder written with the old key names cannot resume: one line saying which and why."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not readable YAML ({' '.join(str(err).split())[:120]}); --resume takes a "
                         "folder that a FLAME run wrote") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a config mapping; --resume takes a folder that a FLAME run wrote")
    old = [key for key in RENAMED if _has_key(saved, key.split("."))]
    if old:
        renames = "; ".join(f"{key} is now {RENAMED[key]}" for key in old)
        raise ValueError(f"{path} was written by an older version of flame ({renames}): rerun, "
                         f"or edit config.yaml to the new names and resume again")


def _has_key(tree: object, parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True
