"""The whole F3CRec config tree, one comment per key; the defaults are the paper's main setting (FedMF,
F3CRec, ML-100K, official README hyper-parameters, §9). `configs/smoke.yaml` is the seconds-long run.

`resolve(cfg)` turns the config into the run's concrete flags: every [Q] key left at None follows
`fidelity` (method.md §0), and the method name switches the continual terms on (§11).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union

from common.config import ConfigError, Fraction, NonNegFloat, PosFloat, PosInt, Range

from common.io import cache_root
from common.tracking import check_tracker

from .model import BACKBONES

MethodName = Literal["ft", "arm", "itm", "f3crec", "topn_kd", "naive_replay", "emb_reg", "ewc", "full_retrain"]


@dataclass
class DataConfig:
    name: Literal["ml-100k", "ml-latest-small", "hetrec2011", "lastfm-2k", "synthetic"] = "ml-100k"  # §12
    blocks: Optional[str] = None     # folder with block_0..3.json (e.g. the released reference blocks, §2)
    root: Optional[str] = None       # raw-data root (default $REPRO_DATA, then data/raw)
    core: PosInt = 10                   # k of the k-core filter (§1.1 step 3)
    synthetic_users: PosInt = 60        # synthetic stream size (tests, smoke)
    synthetic_items: PosInt = 50
    synthetic_interactions: PosInt = 2400


@dataclass
class BackboneConfig:
    name: Literal["fedmf", "fedncf", "pfedrec"] = "fedmf"   # the network (§4 table; model.py::BACKBONES)
    dim: PosInt = 32                      # d (§9)
    lr: PosFloat = 1.0                    # base SGD learning rate (README FedMF ML-100K value, §9)
    lr_eta: PosFloat = 170.0              # η: FedNCF/PFedRec item and user-vector lr multiplier (§4)
    dtype: Literal["float32", "float64"] = "float32"   # float64 only for the exactness tests


@dataclass
class MethodConfig:
    name: MethodName = "f3crec"   # the trained method (§11 table)
    arm: Optional[bool] = None    # override the method's ARM switch (None = as the method defines it)
    itm: Optional[bool] = None    # override the method's ITM switch
    kd_weight: NonNegFloat = 0.1        # λ (`reg_client_cl`), FedMF ML-100K README value (§9)
    eps: NonNegFloat = 0.006            # ε of p_u = exp(-ε D_u) (§6)
    topn: PosInt = 30                # N, size of T^u (§6)
    beta: Fraction = 0.9             # β of ITM (§7)
    reg_d: Optional[NonNegFloat] = None  # topn_kd / emb_reg weight; None = λ for topn_kd, 1e-4 for emb_reg [D]
    ewc_gamma: NonNegFloat = 0.01       # γ of EWC [D]: best mean validation N@20 (FedMF, ML-100K, seed 1) on the
    #                               grid 1e-3..1e2; γ ≥ 1 diverges because the item lr is lr·|I^t| ≈ 1,150
    replay_size: PosInt = 30         # naive_replay: pseudo-positives per round (= N) [D]
    full_retrain_warm: bool = False  # full_retrain continues from the previous block instead of re-init


@dataclass
class FederationConfig:
    simulator: Literal["vectorised", "compiled", "auto", "reference", "flower"] = "vectorised"  # §13, §14: same
    #                               numbers, tested; compiled: rounds and evaluation as numba loops (CPU;
    #                               equal to vectorised to rounding in float64); auto: compiled where it
    #                               covers the run, else vectorised
    nodes: PosInt = 2                # flower: in-process nodes; user u lives on node u mod nodes (§14)
    # flower: the simulator each node runs over its users (auto: compiled where it covers the run, else vectorised)
    node_simulator: Literal["auto", "compiled", "vectorised"] = "auto"
    # flower: a round needs replies for this share of its users, in (0, 1]: zero replies have no mean (§14)
    min_reply_fraction: Annotated[float, Range(0, 1, min_open=True)] = 1.0
    reply_timeout: PosFloat = 600.0  # flower: seconds a round waits for its replies (§14)
    node_state_dir: Optional[str] = None  # flower: where nodes keep their checkpoints; None = cache (§14)
    rounds: PosInt = 100                # R per block (§9)
    patience: PosInt = 30               # early-stopping rounds without strict improvement (§8.3)
    batch_size: PosInt = 512            # local mini-batch (§5)
    num_neg: PosInt = 4                 # negatives per positive (§5)
    ldp_scale: NonNegFloat = 0.0           # Laplace b of the optional LDP noise on uploads (§3); 0 = off


@dataclass
class EvalConfig:
    select_metric: Literal["ndcg", "recall"] = "ndcg"   # validation metric for selection (§8.3)


@dataclass
class QuirkConfig:
    """[Q] keys (method.md §0 table): None follows `fidelity` (reference value when true, clean when false)."""
    handoff: Optional[Literal["last", "best"]] = None          # Q1 §8.6 (fidelity: last for FedMF, else best)
    private_init_round0: Optional[Literal["shared", "own"]] = None     # Q2 §4 round-0 reset (FedNCF, PFedRec)
    emb_init: Optional[Literal["reference", "small"]] = None           # Q3 §4 N(0,1) vs N(0,.01²) inits
    old_block_mask: Optional[Literal["current", "cumulative"]] = None  # Q4 §10
    metric_decimals: Optional[Annotated[int, Range(-1)]] = None  # Q5 §8.2: None follows fidelity (5 / unrounded);
    #                                                            -1 = unrounded; n ≥ 0 = round to n decimals
    neg_exclude: Optional[Literal["block_train", "all_known"]] = None  # Q6 §5
    target_scores: Optional[Literal["latest", "matched"]] = None       # Q7 §6


@dataclass
class TrainConfig:
    seed: Annotated[int, Range(0, 2**32 - 1)] = 42   # reference default (§9); numpy seeds fit in 32 bits
    stop_after_block: Optional[Annotated[int, Range(0, 3)]] = None   # stop after block 0..3 (0: only the shared base)
    share_base: bool = True          # reuse the cached end-of-D⁰ state across methods (§8.6); false = train it here
    base_cache: Union[str, bool, None] = "default"  # WHERE the shared base states live (not whether): a folder,
    #                 or "default" = common.io.cache_root()/f3crec/base; null/off/false are refused (share_base says whether)
    threads: PosInt = 1              # torch's intra-op threads (sums, so the numbers, depend on it; keyed, recorded); compiled: one
    device: Literal["auto", "cpu", "cuda"] = "cpu"   # where the vectorised simulator keeps its tensors
    track: Optional[Literal["tensorboard", "wandb", "mlflow"]] = None  # experiment tracker fed every metrics.jsonl record (common/tracking.py); null = off


@dataclass
class Config:
    """F3CRec: federated continual recommendation (CIKM 2025)."""
    fidelity: bool = True            # every [Q] key left at None takes its reference value (§0)
    methods: list[MethodName] = field(default_factory=list)   # several methods in one command (shared base)
    run_root: Optional[str] = None   # run folders go here; None = common.io.default_run_root()
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quirks: QuirkConfig = field(default_factory=QuirkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # What `--resume` may change (checks.RESUME_FREE says why; recorded in log.txt and results.json).
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("run_root", "methods", "train.stop_after_block", "train.device",
                                              "train.share_base", "train.base_cache", "federation.nodes",
                                              "federation.min_reply_fraction", "federation.reply_timeout",
                                              "federation.node_state_dir", "train.track")


def check_config(cfg: Config) -> None:
    """The rules between keys (each key's own range is declared in the schema above): one ConfigError line
    naming the keys, before any data is read."""
    check_tracker(cfg.train.track)  # train.track's package is there, else one line naming the pip line
    d = cfg.data
    if d.name == "synthetic" and not d.blocks and d.synthetic_interactions > d.synthetic_users * d.synthetic_items:
        raise ConfigError(f"data.synthetic_interactions={d.synthetic_interactions}: more than the "
                          f"data.synthetic_users x data.synthetic_items = {d.synthetic_users * d.synthetic_items} "
                          "distinct (user, item) pairs")
    repeated = sorted({name for name in cfg.methods if cfg.methods.count(name) > 1})
    if repeated:
        raise ConfigError(f"methods: {repeated[0]} is listed twice (each method is one run)")


# Values of train.base_cache that read as "no cache" but would name a folder: refused with the key that does it.
NOT_A_CACHE_FOLDER = {"", "off", "none", "no", "false", "null", "0"}


def base_cache_dir(train: TrainConfig):
    """The folder of the shared end-of-D⁰ states that `train.base_cache` names. It says where, never
    whether: `train.share_base=false` turns sharing off, and a value that reads as "off" is refused."""
    value = train.base_cache
    if value is None or isinstance(value, bool) or str(value).strip().lower() in NOT_A_CACHE_FOLDER:
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
        raise ConfigError(f"train.base_cache={shown} is ambiguous: it names where the "
                          "shared base block is cached, not whether; use train.share_base=false to train the base "
                          "block in this run (no cache), or train.base_cache=default for $REPRO_CACHE/f3crec/base")
    if value == "default":
        return cache_root() / "f3crec" / "base"
    return Path(value).expanduser()


def method_flags(cfg: MethodConfig) -> dict:
    """Which terms the method uses: arm in {'off','adaptive','full'}, itm, reg in {None,'emb','ewc'}."""
    arm = {"arm": "adaptive", "f3crec": "adaptive", "topn_kd": "full"}.get(cfg.name, "off")
    itm = cfg.name in ("itm", "f3crec")
    if cfg.arm is not None:
        arm = "adaptive" if cfg.arm else "off"
    if cfg.itm is not None:
        itm = cfg.itm
    reg = {"emb_reg": "emb", "ewc": "ewc"}.get(cfg.name)
    default_d = cfg.kd_weight if cfg.name == "topn_kd" else 1e-4
    weight = cfg.reg_d if cfg.reg_d is not None else default_d
    kd_weight = weight if cfg.name == "topn_kd" else cfg.kd_weight
    return {"arm": arm, "itm": itm, "reg": reg, "kd_weight": kd_weight, "reg_d": weight,
            "replay": cfg.name == "naive_replay", "full_retrain": cfg.name == "full_retrain"}


def resolve(cfg: Config) -> tuple[Config, dict]:
    """(cfg with every quirk concrete, the run's flags): each unset [Q] key follows `fidelity` (§0).

    The flags (recorded in results.json) carry the method's terms and the quirks that the loop reads;
    the two init quirks (Q2, Q3) are read from the returned `cfg.quirks`.
    """
    q, fid = cfg.quirks, cfg.fidelity
    decimals = q.metric_decimals if q.metric_decimals is not None else (5 if fid else -1)
    quirks = QuirkConfig(
        handoff=q.handoff or (BACKBONES[cfg.backbone.name].fidelity_handoff if fid else "best"),
        private_init_round0=q.private_init_round0 or ("shared" if fid else "own"),
        emb_init=q.emb_init or ("reference" if fid else "small"),
        old_block_mask=q.old_block_mask or ("current" if fid else "cumulative"),
        metric_decimals=decimals,
        neg_exclude=q.neg_exclude or ("block_train" if fid else "all_known"),
        target_scores=q.target_scores or ("latest" if fid else "matched"))
    flags = method_flags(cfg.method)
    flags.update(batch_size=cfg.federation.batch_size, replay_size=cfg.method.replay_size,
                 handoff=quirks.handoff, old_block_mask=quirks.old_block_mask,
                 metric_decimals=None if decimals == -1 else decimals,
                 neg_exclude=quirks.neg_exclude, target_scores=quirks.target_scores)
    return replace(cfg, quirks=quirks), flags
