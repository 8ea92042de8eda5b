"""F3CRec simulators: the vectorised simulator equals the per-client reference (method.md §13), federated
training of one client equals centralised training, and the server cannot reach client state."""
import ast
import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import load_config
from f3crec.config import Config, resolve
from f3crec.data import get_blocks
from f3crec.model import BACKBONES, init_private, learning_rates
from f3crec.round import PlanMaker, RoundContext, make_plan, plan_inputs
from f3crec.server import Server
from f3crec.sim_reference import Client, LocalModel
from f3crec.train import end_block, grow, make_simulator, round_context

from conftest import late_joiner_blocks

SMOKE = Path(__file__).resolve().parents[2] / "f3crec" / "configs" / "smoke.yaml"


def _setup(overrides, stream="recurring", tmp_path=None):
    data = [f"data.blocks={late_joiner_blocks(tmp_path / 'late')}"] if stream == "late_joiners" else []
    cfg = load_config(Config, SMOKE, ["backbone.dtype=float64", "federation.batch_size=16", "method.kd_weight=1.0",
                                      "method.eps=0.02", *data, *overrides])
    cfg, flags = resolve(cfg)
    blocks, _ = get_blocks(cfg.data, cfg.train.seed)
    return cfg, flags, blocks


def _ctx(cfg, flags, blocks, t, r):
    return round_context(cfg, flags, blocks, t, r)


@pytest.mark.parametrize("stream", ["recurring", "late_joiners"])
@pytest.mark.parametrize("overrides", [
    [],                                                     # FedMF, ARM + ITM (the default F3CRec)
    ["backbone.name=pfedrec", "backbone.lr=0.02"],          # two sub-steps, round-0 reset
    ["backbone.name=fedncf", "backbone.lr=0.02", "method.name=emb_reg"],
    ["method.name=ewc"], ["method.name=naive_replay"], ["method.name=topn_kd", "federation.ldp_scale=0.01"],
    ["quirks.target_scores=matched", "method.name=arm"],     # Q7 clean: ŷ kept from the block that made T^u
])
@pytest.mark.heavy
def test_simulators_agree_round_by_round(overrides, stream, tmp_path):
    cfg, flags, blocks = _setup(overrides, stream, tmp_path)
    if stream == "late_joiners":
        assert all(blocks[t].n_users > blocks[t - 1].n_users for t in (1, 2))   # users join in later blocks
    factory = {}
    for name in ("reference", "vectorised"):
        c = load_config(Config, None, [f"federation.simulator={name}"])
        factory[name] = lambda items, private, c=c: make_simulator(
            cfg.__class__(**{**cfg.__dict__, "federation": c.federation}), flags, items, private)
    sims = {name: None for name in factory}
    saw_partial_memory = False
    for t in range(3):
        for name in sims:
            sims[name] = grow(sims[name], factory[name], cfg, blocks, t, cfg.train.seed)
        ref, vec = sims["reference"], sims["vectorised"]
        for r in range(3):
            ctx = _ctx(cfg, flags, blocks, t, r)
            positives, exclude = plan_inputs(dict(blocks[t].train), ref.topn_lists(), ctx)
            plan = make_plan(1, t, r, positives, exclude, blocks[t].n_items, 4, 16, 30, len(BACKBONES[cfg.backbone.name].substeps))
            assert np.diff(plan.step_offsets).max() > 1                      # multi-step clients occur
            stats_ref, stats_vec = ref.train_round(plan, ctx), vec.train_round(plan, ctx)
            assert sorted(stats_ref["D"]) == sorted(stats_vec["D"]) and sorted(stats_ref["m"]) == sorted(stats_vec["m"])
            saw_partial_memory |= any(0 < m < 30 for m in stats_ref["m"])
            scale = 1 + ref.server.items.abs().max()
            assert torch.allclose(ref.server.items, vec.server.items, rtol=0, atol=1e-10 * scale)
            for k, v in ref.private_matrix().items():
                assert torch.allclose(v, vec.private_matrix()[k], rtol=0, atol=1e-10 * (1 + v.abs().max()))
            for sim in sims.values():
                sim.save_slot("best")
        for sim in sims.values():
            sim.save_slot("last")
            end_block(sim, cfg, blocks, t, flags)
        a, b = ref.states(), vec.states()
        assert torch.equal(a.topn, b.topn) and torch.allclose(a.yhat, b.yhat, atol=1e-9)
    if flags["arm"] == "adaptive":
        assert saw_partial_memory


def test_simulators_same_metrics_over_a_short_run(tmp_path):
    from f3crec.main import main
    out = {}
    for name in ("reference", "vectorised"):
        out[name] = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / name), f"federation.simulator={name}",
                          "backbone.dtype=float64", "federation.rounds=3", "method.kd_weight=1.0"])
    assert out["reference"]["summary"] == out["vectorised"]["summary"]


def test_float32_one_round_allclose():
    cfg, flags, blocks = _setup(["backbone.dtype=float32", "federation.batch_size=64"])
    sims = {}
    for name in ("reference", "vectorised"):
        c = load_config(Config, None, [f"federation.simulator={name}"])
        run_cfg = cfg.__class__(**{**cfg.__dict__, "federation": c.federation})
        sims[name] = grow(None, lambda i, p, rc=run_cfg: make_simulator(rc, flags, i, p), cfg, blocks, 0, 1)
    ctx = _ctx(cfg, flags, blocks, 0, 0)
    plan = make_plan(1, 0, 0, dict(blocks[0].train), dict(blocks[0].train), blocks[0].n_items, 4, 64, 30, 1)
    for sim in sims.values():
        sim.train_round(plan, ctx)
    assert torch.allclose(sims["reference"].server.items, sims["vectorised"].server.items, atol=1e-6)


def test_one_client_one_round_equals_centralised_training():
    cfg = load_config(Config, None, ["backbone.dtype=float64", "backbone.lr=0.05"])
    n_items, user = 12, 0
    items = torch.randn(n_items, 32, dtype=torch.float64) * 0.1
    private = init_private(cfg.backbone, "reference", 0, user)
    train = np.array([1, 4, 7])
    plan = PlanMaker({user: train}, {user: train}, n_items, 4, 4).draw(0, 0, 0)
    flags = {"arm": "off", "reg": None, "replay": False, "batch_size": 4, "kd_weight": 0.0}
    ctx = RoundContext(block=0, round=0, n_items=n_items, n_prev_users=0, n_prev_items=0,
                       lrs=learning_rates(cfg.backbone, n_items), flags=flags, net=BACKBONES["fedmf"], seed=0)
    server = Server(items.clone(), beta=0.9, itm=True)
    client = Client(user, dict(private))
    upload, _ = client.local_train(server.broadcast(), plan.client(0), ctx)
    server.aggregate([upload])
    # Centralised: plain SGD on the same mini-batches of the same model.
    model = LocalModel(BACKBONES["fedmf"], items, private)
    opt = torch.optim.SGD([{"params": [model.items], "lr": ctx.lrs["Q"]},
                           {"params": [model.private["p"]], "lr": ctx.lrs["p"]}])
    samples, labels = torch.from_numpy(plan.items), torch.from_numpy(plan.labels)
    for lo in range(0, len(samples), 4):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model.score_items(samples[lo:lo + 4]), labels[lo:lo + 4]).backward()
        opt.step()
    assert len(samples) == 15 and torch.allclose(server.items, model.items.detach(), atol=1e-12)
    assert torch.allclose(client.private["p"], model.private["p"].detach(), atol=1e-12)


def test_server_cannot_reach_client_state():
    cfg, flags, blocks = _setup(["federation.simulator=reference"])
    sim = grow(None, lambda i, p: make_simulator(cfg, flags, i, p), cfg, blocks, 0, 1)
    ctx = _ctx(cfg, flags, blocks, 0, 0)
    plan = make_plan(1, 0, 0, dict(blocks[0].train), dict(blocks[0].train), blocks[0].n_items, 4, 16, 30, 1)
    sim.train_round(plan, ctx)
    sim.save_slot("best")
    private_ids = {id(t) for c in sim.clients.values() for t in c.private.values()}
    data_ids = {id(v) for v in blocks[0].train.values()} | {id(c) for c in sim.clients.values()}
    seen, frontier = set(), [sim.server]
    while frontier:                                     # everything reachable from the server object
        obj = frontier.pop()
        if id(obj) in seen or isinstance(obj, type) or type(obj).__name__ == "module":
            continue
        seen.add(id(obj))
        assert id(obj) not in private_ids | data_ids, f"server reaches client state: {type(obj)}"
        assert not isinstance(obj, (Client, np.ndarray)), f"server reaches {type(obj).__name__}"
        frontier.extend(gc.get_referents(obj))
    # Structurally: server.py imports nothing from the client side, and its inputs are arrays only (tensors, or
    # numpy arrays for the compiled simulator: `arrays` is the array-kind helpers, no state of anyone's).
    tree = ast.parse((Path(__file__).resolve().parents[2] / "f3crec" / "server.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "arrays", "method", "common.runs"}, imported   # no client, data or simulator module


@pytest.mark.slow
def test_simulators_agree_on_released_block1_float32(shared_data):
    """Spec §13: one round of D¹ on the released blocks, float32, from one shared end-of-D⁰ state."""
    cfg = load_config(Config, None, [f"data.blocks={shared_data / 'f3crec-ml-100k-blocks'}", "backbone.lr=1.0"])
    cfg, flags = resolve(cfg)
    blocks, _ = get_blocks(cfg.data, cfg.train.seed)
    sims = {}
    for name in ("reference", "vectorised"):
        c = load_config(Config, None, [f"federation.simulator={name}"])
        run_cfg = cfg.__class__(**{**cfg.__dict__, "federation": c.federation})
        sim = grow(None, lambda i, p, rc=run_cfg: make_simulator(rc, flags, i, p), cfg, blocks, 0, 1)
        for slot in ("best", "last"):
            sim.save_slot(slot)
        end_block(sim, cfg, blocks, 0, flags)
        sims[name] = grow(sim, None, cfg, blocks, 1, 1)
    ctx = _ctx(cfg, flags, blocks, 1, 1)
    plan = make_plan(1, 1, 1, dict(blocks[1].train), dict(blocks[1].train), blocks[1].n_items)
    stats = {name: sim.train_round(plan, ctx) for name, sim in sims.items()}
    assert stats["reference"]["m"] and sorted(stats["reference"]["m"]) == sorted(stats["vectorised"]["m"])
    assert torch.allclose(sims["reference"].server.items, sims["vectorised"].server.items, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_metrics_on_released_blocks_match_brute_force(shared_data):
    """a_{0,0} of a popularity scorer on the released D⁰ through `evaluate` vs a plain Python loop."""
    import math
    from f3crec.data import load_blocks
    from f3crec.evaluate import evaluate
    block = load_blocks(shared_data / "f3crec-ml-100k-blocks")[0]
    popularity = np.bincount(np.concatenate(list(block.train.values())), minlength=block.n_items).astype(float)
    users = sorted(block.test)
    scores = torch.tensor(popularity)[None].repeat(len(users), 1) + torch.arange(block.n_items) * 1e-9
    got = evaluate(scores, users, block.test, [block.train, block.valid], decimals=None)
    ndcg, recall = [], []
    for user in users:
        seen = set(block.train[user]) | set(block.valid.get(user, []))
        ranked = [i for i in np.argsort(-scores[0].numpy(), kind="stable") if i not in seen][:20]
        test = set(block.test[user])
        dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(ranked) if i in test)
        ndcg.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(test), 20))))
        recall.append(sum(i in test for i in ranked) / len(test))
    assert got["ndcg"] == pytest.approx(np.mean(ndcg), abs=1e-9) and got["recall"] == pytest.approx(np.mean(recall))


def test_handoff_restore_and_round0_reset():
    cfg, flags, blocks = _setup([])
    sim = grow(None, lambda i, p: make_simulator(cfg, flags, i, p), cfg, blocks, 0, 1)
    for r in range(2):
        ctx = _ctx(cfg, flags, blocks, 0, r)
        sim.train_round(make_plan(1, 0, r, dict(blocks[0].train), dict(blocks[0].train), blocks[0].n_items,
                                  4, 16), ctx)
        if r == 0:
            sim.save_slot("best")
    sim.save_slot("last")
    best_q, last_q = sim.server.slots["best"].clone(), sim.server.slots["last"].clone()
    sim.load_slot("best")
    end_block(sim, cfg, blocks, 0, flags)                       # FedMF fidelity: hand-off from the last round
    assert flags["handoff"] == "last" and torch.equal(sim.server.items, last_q)
    assert torch.equal(sim.server.previous, best_q)             # Q^{t} for ITM is the best round
    assert not torch.equal(best_q, last_q)
    ncf, _ = resolve(load_config(Config, SMOKE, ["backbone.name=fedncf"]))
    ctx = _ctx(ncf, flags, blocks, 1, 0)
    assert ctx.reset_private and not _ctx(ncf, flags, blocks, 1, 1).reset_private
    own, _ = resolve(load_config(Config, SMOKE, ["backbone.name=fedncf", "fidelity=false"]))
    assert own.quirks.private_init_round0 == "own" and not _ctx(own, flags, blocks, 1, 0).reset_private


def test_early_stopping_counts_rounds_without_strict_improvement(tmp_path):
    from f3crec.main import main
    res = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "r"), "federation.rounds=12",
                "federation.patience=2", "train.share_base=false"])
    for info in res["blocks"]:
        assert info["rounds_run"] == 12 or info["rounds_run"] == info["best_round"] + 1 + 2
    assert any(info["rounds_run"] < 12 for info in res["blocks"])
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for t, info in enumerate(res["blocks"]):
        values = [r["val_ndcg"] for r in records if r["block"] == t]
        assert info["best_val"] == max(values) and values.index(max(values)) == info["best_round"]


@pytest.mark.slow
def test_reference_simulator_runs_the_released_blocks_like_the_vectorised_one(shared_data, tmp_path):
    """Every block of the released ML-100K blocks (users join in D¹–D³), 2 rounds each: the per-client
    simulator runs where the vectorised one runs and gives the same a-matrices."""
    from f3crec.main import main
    out = {}
    for name in ("reference", "vectorised"):
        out[name] = main(["--run-dir", str(tmp_path / name), f"data.blocks={shared_data / 'f3crec-ml-100k-blocks'}",
                          f"federation.simulator={name}", "backbone.dtype=float64", "federation.rounds=2",
                          "quirks.metric_decimals=-1", "train.share_base=false"])
    assert [b["rounds_run"] for b in out["reference"]["blocks"]] == [2, 2, 2, 2]
    for metric in ("ndcg", "recall"):
        ref, vec = out["reference"]["summary"][metric]["a"], out["vectorised"]["summary"][metric]["a"]
        assert [len(row) for row in ref] == [1, 2, 3, 4]
        assert np.allclose(sum(ref, []), sum(vec, []), rtol=0, atol=1e-9)


def test_per_user_streams_bulk_equals_one_client_alone():
    """Every client's negatives, sample order, memory draws and LDP noise drawn alone from its own streams
    equal its part of the all-clients draw, and do not depend on who else takes part (§13)."""
    rng = np.random.default_rng(0)
    positives = {u: np.unique(rng.integers(0, 40, 3 + u % 7)) for u in range(0, 30, 2)}
    exclude = {u: np.concatenate([v, [u % 40]]) for u, v in positives.items()}
    maker = PlanMaker(positives, exclude, 40, 4, 8, 30, 2)
    plan = maker.draw(5, 2, 3)
    others = PlanMaker({u: v for u, v in positives.items() if u != 4}, exclude, 40, 4, 8, 30, 2).draw(5, 2, 3)
    for index, user in enumerate(plan.users):
        lo, hi = plan.offsets[index], plan.offsets[index + 1]
        alone = plan.client(index)
        assert np.array_equal(alone["items"], plan.items[lo:hi]) and np.array_equal(alone["labels"], plan.labels[lo:hi])
        assert not np.isin(alone["items"][alone["labels"] == 0], exclude[user]).any()
        steps = np.arange(plan.step_offsets[index + 1] - plan.step_offsets[index])
        for sub in range(2):
            bulk = plan.memory_perm(np.full(steps.size, index), steps, sub)
            assert np.array_equal(alone["memory_perms"][:, sub], bulk)
        if user != 4:
            mine = int(np.searchsorted(others.users, user))
            assert np.array_equal(others.client(mine)["items"], alone["items"])
    assert len({tuple(plan.client(i)["memory_perms"][0, 0]) for i in range(len(plan.users))}) > 1
    ctx = RoundContext(block=2, round=3, n_items=40, n_prev_users=0, n_prev_items=0, lrs={}, flags={},
                       net=BACKBONES["fedmf"], seed=5, ldp_scale=0.1)
    from f3crec.round import ldp_noise
    bulk = ldp_noise(ctx, plan.users, (40, 4), torch.float64)
    for index, user in enumerate(plan.users):
        assert torch.equal(ldp_noise(ctx, np.array([user]), (40, 4), torch.float64)[0], bulk[index])
    assert abs(float(bulk.abs().mean()) - 0.1) < 0.01                       # Laplace(0, b): E|x| = b


def test_stream_keys_are_the_splitmix64_chain_of_their_fields():
    """streams.keys(seed, block, round, user, purpose) is SplitMix64's finaliser chained over the fields
    (key ← mix(key + (field + 1)·γ), from 0; round shifted by one so the block end, −1, is field 0), written
    out here on Python integers."""
    from f3crec import streams
    mask = (1 << 64) - 1
    gamma, m1, m2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

    def mix(x):
        x = ((x ^ (x >> 30)) * m1) & mask
        x = ((x ^ (x >> 27)) * m2) & mask
        return x ^ (x >> 31)

    def key(*fields):
        x = 0
        for value in fields:
            x = mix((x + (value & mask) * gamma + gamma) & mask)
        return x
    users = np.array([0, 1, 7, 942, 99_999])
    for seed, block, round_idx, purpose in [(42, 0, 0, 1), (1, 3, -1, 3), (2 ** 63 - 1, 2, 19, 4)]:
        got = streams.keys(seed, block, round_idx, users, purpose)
        assert got.dtype == np.uint64 and got.shape == users.shape
        assert got.tolist() == [key(seed, block, round_idx + 1, purpose, int(u)) for u in users]
