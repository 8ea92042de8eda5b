"""The VLM embedder: prompts, last-token pooling, LoRA, and the tiny test VLM (§5, §6).

One pass of `VLMEmbedder` is `prepare(what, ids, drop=None)` (CPU inputs) then `forward(prepared)`
(device) -> (B, hidden), for what in {item_text, item_image, hist_text, hist_image, item_joint, hist_joint},
where `ids` are item ids (B,) or left-padded histories (B, L) (0 = padding); `branch(what, ids, drop)` is
the two in one call, the interface the two-tower stand-in (two_tower.py) shares. The table that maps
`backbone.name` to a builder is backbones.py; the frozen vision tower's per-image cache is visual_cache.py.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import torch
import torch.nn as nn

from common.io import atomic_dir

from .catalog import Catalog, history_items
from .config import LoraSettings, PromptConfig
from .visual_cache import VisualCache

IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
IMG = VISION_START + IMAGE_PAD + VISION_END
PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Qwen's chat turns (its tokenizer's own template), as GME wraps a query; the pooled end token follows.
CHAT = IM_START + "system\n{system}" + IM_END + "\n" + IM_START + "user\n{prompt}" + IM_END + "\n" + IM_START + "assistant\n"


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


class Preparer:
    """The CPU half of an embedder pass (§5.1, §5.5): prompt strings, tokenisation, image loading and the
    image processor -> CPU tensors. It holds the tokenizer, the processor, the catalogue and the prompts,
    never the model, so it pickles into DataLoader workers (train.PreparedLoader)."""

    def __init__(self, tokenizer, image_processor, catalog: Catalog, prompts: PromptConfig, max_title_tokens: int,
                 append_eos: bool):
        self.tokenizer, self.image_processor, self.prompts = tokenizer, image_processor, prompts
        self.max_title_tokens, self.append_eos = max_title_tokens, append_eos
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.merge = image_processor.merge_size ** 2
        self.set_catalog(catalog)

    def set_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._titles: dict[int, str] = {}

    def title(self, item: int) -> str:
        # Spec §5.5: truncate each title before joining, so one long title cannot push out older items.
        if item not in self._titles:
            ids = self.tokenizer(self.catalog.titles[item], add_special_tokens=False)["input_ids"]
            self._titles[item] = self.tokenizer.decode(ids[: self.max_title_tokens])
        return self._titles[item]

    def _prompt(self, what: str, items: list[int], drop: str | None) -> tuple[str, list[int]]:
        """One prompt string (IMG placeholders) and the items whose images fill them, in order."""
        p = self.prompts
        if what == "item_text":
            return p.item_text.format(title=self.title(items[0])), []
        if what == "item_image":
            return p.item_image.format(image=IMG), [items[0]]
        if what == "hist_text":
            return p.hist_text.format(titles=p.separator.join(self.title(i) for i in items)), []
        if what == "hist_image":
            return p.hist_image.format(images=IMG * len(items)), list(items)
        # Internal fusion (§6): one interleaved prompt; dropout deletes one modality's tokens.
        parts, images = [], []
        for item in items:
            if drop != "image":
                parts.append(IMG)
                images.append(item)
            if drop != "text":
                parts.append(self.title(item) + "\n")
        body = "".join(parts)
        if what == "item_joint":
            return p.item_text.format(title=body.rstrip("\n")), images
        return p.hist_text.format(titles=body.rstrip("\n")), images

    def wrap(self, prompt: str) -> str:
        """The text that is tokenised for one prompt (§5.5): raw (default, as VLM2Vec) with an optional EOS,
        or, with prompts.chat_template, Qwen's system/user/assistant turns followed by the end token
        (as GME); the pooled token is the last one: the prompt's last token, or the end token."""
        if self.prompts.chat_template:
            return CHAT.format(system=self.prompts.system, prompt=prompt) + self.tokenizer.eos_token
        return prompt + (self.tokenizer.eos_token if self.append_eos else "")

    def texts(self, what: str, ids: torch.Tensor, drop: str | None = None) -> tuple[list[str], list[int]]:
        """The tokenised texts of one pass over item ids (B,) or left-padded histories (B, L), and the item
        ids whose images fill their placeholders, in order."""
        rows = [[int(i)] for i in ids.tolist()] if ids.dim() == 1 else [history_items(r) for r in ids]
        texts, images = [], []
        for items in rows:
            text, imgs = self._prompt(what, items, drop)
            texts.append(self.wrap(text))
            images.extend(imgs)
        return texts, images

    def pixels(self, images: list[int]) -> dict[str, torch.Tensor]:
        """The image processor's pixel_values (float32) and image_grid_thw of the images of `images`."""
        vision = self.image_processor(images=[self.catalog.image(i) for i in images], return_tensors="pt")
        return {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}

    def tokens(self, texts: list[str], vision: dict) -> dict:
        """Left-padded token ids, mask and token types of `texts`, each image placeholder expanded to the
        number of merged patches of its image (vision["image_grid_thw"], §5.1), plus `vision` itself."""
        if "image_grid_thw" in vision:
            counts = iter((vision["image_grid_thw"].prod(dim=1) // self.merge).tolist())
            texts = [_expand_images(text, counts) for text in texts]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        input_ids = tokens["input_ids"]
        # transformers 5.x wants the token types whenever pixel values are passed (0 text, 1 image).
        return {"input_ids": input_ids, "attention_mask": tokens["attention_mask"],
                "mm_token_type_ids": (input_ids == self.image_token_id).long(), **vision}

    def prepare(self, what: str, ids: torch.Tensor, drop: str | None = None) -> dict:
        """The CPU inputs of one pass (the processor's pixels; no visual cache, which needs the model)."""
        texts, images = self.texts(what, ids, drop)
        return self.tokens(texts, self.pixels(images) if images else {})


class VLMEmbedder(nn.Module):
    """Qwen-VL base model (visual + language_model, no LM head) used as a multimodal embedder.

    A pass is `prepare` (CPU: Preparer, or the visual cache's lookup) then `forward` (device); `branch`
    does both, and a batch's passes can be prepared elsewhere (DataLoader workers, train.py)."""

    def __init__(self, model: nn.Module, tokenizer, image_processor, catalog: Catalog, prompts: PromptConfig,
                 identifier: str, max_title_tokens: int, append_eos: bool):
        super().__init__()
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.tokenizer.padding_side = "left"       # §5.2: explicit; pooling works for both anyway
        self.prompts, self.identifier = prompts, identifier
        if prompts.chat_template:
            lacking = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
            if lacking:
                raise ValueError(f"backbone.prompts.chat_template=true needs the chat tokens {', '.join(lacking)}, "
                                 f"which the tokenizer of {identifier} lacks")
        self.preparer = Preparer(tokenizer, image_processor, catalog, prompts, max_title_tokens, append_eos)
        self.merge = self.preparer.merge           # merged patches per visual token (the visual cache reads it)
        self.hidden_size = model.config.text_config.hidden_size
        self.visual_cache: VisualCache | None = None
        self.set_catalog(catalog)

    def set_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.preparer.set_catalog(catalog)

    def precompute(self, histories: list[np.ndarray]) -> None:
        """Fill the visual cache (when on) for every catalogue item up front, with one progress bar; the
        language model runs live (LoRA changes every feature)."""
        if self.visual_cache is not None:
            self.visual_cache.fill(self, list(range(1, len(self.catalog.titles))))

    def cpu_preparer(self) -> Preparer | None:
        """What a DataLoader worker needs to prepare this embedder's passes, or None where preparing needs
        the model (the visual cache fills itself with the tower; its lookup is all the CPU work left)."""
        return self.preparer if self.visual_cache is None else None

    def prepare(self, what: str, ids: torch.Tensor, drop: str | None = None) -> dict:
        """The CPU inputs of one pass over item ids (B,) or left-padded histories (B, L): left-padded token
        ids, mask, token types, and the processor's pixels and grid of the items whose images fill the
        prompts' placeholders. With a visual cache (frozen vision tower) the tower's output per item is read
        from it ("image_features") instead of re-running the processor and the tower. A DataLoader worker's
        `Preparer.prepare` gives the same dict (without a visual cache)."""
        texts, images = self.preparer.texts(what, ids, drop)
        vision = {}
        if images:
            if self.visual_cache is not None:
                feats, grid = self.visual_cache.get(self, images)
                vision = {"image_features": feats, "image_grid_thw": grid}
            else:
                vision = self.preparer.pixels(images)
        return self.preparer.tokens(texts, vision)

    def forward(self, prepared: dict) -> torch.Tensor:
        """One pass from its CPU inputs (`prepare`): to the model's device, forward, last-token pooling ->
        [B, hidden] (float32)."""
        inputs = self._on_device(prepared)
        # use_cache=False: an embedding pass never decodes, so a KV cache would only take memory.
        hidden = self.model(use_cache=False, **inputs).last_hidden_state
        return last_token_pool(hidden, inputs["attention_mask"]).float()

    def branch(self, what: str, ids: torch.Tensor, drop: str | None = None) -> torch.Tensor:
        """`forward(prepare(...))`: the one call the model makes on either embedder (two_tower.py has it too)."""
        return self(self.prepare(what, ids, drop))

    def _on_device(self, prepared: dict) -> dict:
        """CPU inputs as the model takes them: on its device, pixels in its dtype, cached tower outputs as
        the encoder outputs transformers accepts."""
        device = next(self.model.parameters()).device
        inputs = {}
        for key, value in prepared.items():
            if key == "image_features":
                from transformers.modeling_outputs import BaseModelOutputWithPooling
                inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
                    pooler_output=[f.to(device) for f in value])}
            elif key == "pixel_values":
                inputs[key] = value.to(device, next(self.model.parameters()).dtype)
            else:
                inputs[key] = value.to(device)
        return inputs

    def save_adapter(self, folder, base_name: str) -> bool:
        """Write the LoRA adapters in peft's own format (adapter_config.json + adapter_model.safetensors,
        keys as PeftModel.save_pretrained writes them), so `PeftModel.from_pretrained(base, folder)` loads
        the trained embedder whatever this code's module layout; atomically (a folder is whole or absent).
        Returns False when the model carries no peft adapters (lora.enabled=false: full fine-tuning)."""
        if not getattr(self.model, "peft_config", None):
            return False
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        state = {f"base_model.model.{k}": v.detach().cpu().contiguous()
                 for k, v in get_peft_model_state_dict(self.model).items()}
        config = copy.copy(self.model.peft_config["default"])
        config.base_model_name_or_path = base_name
        with atomic_dir(folder) as tmp:
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            config.save_pretrained(str(tmp))
        return True

    def enable_visual_cache(self, settings: str) -> bool:
        """Cache the vision tower's output per item (on disk, by content; see VisualCache) when the tower
        is frozen and this transformers accepts precomputed encoder outputs; returns whether it is on."""
        frozen = not any(p.requires_grad for p in self.model.visual.parameters())
        accepts = "mm_encoder_outputs" in inspect.signature(self.model.forward).parameters
        self.visual_cache = VisualCache(self, settings) if frozen and accepts else None
        return self.visual_cache is not None


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

def byte_tokenizer(chat: bool = False):
    """A byte-level tokenizer with Qwen's special tokens, built locally (no download): 256 + 5 ids, and
    with `chat` also Qwen's two chat-turn tokens (ids 261, 262; the tiny model's vocabulary then grows,
    so the default 261-id model, and every result built on it, is unchanged)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"])
    if chat:
        core.add_special_tokens([IM_START, IM_END])
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


