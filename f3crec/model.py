"""F3CRec backbones (§4): FedMF, FedNCF and PFedRec as functions of a client's private state.

All three scores are affine in the item vector: s(u, i) = a_u · q_i + c_u, where (a_u, c_u) come from the
private parameters Φ_u (FedMF: a = p_u, c = 0; FedNCF: Linear(2d→1)([p_u; q_i]) splits into
a = w[d:], c = w[:d]·p_u + b; PFedRec: a = w, c = b). `BACKBONES` holds one `Backbone` per network: its
private shapes, head, learning-rate rule, optimiser sub-steps, `affine` (private tensors with any leading
batch shape, so per-client and batched code share one formula), init and quirks.

The private states and tables are torch tensors, or numpy arrays for the compiled simulator (which never
imports torch: this module imports it only where a tensor is made). One client's torch model, `LocalModel`,
is the reference simulator's (sim_reference.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .arrays import zeros

Private = dict   # name -> torch.Tensor or numpy array


def _affine_fedmf(private: Private) -> tuple:
    p = private["p"]
    return p, zeros(p, tuple(p.shape[:-1]))


def _affine_fedncf(private: Private) -> tuple:
    w, b = private["w"], private["b"][..., 0]
    dim = w.shape[-1] // 2
    return w[..., dim:], (w[..., :dim] * private["p"]).sum(-1) + b


def _affine_pfedrec(private: Private) -> tuple:
    return private["w"], private["b"][..., 0]


@dataclass(frozen=True)
class Backbone:
    """One row of the §4 table: everything the simulators need to know about a network."""
    name: str
    private_dims: dict[str, tuple[int, int]]   # Φ_u tensor -> shape as (multiple of d, constant): d·m + c
    head_names: tuple[str, ...]                # private tensors of the score head (lr = `lr`)
    user_lr_eta: bool                          # p_u's lr is lr·η (else lr)
    item_lr_eta: bool                          # Q's lr is lr·|I^t|·η (else lr·|I^t|)
    substeps: tuple[tuple[str, ...], ...]      # tensors each optimiser sub-step updates, with L recomputed
    affine: Callable[[Private], tuple]          # Φ (any leading shape) -> (a, c), tensors or numpy arrays
    reference_std: float                       # std of item rows and p_u under `emb_init: reference` (Q3)
    head_fan_in: int                           # fan-in of the head as a multiple of d (U(±1/√fan_in) init)
    round0_reset: bool                         # the round-0 private reset applies (Q2)
    fidelity_handoff: str                      # hand-off under fidelity (Q1): 'last' or 'best'

    def private_shapes(self, dim: int) -> dict[str, tuple[int, ...]]:
        """Shape of each private tensor Φ_u of one client."""
        return {name: (m * dim + c,) for name, (m, c) in self.private_dims.items()}

    def learning_rates(self, lr: float, lr_eta: float, n_items: int) -> dict[str, float]:
        """Per-tensor SGD learning rates: the item lr grows with the cumulative catalogue |I^t| (§4)."""
        rates = {name: lr for name in self.head_names}
        rates["Q"] = lr * n_items * lr_eta if self.item_lr_eta else lr * n_items
        if "p" in self.private_dims:
            rates["p"] = lr * lr_eta if self.user_lr_eta else lr
        return rates


# PFedRec steps the head, then Q with L recomputed. The reference's third, KD-only PFedRec step changes no
# parameter (its gradient reaches only the head, which is not stepped), so it is omitted [D] (§16.6).
BACKBONES: dict[str, Backbone] = {
    "fedmf": Backbone("fedmf", {"p": (1, 0)}, (), user_lr_eta=False, item_lr_eta=False,
                      substeps=(("p", "Q"),), affine=_affine_fedmf, reference_std=0.01, head_fan_in=0,
                      round0_reset=False, fidelity_handoff="last"),
    "fedncf": Backbone("fedncf", {"p": (1, 0), "w": (2, 0), "b": (0, 1)}, ("w", "b"), user_lr_eta=True,
                       item_lr_eta=True, substeps=(("p", "w", "b", "Q"),), affine=_affine_fedncf,
                       reference_std=1.0, head_fan_in=2, round0_reset=True, fidelity_handoff="best"),
    "pfedrec": Backbone("pfedrec", {"w": (1, 0), "b": (0, 1)}, ("w", "b"), user_lr_eta=False, item_lr_eta=True,
                        substeps=(("w", "b"), ("Q",)), affine=_affine_pfedrec, reference_std=1.0,
                        head_fan_in=1, round0_reset=True, fidelity_handoff="best"),
}


def learning_rates(cfg, n_items: int) -> dict[str, float]:
    """The configured backbone's learning rates for a catalogue of `n_items` (§4)."""
    return BACKBONES[cfg.name].learning_rates(cfg.lr, cfg.lr_eta, n_items)


def item_std(net: Backbone, emb_init: str) -> float:
    """Std of item rows and of p_u: FedMF inits at N(0, 0.01²); the others keep PyTorch's N(0, 1) [Q3]."""
    return 0.01 if emb_init == "small" else net.reference_std


def _as_dtype(values: np.ndarray, cfg, tensor: bool):
    """float64 draws in the configured dtype (numpy's and torch's float64 -> float32 round alike)."""
    values = values.astype(np.float64 if cfg.dtype == "float64" else np.float32)
    if not tensor:
        return values
    import torch
    return torch.from_numpy(values)


def init_items(cfg, emb_init: str, seed: int, block: int, count: int, tensor: bool = True):
    """Rows appended for the items first seen in `block` (§8.1), drawn from a (seed, block) stream; a torch
    tensor, or a numpy array with tensor=False."""
    rng = np.random.default_rng([seed, 101, block])
    rows = rng.normal(0.0, item_std(BACKBONES[cfg.name], emb_init), size=(count, cfg.dim))
    return _as_dtype(rows, cfg, tensor)


def init_private(cfg, emb_init: str, seed: int, user: int, tensor: bool = True) -> Private:
    """Φ_u of a new client; user = -1 gives the shared start-up values used by the round-0 reset (Q2).

    The head follows PyTorch's Linear default U(±1/√fan_in) for weight and bias (§4). Tensors, or numpy
    arrays with tensor=False.
    """
    return {name: _as_dtype(values, cfg, tensor) for name, values in _private_draws(cfg, emb_init, seed, user)}


def _private_draws(cfg, emb_init: str, seed: int, user: int):
    """(name, float64 values) of Φ_u in draw order, from the user's own stream: p ~ N(0, item_std), the head
    ~ U(±1/√fan_in)."""
    net = BACKBONES[cfg.name]
    rng = np.random.default_rng([seed, 102, user + 1])
    for name, shape in net.private_shapes(cfg.dim).items():
        if name == "p":
            yield name, rng.normal(0.0, item_std(net, emb_init), size=shape)
        else:
            bound = 1.0 / math.sqrt(net.head_fan_in * cfg.dim)
            yield name, rng.uniform(-bound, bound, size=shape)


def init_private_rows(cfg, emb_init: str, seed: int, users: range, tensor: bool = True) -> Private | None:
    """Φ_u of the new clients `users` stacked (len(users), ...): row i is init_private(..., users[i]) bit for
    bit (each user's own stream, drawn in float64, the stack converted once), without the per-user
    dictionaries and conversions (a base block makes 943 on ML-100K). None when `users` is empty."""
    if len(users) == 0:
        return None
    shapes = BACKBONES[cfg.name].private_shapes(cfg.dim)
    out = {name: np.empty((len(users), *shape)) for name, shape in shapes.items()}
    for row, user in enumerate(users):
        for name, values in _private_draws(cfg, emb_init, seed, user):
            out[name][row] = values
    return {name: _as_dtype(values, cfg, tensor) for name, values in out.items()}


def sgd_step(params: dict, names: tuple[str, ...], grads, lrs: dict[str, float]) -> None:
    """Plain SGD (§4): params[name] -= lr[name]·grad, in place, for the tensors of one sub-step."""
    import torch
    with torch.no_grad():
        for name, grad in zip(names, grads):
            if grad is not None:
                params[name].add_(grad, alpha=-lrs[name])


def score_matrix(net: Backbone, private: Private, items):
    """Scores (U, I) of stacked private states (U, ...) against an item table (I, d)."""
    a, c = net.affine(private)
    return a @ items.T + c[:, None]
