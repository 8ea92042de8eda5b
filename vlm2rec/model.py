"""VLM2Rec: a (LoRA-adapted) VLM as a CF-aware multimodal embedder for sequential recommendation.

`VLM2Rec(cfg, catalog, device, loss, wpcl, crtr)` turns a batch {"history": (B, L) left-padded item ids,
"target": (B,)} into user and item embeddings by branch (§4, §6):
  external_sum        u = n(u^T) + n(u^V), e = n(e^T) + n(e^V): four passes through one shared VLM
  internal_interleave u = n(VLM(interleaved history)); branch passes feed WPCL/CRTR and diagnostics
and exposes `loss(batch)` (§10), `score_all(batch)` (B, I+1) and `encode(kind, ids, mode)` for the
modality-dropout evaluation (mode in both / text / image, §11.1).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import parallel
from .backbones import BACKBONES
from .catalog import Catalog
from .config import MODES, BackboneConfig, CRTRConfig, LossConfig, WPCLConfig
from .losses import WPCLState, check_objective, objective


class VLM2Rec(nn.Module):
    def __init__(self, cfg: BackboneConfig, catalog: Catalog, device: torch.device, loss: LossConfig,
                 wpcl: WPCLConfig, crtr: CRTRConfig, embedder: nn.Module | None = None):
        super().__init__()
        if not set(cfg.modalities) <= {"text", "image"} or not cfg.modalities:
            raise ValueError(f"backbone.modalities must be a non-empty subset of [text, image], got {cfg.modalities}")
        if cfg.fusion == "internal_interleave" and not cfg.internal_branch_passes and (wpcl.enabled or crtr.enabled):
            raise ValueError("wpcl/crtr need backbone.internal_branch_passes=true under internal fusion (§6)")
        check_objective(wpcl, crtr, cfg.modalities)
        self.cfg, self.loss_cfg, self.wpcl, self.crtr = cfg, loss, wpcl, crtr
        # `embedder` lets a caller pass a pre-built one (bench.py's randomly initialised 3B-sized model).
        self.embedder = embedder if embedder is not None else BACKBONES[cfg.name](cfg, catalog, device)
        # log(1/tau) as a parameter only when learnt; otherwise a fixed buffer (§7).
        log_scale = torch.tensor(math.log(1.0 / loss.temperature), device=device)
        if loss.learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.wpcl_state = WPCLState()

    @property
    def tau(self) -> torch.Tensor:
        return torch.exp(-self.log_scale)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.cfg.normalize else x

    def branches(self, side: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-modality embeddings of one side ('hist' or 'item'): {"text": [B, d], "image": [B, d]}."""
        return {m: self._unit(self.embedder.branch(f"{side}_{m}", ids)) for m in self.cfg.modalities}

    def fuse(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        fused = sum(parts.values())
        return F.normalize(fused, dim=-1) if self.cfg.score == "cos" else fused

    def joint(self, side: str, ids: torch.Tensor, drop: str | None = None) -> torch.Tensor:
        """Internal fusion: one interleaved pass; `drop` deletes one modality's tokens (§6)."""
        return self._joint_out(self.embedder.branch(f"{side}_joint", ids, drop=drop))

    def _joint_out(self, pooled: torch.Tensor) -> torch.Tensor:
        out = self._unit(pooled)
        return F.normalize(out, dim=-1) if self.cfg.score == "cos" else out

    def passes(self, negatives: bool) -> list[tuple[str, str]]:
        """(source, what) of every embedder pass `forward` makes on a training batch: source is the batch key
        whose ids it encodes (history, target, negatives), what the embedder branch. A DataLoader worker
        prepares exactly these (train.PreparedLoader)."""
        internal = self.cfg.fusion == "internal_interleave"
        out = []
        if not internal or self.cfg.internal_branch_passes:
            out += [(source, f"{side}_{m}") for source, side in (("history", "hist"), ("target", "item"))
                    for m in self.cfg.modalities]
        if internal:
            out += [("history", "hist_joint"), ("target", "item_joint")]
        if negatives:
            out += [("negatives", "item_joint")] if internal else [("negatives", f"item_{m}") for m in self.cfg.modalities]
        return out

    def _pass(self, batch: dict, source: str, what: str) -> torch.Tensor:
        """One embedder pass of `forward` over batch[source] (negatives flattened): from the inputs a
        DataLoader worker prepared when the batch carries them ("prepared", keyed source:what), else live."""
        if "prepared" in batch:
            return self.embedder(batch["prepared"][f"{source}:{what}"])
        ids = batch[source].reshape(-1) if source == "negatives" else batch[source]
        return self.embedder.branch(what, ids)

    def encode(self, side: str, ids: torch.Tensor, modes: tuple[str, ...] = MODES) -> dict[str, torch.Tensor]:
        """Embeddings per modality mode. External: text/image are the exact branches (§6)."""
        usable = [m for m in modes if m == "both" or m in self.cfg.modalities]
        if self.cfg.fusion == "internal_interleave":
            drops = {"both": None, "text": "image", "image": "text"}
            return {m: self.joint(side, ids, drops[m]) for m in usable}
        parts = self.branches(side, ids)
        out = {m: parts[m] for m in usable if m != "both"}
        if "both" in usable:
            out["both"] = self.fuse(parts)
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        """Total loss, its logged parts, and the raw pooled branch outputs (for per-branch gradient norms).

        The gradient norms are read on the pooled outputs *before* L2 normalisation: after it, both
        addends of the external sum receive the identical gradient, so their ratio would always be 1.
        """
        # An embedder that encodes items live (the tuned two-tower) encodes the batch's unique items once.
        scope = getattr(self.embedder, "batch_items", None)
        with scope(batch["history"], batch["target"], batch.get("negatives")) if scope else contextlib.nullcontext():
            return self._forward(batch)

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        target = batch["target"]
        internal = self.cfg.fusion == "internal_interleave"
        raw: dict[str, torch.Tensor] = {}
        if not internal or self.cfg.internal_branch_passes:    # else no unimodal passes (no WPCL/CRTR)
            for prefix, side, source in (("u", "hist", "history"), ("e", "item", "target")):
                for m in self.cfg.modalities:
                    raw[f"{prefix}_{m}"] = self._pass(batch, source, f"{side}_{m}")
        named = {key: self._unit(value) for key, value in raw.items()}
        if internal:
            u = self._joint_out(self._pass(batch, "history", "hist_joint"))
            e = self._joint_out(self._pass(batch, "target", "item_joint"))
        else:
            u = self.fuse({m: named[f"u_{m}"] for m in self.cfg.modalities})
            e = self.fuse({m: named[f"e_{m}"] for m in self.cfg.modalities})
        e_neg = negs = None
        if "negatives" in batch:                                            # mined hard negatives (B, k)
            negs = batch["negatives"].reshape(-1)                           # shared by every row: (B*k,)
            e_neg = self._joint_out(self._pass(batch, "negatives", "item_joint")) if internal else self.fuse(
                {m: self._unit(self._pass(batch, "negatives", f"item_{m}")) for m in self.cfg.modalities})
        if parallel.world() > 1:
            # Several processes: every rank's rows, in rank order, so that each computes the global objective
            # (in-batch negatives, WPCL's statistics, CRTR's topology) with gradients to its own rows.
            counts = parallel.row_counts(len(target))
            named = {key: parallel.gather(value, counts) for key, value in named.items()}
            u, e, target = parallel.gather(u, counts), parallel.gather(e, counts), parallel.gather(target, counts)
            if negs is not None:
                k = len(negs) // counts[parallel.rank()]
                e_neg = parallel.gather(e_neg, [n * k for n in counts])
                negs = parallel.gather(negs, [n * k for n in counts])
        fused_logits = u @ e.T / self.tau                                   # (B, B) s_bk
        extra_logits = extra_mask = None
        if negs is not None:
            extra_logits = u @ e_neg.T / self.tau                           # (B, B*k)
            extra_mask = negs.view(1, -1) == target.view(-1, 1)             # a row's own target is no negative
        total, stats = objective(named, target, fused_logits, self.tau, self.loss_cfg, self.wpcl, self.crtr,
                                 self.wpcl_state, extra_logits, extra_mask)
        return total, stats, raw

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(batch)[0]

    @torch.no_grad()
    def item_table(self, num_items: int, mode: str = "both", batch_size: int = 64) -> torch.Tensor:
        """[I+1, d] item embeddings in one modality mode; row 0 (padding) is zero."""
        device = self.log_scale.device
        rows = [self.encode("item", torch.arange(s, min(s + batch_size, num_items + 1), device=device), (mode,))[mode]
                for s in range(1, num_items + 1, batch_size)]
        table = torch.cat(rows)
        return torch.cat([torch.zeros(1, table.shape[1], device=device), table])

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor], mode: str = "both") -> torch.Tensor:
        """[B, I+1] scores of every item for each history; the padding column is -inf."""
        num_items = len(self.embedder.catalog.titles) - 1
        users = self.encode("hist", batch["history"], (mode,))[mode]
        scores = users @ self.item_table(num_items, mode).T
        scores[:, 0] = float("-inf")
        return scores

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trained weights (LoRA, projections, pooling): never the pretrained base (§5.4)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().clone() for n, t in self.state_dict().items() if n in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        if set(state) != expected:
            raise ValueError(f"checkpoint weights differ from the model's trainable weights: "
                             f"missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
        self.load_state_dict(state, strict=False)
