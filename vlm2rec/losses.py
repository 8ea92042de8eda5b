"""Contrastive SFT objective of VLM2Rec: fused InfoNCE + WPCL (§8) + CRTR (§9).

    L = L_CL(fused) + wpcl.weight * L_WPCL + crtr.weight * L_CRTR            (§10)

`objective(branches, targets, ...)` takes the L2-normalised branch embeddings u^T, u^V, e^T, e^V
(and the fused u, e) of B (history, next item) pairs and returns the total loss plus the per-step
statistics the collapse diagnostics log (§11.3). Every WPCL/CRTR reading is a config key.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import CRTRConfig, LossConfig, WPCLConfig

MODALITIES = ("text", "image")


def duplicate_mask(targets: torch.Tensor) -> torch.Tensor:
    """[B, B] True where pair k's target equals pair b's target, off the diagonal (false negatives)."""
    same = targets.view(-1, 1) == targets.view(1, -1)
    return same & ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)


def info_nce(logits: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Spec §7: -log softmax(logits)_bb with masked (duplicate) columns removed from the denominator."""
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


def positive_prob(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """p_bb = softmax_k(logits_b.)_b per row (B,) (duplicates masked like the loss)."""
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return logits.softmax(dim=1).diagonal()


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, invalid: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows of 1/2 [KL(P_a || P_b) + KL(P_b || P_a)], P = softmax over the valid columns."""
    if invalid is not None:
        logits_a = logits_a.masked_fill(invalid, float("-inf"))
        logits_b = logits_b.masked_fill(invalid, float("-inf"))
    log_a, log_b = logits_a.log_softmax(dim=1), logits_b.log_softmax(dim=1)
    diff = log_a - log_b
    if invalid is not None:                       # -inf - -inf would be NaN: zero the invalid entries
        diff = diff.masked_fill(invalid, 0.0)
    pointwise = (log_a.exp() - log_b.exp()) * diff  # p_a(la-lb) + p_b(lb-la) = KL(a||b) + KL(b||a)
    return 0.5 * pointwise.sum(dim=1).mean()


def crtr_loss(branches: dict[str, torch.Tensor], cfg: CRTRConfig, tau: torch.Tensor, weak: int,
              dup: torch.Tensor | None) -> torch.Tensor:
    """Spec §9: align the text and image in-batch similarity distributions with a bidirectional KL."""
    tau_r = tau if cfg.temperature is None else cfg.temperature
    eye = torch.eye(branches["u_text"].shape[0], dtype=torch.bool, device=branches["u_text"].device)
    # topology -> (rows, columns, invalid columns): item-item and user-user drop the self-similarity
    pairs = {"user_item": ("u", "e", dup), "item_item": ("e", "e", eye), "user_user": ("u", "u", eye)}
    names = ["user_item", "item_item", "user_user"] if cfg.topology == "all" else [cfg.topology]
    total = 0.0
    for name in names:
        rows, cols, invalid = pairs[name]
        logits = [branches[f"{rows}_{m}"] @ branches[f"{cols}_{m}"].T / tau_r for m in MODALITIES]
        if cfg.stopgrad != "none":              # a teacher side: the strong (or weak) modality is detached
            detach = 1 - weak if cfg.stopgrad == "strong" else weak
            logits[detach] = logits[detach].detach()
        total = total + symmetric_kl(logits[0], logits[1], invalid)
    return total / len(names)


class WPCLState:
    """Step-to-step memory of WPCL (the EMA of the modality strengths c^m)."""

    def __init__(self):
        self.ema: torch.Tensor | None = None


def _strength(logits: torch.Tensor, dup: torch.Tensor | None, how: str) -> torch.Tensor:
    """Per-sample strength (B,) of one modality, detached (§8.2)."""
    with torch.no_grad():
        if how == "pos_prob":
            return positive_prob(logits, dup)
        return torch.exp(-info_nce(logits, dup, reduction="none"))   # exp(-l^m) keeps c in (0, 1]


def wpcl_terms(logits_m: list[torch.Tensor], cfg: WPCLConfig, dup: torch.Tensor | None,
               state: WPCLState) -> dict[str, torch.Tensor]:
    """Weak-modality detection and penalty (§8). Returns gamma/weak/rho and the WPCL loss term.

    The weak modality w has the lower strength c^w; rho = c^s / c^w >= 1 and gamma = 1 + alpha tanh(rho-1).
    """
    per_sample = torch.stack([_strength(logit, dup, cfg.strength) for logit in logits_m])   # (2, B)
    if cfg.granularity == "per_batch":
        strength = per_sample.mean(dim=1)                                                  # (2,)
        if cfg.ema > 0:
            state.ema = strength if state.ema is None else cfg.ema * state.ema + (1 - cfg.ema) * strength
            strength = state.ema
        weak = torch.argmin(strength).expand(per_sample.shape[1])                           # (B,)
        rho = (strength.max() / strength.min().clamp_min(1e-12)).expand(per_sample.shape[1])
    else:
        weak = torch.argmin(per_sample, dim=0)                                              # (B,) per user
        rho = per_sample.max(dim=0).values / per_sample.min(dim=0).values.clamp_min(1e-12)
    gamma = 1 + cfg.alpha * torch.tanh(rho - 1) if cfg.fixed_gamma is None else torch.full_like(rho, cfg.fixed_gamma)
    stacked = torch.stack(logits_m)                                                         # (2, B, B)
    rows = torch.arange(stacked.shape[1], device=stacked.device)
    weak_logits, strong_logits = stacked[weak, rows], stacked[1 - weak, rows]               # (B, B) each
    out = {"c_text": per_sample[0].mean(), "c_image": per_sample[1].mean(), "rho": rho.mean(),
           "gamma": gamma.mean(), "weak": weak.float().mean()}
    if cfg.variant == "neg_penalty":
        # Variant A: exp(s_bb) / (exp(s_bb) + gamma sum_{k!=b} exp(s_bk)) == CE after adding log(gamma)
        # to every off-diagonal weak logit (a margin of tau*log(gamma) in similarity units).
        eye = torch.eye(len(rows), dtype=torch.bool, device=stacked.device)
        penalised = weak_logits + torch.where(eye, 0.0, torch.log(gamma).view(-1, 1))
        out["loss"] = info_nce(penalised, dup)
    elif cfg.variant == "loss_reweight":
        # Variant B: sum_m omega_m l^m with omega_w = gamma, omega_s = strong_weight (per row).
        weak_loss = info_nce(weak_logits, dup, reduction="none")
        strong_loss = info_nce(strong_logits, dup, reduction="none")
        out["loss"] = (gamma * weak_loss + cfg.strong_weight * strong_loss).mean()
    else:   # variants C and D act on L_CL or on gradients; they add no separate term
        out["loss"] = torch.zeros((), device=stacked.device)
    out["weak_per_row"], out["gamma_per_row"], out["weak_logits"] = weak, gamma, weak_logits
    return out


def _scale_grad(tensor: torch.Tensor, scale: torch.Tensor) -> None:
    """Variant D: multiply the gradient reaching `tensor` by `scale` (the loss value is unchanged)."""
    if tensor.requires_grad:
        tensor.register_hook(lambda grad: grad * scale)


def modality_terms(branches: dict[str, torch.Tensor], tau: torch.Tensor, dup: torch.Tensor | None,
                   wpcl: WPCLConfig, state: WPCLState, stats: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per-modality logits s^m_bk = <u^m_b, e^m_k> / tau from the existing branch embeddings (§8.1), their
    logged losses and accuracies (§11.3), and the WPCL terms (§8); `stats` is filled in place."""
    logits_m = [branches[f"u_{m}"] @ branches[f"e_{m}"].T / tau for m in MODALITIES]
    for m, logit in zip(MODALITIES, logits_m):
        with torch.no_grad():
            stats[f"loss_{m}"] = float(info_nce(logit, dup))
            stats[f"acc_{m}"] = float((logit.argmax(dim=1) == torch.arange(len(logit), device=logit.device))
                                      .float().mean())
    terms = wpcl_terms(logits_m, wpcl, dup, state)
    stats.update({k: float(terms[k]) for k in ("c_text", "c_image", "rho", "gamma", "weak")})
    return terms


def objective(branches: dict[str, torch.Tensor], targets: torch.Tensor, fused_logits: torch.Tensor,
              tau: torch.Tensor, loss_cfg: LossConfig, wpcl: WPCLConfig, crtr: CRTRConfig,
              state: WPCLState, extra_logits: torch.Tensor | None = None,
              extra_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of §10 and its logged parts. `branches` holds u_/e_{text,image} when two
    modalities are used; `fused_logits` [B, B] is s_bk = score(u_b, e_k) / tau. Optional hard negatives
    add fused columns `extra_logits` [B, M] (True in `extra_mask` = the row's own target: removed) to
    L_CL only; WPCL and CRTR stay in-batch."""
    dup = duplicate_mask(targets) if loss_cfg.mask_duplicate_items else None
    stats: dict[str, float] = {}
    terms = None
    if "u_text" in branches and "u_image" in branches:
        terms = modality_terms(branches, tau, dup, wpcl, state, stats)
    if wpcl.enabled and wpcl.variant == "fused_neg_penalty":
        # Variant C: fused negative k of row b weighted by 1 + beta * sigmoid(s^w_bk) (detached weight).
        eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
        weight = 1 + wpcl.beta * torch.sigmoid(terms["weak_logits"].detach())
        fused_logits = fused_logits + torch.where(eye, 0.0, torch.log(weight))
    if extra_logits is None:
        loss_cl = info_nce(fused_logits, dup)
    else:
        in_batch = dup if dup is not None else torch.zeros_like(fused_logits, dtype=torch.bool)
        loss_cl = info_nce(torch.cat([fused_logits, extra_logits], 1), torch.cat([in_batch, extra_mask], 1))
    if loss_cfg.symmetric:
        loss_cl = 0.5 * (loss_cl + info_nce(fused_logits.T, dup.T if dup is not None else None))
    total = loss_cl
    stats["loss_cl"] = float(loss_cl.detach())
    if wpcl.enabled:
        if wpcl.variant == "grad_scale":
            # Variant D (OGM-GE style): damp the strong branch's gradient when rho > 1.
            weak = int(terms["weak_per_row"][0])
            rho = terms["rho"].detach()
            scale = torch.where(rho > 1, 1 - torch.tanh(wpcl.alpha * rho), torch.ones_like(rho))
            for side in ("u", "e"):
                _scale_grad(branches[f"{side}_{MODALITIES[1 - weak]}"], scale)
            stats["grad_scale"] = float(scale)
        total = total + wpcl.weight * terms["loss"]
        stats["loss_wpcl"] = float(terms["loss"].detach())
    if crtr.enabled:
        weak = int(terms["weak_per_row"].float().mean().round())
        loss_crtr = crtr_loss(branches, crtr, tau, weak, dup)
        total = total + crtr.weight * loss_crtr
        stats["loss_crtr"] = float(loss_crtr.detach())
    stats["loss"] = float(total.detach())
    return total, stats


def check_objective(wpcl: WPCLConfig, crtr: CRTRConfig, modalities: list[str]) -> None:
    """WPCL and CRTR need both modalities' branch embeddings (§6, §10)."""
    if (wpcl.enabled or crtr.enabled) and sorted(modalities) != sorted(MODALITIES):
        raise ValueError(f"wpcl/crtr need backbone.modalities = [text, image], got {modalities}: "
                         "disable them for unimodal SFT")
    if wpcl.granularity == "per_sample" and wpcl.variant == "grad_scale":
        raise ValueError("wpcl.variant=grad_scale needs wpcl.granularity=per_batch (one strong branch per batch)")
    if wpcl.fixed_gamma is not None and wpcl.fixed_gamma < 1:
        raise ValueError(f"wpcl.fixed_gamma must be >= 1, got {wpcl.fixed_gamma}")
    if not math.isfinite(wpcl.alpha) or wpcl.alpha < 0:
        raise ValueError(f"wpcl.alpha must be >= 0, got {wpcl.alpha}")
