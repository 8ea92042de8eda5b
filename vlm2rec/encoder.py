"""The VLM embedder: prompts, last-token pooling, LoRA, and the tiny test VLM (§5, §6).

`VLMEmbedder.branch(what, ids, drop=None) -> (B, hidden)` for what in {item_text, item_image,
hist_text, hist_image, item_joint, hist_joint}, where `ids` are item ids (B,) or left-padded
histories (B, L) (0 = padding). The two-tower stand-in (two_tower.py) has the same interface; the
table that maps `backbone.name` to a builder is backbones.py.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .catalog import Catalog, history_items
from .config import LoraSettings, PromptConfig

IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
IMG = VISION_START + IMAGE_PAD + VISION_END
PAD = "<|endoftext|>"


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last non-padding token of each row (§5.2), for left or right padding.

    The index is the position of the last 1 in the mask; with left padding this is always T-1, and the
    fast path below is taken only when every row ends in a real token (a test checks they agree).
    """
    if bool(attention_mask[:, -1].all()):
        return hidden[:, -1]                                                  # (B, H) left-padding fast path
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(dims=[1]).long().argmax(dim=1)    # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _expand_images(text: str, counts) -> str:
    """Repeat each image placeholder once per merged patch of its image (§5.1), in order."""
    pieces = text.split(IMAGE_PAD)
    return pieces[0] + "".join(IMAGE_PAD * next(counts) + piece for piece in pieces[1:])


class VLMEmbedder(nn.Module):
    """Qwen-VL base model (visual + language_model, no LM head) used as a multimodal embedder."""

    def __init__(self, model: nn.Module, tokenizer, image_processor, catalog: Catalog, prompts: PromptConfig,
                 identifier: str, max_title_tokens: int, append_eos: bool):
        super().__init__()
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.tokenizer.padding_side = "left"       # §5.2: explicit; pooling works for both anyway
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
        # Internal fusion (§6): one interleaved prompt; dropout deletes one modality's tokens.
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
            # Expand each image placeholder to the number of merged patches of its image (§5.1).
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


# ---------------------------------------------------------------- LoRA (§5.4)

VISION_TARGETS = r".*visual\.blocks\..*\.(qkv|proj|fc1|fc2|gate_proj|up_proj|down_proj)"


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


# ---------------------------------------------------------------- tiny test VLM

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


def image_processor_for(pixels: int, source: str | None = None, local_files_only: bool = True):
    """Qwen2-VL image processor at a fixed pixel budget (the PIL backend: no torchvision needed), from
    `source` (a local folder or a hub name, downloaded unless `local_files_only`) or built locally."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    kwargs = dict(min_pixels=pixels, max_pixels=pixels)
    if source is None:
        return Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2, **kwargs)
    return Qwen2VLImageProcessorPil.from_pretrained(source, local_files_only=local_files_only, **kwargs)


