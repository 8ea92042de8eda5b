"""The exact savings and the cheap dropout of backbone.kernels=fast (flame/docs/method.md §10.1): the last block
computed for the read rows only equals the full computation (dropout 0) for SASRec, FLAME's tiled and
independent paths and the baselines; the fast dropout masks have dropout's Bernoulli law."""
import math

import numpy as np
import pytest
import torch

from flame.config import BackboneConfig, FlameConfig
from flame.ensemble import FLAME
from flame.model import AveragedLogits, SASRec, keep_mask, keep_noise

L, ITEMS = 7, 15


def pair(seed=0, dropout=0.0, blocks=2):
    """The same weights under kernels=fast and kernels=torch (the full last block)."""
    out = []
    for kernels in ("fast", "torch"):
        torch.manual_seed(seed)
        out.append(SASRec(BackboneConfig(d=16, heads=2, blocks=blocks, dropout=dropout, kernels=kernels), ITEMS, L))
    return out


def batch():
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(1, ITEMS + 1, (9, L), generator=g)
    seq[0] = 0  # all padding
    seq[1, :4] = 0  # left padding
    return {"seq": seq, "target": torch.randint(1, ITEMS + 1, (9,), generator=g), "lam": 0.7}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(fast_terms, full_terms, fast_model, full_model, tol=1e-6):
    assert fast_terms.keys() == full_terms.keys()
    for key in fast_terms:
        assert torch.allclose(fast_terms[key], full_terms[key], atol=tol, rtol=0), key
    fast_terms["loss"].backward()
    full_terms["loss"].backward()
    g_fast, g_full = grads(fast_model), grads(full_model)
    assert g_fast.keys() == g_full.keys() and g_fast
    for name in g_fast:  # relative to the gradient's scale (FLAME's raw-dot NT-Xent gives gradients ~30)
        scale = max(1.0, float(g_full[name].abs().max()))
        assert float((g_fast[name] - g_full[name]).abs().max()) <= tol * scale, name


@pytest.mark.parametrize("blocks", [1, 2])
def test_sasrec_read_rows_equal_the_full_last_block(blocks):
    fast, full = pair(blocks=blocks)
    b = batch()
    assert torch.allclose(fast(b["seq"]), full(b["seq"]), atol=1e-6, rtol=0)
    assert torch.allclose(fast.score_all(b), full.score_all(b), atol=1e-6, rtol=0)
    fast.train(), full.train()
    assert_same(fast.loss_terms(b), full.loss_terms(b), fast, full)


@pytest.mark.parametrize("split,mixing,mutual", [("embed_encoder", "tiled", False), ("per_block", "tiled", False),
                                                  ("embed_encoder", "independent", False),
                                                  ("per_block", "independent", False), ("embed_encoder", "tiled", True)])
def test_flame_paths_read_rows_equal_the_full_computation(split, mixing, mutual):
    cfg = FlameConfig(split=split, path_mixing=mixing)
    learn_fast, learn_full = pair(0)
    other_fast, other_full = pair(1)
    fast, full = FLAME(learn_fast, other_fast, cfg, mutual=mutual), FLAME(learn_full, other_full, cfg, mutual=mutual)
    fast.train(), full.train()
    b = batch()
    z_fast = fast.path_outputs(b["seq"], fast.all_paths)
    z_full = full.path_outputs(b["seq"], full.all_paths)
    for path in fast.all_paths:
        assert torch.allclose(z_fast[path], z_full[path], atol=1e-6, rtol=0), path
    assert_same(fast.loss_terms(b), full.loss_terms(b), fast, full)


def test_ensemble_read_rows_equal_the_full_computation():
    fast = AveragedLogits([pair(0)[0], pair(1)[0]])
    full = AveragedLogits([pair(0)[1], pair(1)[1]])
    b = batch()
    assert torch.allclose(fast.score_all(b)[:, 1:], full.score_all(b)[:, 1:], atol=1e-6, rtol=0)


def test_fast_mask_has_the_bernoulli_rate_and_independent_elements():
    torch.manual_seed(0)
    for p in (0.2, 0.5):
        n = 400_000
        keep = keep_mask((n,), p).numpy()
        rate = 1 - keep.mean()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma
        x = keep[:-1].astype(np.float64), keep[1:].astype(np.float64)  # neighbours: no correlation
        assert abs(np.corrcoef(*x)[0, 1]) < 4 / math.sqrt(n)
        grid = keep[: 1000 * 400].reshape(1000, 400).astype(np.float64)  # columns (fixed offsets) too
        col = np.corrcoef(grid[:, 0], grid[:, 1])[0, 1]
        assert abs(col) < 4 / math.sqrt(1000) + 0.02
        pairs = keep[0::2].astype(int) * 2 + keep[1::2]  # the 4 joint outcomes of element pairs
        counts = np.bincount(pairs, minlength=4)
        expected = np.array([p * p, p * (1 - p), (1 - p) * p, (1 - p) ** 2]) * len(pairs)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    a, b = keep_mask((1000,), 0.5), keep_mask((1000,), 0.5)
    assert not torch.equal(a, b)  # consecutive calls draw new keys
    torch.manual_seed(5)
    c = keep_mask((1000,), 0.5)
    torch.manual_seed(5)
    assert torch.equal(c, keep_mask((1000,), 0.5))  # seeded by torch's generator: reproducible, resumable
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(keep_mask((64,), 0.3, g1), keep_mask((64,), 0.3, g2))  # a run's own generator


def test_keep_noise_is_the_mask_divided_bit_for_bit():
    """keep_noise (one numpy pass) = keep_mask(...).to(dtype).div_(1 - p) from the same generator state."""
    for dtype in (torch.float32, torch.float64):
        for p in (0.1, 0.2, 0.3, 0.5, 0.7, 0.95):
            g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            old = keep_mask((7, 333), p, g1).to(dtype).div_(1 - p)
            new = keep_noise((7, 333), p, g2, dtype)
            assert new.dtype == dtype and new.shape == (7, 333)
            assert torch.equal(old, new) and torch.equal(old.view(-1).view(torch.uint8), new.view(-1).view(torch.uint8))
            assert 0 < int((new == 0).sum()) < new.numel()


def test_fast_dropout_scales_like_torch_and_only_in_training():
    model = pair(dropout=0.5)[0]
    drop = model.dropout
    x = torch.ones(2000)
    drop.train()
    y = drop(x)
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0}
    drop.eval()
    assert torch.equal(drop(x), x)
    torch.manual_seed(0)
    fast, full = pair(dropout=0.3)
    fast.train()
    out = fast.loss_terms(batch())  # the unfused attention with the fast mask trains
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)


def test_torch_kernels_keep_the_old_stream():
    """kernels=torch: the module draws torch's dropout exactly as nn.Dropout + SDPA did."""
    _, full = pair(dropout=0.5)
    full.train()
    b = batch()
    torch.manual_seed(11)
    got = full.loss_terms(b)["loss"]
    torch.manual_seed(11)  # the pre-change computation, written out
    import torch.nn.functional as F
    x = F.dropout(full.layernorm(full.item_emb(b["seq"]) + full.pos_emb.weight[:L]), 0.5, True)
    mask = full.mask(b["seq"])
    for mha, ffn in zip(full.seq_encoder.mhas, full.seq_encoder.ffns):
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, 2, C // 2).transpose(1, 2) for w in (mha.w_Q, mha.w_K, mha.w_V))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.5).transpose(1, 2).reshape(B, T, C)
        x = mha.layernorm(x + F.dropout(mha.w(ctx), 0.5, True))
        x = ffn.layernorm(x + F.dropout(ffn.w2(F.gelu(ffn.w1(x))), 0.5, True))
    expected = F.cross_entropy(full.logits(x[:, -1]), b["target"] - 1)
    assert torch.equal(got, expected)


def test_keep_freed_memory_is_accepted_by_glibc():
    """keep_freed_memory's two mallopt calls are accepted (glibc returns 0 for a value out of its range,
    e.g. an mmap threshold above 32 MiB), in a child process so this one's allocator is left as it is."""
    import platform
    import subprocess
    import sys
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    code = "from flame.fast import keep_freed_memory\nprint(keep_freed_memory())\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
