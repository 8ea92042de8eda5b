"""The whole VLM2Rec config schema. The class defaults are the paper's main setting (Qwen2.5-VL-3B + LoRA,
external fusion, WPCL + CRTR, Amazon Beauty, 1 + 100 sampled negatives); a YAML file under configs/ holds
only what differs. § numbers refer to docs/method.md, tags are defined there.

The method (plain SFT, +WPCL, +CRTR, VLM2Rec) is selected by `wpcl.enabled` and `crtr.enabled` (§10);
the network by `backbone.name` (§5.1).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

import torch
import yaml

from common.config import Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, Range
from common.runs import checkpoint_identity
from common.tracking import check_tracker

DATASETS = ("synthetic", "ml100k-posters", "amazon")
MODES = ("both", "text", "image")
SCENARIOS = ("missing_image", "missing_title", "noisy_image")
LM_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class PromptConfig:
    """§5.5 [R]: the paper's wording is unknown; raw prompts by default (Q11)."""
    hist_text: str = "{titles}\nSummarize the user's history above to predict the next item:"  # {titles}: joined
    hist_image: str = "{images}Summarize the user's history shown in these images to predict the next item:"
    item_text: str = "{title}\nRepresent this item:"                # {title}: one truncated title
    item_image: str = "{image}Represent this item image:"           # {image}: one image placeholder
    separator: str = " ; "                                          # between history titles
    chat_template: bool = False      # wrap each prompt in Qwen's chat turns + an appended end token (GME's form)
    system: str = "You are a helpful assistant."                    # the chat form's system turn


@dataclass
class LoraSettings:
    """§5.4: peft adapters on the language model."""
    enabled: bool = True                 # [S] LoRA; false trains nothing inside the VLM
    r: PosInt = 16                          # [R] rank
    alpha: PosInt = 32                      # [R] scale alpha / r = 2
    dropout: Annotated[float, Range(0, 1, max_open=True)] = 0.05                # [R] dropout on the adapter input
    target_regex: str = LM_TARGETS       # [R] module-path regex: language-model projections only (Q3)
    include_vision: bool = False         # also adapt the ViT blocks (off: vision tower frozen)


@dataclass
class TwoTowerConfig:
    """§15: the MiniLM + EfficientNet-Lite0 stand-in (backbone.name=two-tower)."""
    dim: PosInt = 256                                          # d of both projections
    image_pool: Literal["attention", "mean"] = "attention"  # history image tower over item features
    hist_text: Literal["joined", "attention"] = "joined"    # MiniLM over the joined titles, or pooled titles
    max_text_tokens: Annotated[int, Range(1, 512)] = 256                              # MiniLM's own limit
    separator: str = " ; "                                  # between history titles (as the VLM prompt)
    encode_batch: PosInt = 64                                  # tower batch size when filling the feature cache
    # Encoder tuning (§15.1): items are then encoded live, once per step for the batch's unique items, over
    # cached outputs of the frozen lower layers. Off (0 / false) = frozen towers, cached features (§15).
    tune_text_layers: Annotated[int, Range(0, 6)] = 0   # top MiniLM layers with LoRA (backbone.lora's r, alpha, dropout)
    tune_image_stage: bool = False                      # unfreeze EfficientNet's last stage and head (BN statistics kept)
    tower_lr: Optional[PosFloat] = None                 # learning rate of the tuned tower weights; None = train.lr


@dataclass
class BackboneConfig:
    """The embedding network (§5, §6)."""
    name: Literal["qwen2-vl", "qwen2.5-vl", "tiny", "tiny-qwen2.5-vl", "two-tower"] = "qwen2.5-vl"  # [S] §5.1
    source: str = "Qwen/Qwen2.5-VL-3B-Instruct"      # [S] HF name or local dir (qwen names only)
    local_files_only: bool = True                    # never download inside main or the tests
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"   # flash_attention_2 opt-in
    grad_checkpointing: bool = True                  # [S] on GPU only, non-reentrant (Q13)
    fusion: Literal["external_sum", "internal_interleave"] = "external_sum"   # [S] external is adopted (§6)
    internal_branch_passes: bool = True              # internal fusion: unimodal passes for WPCL/CRTR
    modalities: list[Literal["text", "image"]] = field(default_factory=lambda: ["text", "image"])  # unimodal SFT
    normalize: bool = True                           # L2 per branch before the sum (§5.3)
    score: Literal["cos", "dot"] = "cos"             # cos re-normalises the fused vectors
    append_eos: bool = False                         # pool an EOS instead of the instruction's last token (Q1)
    visual_cache: bool = True                        # frozen vision tower: its output per item computed once, on disk
    image_pixels: Annotated[int, Range(784)] = 50176                        # 224^2 image budget of the Qwen processor
    keep_aspect: bool = True                         # VLMs: images keep their aspect ratio within the budget (§5.1)
    max_title_tokens: PosInt = 64                       # per title, before joining (§5.5)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)


@dataclass
class DataConfig:
    """§14: the dataset and its recipe."""
    name: Literal["synthetic", "ml100k-posters", "amazon"] = "amazon"   # [S] the paper's Amazon domains
    category: str = "Beauty"             # [S] Amazon 2014 category (name=amazon), §14.1
    root: Optional[str] = None           # data root; None = common.io.data_root(), i.e. $REPRO_DATA
    num_users: PosInt = 64                  # synthetic users (name=synthetic)
    num_items: Annotated[int, Range(4)] = 40                  # synthetic items (name=synthetic)
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0   # synthetic generator seed; real datasets need none
    image_size: Annotated[int, Range(28)] = 224                # [R] side of the square RGB image given to the embedder
    max_history: PosInt = 10                # [S] a history is the last <= 10 items before the target (§4)
    missing_image: Literal["drop", "placeholder"] = "drop"     # [R] §14: drop items without image/title
    item_text: Literal["title", "title_overview"] = "title"    # [R] §14.2: ML-100K title (+ TMDB overview)
    min_rating: Annotated[float, Range(0, 5)] = 0.0              # [R] §14.2: ML-100K ratings >= this before k-core (0 keeps all)


@dataclass
class LossConfig:
    """§7: the fused InfoNCE."""
    temperature: PosFloat = 0.05            # [R] tau of every logit (Q2)
    learnable_temperature: bool = False  # learn log(1/tau), starting from `temperature` (Q4)
    symmetric: bool = False              # add the item -> user direction to L_CL
    mask_duplicate_items: bool = True    # in-batch negatives equal to the positive are removed


@dataclass
class WPCLConfig:
    """§8: weak-modality penalised contrastive learning."""
    enabled: bool = True                 # [C] WPCL on; off = plain contrastive SFT (§10)
    weight: NonNegFloat = 0.5                  # [R] lambda_w (§8.6)
    variant: Literal["neg_penalty", "loss_reweight", "fused_neg_penalty", "grad_scale"] = "neg_penalty"  # §8.5
    strength: Literal["pos_prob", "unimodal_loss"] = "pos_prob"   # c^m = p_bb, or exp(-l^m) (§8.2, Q6)
    granularity: Literal["per_batch", "per_sample"] = "per_batch"  # one weak modality per batch or per row
    alpha: NonNegFloat = 1.0                   # gamma = 1 + alpha * tanh(rho - 1) (§8.4)
    fixed_gamma: Optional[NonNegFloat] = None  # force a constant gamma (weak modality still detected)
    ema: Annotated[float, Range(0, 1, max_open=True)] = 0.0                     # EMA of c^m across steps (per_batch only; 0 = off)
    beta: NonNegFloat = 1.0                    # variant C: fused negative weight 1 + beta * sigmoid(s^w)
    strong_weight: NonNegFloat = 1.0           # variant B: weight of the strong modality's InfoNCE


@dataclass
class CRTRConfig:
    """§9: cross-modal relational topology regularisation."""
    enabled: bool = True                 # [C] CRTR on (§10)
    weight: NonNegFloat = 0.1                  # [R] lambda_r (§9.5)
    temperature: Optional[PosFloat] = None  # tau_r; null = tau (reuse the s^m logits)
    topology: Literal["user_item", "item_item", "user_user", "all"] = "user_item"   # §9.4
    stopgrad: Literal["none", "strong", "weak"] = "none"                            # §9.3


@dataclass
class TrainConfig:
    """§7: contrastive SFT."""
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0   # seeds torch, numpy and the batch order (numpy: 32 bits)
    max_epochs: PosInt = 3                  # [S] every epoch is validated; the best one is tested
    batch_size: Annotated[int, Range(2)] = 32                 # [R] in-batch negatives = batch_size - 1
    lr: PosFloat = 1e-4                     # [R]
    weight_decay: NonNegFloat = 0.0            # [R] none on LoRA
    warmup_ratio: Fraction = 0.03           # [R] linear warm-up share of all steps
    schedule: Literal["cosine", "constant"] = "cosine"   # [R] after the warm-up
    grad_clip: NonNegFloat = 1.0               # [R] max global norm of the trained weights; 0 = off
    instances_per_user: NonNegInt = 0          # [R] 0 = every target i_2..i_{n-2}; k = each user's latest k
    grad_norm_every: NonNegInt = 10            # per-branch gradient norms every N steps (§11.2); 0 = off
    log_every: PosInt = 10                  # metrics.jsonl line every N steps (printed every 5N)
    max_steps_per_epoch: NonNegInt = 0         # 0 = full epoch; > 0 bounds CPU budget runs
    num_workers: NonNegInt = 0                 # DataLoader workers building prompts + pixels where the tower trains
    hard_negatives: NonNegInt = 0              # [R] per pair, mined each epoch from the fused item table (0 = off)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"   # accelerate's flag; real backbones load in bf16
    track: Optional[Literal["tensorboard", "wandb", "mlflow"]] = None  # experiment tracker fed every metrics.jsonl record (common/tracking.py); null = off


@dataclass
class EvalConfig:
    """§13: leave-one-out, both protocols, all modality modes, robustness."""
    protocols: list[Literal["sampled", "full"]] = field(default_factory=lambda: ["sampled", "full"])  # P1, P2
    num_negatives: PosInt = 100             # [S] 1 positive + 100 sampled negatives (§13.1)
    ks: list[PosInt] = field(default_factory=lambda: [10, 20])   # cut-offs of HR@K and NDCG@K
    ties: Literal["pessimistic", "optimistic", "average"] = "pessimistic"   # [R] P1 ties (Q10)
    full_ties: Literal["topk", "pessimistic", "optimistic", "average"] = "topk"   # [R] P2 ties (Q10), as RecBole
    neg_seed: Annotated[int, Range(0, 2**32 - 1)] = 0   # negatives and robustness edits (same for every method)
    modality_modes: list[Literal["both", "text", "image"]] = field(default_factory=lambda: list(MODES))  # §11.1
    select_on: str = "full/both/NDCG@10"   # validation metric for selection: protocol/mode/metric
    batch_size: PosInt = 64              # encoding batch
    scenarios: list[Literal["missing_image", "missing_title", "noisy_image"]] = field(
        default_factory=lambda: list(SCENARIOS))   # robustness on the test split (§13.3)
    scenario_fraction: Fraction = 0.5       # share of items hit by a scenario (fixed seed)
    noise_std: NonNegFloat = 0.3               # noisy_image: Gaussian noise std in [0, 1] pixel units


@dataclass
class SeqRecConfig:
    """§12: SASRec trained from the VLM item table."""
    enabled: bool = True                 # train it after the embedder
    init: Literal["random", "pca", "frozen_adapter"] = "pca"   # [R] item-table initialisation (Q5)
    hidden_size: PosInt = 128               # [R]
    num_layers: PosInt = 2                  # [R]
    num_heads: PosInt = 2                   # [R]
    dropout: Annotated[float, Range(0, 1, max_open=True)] = 0.3                 # [R]
    adapter_layers: Literal[1, 2] = 1    # frozen_adapter: 1 linear, or 2 with a GELU between
    lr: PosFloat = 1e-3                     # [R]
    weight_decay: NonNegFloat = 1e-4           # [R]
    batch_size: PosInt = 256                # [R]
    max_epochs: PosInt = 200                # upper bound; early stopping usually ends sooner
    patience: PosInt = 20                   # epochs without validation improvement (full NDCG@10)


@dataclass
class Config:
    """VLM2Rec: VLM embedder + contrastive SFT with WPCL and CRTR (arXiv 2603.17450)."""
    tag: str = ""                        # suffix of the run folder name
    run_root: Optional[str] = None       # None = common.io.default_run_root() ($REPRO_RUNS or <repo>/runs)
    zero_shot: bool = True               # also score the untrained embedder on validation (§10)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    wpcl: WPCLConfig = field(default_factory=WPCLConfig)
    crtr: CRTRConfig = field(default_factory=CRTRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seqrec: SeqRecConfig = field(default_factory=SeqRecConfig)
    # What `--resume` may change (recorded in log.txt and results.json): where and on what the run goes, not
    # its numbers (float-level device differences aside); max_epochs is not among them (it sets the schedule).
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("train.device", "run_root", "tag", "train.track")


def check_config(cfg: Config) -> None:
    """Cross-key checks that a type cannot express; ValueError names the key (before any loading)."""
    check_tracker(cfg.train.track)  # train.track's package is there, else one line naming the pip line
    parts = cfg.eval.select_on.split("/")
    if len(parts) != 3:
        raise ValueError(f"eval.select_on must be protocol/mode/metric, got {cfg.eval.select_on!r}")
    protocol, mode, metric = parts
    if protocol not in cfg.eval.protocols:
        raise ValueError(f"eval.select_on uses protocol {protocol!r}, which eval.protocols={cfg.eval.protocols} "
                         "does not compute")
    if mode not in cfg.eval.modality_modes:
        raise ValueError(f"eval.select_on uses mode {mode!r}, which eval.modality_modes="
                         f"{cfg.eval.modality_modes} does not compute")
    name, _, k = metric.partition("@")
    if name not in ("HR", "NDCG") or not k.isdigit() or int(k) not in cfg.eval.ks:
        raise ValueError(f"eval.select_on metric must be HR@K or NDCG@K with K in eval.ks={cfg.eval.ks}, "
                         f"got {metric!r}")
    if not cfg.backbone.modalities:
        raise ValueError("backbone.modalities must name at least one of text, image")
    tower = cfg.backbone.two_tower
    if cfg.backbone.name == "two-tower" and tower.tune_text_layers and tower.hist_text == "joined":
        raise ValueError("backbone.two_tower.tune_text_layers needs backbone.two_tower.hist_text=attention: a tuned "
                         "MiniLM encodes items, not each user's joined titles (§15.1)")
    if cfg.seqrec.hidden_size % cfg.seqrec.num_heads:
        raise ValueError(f"seqrec.hidden_size={cfg.seqrec.hidden_size} must be a multiple of "
                         f"seqrec.num_heads={cfg.seqrec.num_heads}")


# Keys of run folders written before the schema was unified: old dotted name -> new dotted name.
RENAMED = {"seed": "train.seed", "train.epochs": "train.max_epochs", "data.kind": "data.name",
           "model": "backbone", "model.kind": "backbone.name", "model.backbone": "backbone.source",
           "model.offline": "backbone.local_files_only"}


# A top-level config section that only another paper's runs have -> that paper.
FOREIGN_SECTIONS = {"flame": "FLAME", "method": "FLAME or F3CRec", "federation": "F3CRec", "quirks": "F3CRec"}


def check_run_folder(run_dir: str | Path) -> None:
    """Refuse, in one line, to resume a run folder that is another paper's, whose config.yaml is not a
    mapping or uses the old key names, or that has no readable last.pt (checked before any loading)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not readable YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a config mapping; --resume takes a folder that a VLM2Rec run wrote")
    foreign = sorted({FOREIGN_SECTIONS[k] for k in saved if k in FOREIGN_SECTIONS})
    if foreign:
        raise ValueError(f"run folder {run_dir} is a {foreign[0]} run (its config.yaml has "
                         f"{', '.join(k for k in saved if k in FOREIGN_SECTIONS)}), not a VLM2Rec run")
    old = [key for key in ("seed", "model") if key in saved]
    old += [f"{section}.{key}" for section, key in (("train", "epochs"), ("data", "kind"))
            if isinstance(saved.get(section), dict) and key in saved[section]]
    if old:
        renames = ", ".join(f"{key} -> {RENAMED[key]}" for key in old)
        raise ValueError(f"run folder {run_dir} was written with old config keys ({renames}; model.kind "
                         "'offline' is now backbone.name 'two-tower'); this version cannot resume it: "
                         "rerun, or rename the keys in its config.yaml")
    last = Path(run_dir) / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"run folder {run_dir} has no last.pt: it stopped before its first epoch ended "
                                "(nothing to resume); start the run again")
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        missing = [k for k in ("model", "optimizer", "scheduler", "rng", "epoch", "step") if k not in ckpt]
    except Exception as err:              # torch.load raises many types on a damaged file
        raise ValueError(f"{last} is damaged or not a VLM2Rec checkpoint ({type(err).__name__}); "
                         "start the run again") from None
    if missing:
        raise ValueError(f"{last} is not a VLM2Rec checkpoint (no {', '.join(missing)})")
    checkpoint_identity(Path(run_dir))  # a last.pt of another run (another seed's, copied in) is refused


def check_resume(argv: list[str] | None) -> None:
    """When the command line resumes a run folder, check its keys (see check_run_folder)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--resume", default=None)
    known, _ = parser.parse_known_args(argv)
    if known.resume is not None:
        check_run_folder(known.resume)
