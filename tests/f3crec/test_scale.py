"""F3CRec at scale: evaluation in chunks with sparse masks equals one dense evaluation bit for bit and
keeps no users × items mask; the synthetic generator's draws do not depend on its chunk size."""
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from f3crec.config import Config, resolve
from f3crec.data import get_blocks, synthetic_stream
from f3crec import evaluate as ev
from f3crec.model import BACKBONES
from f3crec.train import end_block, grow, make_simulator, round_context

SMOKE = Path(__file__).resolve().parents[2] / "f3crec" / "configs" / "smoke.yaml"


def test_synthetic_stream_does_not_depend_on_its_chunk():
    whole, chunked = synthetic_stream(60, 50, 2400, 3, chunk=10**6), synthetic_stream(60, 50, 2400, 3, chunk=7)
    assert all(np.array_equal(whole[k], chunked[k]) for k in whole) and 0 < whole["user"].size <= 2400


@pytest.mark.parametrize("backbone", ["fedmf", "fedncf"])
def test_chunked_sparse_evaluation_equals_one_dense_evaluation(backbone):
    cfg, flags = resolve(load_config(Config, SMOKE, [f"backbone.name={backbone}"]))
    blocks, _ = get_blocks(cfg.data, cfg.train.seed)
    sim = grow(None, lambda items, private: make_simulator(cfg, flags, items, private), cfg, blocks, 0, 1)
    sim.server.items = sim.server.items + 0.3 * torch.randn_like(sim.server.items)   # scores with some spread
    net, block = BACKBONES[backbone], blocks[0]
    for users, positives, exclude in [(sorted(block.valid), block.valid, [block.train]),
                                      (sorted(block.test), block.test, ev.test_exclude(blocks, 0, 0, "cumulative"))]:
        dense = ev.metric_sums(ev.oracle_scores(sim, torch.tensor(users), net), users, positives, exclude,
                            ev.eval_masks(users, positives, exclude, block.n_items))
        for chunk in (1, 5, 64, 10**6):
            masks = ev.sparse_masks(users, positives, exclude, chunk=chunk)
            assert len(masks) == -(-len(users) // chunk)
            # O(interactions): exactly one (row, item) pair per positive and per excluded interaction
            assert sum(m[2].shape[1] for m in masks) == sum(len(positives[u]) for u in users)
            assert sum(m[3].shape[1] for m in masks) == sum(len(part[u]) for u in users for part in exclude
                                                            if u in part)
            assert ev.oracle_sums(sim, net, users, masks, block.n_items) == dense     # exact Fractions, equal
        assert dense["ndcg"][1] == len(users) and 0 < dense["ndcg"][0] < len(users)


def test_ml100k_shaped_blocks_have_the_shape_and_disjoint_splits():
    from f3crec.bench import ml100k_shaped_blocks
    base, inc = ml100k_shaped_blocks(2000)
    assert base.n_items == inc.n_items == 2440 and base.n_users == 2000 and inc.n_users == 2340
    per_user = np.mean([sum(len(b.split(s).get(u, ())) for s in ("train", "valid", "test")) for b in [base]
                        for u in base.train])
    assert 85 < per_user < 95 and len(base.train) == 2000                   # ≈ 94 drawn, minus repeats
    returning = [u for u in inc.train if u < base.n_users]
    assert 0.4 < len(returning) / len(inc.train) < 0.7                      # about half of D¹ returns
    for block in (base, inc):
        for u, items in block.train.items():
            parts = [items, block.valid.get(u, np.zeros(0, np.int64)), block.test.get(u, np.zeros(0, np.int64))]
            joined = np.concatenate(parts)
            assert np.unique(joined).size == joined.size and joined.max() < block.n_items
            assert len(parts[0]) >= len(parts[1]) >= len(parts[2]) - 1


def test_bench_scale_reports_a_row_per_size(capsys):
    from f3crec.bench import main
    out = main(["--scale", "--sizes", "60", "120", "--rounds", "1"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 60 ") or
             line.startswith("| 120 ")]
    assert sorted(out) == [60, 120] and len(table) == 2
    for res in out.values():
        assert res["block0"]["cpu_s_per_round"] > 0 and res["block1"]["clients"] > 0 and res["peak_rss_mb"] > 50


def test_bench_scale_times_the_compiled_simulator_when_asked(capsys):
    pytest.importorskip("numba")
    from f3crec.bench import main
    out = main(["--scale", "--simulator", "compiled", "--sizes", "60", "--rounds", "1"])
    printed = capsys.readouterr().out
    assert "compiled simulator" in printed and any(line.startswith("| 60 ") for line in printed.splitlines())
    assert out[60]["simulator"] == "CompiledSimulator" and out[60]["block0"]["validation_cpu_s"] > 0
    for block in ("block0", "block1"):   # the first round (with the layout) apart from the steady rounds
        res = out[60][block]
        assert res["first_cpu_s"] > 0 and len(res["steady_cpu_s"]) == 1
        assert res["cpu_s_per_round"] == res["steady_cpu_s"][0]
    assert main(["--scale", "--sizes", "60", "--rounds", "1"])[60]["simulator"] == "VectorisedSimulator"


def test_bench_scale_times_the_in_process_flower_grid_on_the_synthetic_blocks(capsys):
    """--simulator flower: two in-process nodes (compiled) train and validate the synthetic blocks, not block files."""
    pytest.importorskip("flwr")
    from f3crec.bench import main
    out = main(["--scale", "--simulator", "flower", "--sizes", "60", "--rounds", "1", "federation.nodes=2"])
    assert "flower simulator" in capsys.readouterr().out
    res = out[60]
    assert res["simulator"] == "FlowerSimulator" and res["block0"]["clients"] == 60 and res["block1"]["clients"] > 0
    assert res["block0"]["validation_cpu_s"] > 0 and res["block1"]["cpu_s_per_round"] > 0


def _sims(overrides, **kwargs):
    """Two vectorised simulators on the smoke stream (float64, several local steps), built with `kwargs`[i]."""
    from f3crec.sim_vectorised import VectorisedSimulator
    cfg, flags = resolve(load_config(Config, SMOKE, ["backbone.dtype=float64", "federation.batch_size=16",
                                                     "method.kd_weight=1.0", "method.eps=0.02", *overrides]))
    blocks, _ = get_blocks(cfg.data, cfg.train.seed)
    sims = []
    for options in kwargs["options"]:
        sim = grow(None, lambda items, private: make_simulator(cfg, flags, items, private, blocks), cfg, blocks, 0, 1)
        sims.append(VectorisedSimulator(sim.server, sim.state, **options).attach(cfg, flags, blocks))
    return cfg, flags, blocks, sims


@pytest.mark.parametrize("overrides", [[], ["backbone.name=pfedrec", "backbone.lr=0.02"],
                                       ["method.name=topn_kd", "federation.ldp_scale=0.01"]])
def test_a_round_in_client_groups_equals_one_flat_round(overrides):
    """Large rounds are trained a group of clients at a time (memory O(group)); the result is one flat
    sparse round's, ARM and KD included, in the base and an incremental block: bit for bit for FedMF."""
    from f3crec.train import end_block
    cfg, flags, blocks, (flat, grouped) = _sims(overrides, options=[{"dense_limit": 0},
                                                                     {"dense_limit": 0, "group_samples": 150}])
    for t in (0, 1):
        if t:
            for sim in (flat, grouped):
                sim.save_slot("best"), sim.save_slot("last")
                end_block(sim, cfg, blocks, 0, flags)
                grow(sim, None, cfg, blocks, 1, 1)
        for r in range(3):
            ctx = round_context(cfg, flags, blocks, t, r)
            plan = flat.plan(ctx)
            assert len(grouped._groups(plan, ctx)) > 2                     # really split into groups
            stats_flat, stats_grouped = flat.train_round(plan, ctx), grouped.train_round(plan, ctx)
            assert sorted(stats_flat["D"]) == sorted(stats_grouped["D"]) and stats_flat.get("itm_w") == stats_grouped.get("itm_w")
            if not overrides:   # FedMF, the scale setting: the same tensors
                assert torch.equal(flat.server.items, grouped.server.items)
                assert all(torch.equal(v, grouped.state.private[k]) for k, v in flat.state.private.items())
            # PFedRec / LDP: within a few ulps (a kernel's summation order can follow the group's shape)
            assert torch.allclose(flat.server.items, grouped.server.items, rtol=0, atol=1e-13)
            for k, v in flat.state.private.items():
                assert torch.allclose(v, grouped.state.private[k], rtol=0, atol=1e-13)
        if t and flags["arm"] == "adaptive":
            assert stats_flat["m"]                                          # KD ran in the groups


def test_evaluation_and_block_end_never_score_users_times_items_at_once(monkeypatch):
    """With a small budget, every score matrix of validation, a_{t,i} and the block end has at most
    max(budget, SCORE_ROWS × items) entries, far below users × items, and the metrics do not change."""
    from f3crec import round as rd
    cfg, flags, blocks, (sim,) = _sims([], options=[{}])
    block, net = blocks[0], BACKBONES[cfg.backbone.name]
    ctx = round_context(cfg, flags, blocks, 0, 0)
    sim.train_round(None, ctx)
    whole = sim.validate(ctx, None)
    row = sim.test_row(0, flags["old_block_mask"], None)
    shapes, real = [], rd.score_matrix

    def recording(net, private, items):
        out = real(net, private, items)
        shapes.append(tuple(out.shape))
        return out
    monkeypatch.setattr(ev, "score_matrix", recording)
    monkeypatch.setattr(rd, "score_matrix", recording)
    monkeypatch.setattr(ev, "EVAL_BUDGET", ev.SCORE_ROWS * block.n_items)      # one product per chunk
    monkeypatch.setattr(rd, "SCORE_BUDGET", 3 * block.n_items)
    monkeypatch.setattr(ev, "SCORE_ROWS", 4)
    sim._valid = None
    cap = 4 * block.n_items
    assert sim.validate(ctx, None) == whole and sim.test_row(0, flags["old_block_mask"], None) == row
    assert shapes and max(a * b for a, b in shapes) <= cap < len(block.valid) * block.n_items
    shapes.clear()
    sim.save_slot("best"), sim.save_slot("last")
    before = {k: v.clone() for k, v in sim.state.private.items()}
    end_block(sim, cfg, blocks, 0, flags)
    assert shapes and max(a * b for a, b in shapes) <= 3 * block.n_items < block.n_users * block.n_items
    st = sim.state       # ŷ kept at T^u only: (U, N), each the best model's score of that item
    scores = rd.score_matrix(net, before, sim.server.items)
    assert st.yhat.shape == st.topn.shape == (block.n_users, cfg.method.topn) and bool(st.has_topn.all())
    # (a product's rows can differ in the last bit with its row count, so ŷ is compared to rounding)
    assert torch.allclose(st.yhat, scores.gather(1, st.topn), rtol=1e-12, atol=0)
    assert torch.equal(st.topn, torch.argsort(scores, dim=1, descending=True, stable=True)[:, :cfg.method.topn])


def test_checkpoint_is_sized_by_the_state_not_users_times_items():
    """After a block end nothing in the simulator's state_dict is users × items."""
    cfg, flags, blocks, (sim,) = _sims([], options=[{}])
    sim.save_slot("best"), sim.save_slot("last")
    end_block(sim, cfg, blocks, 0, flags)
    users, items = blocks[0].n_users, blocks[0].n_items

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
    state = list(tensors(sim.state_dict()))
    assert all(t.shape[:2] != (users, items) for t in state)
    dim, topn = cfg.backbone.dim, cfg.method.topn
    # Φ, its two slots, θ*, F (U × d each), T^u and ŷ (U × N), flags; Q, Q^{t−1}, slots, received Q (I × d)
    assert sum(t.numel() for t in state) <= users * (5 * dim + 2 * topn + 2) + items * dim * 5


def test_ml100k_shaped_generator_memory_is_linear_in_its_interactions():
    """The scale generator holds O(interactions) memory (tracemalloc sees numpy's buffers): the peak per
    interaction does not grow with the size, and is far below one users × items array."""
    import tracemalloc
    from f3crec.bench import ml100k_shaped_blocks
    per_interaction = []
    for clients in (1000, 6000):
        tracemalloc.start()
        base, inc = ml100k_shaped_blocks(clients)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        interactions = base.stats()[0] + inc.stats()[0]
        assert 75 * clients < base.stats()[0] < 95 * clients             # ≈ 94 drawn per user, minus repeats
        if clients > 1000:
            assert peak < base.n_users * base.n_items * 8 / 4           # a quarter of one float64 users × items
        per_interaction.append(peak / interactions)
    assert per_interaction[1] < 1.25 * per_interaction[0]


def test_blocks_are_cached_in_binary_keyed_by_their_content(tmp_path, monkeypatch):
    """The second load of a block folder reads the binary cache (no JSON parsing) and gives the same blocks;
    a changed block file changes the key; a damaged cache file is parsed around and rewritten."""
    import json
    from f3crec import data
    from f3crec.data import build_blocks, cached_blocks, write_blocks
    folder = tmp_path / "blocks"
    write_blocks(folder, build_blocks(synthetic_stream(60, 50, 2400, 3), 3, core=3), {"dataset": "synthetic"})
    first, key = cached_blocks(folder)
    assert data.binary_path(key).is_file()

    def no_parsing(path):
        raise AssertionError(f"parsed {path}")
    monkeypatch.setattr(data, "load_json", no_parsing)
    second, key2 = cached_blocks(folder)
    assert key2 == key
    for a, b in zip(first, second):
        assert (a.n_users, a.n_items) == (b.n_users, b.n_items) and np.array_equal(a.item_list, b.item_list)
        for name in ("train", "valid", "test"):
            assert list(a.split(name)) == list(b.split(name))                     # same users, same order
            assert all(np.array_equal(v, b.split(name)[u]) and b.split(name)[u].dtype == np.int64
                       for u, v in a.split(name).items())
    monkeypatch.undo()
    raw = json.loads((folder / "block_3.json").read_text())
    user = next(u for u, v in raw["train_dict"].items() if len(v) > 1)
    raw["train_dict"][user] = raw["train_dict"][user][:-1]                          # drop one train item
    raw["item_list"] = raw["item_list"][:-1]
    (folder / "block_3.json").write_text(json.dumps(raw))
    changed, key3 = cached_blocks(folder)
    assert key3 != key and data.binary_path(key3).is_file()
    assert len(changed[3].train[int(user)]) == len(first[3].train[int(user)]) - 1
    data.binary_path(key3).write_bytes(b"not a zip")                              # damaged: parsed again
    again, _ = cached_blocks(folder)
    assert len(again[3].train[int(user)]) == len(changed[3].train[int(user)])
    assert cached_blocks(folder)[0][3].stats() == changed[3].stats()              # rewritten, readable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_mean_of_whole_tables_in_blocks_of_rows_equals_one_mean(dtype):
    """`aggregate` (the reference simulator's mean of uploaded tables) a block of item rows at a time, for any
    budget, is the one-shot mean over the clients (to rounding; exactly when one block holds everything)."""
    from f3crec.server import aggregate
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(53, 8, generator=g, dtype=dtype) for _ in range(7)]
    for budget in (1, 7 * 8 * 5, 1 << 24):          # one row, five rows, everything per block
        assert torch.allclose(aggregate(tables, budget=budget), torch.stack(tables).mean(0), rtol=0,
                              atol=1e-6 if dtype == torch.float32 else 1e-14)
    assert torch.equal(aggregate(tables), torch.stack(tables).mean(0))          # small: one block, as ever


def test_fused_evaluation_refuses_non_finite_scores_and_rows_without_positives():
    pos, exc = torch.tensor([[0, 1], [2, 0]]), torch.tensor([[0], [1]])
    scores = torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.9, 0.4]])
    sums = ev.sparse_metric_sums(scores.clone(), pos, exc)
    # user 0: item 1 excluded, positive 2 ranks 2nd of {0, 2}; user 1: positive 0 ranks 3rd
    assert sums["recall"] == (2, 2) and sums["ndcg"][0] == ev.Fraction(1 / np.log2(3)) + ev.Fraction(1 / np.log2(4))
    for bad in (float("nan"), float("inf")):
        broken = scores.clone()
        broken[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            ev.sparse_metric_sums(broken, pos, exc)
    with pytest.raises(ValueError, match="no positive"):
        ev.sparse_metric_sums(scores.clone(), pos[:, :1], exc)


def test_a_checkpoint_with_yhat_over_every_item_is_refused():
    from f3crec.client_state import ClientStates
    states = ClientStates({"p": torch.zeros(4, 8)}, topn=3)
    state = states.state_dict()
    ClientStates({"p": torch.zeros(4, 8)}, topn=3).load_state_dict(state)           # today's form loads
    with pytest.raises(ValueError, match="not resumable"):
        ClientStates({"p": torch.zeros(4, 8)}, topn=3).load_state_dict({**state, "yhat": torch.zeros(4, 50)})
