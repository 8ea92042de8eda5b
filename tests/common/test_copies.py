"""Copies kept in step, in the spirit of transformers' copy check.

vlm2rec/seqrec.py carries an adaptation of flame/model.py::SASRec (vlm2rec/docs/method.md §12, Q12): the same
maths with one fused QKV projection and PyTorch's LayerNorm epsilon. Instead of a textual diff, the weights
of a flame SASRec are mapped onto the vlm2rec one and both must give the same outputs in eval mode. Any
change of the maths on either side (pre-LN, another mask value, another activation, a new parameter) fails.
"""
import dataclasses
import inspect

import pytest
import torch

from flame.model import SASRec as FlameSASRec

from flame.config import BackboneConfig as FlameSASRecConfig
from vlm2rec.config import SeqRecConfig
from vlm2rec.seqrec import SASRec as VlmSASRec

NUM_ITEMS, MAX_LEN, HIDDEN, HEADS, LAYERS = 23, 7, 16, 2, 2
# The declared differences of the adaptation: the epsilon of every LayerNorm (flame follows its reference's
# 1e-12, vlm2rec keeps nn.LayerNorm's default) is set equal here; everything else must agree as is.
VLM_LN_EPS = 1e-5


def weight_map(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """flame's 36-key layout -> vlm2rec's names; Q, K and V are stacked into the fused projection."""
    out = {"item_emb.weight": state["item_emb.weight"], "pos_emb.weight": state["pos_emb.weight"],
           "ln_emb.weight": state["layernorm.weight"], "ln_emb.bias": state["layernorm.bias"]}
    for k in range(LAYERS):
        mha, ffn, block = f"seq_encoder.mhas.{k}", f"seq_encoder.ffns.{k}", f"blocks.{k}"
        for kind in ("weight", "bias"):
            out[f"{block}.qkv.{kind}"] = torch.cat([state[f"{mha}.w_{x}.{kind}"] for x in "QKV"])
            out[f"{block}.out.{kind}"] = state[f"{mha}.w.{kind}"]
            out[f"{block}.ln_att.{kind}"] = state[f"{mha}.layernorm.{kind}"]
            out[f"{block}.ffn_in.{kind}"] = state[f"{ffn}.w1.{kind}"]
            out[f"{block}.ffn_out.{kind}"] = state[f"{ffn}.w2.{kind}"]
            out[f"{block}.ln_ffn.{kind}"] = state[f"{ffn}.layernorm.{kind}"]
    return out


def build_flame() -> FlameSASRec:
    """flame's SASRec at our sizes, whichever of its two constructor forms is present (max_len in the config
    or as an argument)."""
    kwargs = dict(d=HIDDEN, heads=HEADS, blocks=LAYERS, dropout=0.3, ln_eps=VLM_LN_EPS)
    if "max_len" in {f.name for f in dataclasses.fields(FlameSASRecConfig)}:
        kwargs["max_len"] = MAX_LEN
    if "max_len" in inspect.signature(FlameSASRec).parameters:
        return FlameSASRec(FlameSASRecConfig(**kwargs), NUM_ITEMS, max_len=MAX_LEN)
    return FlameSASRec(FlameSASRecConfig(**kwargs), NUM_ITEMS)


def pair(seed: int = 0) -> tuple[FlameSASRec, VlmSASRec]:
    torch.manual_seed(seed)
    flame = build_flame()
    with torch.no_grad():          # far from the 0.02 init, so that every term of the maths matters
        for param in flame.parameters():
            param.normal_(0.0, 0.5)
    ours = VlmSASRec(SeqRecConfig(init="random", hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, dropout=0.3),
                     NUM_ITEMS, MAX_LEN, None)
    mapped = weight_map(flame.state_dict())
    assert set(mapped) == set(ours.state_dict()), "the weight map must cover every tensor on both sides"
    assert sum(v.numel() for v in mapped.values()) == sum(v.numel() for v in flame.state_dict().values())
    ours.load_state_dict(mapped, strict=True)
    return flame.eval(), ours.eval()


def sequences() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, NUM_ITEMS + 1, (6, MAX_LEN), generator=g)
    seq[1, :3] = 0                 # left padding
    seq[2, :-1] = 0                # a single item
    seq[3] = 0                     # all padding: the finite mask keeps it finite
    return seq


@pytest.mark.heavy
def test_vlm2rec_sasrec_equals_flame_sasrec_under_mapped_weights():
    flame, ours = pair()
    seq = sequences()
    target = torch.randint(1, NUM_ITEMS + 1, (len(seq),), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h_flame, h_ours = flame(seq), ours.user(seq)
        assert torch.isfinite(h_flame).all() and h_flame.abs().max() > 0.1
        torch.testing.assert_close(h_ours, h_flame, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.score_all({"history": seq}), flame.score_all({"seq": seq}), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(ours.loss({"history": seq, "target": target}),
                                   flame.loss({"seq": seq, "target": target}), atol=1e-6, rtol=1e-6)


def test_the_check_catches_a_change_of_the_maths():
    """The comparison is sensitive: one perturbed weight, or Q and K swapped in the map, is caught."""
    flame, ours = pair()
    seq = sequences()
    with torch.no_grad():
        assert torch.allclose(ours.user(seq), flame(seq), atol=1e-6)
        ours.blocks[1].ffn_in.weight[0, 0] += 0.5
        assert not torch.allclose(ours.user(seq), flame(seq), atol=1e-4)
        state = flame.state_dict()
        swapped = {**state, "seq_encoder.mhas.0.w_Q.weight": state["seq_encoder.mhas.0.w_K.weight"],
                   "seq_encoder.mhas.0.w_K.weight": state["seq_encoder.mhas.0.w_Q.weight"]}
        ours.load_state_dict(weight_map(swapped))
        assert not torch.allclose(ours.user(seq), flame(seq), atol=1e-4)
