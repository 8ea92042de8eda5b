"""SASRec backbone of FLAME (§4) and the loader for the authors' released frozen checkpoints (§5).

The parameter names are exactly the 36 keys of the shipped files (item_emb, pos_emb, layernorm,
seq_encoder.mhas.i.*, seq_encoder.ffns.i.*), so `load_state_dict(strict=True)` is the whole mapping.
The guided-mutual-learning ensemble that wraps two of these networks lives in ensemble.py.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig


def attention_mask(seq: torch.Tensor, mask_value: float, tiles: int = 1) -> torch.Tensor:
    """Additive mask A (§4.2), tiled tiles x tiles (§7.1 step 4): shape (B, 1, tiles*L, tiles*L).

    allowed[i, j] = seq_i > 0 and seq_j > 0 and j <= i, evaluated on positions i mod L, j mod L.
    """
    valid = seq > 0  # (B, L)
    length = seq.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
    allowed = valid[:, :, None] & valid[:, None, :] & causal  # (B, L, L)
    mask = (~allowed).to(torch.float32) * mask_value  # 0 where allowed, mask_value elsewhere
    if tiles > 1:
        mask = mask.repeat(1, tiles, tiles)  # M2[i, j] = A[i mod L, j mod L]
    return mask.unsqueeze(1)  # (B, 1, tiles*L, tiles*L), broadcast over heads


KEEP_BITS = 2**32  # a fast mask draws one uint32 per element: keep iff u >= round(p * 2^32)


def _draws(n: int, generator: Optional[torch.Generator]) -> np.ndarray:
    """n uint32 from numpy's Philox-4x32 keyed by one 63-bit key drawn from `generator` (keep_mask's stream)."""
    key = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    raw = np.random.Generator(np.random.Philox(key)).bit_generator.random_raw((n + 1) // 2)
    return raw.view(np.uint32)[:n]


def _kept(drawn: np.ndarray, p: float) -> np.ndarray:
    return drawn >= np.uint32(min(round(p * KEEP_BITS), KEEP_BITS - 1))


@torch.compiler.disable  # host code (numpy): never traced into a graph
def keep_mask(shape: tuple, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dropout's keep mask (bool, CPU) from a counter-based stream (§10.1): one 63-bit key drawn from
    `generator` (None: torch's global CPU generator, so seeding and last.pt's RNG state cover it), then
    numpy's Philox-4x32 keyed by it gives one uint32 per element; kept with probability
    1 - round(p 2^32)/2^32 (= 1 - p to 2^-32), every element independent. Same Bernoulli law as torch's
    bernoulli_, another stream, ~50x cheaper on the CPU."""
    return torch.from_numpy(_kept(_draws(math.prod(shape), generator), p)).view(shape)


def dropout_scale(p: float, dtype: torch.dtype = torch.float32) -> float:
    """1 / (1 - p) rounded as torch's `keep.to(dtype).div_(1 - p)` rounds it (the kept elements' noise)."""
    return torch.ones(8, dtype=dtype).div_(1 - p)[0].item()


@torch.compiler.disable  # host code (numpy): never traced into a graph
def keep_noise(shape: tuple, p: float, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """keep_mask(shape, p, generator).to(dtype).div_(1 - p), bit for bit and from the same draws, in one numpy
    pass (no bool -> float conversion and division over the whole tensor). dtype float32 or float64."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    kept = _kept(_draws(math.prod(shape), generator), p)
    return torch.from_numpy(np.multiply(kept, np_dtype(dropout_scale(p, dtype)), dtype=np_dtype)).view(shape)


def fast_dropout(x: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x * keep / (1 - p) with keep_mask's stream (as torch's dropout: noise = keep / (1 - p), out = x * noise)."""
    if x.dtype in (torch.float32, torch.float64):
        noise = keep_noise(tuple(x.shape), p, generator, x.dtype).to(x.device)
    else:  # bf16 / half: numpy has no such type
        noise = keep_mask(tuple(x.shape), p, generator).to(x.device, x.dtype).div_(1 - p)
    return x * noise


class Dropout(nn.Module):
    """nn.Dropout with backbone.kernels' choice of stream: fast (keep_mask, CPU tensors) or torch.
    On a CUDA device, and under torch.compile, the torch stream is used either way (bernoulli is cheap there,
    graph-safe, and traceable)."""

    def __init__(self, p: float, kernels: str = "fast"):
        super().__init__()
        self.p, self.fast = p, kernels == "fast"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.fast and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return fast_dropout(x, self.p)
        return F.dropout(x, self.p, True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: float, fast: bool,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """softmax(QK^T/sqrt(hs) + A) V with dropout p on the probabilities. Without dropout: SDPA (fused).
    With dropout and fast kernels on the CPU: the probabilities times keep_mask's noise; else SDPA's own."""
    if p == 0.0 or not fast or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=p)
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.shape[-1])).add_(mask.to(q.dtype))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(fast_dropout(probs, p, generator), v)


class MultiHeadAttention(nn.Module):
    """Attention sub-layer with its post-LN residual: x <- LN(x + Dropout(W_O(attn(x))))."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.heads = cfg.heads
        self.w_Q = nn.Linear(cfg.d, cfg.d)
        self.w_K = nn.Linear(cfg.d, cfg.d)
        self.w_V = nn.Linear(cfg.d, cfg.d)
        self.w = nn.Linear(cfg.d, cfg.d)  # output projection Linear_O
        self.layernorm = nn.LayerNorm(cfg.d, eps=cfg.ln_eps)
        self.dropout_p = cfg.dropout
        self.fast = cfg.kernels == "fast"
        self.dropout = Dropout(cfg.dropout, cfg.kernels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rows: the query rows whose output is read after this block (None: all). Keys and values come
        from every position, so the kept rows equal the full computation's (§10.1)."""
        B, T, C = x.shape
        xq = x if rows is None else x[:, rows]  # (B, R, C)
        if rows is not None:
            mask = mask[:, :, rows]
        # Contiguous head split (§4.3): view (B, T, heads, C/heads), head h = features 32h..32h+31.
        q = self.w_Q(xq).view(B, -1, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, R, hs)
        k = self.w_K(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = self.w_V(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(QK^T/sqrt(hs) + A) with dropout on the probabilities: exactly SDPA with a float
        # additive mask. The mask is finite, so all-pad query rows stay finite (§4.2, quirk 12).
        p = self.dropout_p if self.training else 0.0
        context = attend(q, k, v, mask, p, self.fast)
        context = context.transpose(1, 2).reshape(B, -1, C)  # heads concatenated back in order
        return self.layernorm(xq + self.dropout(self.w(context)))


class FeedForward(nn.Module):
    """FFN sub-layer with post-LN: x <- LN(x + Dropout(W2 GELU(W1 x))); no dropout inside (§4.3)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d, 4 * cfg.d)
        self.w2 = nn.Linear(4 * cfg.d, cfg.d)
        self.layernorm = nn.LayerNorm(cfg.d, eps=cfg.ln_eps)
        self.dropout = Dropout(cfg.dropout, cfg.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.w1(x))  # exact erf GELU
        return self.layernorm(x + self.dropout(self.w2(hidden)))


class SequenceEncoder(nn.Module):
    """The stack of blocks; block k = mhas[k] then ffns[k]. No final LayerNorm (§4.3)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.mhas = nn.ModuleList(MultiHeadAttention(cfg) for _ in range(cfg.blocks))
        self.ffns = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.blocks))
        self.read_rows = cfg.kernels == "fast"  # the last block computes only the rows that are read

    def block(self, k: int, x: torch.Tensor, mask: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.ffns[k](self.mhas[k](x, mask, rows))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rows: the rows of the output that are read (None: all, (B, T, d)); with backbone.kernels=fast the
        last block computes only those and the result is (B, len(rows), d), else the full output is sliced."""
        last = len(self.mhas) - 1
        for k in range(last):
            x = self.block(k, x, mask)
        if rows is None:
            return self.block(last, x, mask)
        return self.block(last, x, mask, rows) if self.read_rows else self.block(last, x, mask)[:, rows]

    def last_rows(self, tiles: int, length: int, device: torch.device) -> torch.Tensor:
        """The read rows of `tiles` streams of `length` positions side by side: each stream's last index."""
        return torch.arange(1, tiles + 1, device=device) * length - 1


class SASRec(nn.Module):
    """Post-LN SASRec with learned positions, left padding and a tied output (§4).

    batch: dict with "seq" (B, L) long, left-padded with 0, and "target" (B,) long in 1..I.
    max_len: L, the number of positions (data.max_len).
    """

    def __init__(self, cfg: BackboneConfig, num_items: int, max_len: int = 50):
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, cfg.d, padding_idx=0)  # row 0 = padding
        self.pos_emb = nn.Embedding(max_len, cfg.d)
        self.layernorm = nn.LayerNorm(cfg.d, eps=cfg.ln_eps)
        self.dropout = Dropout(cfg.dropout, cfg.kernels)
        self.seq_encoder = SequenceEncoder(cfg)
        # Positions are array indices 0..L-1 (§4.1): the latest item always sits at L-1.
        self.register_buffer("positions", torch.arange(max_len), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # §4.5: N(0, 0.02^2) everywhere, padding row included (it then never gets a gradient).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """Module 1 (§4.1): Dropout(LN(item_emb[seq] + pos_emb)); pad tokens are not zeroed."""
        x = self.item_emb(seq) + self.pos_emb(self.positions[: seq.shape[1]])  # (B, L, d)
        return self.dropout(self.layernorm(x))

    def mask(self, seq: torch.Tensor, tiles: int = 1) -> torch.Tensor:
        return attention_mask(seq, self.cfg.mask_value, tiles)

    def forward(self, seq: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sequence representation h = encoder output at the last index L-1 (§4.4): (B, d).
        `mask`: this sequence's attention_mask when the caller has it already."""
        rows = self.seq_encoder.last_rows(1, seq.shape[1], seq.device)
        return self.seq_encoder(self.embed(seq), self.mask(seq) if mask is None else mask, rows)[:, -1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output: column c holds item c+1; the padding row is left out (§4.4)."""
        return h @ self.item_emb.weight[1:].T  # (B, I)

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        """L_rec, full softmax; batch["share"] (data parallel, flame/parallel.py): this rank's share of the
        global mean, so the terms summed over the ranks are the global terms."""
        rec = scaled(F.cross_entropy(self.logits(self(batch["seq"])), batch["target"] - 1),
                     batch.get("share", 1.0))
        return {"loss": rec, "rec": rec}

    def loss(self, batch: dict) -> torch.Tensor:
        return self.loss_terms(batch)["loss"]

    def score_all(self, batch: dict) -> torch.Tensor:
        """(B, I+1) scores; column 0 (padding) is -inf so it never ranks."""
        scores = self.logits(self(batch["seq"]))
        return F.pad(scores, (1, 0), value=float("-inf"))


class AveragedLogits(nn.Module):
    """Inference-only mean of raw logits of several SASRecs (B2 full ensemble, B3 side number, §11)."""

    def __init__(self, members: list[SASRec]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def score_all(self, batch: dict) -> torch.Tensor:
        return torch.stack([m.score_all(batch) for m in self.members]).mean(0)


def scaled(term: torch.Tensor, share: float) -> torch.Tensor:
    """A loss term times this rank's share (data parallel); one process (share 1) adds no kernel."""
    return term if share == 1.0 else term * share


def sasrec_state(model: SASRec) -> dict[str, torch.Tensor]:
    """The 36-key layout of §5: a plain dict of CPU float32 tensors (no buffers)."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}


def load_frozen(model: SASRec, path: str | Path) -> SASRec:
    """Load a shipped or our own 36-key checkpoint strictly, refusing any shape mismatch (§5)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frozen checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "item_emb.weight" not in state:
        raise ValueError(f"{path}: not a SASRec state dict in the 36-key layout (§5)")
    expected = {
        "item_emb.weight": (model.num_items + 1, model.cfg.d),
        "pos_emb.weight": (model.max_len, model.cfg.d),
    }
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, this dataset and "
                             f"config need {shape} (wrong dataset or max_len?)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # key or shape mismatch deeper in the network: one-line message
        raise ValueError(f"{path}: does not fit SASRec{tuple(expected['item_emb.weight'])}: "
                         f"{str(err).splitlines()[0]}") from err
    return model


def lambda_schedule(epoch: int, lambda0: float, lambda_end: float, horizon: int) -> float:
    """λ(e) = λ0 (λR/λ0)^(e/R), e 1-based (§7.4); defaults give λ(1)=0.944, λ(50)=0.0562."""
    if lambda0 == 0.0:
        return 0.0
    return lambda0 * math.pow(lambda_end / lambda0, epoch / horizon)
