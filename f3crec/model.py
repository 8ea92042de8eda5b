"""F3CRec backbones (spec §4): FedMF, FedNCF and PFedRec as functions of a client's private state.

All three scores are affine in the item vector: s(u, i) = a_u · q_i + c_u, where (a_u, c_u) come from the
private parameters Φ_u (FedMF: a = p_u, c = 0; FedNCF: Linear(2d→1)([p_u; q_i]) splits into
a = w[d:], c = w[:d]·p_u + b; PFedRec: a = w, c = b). Both simulators use `affine` on private tensors
with any leading batch shape, so per-client and batched code share one formula.

`LocalModel` is one client's on-device model (its copy of the public item table + its private Φ_u),
with `loss(batch)` and `score_all()`; the per-client reference simulator trains it directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BACKBONES = ("fedmf", "fedncf", "pfedrec")


@dataclass
class ModelConfig:
    backbone: Literal["fedmf", "fedncf", "pfedrec"] = "fedmf"  # §4 table
    dim: int = 32                      # d, §9
    lr: float = 1.0                    # base SGD learning rate (README FedMF ML-100K value, §9)
    lr_eta: float = 170.0              # η: FedNCF/PFedRec item and user-vector lr multiplier (§4)
    emb_init: Literal["reference", "small"] = "reference"  # [Q] §4: N(0,1) for FedNCF/PFedRec; small=N(0,.01²)
    private_init_round0: Literal["shared", "own"] = "shared"  # [Q] §4 round-0 private reset (FedNCF, PFedRec)
    dtype: Literal["float32", "float64"] = "float32"   # float64 only for the exactness tests


def private_shapes(backbone: str, dim: int) -> dict[str, tuple[int, ...]]:
    """Shape of each private tensor Φ_u of one client (§4)."""
    return {"fedmf": {"p": (dim,)},
            "fedncf": {"p": (dim,), "w": (2 * dim,), "b": (1,)},
            "pfedrec": {"w": (dim,), "b": (1,)}}[backbone]


def head_names(backbone: str) -> tuple[str, ...]:
    """Private tensors that form the score head (lr = `lr`), as opposed to the user vector p."""
    return {"fedmf": (), "fedncf": ("w", "b"), "pfedrec": ("w", "b")}[backbone]


def learning_rates(cfg: ModelConfig, n_items: int) -> dict[str, float]:
    """Per-tensor SGD learning rates (§4): the item lr grows with the cumulative catalogue |I^t|."""
    if cfg.backbone == "fedmf":
        return {"p": cfg.lr, "Q": cfg.lr * n_items}
    rates = {"w": cfg.lr, "b": cfg.lr, "Q": cfg.lr * n_items * cfg.lr_eta}
    if cfg.backbone == "fedncf":
        rates["p"] = cfg.lr * cfg.lr_eta
    return rates


def substeps(backbone: str) -> list[tuple[str, ...]]:
    """Which tensors each optimiser sub-step updates (§4): PFedRec steps the head, then Q, with L recomputed.

    The reference's third, KD-only PFedRec step changes no parameter (its gradient reaches only the head,
    which is not stepped), so it is omitted [D] (§16.6).
    """
    if backbone == "pfedrec":
        return [("w", "b"), ("Q",)]
    return [tuple(private_shapes(backbone, 1)) + ("Q",)]


def item_std(cfg: ModelConfig) -> float:
    """Std of item rows and of p_u: FedMF inits at N(0, 0.01²); the others keep PyTorch's N(0, 1) [Q]."""
    return 0.01 if cfg.backbone == "fedmf" or cfg.emb_init == "small" else 1.0


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.float64 if cfg.dtype == "float64" else torch.float32


def init_items(cfg: ModelConfig, seed: int, block: int, count: int) -> torch.Tensor:
    """Rows appended for the items first seen in `block` (§8 step 1), drawn from a (seed, block) stream."""
    rng = np.random.default_rng([seed, 101, block])
    rows = rng.normal(0.0, item_std(cfg), size=(count, cfg.dim))
    return torch.from_numpy(rows).to(torch_dtype(cfg))


def init_private(cfg: ModelConfig, seed: int, user: int) -> dict[str, torch.Tensor]:
    """Φ_u of a new client; user = -1 gives the shared start-up values used by the round-0 reset.

    The head follows PyTorch's Linear default U(±1/√fan_in) for weight and bias (§4).
    """
    rng = np.random.default_rng([seed, 102, user + 1])
    out = {}
    for name, shape in private_shapes(cfg.backbone, cfg.dim).items():
        if name == "p":
            values = rng.normal(0.0, item_std(cfg), size=shape)
        else:
            fan_in = 2 * cfg.dim if cfg.backbone == "fedncf" else cfg.dim
            bound = 1.0 / math.sqrt(fan_in)
            values = rng.uniform(-bound, bound, size=shape)
        out[name] = torch.from_numpy(values).to(torch_dtype(cfg))
    return out


def affine(backbone: str, private: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [..., d], c [...]) with s(u, i) = a·q_i + c, for private tensors with any leading shape."""
    if backbone == "fedmf":
        p = private["p"]
        return p, torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
    w, b = private["w"], private["b"][..., 0]
    if backbone == "pfedrec":
        return w, b
    dim = w.shape[-1] // 2
    return w[..., dim:], (w[..., :dim] * private["p"]).sum(-1) + b


def score_matrix(backbone: str, private: dict[str, torch.Tensor], items: torch.Tensor) -> torch.Tensor:
    """Scores [U, I] of stacked private states [U, ...] against an item table [I, d]."""
    a, c = affine(backbone, private)
    return a @ items.T + c[:, None]


class LocalModel(nn.Module):
    """One client's model: a local copy of the public item table Q plus its private Φ_u."""

    def __init__(self, backbone: str, items: torch.Tensor, private: dict[str, torch.Tensor]):
        super().__init__()
        self.backbone = backbone
        self.items = nn.Parameter(items.detach().clone())                      # (I, d) local copy of Q
        self.private = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in private.items()})

    def params(self) -> dict[str, nn.Parameter]:
        """Tensors by the names `learning_rates` uses."""
        return {"Q": self.items, **dict(self.private)}

    def score_items(self, items: torch.Tensor) -> torch.Tensor:
        a, c = affine(self.backbone, dict(self.private))
        return (self.items[items] * a).sum(-1) + c                               # (B,)

    def score_all(self) -> torch.Tensor:
        a, c = affine(self.backbone, dict(self.private))
        return self.items @ a + c                                                # (I,)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_rec (§5): mean BCE-with-logits over the mini-batch; repeated items accumulate gradient."""
        logits = self.score_items(batch["items"])
        return F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="mean")
