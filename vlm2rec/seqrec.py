"""SASRec initialised from VLM item embeddings (§12): the second downstream use of VLM2Rec.

`fit_seqrec(cfg, split, item_emb, negs, eval_cfg, seed)` trains SASRec on the same leave-one-out
training pairs, selects on validation (full ranking NDCG@10), and scores test once under both protocols.
Item-table initialisation (`seqrec.init`): random (ID-only baseline) | pca | frozen_adapter.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.runs import check_finite
from common.selection import Selection

from .config import EvalConfig, SeqRecConfig
from .evaluate import score_protocols


# Adapted from flame/model.py::SASRec; kept in step by tests/common/test_copies.py (Q12). Post-LN blocks, a finite
# additive mask (a -inf mask would turn all-padding rows into NaN), learned positions, tied output
# embedding, full softmax. The adaptation: one fused QKV projection, PyTorch's LayerNorm epsilon.
class SASRecBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln_att, self.ln_ffn = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ffn_in, self.ffn_out = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(C // self.heads) + mask                      # (B, nh, T, T)
        context = (self.dropout(scores.softmax(dim=-1)) @ v).transpose(1, 2).reshape(B, T, C)
        x = self.ln_att(x + self.dropout(self.out(context)))
        return self.ln_ffn(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class SASRec(nn.Module):
    def __init__(self, cfg: SeqRecConfig, num_items: int, max_len: int, item_emb: torch.Tensor | None):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.ln_emb = nn.LayerNorm(hidden)
        self.blocks = nn.ModuleList(SASRecBlock(hidden, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.adapter = None
        self.apply(self._init_weights)
        if cfg.init == "pca":
            self.item_emb.weight.data[1:] = pca_init(item_emb[1:], hidden)
        elif cfg.init == "frozen_adapter":
            # LLM2Rec / LLMEmb style: the VLM table stays frozen behind a small trainable adapter.
            self.register_buffer("frozen", item_emb.float().clone())
            dim = item_emb.shape[1]
            layers = [nn.Linear(dim, hidden)] if cfg.adapter_layers == 1 else \
                [nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)]
            self.adapter = nn.Sequential(*layers)
        elif cfg.init != "random":
            raise ValueError(f"seqrec.init must be random, pca or frozen_adapter, got {cfg.init!r}")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def items(self) -> torch.Tensor:
        return self.adapter(self.frozen) if self.adapter is not None else self.item_emb.weight    # (I+1, C)

    def user(self, seq: torch.Tensor) -> torch.Tensor:
        """Representation at the last position of left-padded sequences [B, L] -> [B, C]."""
        table = self.items()
        x = self.dropout(self.ln_emb(table[seq] + self.pos_emb.weight[: seq.shape[1]]))
        valid = seq > 0
        causal = torch.tril(torch.ones(seq.shape[1], seq.shape[1], dtype=torch.bool, device=seq.device))
        allowed = valid[:, None, :, None] & valid[:, None, None, :] & causal
        mask = (~allowed).float() * -10000.0                                                  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, mask)
        return x[:, -1]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.user(batch["history"]) @ self.items()[1:].T                             # full softmax
        return F.cross_entropy(logits, batch["target"] - 1)

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = self.user(batch["history"]) @ self.items().T
        scores[:, 0] = float("-inf")
        return scores


def pca_init(emb: torch.Tensor, hidden: int) -> torch.Tensor:
    """Top principal components of the VLM table, rescaled to the default init's std (0.02)."""
    centred = emb.double() - emb.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(hidden, vh.shape[0])
    projected = centred @ vh[:k].T
    if k < hidden:                                  # fewer components than the hidden size: pad with zeros
        projected = torch.cat([projected, projected.new_zeros(len(projected), hidden - k)], dim=1)
    return (projected / projected.std().clamp_min(1e-12) * 0.02).float()


@torch.no_grad()
def _embed_users(model: SASRec, history: np.ndarray, device: torch.device) -> torch.Tensor:
    model.eval()
    out = [model.user(torch.as_tensor(history[s:s + 1024], device=device)) for s in range(0, len(history), 1024)]
    return torch.cat(out).cpu()


def evaluate_seqrec(model: SASRec, split_data: dict, negs: np.ndarray, cfg: EvalConfig, device) -> dict:
    users = _embed_users(model, split_data["history"], device)
    with torch.no_grad():
        items = model.items().detach().cpu()
    return score_protocols(users, items, split_data, negs, cfg)


def fit_seqrec(cfg: SeqRecConfig, split: dict, item_emb: torch.Tensor | None, negs: dict[str, np.ndarray],
               eval_cfg: EvalConfig, seed: int, device: torch.device, log=print) -> dict:
    """Train with early stopping on validation (full NDCG@10), then score test once at the best epoch."""
    torch.manual_seed(seed)
    num_items = int(max(split["train"]["target"].max(), split["test"]["target"].max(),
                        split["valid"]["target"].max())) if item_emb is None else item_emb.shape[0] - 1
    model = SASRec(cfg, num_items, split["train"]["history"].shape[1], item_emb).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    history, target = split["train"]["history"], split["train"]["target"]
    select, best_state = Selection(patience=cfg.patience), None
    for epoch in range(cfg.max_epochs):
        model.train()
        order = np.random.default_rng([seed, epoch, 5]).permutation(len(target))   # scoped shuffling
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            batch = {"history": torch.as_tensor(history[idx], device=device),
                     "target": torch.as_tensor(target[idx], device=device)}
            loss = model.loss(batch)
            check_finite(loss, f"seqrec epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        valid = evaluate_seqrec(model, split["valid"], negs["valid"], eval_cfg, device)
        score = valid["full"]["NDCG@10"] if "full" in valid else valid["sampled"]["NDCG@10"]
        if select.update(score, epoch):
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if select.should_stop:
            break
    log(f"seqrec[{cfg.init}] best epoch {select.best_at} valid NDCG@10 {select.best:.4f}")
    model.load_state_dict(best_state)
    test = evaluate_seqrec(model, split["test"], negs["test"], eval_cfg, device)
    return {"init": cfg.init, "best_epoch": select.best_at, "valid_select": select.best, "test": test}
