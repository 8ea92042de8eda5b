"""FLAME unit tests (flame/docs/method.md §14): mask, losses, λ, gradient flow, frozen net, loader, data, evaluation."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flame.config import BackboneConfig, DataConfig, FlameConfig
from flame.data import build_data
from flame.ensemble import FLAME, nt_xent, path_order, weighted_contrastive
from flame.evaluate import evaluate, leave_one_out_ranks, seen_adjust
from flame.model import AveragedLogits, SASRec, attention_mask, lambda_schedule, load_frozen, sasrec_state

L = 6


def tiny(num_items=12, dropout=0.0, d=16, seed=0):
    torch.manual_seed(seed)
    return SASRec(BackboneConfig(d=d, heads=2, blocks=2, dropout=dropout), num_items, max_len=L)


def toy_seq():
    return torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]])


def test_mask_equals_explicit_tiling():
    seq = toy_seq()
    mask = attention_mask(seq, -10000.0, tiles=2)
    assert mask.shape == (3, 1, 2 * L, 2 * L)
    for b, i, j in itertools.product(range(3), range(2 * L), range(2 * L)):
        qi, kj = i % L, j % L
        allowed = seq[b, qi] > 0 and seq[b, kj] > 0 and kj <= qi
        assert mask[b, 0, i, j] == (0.0 if allowed else -10000.0)
    # Query L-1 and 2L-1 see exactly {j, L+j : seq_j != 0} (method.md §14, item 5).
    for q in (L - 1, 2 * L - 1):
        keys = set(torch.nonzero(mask[0, 0, q] == 0).flatten().tolist())
        assert keys == {j for j in range(L) if seq[0, j]} | {L + j for j in range(L) if seq[0, j]}


def test_no_nan_for_all_pad_rows():
    model = tiny(dropout=0.5)
    model.train()
    flame = FLAME(model, tiny(seed=1), FlameConfig())
    terms = flame.loss_terms({"seq": toy_seq(), "target": torch.tensor([7, 1, 7]), "lam": 1.0})
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert torch.isfinite(model.score_all({"seq": toy_seq()})[:, 1:]).all()


def test_nt_xent_and_pair_weights_match_per_row_reference():
    torch.manual_seed(0)
    paths = {name: torch.randn(3, 4) for name in ("ll", "fl", "lf", "ff")}
    a, b = paths["ll"], paths["fl"]
    s = torch.cat([a, b])
    rows = []
    for k in range(6):  # hand-written: positive is the twin row, negatives all other rows but itself
        pos = k + 3 if k < 3 else k - 3
        others = [j for j in range(6) if j != k]
        logits = torch.stack([s[k] @ s[j] / 0.5 for j in others])
        rows.append(-(s[k] @ s[pos] / 0.5) + torch.logsumexp(logits, 0))
    assert torch.allclose(nt_xent(a, b, 0.5), torch.stack(rows).mean(), atol=1e-5)
    loss, alpha = weighted_contrastive(paths, tau=1.0)
    pairs = list(itertools.combinations(paths, 2))
    assert [tuple(k.split("-")) for k in alpha] == pairs == [
        ("ll", "fl"), ("ll", "lf"), ("ll", "ff"), ("fl", "lf"), ("fl", "ff"), ("lf", "ff")]
    w = torch.tensor([-sum(float(paths[p][k] @ paths[q][k]) for k in range(3)) / 3 for p, q in pairs])
    expected = torch.softmax(w, 0)
    assert torch.allclose(torch.stack(list(alpha.values())), expected, atol=1e-6)
    assert math.isclose(sum(float(v) for v in alpha.values()), 1.0, rel_tol=1e-6)
    least_similar = int(torch.argmin(torch.tensor([float((paths[p] * paths[q]).sum(1).mean()) for p, q in pairs])))
    assert int(torch.argmax(expected)) == least_similar
    ntx = torch.stack([nt_xent(paths[p], paths[q], 1.0) for p, q in pairs])
    assert torch.allclose(loss, (expected * ntx).sum(), atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_batched_weighted_contrastive_equals_pairwise_loop(normalize):
    """The one batched NT-Xent gives the per-pair loop's loss and gradients (τ, cosine option)."""
    torch.manual_seed(1)
    leaves = {name: torch.randn(5, 8, requires_grad=True) for name in ("ll", "fl", "lf", "ff")}
    loss, _ = weighted_contrastive(leaves, tau=0.7, normalize=normalize)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    pairs = list(itertools.combinations(leaves, 2))
    alpha = torch.softmax(torch.stack([-(leaves[p] * leaves[q]).sum(-1).mean() for p, q in pairs]), 0)
    looped = (alpha * torch.stack([nt_xent(leaves[p], leaves[q], 0.7, normalize) for p, q in pairs])).sum()
    assert torch.allclose(loss, looped, atol=1e-6)
    for g, h in zip(grads, torch.autograd.grad(looped, list(leaves.values()))):
        assert torch.allclose(g, h, atol=1e-6)


def test_lambda_schedule_defaults():
    assert round(lambda_schedule(1, 1.0, 1e-5, 200), 3) == 0.944
    assert round(lambda_schedule(50, 1.0, 1e-5, 200), 4) == 0.0562
    assert math.isclose(lambda_schedule(200, 1.0, 1e-5, 200), 1e-5)


def test_frozen_net_unchanged_but_in_train_mode():
    frozen = tiny(seed=1, dropout=0.5)
    model = FLAME(tiny(dropout=0.5), frozen, FlameConfig())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert frozen.training and all(m.training for m in frozen.modules())
    model.loss({"seq": toy_seq(), "target": torch.tensor([7, 1, 7]), "lam": 1.0}).backward()
    assert all(p.grad is None for p in frozen.parameters())
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    model_eval = FLAME(tiny(), tiny(seed=1), FlameConfig(frozen_mode="eval")).train()
    assert model_eval.learnable.training and not model_eval.frozen.training


@pytest.mark.parametrize("path", ["ll", "fl", "lf", "ff"])
def test_gradients_reach_learnable_embeddings_from_each_path(path):
    model = FLAME(tiny(), tiny(seed=1), FlameConfig())
    z = model.path_outputs(toy_seq(), path_order(2))
    (z[path] * torch.randn(z[path].shape)).sum().backward()  # a plain sum of a LayerNorm output is constant
    grad = model.learnable.item_emb.weight.grad
    assert grad is not None and grad[1:].abs().sum() > 0  # z_ff only through cross-attention


def test_reference_four_paths_match_manual_construction():
    model = FLAME(tiny(), tiny(seed=1), FlameConfig())
    seq = toy_seq()
    e_l, e_f = model.learnable.embed(seq), model.frozen.embed(seq)
    x, m2 = torch.cat([e_l, e_f], 1), model.learnable.mask(seq, tiles=2)
    y_l, y_f = model.learnable.seq_encoder(x, m2), model.frozen.seq_encoder(x, m2)
    z = model.path_outputs(seq, path_order(2))
    for name, ref in {"ll": y_l[:, L - 1], "fl": y_l[:, -1], "lf": y_f[:, L - 1], "ff": y_f[:, -1]}.items():
        assert torch.allclose(z[name], ref, atol=1e-6)


def test_per_block_split_and_path_sampling():
    model = FLAME(tiny(), tiny(seed=1), FlameConfig(split="per_block"))
    assert len(model.all_paths) == 8
    z = model.path_outputs(toy_seq(), model.all_paths)
    assert len(list(itertools.combinations(z, 2))) == 28
    # independent mixing = each path computed on its own with the plain mask
    ind = FLAME(model.learnable, model.frozen, FlameConfig(split="per_block", path_mixing="independent"))
    z_ind = ind.path_outputs(toy_seq(), ["lfl"])
    seq = toy_seq()
    m = model.learnable.mask(seq)
    h = model.learnable.seq_encoder.block(1, model.frozen.seq_encoder.block(0, model.learnable.embed(seq), m), m)
    assert torch.allclose(z_ind["lfl"], h[:, -1], atol=1e-6)
    sampled = FLAME(tiny(), tiny(seed=1), FlameConfig(split="per_block", num_paths=3))
    terms = sampled.loss_terms({"seq": seq, "target": torch.tensor([7, 1, 7]), "lam": 1.0})
    assert sum(k.startswith("alpha/") for k in terms) == 3  # C(3, 2) pairs
    with pytest.raises(ValueError, match="num_paths"):
        FLAME(tiny(), tiny(), FlameConfig(num_paths=5))


def test_loader_round_trip_and_shape_refusal(tmp_path):
    model = tiny(seed=3).eval()
    state = sasrec_state(model)
    assert len(state) == 4 + 2 * 16 and "seq_encoder.mhas.1.w.weight" in state
    torch.save(state, tmp_path / "ours.pt")
    loaded = load_frozen(tiny(seed=4), tmp_path / "ours.pt").eval()
    seq = toy_seq()
    assert torch.equal(loaded.score_all({"seq": seq}), model.score_all({"seq": seq}))
    with pytest.raises(ValueError, match="item_emb.weight"):
        load_frozen(tiny(num_items=20), tmp_path / "ours.pt")
    with pytest.raises(FileNotFoundError):
        load_frozen(tiny(), tmp_path / "missing.pt")


def test_score_all_shape_padding_column_and_inference_paths():
    a, b = tiny().eval(), tiny(seed=1).eval()
    batch = {"seq": toy_seq()}
    scores = a.score_all(batch)
    assert scores.shape == (3, 13) and torch.isinf(scores[:, 0]).all()
    assert torch.equal(FLAME(a, b, FlameConfig()).eval().score_all(batch), scores)  # §7.6: learnable only
    mean = AveragedLogits([a, b]).score_all(batch)
    assert torch.allclose(mean[:, 1:], (scores[:, 1:] + b.score_all(batch)[:, 1:]) / 2)


def test_overfits_a_tiny_dataset():
    model = tiny(dropout=0.0, d=32)
    seq = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 1, 2]])
    batch = {"seq": seq, "target": torch.tensor([4, 9, 3])}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(model.loss(batch).detach())
    for _ in range(60):
        optimizer.zero_grad()
        model.loss(batch).backward()
        optimizer.step()
    assert float(model.loss(batch).detach()) < 0.1 * first
    model.eval()
    assert torch.equal(model.score_all(batch)[:, 1:].argmax(1) + 1, batch["target"])


def test_training_samples_and_truncation():
    data = build_data([np.arange(1, 8), np.arange(101, 161)], DataConfig())
    assert len(data.train_target) == 4 + 50
    first = data.train_seq[:4]
    for k in range(1, 5):  # sample k: input s[0..k-1] left-padded to 50, target s[k] (method.md §3.4)
        assert first[k - 1, -k:].tolist() == list(range(1, k + 1)) and not first[k - 1, :-k].any()
    assert data.train_target[:4].tolist() == [2, 3, 4, 5]
    assert data.valid_seq[0, -5:].tolist() == [1, 2, 3, 4, 5] and data.valid_target[0] == 6
    assert data.test_seq[0, -6:].tolist() == [1, 2, 3, 4, 5, 6] and data.test_target[0] == 7
    # length 60 -> last 53 (108..160): train part 108..158, valid input its last 50, targets 159, 160
    assert data.valid_hist[1][data.valid_hist[1] > 0].tolist() == list(range(108, 159))
    assert data.valid_seq[1].tolist() == list(range(109, 159)) and data.valid_target[1] == 159
    assert data.test_seq[1].tolist() == list(range(110, 160)) and data.test_target[1] == 160
    assert data.train_target[4] == 109 and data.num_items == 160
    assert len(build_data([np.arange(1, 61)], DataConfig(truncate="none")).train_target) == 57


def test_reference_seen_mask_quirk():
    scores = torch.tensor([[-1.0, 2.0, -3.0, 4.0]])  # items 1..4
    hist = torch.tensor([[1, 3, 3, 0]])  # item 1 seen once, item 3 twice
    assert seen_adjust(scores, hist, "reference").tolist() == [[0.0, 2.0, -3.0, 4.0]]
    assert seen_adjust(scores, hist, "zero").tolist() == [[0.0, 2.0, 0.0, 4.0]]
    assert seen_adjust(scores, hist, "neg_inf").tolist() == [[-math.inf, 2.0, -math.inf, 4.0]]
    assert seen_adjust(scores, hist, "none").tolist() == scores.tolist()


def test_argsort_rank_equals_double_argsort_without_ties():
    torch.manual_seed(0)
    scores, target = torch.randn(8, 30), torch.randint(1, 31, (8,))
    order = torch.argsort(scores, dim=1, descending=True)
    double = torch.argsort(order, dim=1).gather(1, (target - 1)[:, None]).flatten()
    assert torch.equal(leave_one_out_ranks(scores, target, "argsort"), double)
    assert torch.equal(leave_one_out_ranks(scores, target, "strict"), double)


def test_a_nan_logit_is_refused_not_ranked_first():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [0.3, 0.2, 0.1, 0.0]])
    scores[0, 2] = float("nan")                                         # the target's own logit
    for rule in ("strict", "argsort"):
        with pytest.raises(ValueError, match="^flame.evaluate.leave_one_out_ranks: 1 NaN logit"):
            leave_one_out_ranks(scores, torch.tensor([3, 4]), rule)


def test_ranks_and_metrics_hand_case():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [0.3, 0.2, 0.1, 0.0]])
    target = torch.tensor([3, 4])
    assert leave_one_out_ranks(scores, target, "strict").tolist() == [1, 3]
    assert leave_one_out_ranks(scores, target, "argsort")[1] == 3
    assert leave_one_out_ranks(scores, target, "argsort")[0] in (1, 2)  # tie with item 4

    class Fixed(torch.nn.Module):
        def score_all(self, batch):
            return F.pad(scores, (1, 0), value=-math.inf)

    out = evaluate(Fixed(), torch.zeros(2, L, dtype=torch.long), target, torch.zeros(2, 1, dtype=torch.long),
                   "none", "strict")
    assert out["HR@1"] == 0.0 and out["HR@5"] == 100.0
    assert math.isclose(out["NDCG@5"], 100 * (1 / math.log2(3) + 1 / math.log2(5)) / 2)
