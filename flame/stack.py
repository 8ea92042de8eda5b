"""K runs of one network as one batched program (§10.2): SASRec (B1) and FLAME with parameters stacked
along a leading run axis and the runs folded into the batch axis (batched matmuls, one attention call).

    stack = StackedSASRec.from_nets([SASRec(...) for each run])         # or StackedFLAME.from_models
    terms = stack.loss_terms({"seq": (K, B, L), "target": (K, B), "lam": (K,)}, generators)
    terms["loss"].sum().backward()                                        # run k's gradient = its own loss's
    stack.run_state(k)                                                    # run k's plain state_dict

Run k's numbers depend only on run k's inputs and parameters: every op is per run (batched matmuls,
per-row LayerNorm and softmax, per-run means), the objective is the sum of the runs' losses, and Adam is
element-wise, so torch.optim.Adam over the stacked tensors is K independent Adams. Dropout draws run k's
masks from run k's own generator (backbone.kernels=fast, CPU) in the order the plain model draws them;
on a CUDA device, or with kernels=torch, one mask is drawn for the whole stack from torch's stream.
Supported: SASRec, and FLAME with flame.split=embed_encoder, path_mixing=tiled, all paths (the
reference's setting); the other settings run one by one through flame.main.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig, FlameConfig
from .ensemble import FLAME, _nt_xent_batched, path_order
from .model import SASRec, attention_mask, keep_mask, keep_noise

Generators = Optional[Sequence[torch.Generator]]


def _no_padding_grad(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[:, 0] = 0
    return grad


def _key(name: str) -> str:
    return name.replace(".", "__")


class StackedSASRec(nn.Module):
    """K SASRecs of one shape: parameter `item_emb__weight` is (K, I+1, d), and so on for the 36 keys of
    §5. Inputs carry the run axis first: seq (K, B, L). Output h (K, B, d), logits (K, B, I)."""

    def __init__(self, cfg: BackboneConfig, num_items: int, max_len: int, states: Sequence[dict],
                 requires_grad: bool = True):
        super().__init__()
        self.cfg, self.num_items, self.max_len, self.runs = cfg, num_items, max_len, len(states)
        self.names = list(states[0])
        for name in self.names:
            stacked = torch.stack([state[name].detach().to(torch.float32) for state in states]).clone()
            self.register_parameter(_key(name), nn.Parameter(stacked, requires_grad=requires_grad))
        self.fast = cfg.kernels == "fast"
        if requires_grad:  # row 0 (padding) never gets a gradient, as nn.Embedding(padding_idx=0)
            self.p("item_emb.weight").register_hook(_no_padding_grad)

    @classmethod
    def from_nets(cls, nets: Sequence[SASRec], requires_grad: bool = True) -> "StackedSASRec":
        first = nets[0]
        return cls(first.cfg, first.num_items, first.max_len, [dict(n.named_parameters()) for n in nets],
                   requires_grad)

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, _key(name))

    def run_state(self, k: int) -> dict[str, torch.Tensor]:
        """Run k's parameters under the plain SASRec's state_dict keys (detached copies)."""
        return {name: self.p(name)[k].detach().clone() for name in self.names}

    def select(self, keep: Sequence[int]) -> "StackedSASRec":
        """A new stack of the runs `keep` (the parameters sliced, same requires_grad)."""
        states = [self.run_state(k) for k in keep]
        new = StackedSASRec(self.cfg, self.num_items, self.max_len, states, self.p(self.names[0]).requires_grad)
        new.train(self.training)
        return new.to(self.p(self.names[0]).device)

    # -------------------------------------------------------------------------------- the layers, per run

    def drop(self, x: torch.Tensor, generators: Generators) -> torch.Tensor:
        """Dropout with run k's mask from run k's generator (x: run axis first)."""
        p = self.cfg.dropout
        if not self.training or p == 0.0:
            return x
        if not self.fast or x.device.type != "cpu" or generators is None:
            return F.dropout(x, p, True)
        shape = tuple(x.shape[1:])
        if x.dtype in (torch.float32, torch.float64):  # keep_noise: the same values as keep_mask's, one numpy pass
            noise = torch.stack([keep_noise(shape, p, g, x.dtype) for g in generators]).to(x.device)
        else:
            noise = torch.stack([keep_mask(shape, p, g) for g in generators]).to(x.device, x.dtype).div_(1 - p)
        return x * noise

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x (K, ..., din) @ W_k^T + b_k as one batched matmul."""
        w, b = self.p(name + ".weight"), self.p(name + ".bias")
        shape = x.shape
        out = torch.baddbmm(b.unsqueeze(1), x.reshape(shape[0], -1, shape[-1]), w.transpose(1, 2))
        return out.view(*shape[:-1], w.shape[1])

    def layernorm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w, b = self.p(name + ".weight"), self.p(name + ".bias")
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return F.layer_norm(x, (x.shape[-1],), eps=self.cfg.ln_eps) * w.view(view) + b.view(view)

    def embed(self, seq: torch.Tensor, generators: Generators = None) -> torch.Tensor:
        """Module 1 (§4.1) per run: (K, B, L) -> (K, B, L, d)."""
        K, _, L = seq.shape
        table = self.p("item_emb.weight")  # (K, I+1, d): run k's ids offset into the flattened table
        offsets = torch.arange(K, device=seq.device).view(K, 1, 1) * table.shape[1]
        x = F.embedding(seq + offsets, table.reshape(-1, table.shape[-1])) + self.p("pos_emb.weight")[:, None, :L]
        return self.drop(self.layernorm(x, "layernorm"), generators)

    def mask(self, seq: torch.Tensor, tiles: int = 1) -> torch.Tensor:
        """attention_mask of every run's rows: (K*B, 1, tiles*L, tiles*L)."""
        return attention_mask(seq.reshape(-1, seq.shape[-1]), self.cfg.mask_value, tiles)

    def block(self, k: int, x: torch.Tensor, mask: torch.Tensor, rows: Optional[torch.Tensor] = None,
              generators: Generators = None) -> torch.Tensor:
        """Block k on x (K, B, T, d) under mask (K*B, 1, T, T); rows: the query rows computed (None: all)."""
        K, B, T, C = x.shape
        h = self.cfg.heads
        a, f = f"seq_encoder.mhas.{k}", f"seq_encoder.ffns.{k}"
        xq = x if rows is None else x[:, :, rows]
        if rows is not None:
            mask = mask[:, :, rows]
        R = xq.shape[2]
        q = self.linear(xq, a + ".w_Q").view(K * B, R, h, C // h).transpose(1, 2)
        key = self.linear(x, a + ".w_K").view(K * B, T, h, C // h).transpose(1, 2)
        v = self.linear(x, a + ".w_V").view(K * B, T, h, C // h).transpose(1, 2)
        p = self.cfg.dropout if self.training else 0.0
        if p == 0.0 or not (self.fast and x.device.type == "cpu" and generators is not None):
            context = F.scaled_dot_product_attention(q, key, v, attn_mask=mask.to(q.dtype), dropout_p=p)
        else:  # the probabilities times run k's keep mask, as model.attend
            scores = torch.matmul(q, key.transpose(-2, -1)).mul_(1.0 / math.sqrt(C // h)).add_(mask.to(q.dtype))
            probs = torch.softmax(scores, dim=-1).view(K, B, h, R, T)
            context = torch.matmul(self.drop(probs, generators).view(K * B, h, R, T), v)
        context = context.transpose(1, 2).reshape(K, B, R, C)
        x = self.layernorm(xq + self.drop(self.linear(context, a + ".w"), generators), a + ".layernorm")
        hidden = F.gelu(self.linear(x, f + ".w1"))
        return self.layernorm(x + self.drop(self.linear(hidden, f + ".w2"), generators), f + ".layernorm")

    def encoder(self, x: torch.Tensor, mask: torch.Tensor, rows: Optional[torch.Tensor] = None,
                generators: Generators = None) -> torch.Tensor:
        """The blocks; the last one computes only `rows` when given and kernels=fast (§10.1)."""
        last = self.cfg.blocks - 1
        for k in range(last):
            x = self.block(k, x, mask, None, generators)
        if rows is None:
            return self.block(last, x, mask, None, generators)
        if self.fast:
            return self.block(last, x, mask, rows, generators)
        return self.block(last, x, mask, None, generators)[:, :, rows]

    def forward(self, seq: torch.Tensor, mask: Optional[torch.Tensor] = None,
                generators: Generators = None) -> torch.Tensor:
        """h = encoder output at index L-1 per run: (K, B, d)."""
        rows = torch.arange(seq.shape[-1] - 1, seq.shape[-1], device=seq.device)  # a kernel, no host copy (CUDA graphs)
        mask = self.mask(seq) if mask is None else mask
        return self.encoder(self.embed(seq, generators), mask, rows, generators)[:, :, -1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output per run: (K, B, d) @ item_emb[k, 1:]^T -> (K, B, I)."""
        return torch.bmm(h, self.p("item_emb.weight")[:, 1:].transpose(1, 2))

    def rec_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-run mean cross-entropy: (K,)."""
        K, B, items = logits.shape
        per_row = F.cross_entropy(logits.reshape(K * B, items), target.reshape(-1) - 1, reduction="none")
        return per_row.view(K, B).mean(1)

    def loss_terms(self, batch: dict, generators: Generators = None) -> dict[str, torch.Tensor]:
        """Per-run terms (K,) each; the objective is terms["loss"].sum()."""
        rec = self.rec_loss(self.logits(self(batch["seq"], None, generators)), batch["target"])
        return {"loss": rec, "rec": rec}

    @torch.no_grad()
    def score_items(self, seq: torch.Tensor) -> torch.Tensor:
        """(K, B, I) item logits (no padding column) for evaluation."""
        return self.logits(self(seq))


class StackedFLAME(nn.Module):
    """K FLAME runs (§7): a stack of learnable SASRecs and a stack of frozen ones, L_rec + λ_k L_wcl per run.
    batch: "seq" (K, B, L), "target" (K, B), "lam" (K,) tensor or float."""

    def __init__(self, learnable: StackedSASRec, frozen: StackedSASRec, cfg: FlameConfig):
        super().__init__()
        if cfg.split != "embed_encoder" or cfg.path_mixing != "tiled" or cfg.num_paths:
            raise ValueError("the stacked program runs FLAME with flame.split=embed_encoder, path_mixing=tiled "
                             "and num_paths=0 (the reference's setting); run the others with flame.main")
        self.learnable, self.frozen, self.cfg = learnable, frozen, cfg
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.paths = path_order(2)  # ll, fl, lf, ff
        self.runs = learnable.runs

    @classmethod
    def from_models(cls, models: Sequence[FLAME]) -> "StackedFLAME":
        return cls(StackedSASRec.from_nets([m.learnable for m in models]),
                   StackedSASRec.from_nets([m.frozen for m in models], requires_grad=False), models[0].cfg)

    def train(self, mode: bool = True) -> "StackedFLAME":
        super().train(mode)
        if mode and self.cfg.frozen_mode == "eval":
            self.frozen.eval()  # ablation of quirk 4, as FLAME.train
        return self

    def run_state(self, k: int) -> dict[str, torch.Tensor]:
        """Run k's state under the plain FLAME's keys (learnable.*, frozen.*)."""
        return {**{f"learnable.{n}": v for n, v in self.learnable.run_state(k).items()},
                **{f"frozen.{n}": v for n, v in self.frozen.run_state(k).items()}}

    def select(self, keep: Sequence[int]) -> "StackedFLAME":
        new = StackedFLAME(self.learnable.select(keep), self.frozen.select(keep), self.cfg)
        new.train(self.training)
        return new

    def path_outputs(self, seq: torch.Tensor, mask: torch.Tensor, generators: Generators) -> dict[str, torch.Tensor]:
        """The 4 paths of §7.1 per run, in the plain FLAME's order of computation (and of dropout draws)."""
        L = seq.shape[-1]
        nets = {"l": self.learnable, "f": self.frozen}
        streams = {n: nets[n].embed(seq, generators) for n in "lf"}
        tiled = mask.repeat(1, 1, 2, 2)
        rows = torch.arange(1, 3, device=seq.device) * L - 1
        out = {}
        for n in "lf":
            x = torch.cat([streams["l"], streams["f"]], dim=2)  # (K, B, 2L, d): parents l, f
            y = nets[n].encoder(x, tiled, rows, generators)  # (K, B, 2, d)
            out["l" + n], out["f" + n] = y[:, :, 0], y[:, :, 1]
        return {p: out[p] for p in self.paths}

    def weighted_contrastive(self, z: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """L_wcl per run (K,) and α (P, K), as ensemble.weighted_contrastive run by run."""
        pairs = [(x, y) for i, x in enumerate(self.paths) for y in self.paths[i + 1:]]
        a = torch.stack([z[x] for x, _ in pairs])  # (P, K, B, d)
        b = torch.stack([z[y] for _, y in pairs])
        P, K, B, d = a.shape
        alpha = torch.softmax(-(a * b).sum(-1).mean(-1), dim=0)  # (P, K)
        if self.cfg.detach_pair_weights:
            alpha = alpha.detach()
        ntx = _nt_xent_batched(a.reshape(P * K, B, d), b.reshape(P * K, B, d), self.cfg.tau,
                               self.cfg.cl_normalize).view(P, K)
        return (alpha * ntx).sum(0), alpha

    def loss_terms(self, batch: dict, generators: Generators = None) -> dict[str, torch.Tensor]:
        seq, target, lam = batch["seq"], batch["target"], batch.get("lam", 1.0)
        mask = self.learnable.mask(seq)
        rec = self.learnable.rec_loss(self.learnable.logits(self.learnable(seq, mask, generators)), target)
        terms = {"rec": rec}
        loss = rec
        if self.cfg.lambda0 != 0.0:
            z = self.path_outputs(seq, mask, generators)
            wcl, alpha = self.weighted_contrastive(z)
            loss = loss + (lam if torch.is_tensor(lam) else torch.tensor(float(lam))).to(wcl) * wcl
            terms["wcl"] = wcl
            names = [f"{x}-{y}" for i, x in enumerate(self.paths) for y in self.paths[i + 1:]]
            terms.update({f"alpha/{name}": w.detach() for name, w in zip(names, alpha)})
        terms["loss"] = loss
        return terms

    @torch.no_grad()
    def score_items(self, seq: torch.Tensor) -> torch.Tensor:
        """Inference is the learnable network alone (§7.6)."""
        return self.learnable.score_items(seq)
