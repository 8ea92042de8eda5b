"""FLAME's modular ensemble and guided mutual learning (§7, §8), the mutual baseline B3 (§11), and
`build_model`, the network of each method.

Two SASRecs (learnable "l" and frozen "f") are cut into M stages. A path takes each stage from either
network, so there are 2^M paths, named by a string over {l, f} in stage order ("fl" = frozen
embedding, learnable encoder). The paths are computed as a tree (§8): after stage s there are up to
2^s streams, and each network's stage s+1 runs on every stream that one of the kept paths sends
through it. With `path_mixing=tiled` those streams are concatenated along the sequence axis under a
tiled mask, which for M=2 is exactly the reference's 4-path construction (§7.1).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, FlameConfig
from .model import AveragedLogits, SASRec, load_frozen


def path_order(num_stages: int) -> list[str]:
    """All 2^M path names in the reference's order: sorted by the reversed name, l before f.

    For M=2 this is (ll, fl, lf, ff), so itertools.combinations gives the six pairs of §7.3.
    """
    names = ["".join(p) for p in itertools.product("lf", repeat=num_stages)]
    return sorted(names, key=_reference_rank)


def _reference_rank(name: str) -> str:
    """Sort key of a path or prefix: the last stage varies slowest, l before f."""
    return name[::-1].replace("l", "0").replace("f", "1")


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float, normalize: bool = False) -> torch.Tensor:
    """NT-Xent of §7.3: S=[A;B], G=SS^T/τ with a -10000 diagonal, positive of row k is its twin."""
    return _nt_xent_batched(a[None], b[None], tau, normalize)[0]


def _nt_xent_batched(a: torch.Tensor, b: torch.Tensor, tau: float, normalize: bool) -> torch.Tensor:
    """NT-Xent of K pairs at once: a, b (K, n, d) -> (K,), each the mean over its 2n rows, computed as
    one batched problem (pair k's numbers do not depend on the other pairs)."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    k, n = a.shape[0], a.shape[1]
    s = torch.cat([a, b], dim=1)  # (K, 2n, d): S = [A; B] per pair
    g = torch.bmm(s, s.transpose(1, 2)) / tau  # raw dot products by default (quirk 6)
    g = g.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=g.device), -10000.0)
    # Labels are built on the device: no host-to-device copy, so no host sync inside a step.
    positive = torch.arange(2 * n, device=g.device).add_(n).remainder_(2 * n)  # row r's twin: r+n mod 2n
    per_row = F.cross_entropy(g.reshape(k * 2 * n, 2 * n), positive.repeat(k), reduction="none")
    return per_row.view(k, 2 * n).mean(1)


def weighted_contrastive(paths: dict[str, torch.Tensor], tau: float, normalize: bool = False,
                         detach_weights: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_wcl = Σ α_ab NTX_ab over all path pairs; α = softmax(-mean <A_k, B_k>) (§7.3).

    Less similar pairs get more weight. α is not detached unless asked (quirk 6).
    Returns the loss and the detached α per pair, keyed "a-b".
    All pairs go through one batched NT-Xent (the same numbers as `nt_xent` per pair).
    """
    pairs = list(itertools.combinations(paths, 2))
    a = torch.stack([paths[x] for x, _ in pairs])  # (K, b, d)
    b = torch.stack([paths[y] for _, y in pairs])
    logits = -(a * b).sum(-1).mean(-1)  # (K,) mean dot product of the twins, no τ here
    alpha = torch.softmax(logits, dim=0)
    if detach_weights:
        alpha = alpha.detach()
    ntx = _nt_xent_batched(a, b, tau, normalize)
    named = {f"{x}-{y}": w.detach() for (x, y), w in zip(pairs, alpha)}
    return (alpha * ntx).sum(), named


def num_stages(net: SASRec, split: str) -> int:
    return 2 if split == "embed_encoder" else 1 + net.cfg.blocks


def run_stage(net: SASRec, split: str, stage: int, x: torch.Tensor, mask: torch.Tensor,
              rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stage ≥ 1 of a network: the whole encoder (embed_encoder) or one block (per_block). rows: on the
    last stage, the rows that are read (each stream's last index): only those are computed (§10.1)."""
    encoder = net.seq_encoder
    if split == "embed_encoder":
        return encoder(x, mask, rows)
    if rows is None:
        return encoder.block(stage - 1, x, mask)
    return encoder.block(stage - 1, x, mask, rows) if encoder.read_rows else encoder.block(stage - 1, x, mask)[:, rows]


class FLAME(nn.Module):
    """Learnable SASRec + a second SASRec, trained with L_rec + λ(e) L_wcl (§7); inference = learnable.

    mutual=False: FLAME, the second network is frozen (no grads, never updated, §7.2).
    mutual=True: baseline B3, the second network is trainable and gets its own L_rec (§11); with
    ml_loss="kl" the path loss is replaced by classic deep mutual learning (KL to the detached peer).
    batch: "seq" (B, L), "target" (B,), "lam" (λ of the current epoch: a float, or a 0-d tensor) and
    optionally "paths" (the paths to run). The loss is computed in two halves, row_terms (per-row terms
    and path outputs) then pair_terms + total, so that data parallelism (flame/parallel.py::loss_terms)
    can scale the terms and all-gather the path outputs between them.
    """

    def __init__(self, learnable: SASRec, other: SASRec, cfg: FlameConfig, mutual: bool = False,
                 ml_loss: str = "wcl"):
        super().__init__()
        self.learnable = learnable
        self.frozen = other  # named after its FLAME role; trainable when mutual
        self.cfg = cfg
        self.mutual = mutual
        self.ml_loss = ml_loss
        if not mutual:
            self.frozen.requires_grad_(False)
        self.stages = num_stages(learnable, cfg.split)
        self.all_paths = path_order(self.stages)
        if cfg.num_paths and not 2 <= cfg.num_paths <= len(self.all_paths):
            raise ValueError(f"flame.num_paths={cfg.num_paths}: need 0 (all) or 2..{len(self.all_paths)}")

    def train(self, mode: bool = True) -> "FLAME":
        super().train(mode)
        if mode and not self.mutual and self.cfg.frozen_mode == "eval":
            self.frozen.eval()  # ablation of quirk 4; the reference keeps the frozen net in train mode
        return self

    def sample_paths(self) -> list[str]:
        """The paths used this step: all of them, or num_paths drawn uniformly (kept in order)."""
        if not self.cfg.num_paths or self.cfg.num_paths == len(self.all_paths):
            return self.all_paths
        keep = torch.randperm(len(self.all_paths))[: self.cfg.num_paths].sort().values
        return [self.all_paths[i] for i in keep.tolist()]

    def path_outputs(self, seq: torch.Tensor, paths: list[str],
                     base_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Last-position output of every requested path, computed as a tree (§7.1, §8)."""
        nets = {"l": self.learnable, "f": self.frozen}
        if base_mask is None:
            base_mask = self.learnable.mask(seq)  # (B, 1, L, L)
        B, L = seq.shape
        # Stage 0: each network embeds the raw sequence on its own (E_l, E_f of §7.1 step 2).
        streams = {n: nets[n].embed(seq) for n in sorted({p[0] for p in paths}, key="lf".index)}
        tiled_masks: dict[int, torch.Tensor] = {}  # k -> the k x k tiled mask, built once per step
        for stage in range(1, self.stages):
            needed = {p[: stage + 1] for p in paths}
            for n in "lf":
                # Parents in reference order (E_l before E_f, §7.1 step 3).
                parents = sorted({q[:stage] for q in needed if q[stage] == n}, key=_reference_rank)
                if not parents:
                    continue
                k = len(parents)
                last = stage == self.stages - 1  # only each stream's last index is read after it
                if self.cfg.path_mixing == "tiled":
                    x = torch.cat([streams[q] for q in parents], dim=1)  # (B, kL, d)
                    if k not in tiled_masks:
                        tiled_masks[k] = base_mask.repeat(1, 1, k, k)  # tiled k x k (§7.1 step 4)
                    mask = tiled_masks[k]
                    rows = nets[n].seq_encoder.last_rows(k, L, seq.device) if last else None
                    y = run_stage(nets[n], self.cfg.split, stage, x, mask, rows).split(1 if last else L, dim=1)
                else:  # independent streams along the batch axis, plain mask (§8)
                    x = torch.cat([streams[q] for q in parents], dim=0)  # (kB, L, d)
                    rows = nets[n].seq_encoder.last_rows(1, L, seq.device) if last else None
                    y = run_stage(nets[n], self.cfg.split, stage, x, base_mask.repeat(k, 1, 1, 1), rows)
                    y = y.split(B, dim=0)
                for q, out in zip(parents, y):
                    streams[q + n] = out
        return {p: streams[p][:, -1] for p in paths}  # (B, d) each: the last index of its stream

    def loss_terms(self, batch: dict, skip_paths: Optional[bool] = None) -> dict[str, torch.Tensor]:
        """The paper's loss of one batch from its inputs alone: L_rec (+ B3's terms) + λ L_wcl (§7, §11).
        skip_paths: leave the paths (L_wcl, α) out, the caller's decision; None: only when λ is the float 0
        (a tensor λ is never read on the host, so the paths are computed: CUDA graphs pass their own)."""
        lam = batch.get("lam", 1.0)
        if skip_paths is None:
            skip_paths = not torch.is_tensor(lam) and float(lam) == 0.0
        terms, z = self.row_terms(batch["seq"], batch["target"], skip_paths, batch.get("paths"))
        if z is not None:
            terms.update(self.pair_terms(z))
        return self.total(terms, lam)

    def row_terms(self, seq: torch.Tensor, target: torch.Tensor, skip_paths: bool,
                  paths: Optional[list[str]] = None) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
        """First half of the loss: the per-row terms (means over these rows: L_rec; B3's L_rec of the
        other network and its KL) and the path outputs (None when skipped or under ml_loss=kl).
        paths: the paths to run (None: sample_paths())."""
        mask = self.learnable.mask(seq)  # (B, 1, L, L), used by every pass below
        logits = self.learnable.logits(self.learnable(seq, mask))  # h: the only input of L_rec (§7.1 step 1)
        terms = {"rec": F.cross_entropy(logits, target - 1)}
        if self.mutual:
            logits_b = self.frozen.logits(self.frozen(seq, mask))
            terms["rec_b"] = F.cross_entropy(logits_b, target - 1)
            if self.ml_loss == "kl":  # deep mutual learning: KL(p_other || p_self), p_other detached
                log_a, log_b = F.log_softmax(logits, -1), F.log_softmax(logits_b, -1)
                terms["kl"] = (F.kl_div(log_a, log_b.detach(), log_target=True, reduction="batchmean")
                               + F.kl_div(log_b, log_a.detach(), log_target=True, reduction="batchmean"))
                return terms, None
        if skip_paths:  # λ0 = 0 skips the paths entirely (behaves like B1, §11)
            return terms, None
        return terms, self.path_outputs(seq, paths or self.sample_paths(), mask)

    def pair_terms(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Second half: L_wcl and the detached α per pair (§7.3) of the path outputs z (possibly gathered
        over the ranks: flame/parallel.py)."""
        wcl, alpha = weighted_contrastive(z, self.cfg.tau, self.cfg.cl_normalize, self.cfg.detach_pair_weights)
        return {"wcl": wcl, **{f"alpha/{k}": v for k, v in alpha.items()}}

    @staticmethod
    def total(terms: dict[str, torch.Tensor], lam: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms with "loss" added: L_rec (+ L_rec_b + KL) + λ L_wcl, summed in that order."""
        loss = terms["rec"]
        for key in ("rec_b", "kl"):
            if key in terms:
                loss = loss + terms[key]
        if "wcl" in terms:
            loss = loss + (lam if torch.is_tensor(lam) else float(lam)) * terms["wcl"]
        return {**terms, "loss": loss}

    def loss(self, batch: dict) -> torch.Tensor:
        return self.loss_terms(batch)["loss"]

    def score_all(self, batch: dict) -> torch.Tensor:
        """Inference uses the learnable network alone (§7.6): same cost as SASRec."""
        return self.learnable.score_all(batch)


def build_model(cfg: Config, num_items: int, frozen: Optional[Path] = None,
                members: Sequence[Path] = ()) -> nn.Module:
    """The network of cfg.method.name. The learnable SASRec is built first, then the second one, from the
    current seed (§6, §11). frozen: FLAME's frozen checkpoint (None leaves it random: benchmarks only);
    members: B2's checkpoints. Every SASRec has data.max_len positions."""
    def sasrec() -> SASRec:
        return SASRec(cfg.backbone, num_items, cfg.data.max_len)

    name = cfg.method.name
    if name == "sasrec":  # flame.frozen given: start from it (train.max_epochs=0 only scores it)
        return load_frozen(sasrec(), cfg.flame.frozen) if cfg.flame.frozen else sasrec()
    if name == "ensemble":
        return AveragedLogits([load_frozen(sasrec(), path) for path in members])
    learnable, other = sasrec(), sasrec()
    if name == "flame" and frozen is not None:
        load_frozen(other, frozen)
    return FLAME(learnable, other, cfg.flame, mutual=name == "mutual", ml_loss=cfg.method.ml_loss)
