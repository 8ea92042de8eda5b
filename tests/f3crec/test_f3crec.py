"""F3CRec unit tests: block builder, ARM, ITM, FedAvg, metrics, LA/RA/H, learning-rate rules (method.md §15)."""
import math

import numpy as np
import pytest
import torch

from f3crec.data import build_blocks, expected_blocks, load_blocks, split_sizes, write_blocks
from f3crec.method import item_temporal_mean, kd_terms, memory_size, target_ranks
from f3crec.config import BackboneConfig, Config, MethodName, resolve
from f3crec.evaluate import evaluate, la_ra_h
from f3crec.model import BACKBONES, learning_rates
from f3crec.server import aggregate


def _stream():
    """Hand-made stream: user 9 and item 50 need a second k-core pass; equal timestamps test stability."""
    rng = np.random.default_rng(0)
    rows = [(u, i) for u in range(1, 7) for i in range(1, 6)]     # 6 users x 5 items: a 3-core
    rows += [(9, 1), (9, 50), (7, 50), (8, 50)]                  # item 50 (3 users) dies once user 9 goes
    users, items = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    stamps = rng.integers(0, 5, size=len(rows))                  # many ties
    return {"user": users, "item": items, "timestamp": stamps, "rating": np.ones(len(rows))}


def test_block_builder_core_order_fractions_and_splits():
    inter = _stream()
    blocks = build_blocks(inter, seed=3, core=3)
    all_items = np.concatenate([b.item_list for b in blocks])
    assert all_items.size == 30                                  # users 7-9 and item 50 gone (2 passes)
    sizes = [b.item_list.size for b in blocks]
    assert sizes == [int(0.6 * 30), int(0.4 / 3 * 30), int(0.4 / 3 * 30), 30 - 18 - 4 - 4]
    # Stable global time order: block boundaries follow the sorted timestamps, ties in file order.
    keep = ~np.isin(inter["user"], [7, 8, 9]) & (inter["item"] != 50)
    order = np.argsort(inter["timestamp"][keep], kind="stable")
    raw_items = inter["item"][keep][order]
    _, first = np.unique(raw_items, return_index=True)
    expected_ids = {raw: rank for rank, raw in enumerate(raw_items[np.sort(first)])}
    stream_ids = np.array([expected_ids[x] for x in raw_items])
    assert np.array_equal(np.sort(blocks[0].item_list), np.sort(stream_ids[:18]))  # ids by first appearance
    for b in blocks:
        for user, train in b.train.items():
            n = len(train) + len(b.valid.get(user, [])) + len(b.test.get(user, []))
            assert (len(train), len(b.valid.get(user, [])), len(b.test.get(user, []))) == split_sizes(n)


def test_kcore_fixed_point_and_chronological_incremental_split():
    rng = np.random.default_rng(5)
    n = 3000
    inter = {"user": rng.integers(0, 80, n), "item": rng.zipf(1.5, n) % 120, "timestamp": rng.integers(0, 10**6, n),
             "rating": np.ones(n)}
    blocks = build_blocks(inter, seed=1, core=10)
    users = np.concatenate([np.repeat(u, len(v)) for b in blocks for s in ("train", "valid", "test")
                            for u, v in b.split(s).items()])
    items = np.concatenate([v for b in blocks for s in ("train", "valid", "test") for v in b.split(s).values()])
    assert np.bincount(users).min() >= 10 and np.bincount(items)[np.unique(items)].min() >= 10
    assert blocks[-1].n_users == np.unique(users).size and blocks[-1].n_items == np.unique(items).size
    assert blocks[0].n_users <= blocks[1].n_users <= blocks[3].n_users


def test_incremental_split_is_chronological():
    """D¹–D³: a user's oldest items are train, then valid, and the latest are test (§1.1 step 7)."""
    n = 400
    rng = np.random.default_rng(2)
    inter = {"user": np.tile(np.arange(4), n // 4), "item": np.arange(n), "timestamp": np.arange(n) * 10,
             "rating": np.ones(n)}
    inter["item"] = rng.permutation(n)                           # item ids follow time after remapping
    blocks = build_blocks(inter, seed=0, core=1)
    for b in blocks[1:]:
        for user, train in b.train.items():
            valid, test = b.valid.get(user, []), b.test.get(user, [])
            assert max(train) < min(valid) and max(valid) < min(test)


@pytest.mark.parametrize("n,expected", [(2, (2, 0, 0)), (3, (1, 1, 1)), (10, (8, 1, 1)), (11, (8, 1, 2))])
def test_split_sizes(n, expected):
    assert split_sizes(n) == expected


def test_loader_round_trip_and_validation(tmp_path):
    blocks = build_blocks(_stream(), seed=3, core=3)
    write_blocks(tmp_path, blocks, {"dataset": "hand"})
    loaded = load_blocks(tmp_path)
    assert [b.stats() for b in loaded] == [b.stats() for b in blocks]
    bad = tmp_path / "block_2.json"
    bad.write_text(bad.read_text().replace('"item_list": [', '"item_list": [0, '))
    with pytest.raises(ValueError, match="item_list"):
        load_blocks(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_blocks(tmp_path / "missing")


def test_arm_hand_example():
    # 6 items, T^u = [2, 0, 4]; current scores rank items as 4 > 2 > 5 > 0 > 1 > 3.
    scores = torch.tensor([[0.3, 0.1, 0.9, 0.0, 1.0, 0.5]])
    ranks = target_ranks(scores, torch.tensor([[2, 0, 4]]))
    assert ranks.tolist() == [[2, 4, 1]]
    d, p, m = memory_size(ranks, eps=0.1, topn=3)
    assert d.item() == abs(1 - 2) + abs(2 - 4) + abs(3 - 1) == 5
    assert p.item() == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert m.item() == math.floor(3 * math.exp(-0.5)) == 1
    # m = N when nothing moved, m = 0 for a large discrepancy (ε = 0.006, N = 30: D ≥ 567 gives 0).
    same = torch.arange(1, 31)[None]
    assert memory_size(same, 0.006, 30)[2].item() == 30
    assert memory_size(same.flip(1) * 0 + 30, 0.006, 30)[2].item() == math.floor(30 * math.exp(-0.006 * 435))
    far = torch.full((1, 30), 50)
    assert memory_size(far, 0.006, 30)[0].item() >= 567 and memory_size(far, 0.006, 30)[2].item() == 0
    assert memory_size(torch.tensor([[1] * 10 + [2] * 10 + [3] * 10]), 0.006, 30)[0].item() == sum(
        abs(r - c) for r, c in zip(range(1, 31), [1] * 10 + [2] * 10 + [3] * 10))


def test_kd_loss_is_soft_bce_on_probabilities():
    s, y = torch.tensor([0.2, -1.0, 3.0]), torch.tensor([1.0, 0.5, -2.0])
    ps, py = torch.sigmoid(s), torch.sigmoid(y)
    hand = -(py * torch.log(ps) + (1 - py) * torch.log(1 - ps))
    assert torch.allclose(kd_terms(s, y), hand, atol=1e-6)


def test_itm_against_direct_formula():
    torch.manual_seed(0)
    previous, mean = torch.randn(4, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    mean[1] = previous[1]                                          # an item that did not move: δ = 1
    mixed, weight = item_temporal_mean(mean, previous, beta=0.9)
    for i in range(4):
        delta = 1 / (1 + float(((previous[i] - mean[i]) ** 2).sum()) / 3.0)
        expected = (1 - 0.9 * delta) * mean[i] + 0.9 * delta * previous[i]
        assert torch.allclose(mixed[i], expected) and weight[i].item() == pytest.approx(0.9 * delta)
    assert weight[1].item() == pytest.approx(0.9)
    assert torch.equal(mixed[4:], mean[4:])                       # new items untouched


def test_fedavg_matches_numpy():
    rng = np.random.default_rng(1)
    tables = [rng.normal(size=(5, 3)) for _ in range(4)]
    got = aggregate([torch.from_numpy(t) for t in tables])
    assert np.allclose(got.numpy(), np.mean(tables, axis=0))


def test_metrics_brute_force_and_masking():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    positives = {0: np.array([1, 4]), 1: np.array([5])}
    out = evaluate(scores, [0, 1], positives, [{0: np.array([0])}], decimals=None)
    # user 0: item 0 masked -> ranking 1,2,3,4,5 : positives at ranks 1 and 4; user 1: hit at rank 1.
    ndcg0 = (1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert out["ndcg"] == pytest.approx((ndcg0 + 1.0) / 2)
    assert out["recall"] == pytest.approx(1.0)
    many = torch.arange(30, dtype=torch.float64)[None].flip(1)    # |test| = 25 > 20: recall = 20/25
    res = evaluate(many, [0], {0: np.arange(25)}, [], decimals=5)
    assert res["recall"] == 0.8 and res["ndcg"] == 1.0


def test_la_ra_h_known_matrix():
    a = [[0.4], [0.3, 0.5], [0.2, 0.3, 0.6], [0.1, 0.2, 0.3, 0.8]]
    out = la_ra_h(a)
    la, ra = (0.4 + 0.5 + 0.6 + 0.8) / 4, (0.1 + 0.2 + 0.3 + 0.8) / 4
    assert out["LA"] == pytest.approx(la) and out["RA"] == pytest.approx(ra)
    assert out["H"] == pytest.approx(2 * la * ra / (la + ra))
    assert la_ra_h([[0.0]])["H"] == 0.0


def test_learning_rate_rules():
    assert learning_rates(BackboneConfig("fedmf", lr=1.0), 1136) == {"p": 1.0, "Q": 1136.0}
    ncf = learning_rates(BackboneConfig("fedncf", lr=0.1, lr_eta=80), 100)
    assert ncf == {"w": 0.1, "b": 0.1, "p": pytest.approx(8.0), "Q": pytest.approx(800.0)}
    assert set(learning_rates(BackboneConfig("pfedrec"), 10)) == {"w", "b", "Q"}


def test_backbone_table_matches_config_choices_and_quirks_follow_fidelity():
    """The Literal of backbone.name is the table's keys; each unset [Q] key follows fidelity (§0)."""
    import typing
    from f3crec.config import BackboneConfig as B
    assert set(typing.get_args(typing.get_type_hints(B)["name"])) == set(BACKBONES)
    assert set(typing.get_args(MethodName)) >= {"ft", "arm", "itm", "f3crec"}
    for name, net in BACKBONES.items():
        assert {n for step in net.substeps for n in step} == set(net.private_shapes(4)) | {"Q"}, name
    cfg, flags = resolve(Config())
    assert (flags["handoff"], cfg.quirks.private_init_round0, cfg.quirks.emb_init, flags["metric_decimals"]) \
        == ("last", "shared", "reference", 5)
    clean, clean_flags = resolve(Config(fidelity=False))
    assert (clean_flags["handoff"], clean.quirks.emb_init, clean_flags["metric_decimals"]) == ("best", "small", None)
    one = Config()
    one.quirks.metric_decimals, one.quirks.emb_init = -1, "small"     # explicit values override fidelity
    resolved, one_flags = resolve(one)
    assert one_flags["metric_decimals"] is None and resolved.quirks.emb_init == "small"


@pytest.mark.slow
def test_reference_blocks_statistics(shared_data):
    blocks = load_blocks(shared_data / "f3crec-ml-100k-blocks")
    assert [b.stats() for b in blocks] == expected_blocks("ml-100k")
    returning = [sum(u < blocks[t - 1].n_users for u in blocks[t].train) for t in (1, 2, 3)]
    assert returning == [107, 108, 91]
    assert [sum(1 for u in b.train if u not in b.test) for b in blocks] == [1, 18, 16, 17]


@pytest.mark.slow
def test_raw_ml100k_pipeline_statistics(shared_data):
    from f3crec.data import prepare_blocks
    blocks = load_blocks(prepare_blocks("ml-100k", seed=1, root=str(shared_data)))
    assert [b.stats() for b in blocks] == expected_blocks("ml-100k")


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.2])  # m = N, 0 < m < N, m = 0
def test_kd_gradient_reaches_only_p_and_memory_rows(eps):
    from f3crec.model import init_private
    from f3crec.round import RoundContext
    from f3crec.sim_reference import Client, LocalModel
    cfg = BackboneConfig(dtype="float64")
    torch.manual_seed(0)
    items = torch.randn(8, 32, dtype=torch.float64)               # item 7 is new in this block
    client = Client(0, init_private(cfg, "reference", 0, 0))
    client.topn, client.yhat = torch.tensor([5, 1, 6]), torch.randn(3, dtype=torch.float64)   # ŷ at T^u's items
    ctx = RoundContext(block=1, round=0, n_items=8, n_prev_users=1, n_prev_items=7, lrs={},
                       flags={"arm": "adaptive", "kd_weight": 1.0, "reg": None}, net=BACKBONES["fedmf"], seed=0,
                       eps=eps, topn=3)
    model = LocalModel(BACKBONES["fedmf"], items, client.private)
    stats = {"D": [], "m": []}
    perm = np.array([2, 0, 1])
    loss = client._continual_loss(model, perm, ctx, stats)
    size = stats["m"][0]
    ranks = target_ranks(model.score_all().detach()[None], client.topn[None])[0]   # ranks over all 8 items
    assert stats["D"][0] == int((torch.arange(1, 4) - ranks).abs().sum())
    assert size == math.floor(3 * math.exp(-eps * stats["D"][0]))
    if size == 0:
        assert loss == 0.0
        return
    loss.backward()
    touched = model.items.grad.abs().sum(1).nonzero().flatten().tolist()
    assert touched == sorted(client.topn[perm[:size]].tolist())
    assert model.private["p"].grad.abs().sum() > 0


def test_target_ranks_equal_a_stable_descending_sort_with_ties():
    """The counting ranks (§6 step 2) equal the positions in a stable descending sort, ties included."""
    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        rows, n_items = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(30, 70, (1,), generator=g))
        scores = torch.randint(0, 5 if trial % 2 else 1000, (rows, n_items), generator=g).double()
        targets = torch.stack([torch.randperm(n_items, generator=g)[:30] for _ in range(rows)])
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        position = torch.empty_like(order).scatter_(1, order, torch.arange(n_items).expand_as(order))
        assert torch.equal(target_ranks(scores, targets), position.gather(1, targets) + 1)


def test_top_n_equals_a_stable_descending_sort_with_ties():
    """T^u (§6): the first N of a stable descending sort (ties to the lower id), found without sorting."""
    from f3crec.round import top_n
    g = torch.Generator().manual_seed(1)
    for trial in range(100):
        rows, n_items = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(30, 60, (1,), generator=g))
        scores = torch.randint(0, 4 if trial % 2 else 1000, (rows, n_items), generator=g).float()
        assert torch.equal(top_n(scores, 30), torch.argsort(scores, dim=1, descending=True, stable=True)[:, :30])


def test_a_diverged_round_stops_in_one_line():
    """A non-finite aggregate (e.g. FedNCF at the reference lr 0.5) is a FloatingPointError naming the fix,
    which the CLI prints as one line, not an error deep inside the next round's KD loss."""
    from f3crec.server import Server
    server = Server(torch.zeros(3, 2), beta=0.9, itm=False)
    with pytest.raises(FloatingPointError, match="backbone.lr"):
        server.aggregate([torch.tensor([[0.0, float("nan")], [0.0, 0.0], [0.0, 0.0]])])
