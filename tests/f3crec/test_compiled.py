"""The compiled simulator (f3crec/sim_compiled.py, kernels.py) against the vectorised one, float64.

Equality is to rounding (max |diff| ≤ 1e-12 · (1 + max |value|)), not bit for bit: the vectorised simulator's
first step goes through a BLAS product (another summation order than the kernel's serial dot products) and
ATen's SGD update fuses a multiply-add where the kernel rounds twice. Everything integer is compared exactly:
the plan's draws, D_u and m_u of every ARM step, and every validation / test metric (exact sums of the
same per-user values). The compiled kernels are single-threaded with fixed-order sums: the thread count
changes nothing, bit for bit.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config
from f3crec.config import Config, resolve
from f3crec.data import get_blocks
from f3crec.round import make_plan
from f3crec.train import end_block, grow, make_simulator, round_context

from conftest import late_joiner_blocks

pytest.importorskip("numba")
from f3crec.sim_compiled import CompiledSimulator, draw, exact_sum  # noqa: E402

SMOKE = Path(__file__).resolve().parents[2] / "f3crec" / "configs" / "smoke.yaml"
TOL = 1e-12


def _setup(overrides, tmp_path=None, late=False):
    data = [f"data.blocks={late_joiner_blocks(tmp_path / 'late')}"] if late else []
    cfg = load_config(Config, SMOKE, ["backbone.dtype=float64", "federation.batch_size=16", "method.kd_weight=1.0",
                                      "method.eps=0.02", *data, *overrides])
    cfg, flags = resolve(cfg)
    blocks, _ = get_blocks(cfg.data, cfg.train.seed)
    return cfg, flags, blocks


def _sims(cfg, flags, blocks):
    factory = {}
    for name in ("vectorised", "compiled"):
        run_cfg = replace(cfg, federation=replace(cfg.federation, simulator=name))
        factory[name] = lambda items, private, c=run_cfg: make_simulator(c, flags, items, private, blocks)
    return factory


def _close(a, b) -> bool:
    """Tensors or numpy arrays (the compiled simulator holds numpy arrays)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max()) <= TOL * (1 + float(a.abs().max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_target_ranks_equal_a_stable_descending_sort(dtype):
    """arm_kernels._target_ranks (a vector count of the targets below each item's score) gives every target's
    position in a stable descending sort of the scores (ties to the lower item id), as method.target_ranks:
    scores on a coarse grid (many ties, ±0.0, ±inf), 1–33 targets (within and across one 64-byte vector);
    and targets among the highest of many scores (most items below every target: 64-byte runs skipped)."""
    from f3crec import arm_kernels
    rng = np.random.default_rng(3)
    for n_items, n_top in [(1, 1), (9, 1), (40, 7), (70, 16), (90, 17), (200, 30), (300, 33), (1003, 30),
                           (1024, 5)]:
        for attempt in range(3):
            scores = (rng.integers(-6, 7, n_items) / 4).astype(dtype)
            scores[rng.random(n_items) < 0.05] = -0.0
            scores[rng.random(n_items) < 0.02] = np.inf
            scores[rng.random(n_items) < 0.02] = -np.inf
            targets = rng.choice(n_items, n_top, replace=False).astype(np.int64)
            if n_items > 1000 and attempt:        # T^u among the best: the skipped runs, with ties (attempt 2)
                scores = rng.normal(size=n_items).astype(dtype) if attempt == 1 else scores
                best = np.argsort(-scores, kind="stable")[:3 * n_top]
                targets = rng.choice(best, n_top, replace=False).astype(np.int64)
            ranks = np.zeros(n_top, np.int64)
            arm_kernels._target_ranks(scores, targets, ranks)
            position = np.empty(n_items, np.int64)
            position[np.argsort(-scores, kind="stable")] = np.arange(n_items)
            assert np.array_equal(ranks, position[targets] + 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_client_scores_are_the_column_sums_in_order_over_several_chunks(dtype):
    """arm_kernels._client_scores (ARM's whole-catalogue scores, §6 step 2) in chunks of SCORE_CHUNK items: every
    broadcast item's score is still 0 + q_0·v_0 + q_1·v_1 + … in the item dtype, term by term in k order (numpy's
    elementwise column passes give that exactly; whole vectors through intrinsics.column_sums, a chunk's last
    items one by one), and the client's local rows' scores replace theirs."""
    from f3crec import arm_kernels
    rng = np.random.default_rng(4)
    n_items, dim = 2 * arm_kernels.SCORE_CHUNK + 77, 8
    q_t = rng.normal(size=(dim, n_items)).astype(dtype)
    v = rng.normal(size=dim).astype(dtype)
    row_item = np.array([3, arm_kernels.SCORE_CHUNK + 1, n_items - 1], np.int64)
    local = rng.normal(size=(row_item.size, dim)).astype(dtype)
    scores = np.full(n_items, np.nan, dtype)
    arm_kernels._client_scores(q_t, local, row_item, row_item.size, v, 0.0, scores)
    want = np.zeros(n_items, dtype)
    for k in range(dim):
        want += q_t[k] * v[k]
    for r, i in enumerate(row_item):
        want[i] = sum(float(x) for x in local[r] * v)   # the row's products, summed in float64, then rounded
    assert np.array_equal(scores, want)


def test_exact_sum_is_the_fraction_sum():
    values = np.random.default_rng(0).random(500) ** 3
    values[:5] = [0.0, 1.0, 0.5, 1e-300, 0.1]
    from fractions import Fraction
    assert exact_sum(values) == sum(map(Fraction, values.tolist()), Fraction(0))


@pytest.mark.parametrize("late", [False, True])
def test_compiled_plan_draw_equals_the_plan(late, tmp_path):
    """The kernel's negatives and shuffles are the plan's values exactly (same per-user streams)."""
    cfg, flags, blocks = _setup([], tmp_path, late)
    for t in range(len(blocks)):
        data = dict(blocks[t].train)
        # block t ≥ 1: T^u-like extra exclusions, as naive_replay and neg_exclude=all_known add
        exclude = {u: np.union1d(v, np.arange(u % 7)) for u, v in data.items()}
        for r in range(3):
            plan = make_plan(cfg.train.seed, t, r, data, exclude, blocks[t].n_items, 4, 16, 30, 1)
            items, labels = draw(plan)
            assert np.array_equal(items, plan.items) and np.array_equal(labels, plan.labels)


def test_plan_layout_is_lazy_and_the_flat_inputs_are_each_users_items_in_order():
    """The compiled draw reads the maker's flat positives/exclusions and never builds the vectorised draw's
    per-sample layout; the flat arrays and _csr's multi-part CSR are each user's items in user order."""
    from f3crec.round import PlanMaker
    from f3crec.sim_compiled import _csr
    rng = np.random.default_rng(3)
    positives = {u: rng.choice(40, rng.integers(1, 6), replace=False) for u in (7, 2, 11, 5)}
    exclude = {u: np.concatenate([v, rng.integers(0, 40, rng.integers(0, 4))]) for u, v in positives.items()}
    maker = PlanMaker(positives, exclude, 40, 4, 8, 30, 1)
    items, labels = draw(maker.draw(1, 0, 0))
    assert not {"owner", "position", "labels", "base_items", "neg_at", "excluded"} & set(vars(maker))
    order = [2, 5, 7, 11]
    assert np.array_equal(maker.pos_flat, np.concatenate([positives[u] for u in order]))
    assert np.array_equal(maker.exc_flat, np.concatenate([exclude[u] for u in order]))
    assert np.array_equal(np.diff(maker.exc_ptr), [len(exclude[u]) for u in order])
    plan = maker.draw(1, 0, 0)
    assert np.array_equal(items, plan.items) and np.array_equal(labels, plan.labels)   # now built, same values
    parts = [positives, {2: np.array([9, 8]), 11: np.array([1])}, exclude]
    ptr, flat = _csr(order, parts)
    for a, u in enumerate(order):
        mine = np.concatenate([part[u] for part in parts if u in part])
        assert np.array_equal(flat[ptr[a]:ptr[a + 1]], mine)
    with pytest.raises(ValueError, match="user 3 excludes all 5 items"):
        PlanMaker({3: np.array([0])}, {3: np.array([4, 3, 2, 1, 0, 0])}, 5)


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("overrides", [
    [],                                                  # F3CRec: ARM + ITM
    ["method.name=ewc", "method.ewc_gamma=100"],         # EWC: block-end Fisher, penalty on Φ_u and stored rows
    *[pytest.param(overrides, marks=pytest.mark.heavy) for overrides in (
        ["method.name=ewc"],                                    # EWC at its default γ
        ["method.name=ewc", "method.ewc_gamma=100", "method.arm=true"],   # EWC beside ARM's KD
        ["backbone.name=fedncf", "backbone.lr=0.02", "method.name=ewc", "method.ewc_gamma=1"],   # F of p, w, b
        ["backbone.name=pfedrec", "backbone.lr=0.02", "method.name=ewc", "method.ewc_gamma=1"],
        ["method.name=ft"], ["method.name=arm"], ["method.name=itm"],
        ["method.name=topn_kd"],                                # ARM with m_u = N
        ["method.name=naive_replay"],                           # T^u as pseudo-positives
        ["method.name=emb_reg"],                                # every old row local
        ["quirks.target_scores=matched", "method.name=arm"],
        ["fidelity=false"],                                     # all_known exclusions, cumulative test mask
        ["method.name=topn_kd", "federation.ldp_scale=0.01"],   # LDP noise on every row of every upload
        ["method.name=full_retrain"],                           # the union of train data so far
        ["backbone.name=pfedrec", "backbone.lr=0.02"],          # two sub-steps, round-0 reset
        ["backbone.name=fedncf", "backbone.lr=0.02"],           # Linear(2d→1) head, round-0 reset
        ["backbone.name=fedncf", "backbone.lr=0.02", "method.name=emb_reg"],
        ["backbone.name=pfedrec", "backbone.lr=0.02", "method.name=emb_reg"],   # penalty on the rows, not p
        ["backbone.name=pfedrec", "backbone.lr=0.02", "method.name=topn_kd"])],
])
def test_compiled_equals_vectorised_round_by_round(overrides, late, tmp_path):
    """F3CRec (FedMF) runs in the fast suite; the other variants are `heavy` (seconds each, numba compiles once)."""
    cfg, flags, blocks = _setup(overrides, tmp_path, late)
    factory = _sims(cfg, flags, blocks)
    sims = {name: None for name in factory}
    saw_partial_memory = multi_step = False
    for t in range(len(blocks)):
        for name in sims:
            sims[name] = grow(sims[name], factory[name], cfg, blocks, t, cfg.train.seed)
        vec, comp = sims["vectorised"], sims["compiled"]
        assert isinstance(comp, CompiledSimulator) and not isinstance(vec, CompiledSimulator)
        for r in range(3):
            ctx = round_context(cfg, flags, blocks, t, r)
            plan = vec.plan(ctx)
            multi_step |= np.diff(plan.step_offsets).max() > 1
            stats_vec, stats_comp = vec.train_round(plan, ctx), comp.train_round(comp.plan(ctx), ctx)
            assert stats_vec["D"] == stats_comp["D"] and stats_vec["m"] == stats_comp["m"]   # step-major order
            saw_partial_memory |= any(0 < m < 30 for m in stats_comp["m"])
            assert _close(vec.server.items, comp.server.items)
            for k, v in vec.private_matrix().items():
                assert _close(v, comp.private_matrix()[k])
            assert vec.validate(ctx, None) == comp.validate(ctx, None)
            for sim in sims.values():
                sim.save_slot("best")
        assert vec.test_row(t, flags["old_block_mask"], None) == comp.test_row(t, flags["old_block_mask"], None)
        for sim in sims.values():
            sim.save_slot("last")
            end_block(sim, cfg, blocks, t, flags)
        a, b = vec.states(), comp.states()
        assert torch.equal(a.topn, torch.as_tensor(b.topn)) and _close(a.yhat, b.yhat)
        if flags["reg"] == "ewc":   # the block-end Fisher: compiled closed form vs autograd, absent users' kept
            assert torch.equal(a.fisher_valid, torch.as_tensor(b.fisher_valid)) and bool(a.fisher_valid.any())
            for k, v in a.fisher.items():
                assert _close(v, b.fisher[k]) and bool(v.any())
            for k in ("user", "item"):
                assert torch.equal(a.fisher_rows[k], torch.as_tensor(b.fisher_rows[k]))
            assert _close(a.fisher_rows["F"], b.fisher_rows["F"]) and isinstance(b.fisher_rows["F"], np.ndarray)
    assert multi_step
    if flags["arm"] == "adaptive":
        assert saw_partial_memory


def _run(tmp_path, name, *extra, folder=None):
    from f3crec.main import main
    return main(["--config", str(SMOKE), "--run-dir", str(tmp_path / (folder or name)),
                 f"federation.simulator={name}", "backbone.dtype=float64", *extra])


def _records(folder: Path) -> list[dict]:
    keep = ("block", "round", "val_ndcg", "val_recall", "D_mean", "m_mean", "m_hist", "D_hist")
    return [{k: r.get(k) for k in keep} for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def test_ranks_ahead_of_the_round_change_no_record(tmp_path, monkeypatch):
    """The simulator ranks ARM's first steps before the round (arm_kernels.replay_ranks) where the item table
    has RANK_AHEAD_BYTES or more; forced on the smoke catalogue, a float32 run (local and broadcast scores then
    differ by rounding) gives the per-client ranking's records, D_u and m_u lines and summary."""
    from f3crec import arm_kernels

    def round_lines(folder: Path) -> list[str]:
        lines = (tmp_path / folder / "log.txt").read_text().splitlines()
        return [line.rsplit(" ", 2)[0] for line in lines if " round " in line and " D " in line]

    plain = _run(tmp_path, "compiled", "backbone.dtype=float32", folder="plain")
    monkeypatch.setattr(arm_kernels, "RANK_AHEAD_BYTES", 0)
    ahead = _run(tmp_path, "compiled", "backbone.dtype=float32", folder="ahead")
    assert plain["summary"] == ahead["summary"]
    assert _records(tmp_path / "plain") == _records(tmp_path / "ahead")
    assert round_lines("plain") == round_lines("ahead") and len(round_lines("plain")) > 5


@pytest.mark.heavy
@pytest.mark.parametrize("backbone", [[], ["backbone.name=pfedrec", "backbone.lr=0.02"],
                                      ["backbone.name=fedncf", "backbone.lr=0.02"]])
def test_whole_smoke_run_equal(backbone, tmp_path):
    out = {name: _run(tmp_path, name, *backbone) for name in ("vectorised", "compiled")}
    assert out["vectorised"]["summary"] == out["compiled"]["summary"]
    assert _records(tmp_path / "vectorised") == _records(tmp_path / "compiled")
    best = {name: [b["best_round"] for b in res["blocks"]] for name, res in out.items()}
    assert best["vectorised"] == best["compiled"]
    assert out["compiled"]["simulator"] == "compiled"


def _fedmf_round_by_the_rules(q, p_all, users, offsets, items, labels, batch_size, lr_p, lr_q):
    """FedMF's round (no KD, no emb_reg) in plain numpy scalars, each operation rounded to the table's dtype
    where the kernel stores it: per mini-batch, grad rows summed sample by sample, then the SGD update of the
    local rows, the row deltas added to the summed delta client by client."""
    dt = q.dtype.type
    total, p_all = np.zeros_like(q), p_all.copy()
    for a, user in enumerate(users):
        lo, hi = offsets[a], offsets[a + 1]
        local, p = {}, p_all[user].copy()
        for b0 in range(lo, hi, batch_size):
            b1 = min(b0 + batch_size, hi)
            grad, gp = {}, np.zeros_like(p)
            for j in range(b0, b1):
                i = int(items[j])
                row = local.setdefault(i, q[i].copy())
                s = float(np.sum(row.astype(np.float64) * p.astype(np.float64)))
                g = (1.0 / (1.0 + np.exp(-s)) - float(labels[j])) * (1.0 / (b1 - b0))
                acc = grad.setdefault(i, np.zeros_like(p))
                for k in range(p.size):
                    acc[k] = dt(float(acc[k]) + g * float(p[k]))
                    gp[k] = dt(float(gp[k]) + g * float(row[k]))
            for k in range(p.size):
                p[k] = dt(float(p[k]) - lr_p * float(gp[k]))
            for i, acc in grad.items():
                for k in range(p.size):
                    local[i][k] = dt(float(local[i][k]) - lr_q * float(acc[k]))
        p_all[user] = p
        for i, row in local.items():
            total[i] += row - q[i]
    return total, p_all


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fedmf_round_single_and_multi_batch_clients_follow_the_rules(dtype):
    """kernels.fedmf_round's one-mini-batch path (rows read from the table, a row of one sample updated as its
    gradient is formed, rows of several samples summed first) and its general path against the round written
    out in scalars: the summed delta within rounding of the row sums' order (the kernel's dot product sums in
    SIMD lanes), every client's vector likewise; the two paths are exercised by clients of 1–3 mini-batches
    over 9 items (many repeated negatives)."""
    from f3crec import kernels
    rng = np.random.default_rng(5)
    n_items, dim, batch = 9, 8, 12
    q = (rng.standard_normal((n_items, dim)) * 0.5).astype(dtype)
    p_all = (rng.standard_normal((6, dim)) * 0.5).astype(dtype)
    users = np.array([0, 2, 3, 5], np.int64)
    sizes = np.array([5, 12, 30, 19], np.int64)                   # 1, 1, 3 and 2 mini-batches
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = rng.integers(0, n_items, offsets[-1]).astype(np.int64)
    labels = (rng.random(offsets[-1]) < 0.2).astype(dtype)
    want_total, want_p = _fedmf_round_by_the_rules(q, p_all, users, offsets, items, labels, batch, 0.3, 2.0)
    total, got_p = np.zeros_like(q), p_all.copy()
    none = np.zeros(users.size, bool)
    kernels.fedmf_round(q, np.zeros((dim, 1), dtype), got_p, users, offsets, items, labels, batch, 0.3, 2.0, none,
                        none, np.zeros((6, 1), np.int64), np.zeros((1, 1), dtype), np.zeros(users.size, np.uint64), 0,
                        0.0, np.zeros(1, np.int64), 0, 0.0, np.zeros((1, dim), dtype), np.zeros((1, dim), dtype), 0,
                        total, np.zeros((0, 3), np.int64))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.abs(total - want_total).max() <= tol * (1 + np.abs(want_total).max())
    assert np.abs(got_p - want_p).max() <= tol * (1 + np.abs(want_p).max())
    assert np.array_equal(got_p[[1, 4]], p_all[[1, 4]])             # non-participants untouched
    assert np.abs(total).max() > 0.01


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fedmf_round_fast_paths_give_the_general_paths_values_bit_for_bit(dtype):
    """A client without KD or emb_reg trains on kernels.fedmf_round's fast paths (_one_step: one mini-batch;
    _multi_step: several, a row of one sample in a step updated as its gradient is formed, rows a step does not
    use left alone); under emb_reg with reg_d = 0 (a zero penalty: every gradient gains ±0) the same clients take
    the general path (every row's summed gradient, then every row updated each step). Same values bit for bit:
    clients of 0–5 mini-batches over 40 items (rows used by one and by several samples of a step), d = 32."""
    from f3crec import kernels
    rng = np.random.default_rng(17)
    n_items, dim, batch = 40, 32, 24
    q = (rng.standard_normal((n_items, dim)) * 0.5).astype(dtype)
    p_all = (rng.standard_normal((7, dim)) * 0.5).astype(dtype)
    users = np.array([0, 1, 2, 4, 5, 6], np.int64)
    sizes = np.array([0, 7, 24, 60, 97, 120], np.int64)          # 0, 1, 1, 3, 5 and 5 mini-batches
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = rng.integers(0, n_items, offsets[-1]).astype(np.int64)
    labels = (rng.random(offsets[-1]) < 0.2).astype(dtype)
    returning = np.ones(users.size, bool)
    out = {}
    for reg_mode in (0, 1):
        total, got_p = np.zeros_like(q), p_all.copy()
        kernels.fedmf_round(q, np.zeros((dim, 1), dtype), got_p, users, offsets, items, labels, batch, 0.3, 2.0,
                            np.zeros(users.size, bool), returning, np.zeros((7, 1), np.int64), np.zeros((1, 1), dtype),
                            np.zeros(users.size, np.uint64), 0, 0.0, np.zeros(1, np.int64), reg_mode, 0.0,
                            q.copy(), p_all.copy(), n_items, total, np.zeros((0, 3), np.int64))
        out[reg_mode] = total, got_p
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])
    assert np.abs(out[0][0]).max() > 0.01 and not np.array_equal(out[0][1][users[1:]], p_all[users[1:]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("arm_mode,reg_mode,rank_ahead", [(0, 1, False), (2, 1, False), (1, 0, False),
                                                       (1, 0, True), (1, 1, True)])
def test_fedmf_round_drawn_equals_the_drawn_plan_then_fedmf_round(dtype, arm_mode, reg_mode, rank_ahead):
    """kernels.fedmf_round_drawn (each client's samples drawn inside the loop) gives draw_plan + fedmf_round's
    values bit for bit: the same per-user draws, the same training, clients of 0–3 mini-batches (one-batch,
    general and KD paths; emb_reg on the returning ones where reg_mode is 1), every output compared exactly.
    With adaptive ARM (arm_mode 1), no emb_reg and `rank_ahead`, fedmf_round_drawn ranks the first steps before
    the round (arm_kernels.replay_ranks) where fedmf_round ranks each client's own scores: the same D_u and m_u."""
    from f3crec import kernels, streams
    from f3crec.round import PlanMaker
    rng = np.random.default_rng(11)
    n_items, dim, batch, n_top = 23, 8, 10, 4
    sizes = {0: 1, 2: 2, 3: 7, 5: 4, 6: 3, 8: 5}                 # 5, 10, 35, 20, 15, 25 samples
    positives = {u: rng.choice(n_items, n, replace=False) for u, n in sizes.items()}
    exclude = {u: np.concatenate([v, rng.integers(0, n_items, 2)]) for u, v in positives.items()}
    maker = PlanMaker(positives, exclude, n_items, 4, batch, n_top, 1)
    plan = maker.draw(3, 1, 2)
    users = plan.users
    q = (rng.standard_normal((n_items, dim)) * 0.5).astype(dtype)
    q_t = np.ascontiguousarray(q.T)
    p_all = (rng.standard_normal((9, dim)) * 0.5).astype(dtype)
    returning = users < 5
    replay = returning if arm_mode else np.zeros(users.size, bool)
    topn = np.stack([rng.choice(n_items, n_top, replace=False) for _ in range(9)]).astype(np.int64)
    yhat = rng.standard_normal((9, n_top)).astype(dtype)
    keys = streams.keys(3, 1, 2, users, streams.MEMORY)
    anchor_items, anchor_p = (rng.standard_normal((n_items, dim)) * 0.5).astype(dtype), p_all * 0.9
    m_of_d = np.maximum(0, n_top - np.arange(n_top * n_items + 1) // 16).astype(np.int64)
    common = (replay, returning, topn, yhat, keys, arm_mode, 0.7, m_of_d, reg_mode, 0.05, anchor_items, anchor_p, 13)
    items, labels = draw(plan, dtype)
    want_total, want_p, want_stats = np.zeros_like(q), p_all.copy(), np.zeros((20, 3), np.int64)
    n_want = kernels.fedmf_round(q, q_t, want_p, users, plan.offsets, items, labels, batch, 0.3, 2.0, *common,
                                 want_total, want_stats)
    total, got_p, stats = np.zeros_like(q), p_all.copy(), np.zeros((20, 3), np.int64)
    n_got = kernels.fedmf_round_drawn(q, q_t, got_p, users, plan.offsets, maker.counts, maker.pos_flat,
                                      maker.exc_ptr, maker.exc_flat, n_items, plan._keys(streams.NEGATIVES),
                                      plan._keys(streams.SHUFFLE), batch, 0.3, 2.0, *common, total, stats,
                                      None, None, rank_ahead)
    assert np.array_equal(total, want_total) and np.array_equal(got_p, want_p)
    assert n_got == n_want and np.array_equal(stats, want_stats)
    assert np.abs(total).max() > 0.01 and not np.array_equal(got_p, p_all)
    assert (n_got > 0) == (arm_mode == 1) and (arm_mode != 1 or len(set(stats[:n_got, 1].tolist())) > 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_replay_ranks_equal_each_clients_own_ranking(dtype):
    """arm_kernels.replay_ranks (first-step ranks of T^u for a group of clients per pass over the catalogue,
    every item at its broadcast score, then each local row moved to its local score) gives every selected
    client the ranks _target_ranks finds in that client's own first-step scores (_client_scores with its
    samples' items and T^u as local rows), and those scores at T^u: three chunks of items, two groups of
    clients, duplicated rows and a coarse p for ties, targets among the best items and among all."""
    from f3crec import arm_kernels
    from f3crec.draw_kernels import _draw_base
    rng = np.random.default_rng(12)
    n_items, dim, n_top, n_clients = 2 * arm_kernels.SCORE_CHUNK + 100, 8, 6, arm_kernels.RANK_GROUP + 3
    q = rng.standard_normal((n_items, dim)).astype(dtype)
    q[rng.choice(n_items, 300)] = q[rng.choice(n_items, 300)]          # equal rows: equal scores
    q_t = np.ascontiguousarray(q.T)
    p_all = rng.standard_normal((n_clients, dim)).astype(dtype)
    p_all[::3] = np.round(p_all[::3] * 2) / 2
    users = np.arange(n_clients, dtype=np.int64)
    sizes = rng.integers(0, 40, n_clients)
    counts = np.minimum(sizes, rng.integers(1, 8, n_clients))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    positives = rng.integers(0, n_items, counts.sum()).astype(np.int64)
    exc_ptr, exc_items = np.zeros(n_clients + 1, np.int64), np.zeros(0, np.int64)
    neg_keys = rng.integers(0, 2**63, n_clients).astype(np.uint64)
    topn = np.empty((n_clients, n_top), np.int64)
    for u in range(n_clients):
        pool = np.argsort(-(q @ p_all[u]), kind="stable")[:3 * n_top] if u % 2 else np.arange(n_items)
        topn[u] = rng.choice(pool, n_top, replace=False)
    chosen = sizes > 0
    chosen[1] = False
    ranks, values = np.full((n_clients, n_top), -1, np.int64), np.zeros((n_clients, n_top), dtype)
    arm_kernels.replay_ranks(q, q_t, p_all, users, offsets, counts, positives, exc_ptr, exc_items, n_items,
                             neg_keys, topn, chosen, ranks, values)
    pos_at = np.concatenate([[0], np.cumsum(counts)])
    for c in range(n_clients):
        if not chosen[c]:
            assert (ranks[c] == -1).all()
            continue
        base = np.empty(sizes[c], np.int64)
        _draw_base(neg_keys[c], counts[c], sizes[c], positives, pos_at[c], exc_items, 0, 0, n_items,
                   np.zeros(n_items, np.bool_), base)
        local_items = np.array(list(dict.fromkeys(base.tolist() + topn[c].tolist())), np.int64)
        scores = np.empty(n_items, dtype)
        arm_kernels._client_scores(q_t, q[local_items], local_items, local_items.size, p_all[c], 0.0, scores)
        want = np.zeros(n_top, np.int64)
        arm_kernels._target_ranks(scores, topn[c], want)
        position = np.empty(n_items, np.int64)
        position[np.argsort(-scores, kind="stable")] = np.arange(n_items)
        assert np.array_equal(want, position[topn[c]] + 1)
        assert np.array_equal(ranks[c], want), c
        assert np.array_equal(values[c], scores[topn[c]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fedmf_round_drawn_on_a_callers_pair_table_adds_to_total_as_without_it(dtype):
    """The pair table (kernels._pair_in: q's rows beside the summed delta's) given by the caller, as the simulator
    does, full of stale values, gives the values of the kernel's own; the round's deltas are added to what
    `total` held, and q is left alone."""
    from f3crec import kernels, streams
    from f3crec.round import PlanMaker
    rng = np.random.default_rng(5)
    n_items, dim, batch = 29, 8, 10
    sizes = {0: 1, 1: 3, 4: 6, 7: 2}                             # one-batch and several-batch clients
    positives = {u: rng.choice(n_items, n, replace=False) for u, n in sizes.items()}
    maker = PlanMaker(positives, positives, n_items, 4, batch, 4, 1)
    plan = maker.draw(2, 0, 1)
    users = plan.users
    q = (rng.standard_normal((n_items, dim)) * 0.5).astype(dtype)
    p_all = (rng.standard_normal((8, dim)) * 0.5).astype(dtype)
    none = np.zeros(users.size, bool)
    common = (none, none, np.zeros((8, 4), np.int64), np.zeros((8, 4), dtype), streams.keys(2, 0, 1, users,
              streams.MEMORY), 0, 0.7, np.zeros(1, np.int64), 0, 0.0, np.zeros((1, dim), dtype),
              np.zeros((1, dim), dtype), 0)
    start = rng.standard_normal((n_items, dim)).astype(dtype)
    out = []
    for pair in (None, np.full((n_items, 2 * dim), np.nan, dtype)):
        q_in, total, got_p, stats = q.copy(), start.copy(), p_all.copy(), np.zeros((1, 3), np.int64)
        kernels.fedmf_round_drawn(q_in, np.zeros((dim, 1), dtype), got_p, users, plan.offsets, maker.counts,
                                  maker.pos_flat, maker.exc_ptr, maker.exc_flat, n_items,
                                  plan._keys(streams.NEGATIVES), plan._keys(streams.SHUFFLE), batch, 0.3, 2.0,
                                  *common, total, stats, None, pair)
        assert np.array_equal(q_in, q)
        out.append((total, got_p))
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])
    zero_start = np.zeros_like(q)
    kernels.fedmf_round_drawn(q, np.zeros((dim, 1), dtype), p_all.copy(), users, plan.offsets, maker.counts,
                              maker.pos_flat, maker.exc_ptr, maker.exc_flat, n_items, plan._keys(streams.NEGATIVES),
                              plan._keys(streams.SHUFFLE), batch, 0.3, 2.0, *common, zero_start,
                              np.zeros((1, 3), np.int64))
    assert np.abs(zero_start).max() > 0.01 and np.allclose(out[0][0], start + zero_start, rtol=1e-5, atol=1e-6)


def test_round_buffers_are_zeroed_reused_by_shape_and_replaced_when_it_changes():
    from f3crec.sim_compiled import HUGE_PAGE, _buffer, huge_page_array
    big = huge_page_array((HUGE_PAGE // 8 + 3, 2), np.float32)      # over the threshold: mmap-backed
    assert big.shape == (HUGE_PAGE // 8 + 3, 2) and big.dtype == np.float32 and not big.any()
    big[-1] = 7.0
    assert big.flags.writeable and big.flags.c_contiguous and big[-1, 1] == 7.0
    assert not huge_page_array((3, 2), np.int64).any()
    if sys.platform.startswith("linux"):                         # private memory: a shared mapping is shmem,
        at = big.ctypes.data                                         # whose huge pages follow another setting
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= at < hi:
                assert line.split()[1].endswith("p") and "/dev/zero" not in line
                break
        else:
            raise AssertionError("the buffer's mapping is not in /proc/self/maps")
    buffers = {}
    first = _buffer(buffers, "x", (5, 2), np.float64)
    assert _buffer(buffers, "x", (5, 2), np.float64) is first
    assert _buffer(buffers, "x", (6, 2), np.float64) is not first and buffers["x"].shape == (6, 2)
    assert _buffer(buffers, "x", (6, 2), np.float32).dtype == np.float32


def test_thread_count_changes_nothing():
    """A round and a validation with torch (and numba) at 1 and 2 threads: bit for bit the same."""
    import numba
    cfg, flags, blocks = _setup([])
    results, before = [], (torch.get_num_threads(), numba.get_num_threads())
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            sim = grow(None, _sims(cfg, flags, blocks)["compiled"], cfg, blocks, 0, cfg.train.seed)
            out = []
            for r in range(3):
                ctx = round_context(cfg, flags, blocks, 0, r)
                sim.train_round(None, ctx)
                out.append((torch.tensor(sim.server.items), torch.tensor(sim.state.private["p"]), sim.validate(ctx, None)))
            results.append(out)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
    for (q1, p1, v1), (q2, p2, v2) in zip(*results):
        assert torch.equal(q1, q2) and torch.equal(p1, p2) and v1 == v2


def test_auto_picks_compiled_where_it_covers_the_run_and_vectorised_elsewhere(tmp_path):
    from f3crec.train import simulator_kind
    for overrides, kind in ([[], "compiled"], [["method.name=ewc"], "compiled"],
                            [["backbone.name=pfedrec"], "compiled"], [["federation.ldp_scale=0.01"], "compiled"],
                            [["backbone.name=fedncf", "method.name=ewc"], "compiled"],
                            [["train.device=cuda"], "vectorised"]):
        cfg, flags = resolve(load_config(Config, SMOKE, ["federation.simulator=auto", *overrides]))
        assert simulator_kind(cfg, flags) == kind


@pytest.mark.parametrize("overrides,named", [
    (["train.device=cuda"], "train.device=cuda"),
])
def test_compiled_refuses_what_it_does_not_cover_in_one_line(overrides, named, tmp_path):
    from f3crec.main import main
    with pytest.raises(ConfigError) as err:
        main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "r"), "federation.simulator=compiled", *overrides])
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "r").exists()                     # refused before the run folder is claimed


@pytest.mark.heavy
def test_whole_smoke_run_same_with_one_and_two_threads(tmp_path):
    """train.threads sets torch's threads for the run: the compiled run's numbers do not move with it."""
    one, two = (_run(tmp_path, "compiled", f"train.threads={n}", folder=f"t{n}") for n in (1, 2))
    assert one["summary"] == two["summary"] and _records(tmp_path / "t1") == _records(tmp_path / "t2")


def test_bench_report_sides_puts_simulators_side_by_side():
    from f3crec.bench import report_sides
    side = {"base_round_s": 0.05, "incremental_round_s": 0.02, "base_block_s": 1.0, "incremental_blocks_s": 1.5,
            "fixed_s": 2.0, "whole_s": 5.0, "whole_cpu_s": 4.0, "after_imports_cpu_s": 2.0, "summary": {"h": 1}}
    table = report_sides({"vectorised": {**side, "whole_cpu_s": 8.0}, "compiled": side})
    assert "| whole process, CPU | 8 | 4 |" in table and "×" not in table and "same metrics" in table
    assert table.endswith("yes")
    with_ref = report_sides({"compiled": side}, {"whole_cpu_s": 40.0})
    assert "| whole process, CPU | 4 | 40 | 10.0× |" in with_ref
    assert report_sides({"a": side, "b": {**side, "summary": {"h": 2}}}).endswith("NO")


@pytest.mark.heavy
def test_compiled_run_resumed_at_a_block_boundary_equals_an_uninterrupted_one(tmp_path):
    """last.pt of a compiled run (the vectorised simulator's state form) resumes into the compiled simulator."""
    from f3crec.main import main
    whole = _run(tmp_path, "compiled", folder="whole")
    _run(tmp_path, "compiled", "train.stop_after_block=1", folder="cut")
    resumed = main(["--resume", str(tmp_path / "cut"), "train.stop_after_block=null"])
    assert resumed["summary"] == whole["summary"] and resumed["simulator"] == "compiled"
    assert _records(tmp_path / "cut") == _records(tmp_path / "whole")


def test_without_numba_auto_runs_vectorised_and_compiled_is_refused_in_one_line(monkeypatch):
    import sys
    from f3crec.train import simulator_kind
    import f3crec
    monkeypatch.setitem(sys.modules, "numba", None)                      # `import numba` raises ImportError
    for name in ("kernels", "sim_compiled"):                              # imported afresh
        monkeypatch.delitem(sys.modules, f"f3crec.{name}", raising=False)
        monkeypatch.delattr(f3crec, name, raising=False)
    cfg, flags = resolve(load_config(Config, SMOKE, ["federation.simulator=auto"]))
    assert simulator_kind(cfg, flags) == "vectorised"
    cfg, flags = resolve(load_config(Config, SMOKE, ["federation.simulator=compiled"]))
    with pytest.raises(ConfigError) as err:
        simulator_kind(cfg, flags)
    assert "numba" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("backbone", ["fedmf", "fedncf", "pfedrec"])
def test_compiled_fisher_equals_round_fisher(backbone):
    """EWC's block-end Fisher in closed form (CompiledSimulator.fisher_of, kernels.fisher_rows) against
    round.fisher's autograd per-sample gradients, float64: F of every private tensor and of every (client, item)
    row, rows in the same (client, item) order; clients of 1–7 positives over 23 items (repeated negatives)."""
    from f3crec.model import BACKBONES
    from f3crec.round import PlanMaker, fisher
    rng = np.random.default_rng(7)
    n_items, dim = 23, 8
    net = BACKBONES[backbone]
    sizes = {0: 1, 2: 2, 3: 7, 5: 4, 6: 3}
    positives = {u: rng.choice(n_items, n, replace=False) for u, n in sizes.items()}
    plan = PlanMaker(positives, positives, n_items, 4, 10, 4, 1).draw(3, 1, -1)
    shapes = net.private_shapes(dim)
    private = {k: rng.standard_normal((len(sizes), *shape)) for k, shape in shapes.items()}
    items = rng.standard_normal((n_items, dim))
    want = fisher(net, {k: torch.from_numpy(v) for k, v in private.items()}, torch.from_numpy(items), plan)
    got = CompiledSimulator(None, None).fisher_of(net, private, items, plan)
    assert list(got[0]) == list(want[0]) == list(shapes)
    for k, v in want[0].items():
        assert got[0][k].shape == tuple(v.shape) and _close(v, got[0][k]) and bool(v.any())
    assert np.array_equal(got[1], want[1].numpy()) and np.array_equal(got[2], want[2].numpy())
    assert got[3].shape == tuple(want[3].shape) and _close(want[3], got[3]) and float(want[3].abs().max()) > 1e-3


@pytest.mark.heavy
@pytest.mark.parametrize("backbone", [[], ["backbone.name=pfedrec", "backbone.lr=0.02", "method.ewc_gamma=1"]])
def test_whole_ewc_smoke_run_equal_and_a_compiled_resume_equals_it(backbone, tmp_path):
    """EWC's whole smoke run: compiled = vectorised (summary, every round's record, best rounds); a compiled run
    stopped after block 1 (its Fisher rows in a numpy last.pt) and resumed gives the uninterrupted numbers."""
    from f3crec.main import main
    ewc = ["method.name=ewc", "method.ewc_gamma=100", *backbone]
    out = {name: _run(tmp_path, name, *ewc) for name in ("vectorised", "compiled")}
    assert out["vectorised"]["summary"] == out["compiled"]["summary"] and out["compiled"]["simulator"] == "compiled"
    assert _records(tmp_path / "vectorised") == _records(tmp_path / "compiled")
    assert [b["best_round"] for b in out["vectorised"]["blocks"]] == [b["best_round"] for b in out["compiled"]["blocks"]]
    _run(tmp_path, "compiled", *ewc, "train.stop_after_block=1", folder="cut")
    resumed = main(["--resume", str(tmp_path / "cut"), "train.stop_after_block=null"])
    assert resumed["summary"] == out["compiled"]["summary"] and resumed["simulator"] == "compiled"
    assert _records(tmp_path / "cut") == _records(tmp_path / "compiled")


def test_fisher_rows_of_numpy_state_are_set_as_the_tensor_state_sets_them():
    """ClientStates.set_fisher_rows on numpy arrays (the compiled simulator's merge) = on tensors (a sort):
    the new clients' rows replace theirs, absent clients keep theirs, all sorted by (user, item); new rows
    given sorted or not."""
    from f3crec.client_state import ClientStates
    rng = np.random.default_rng(4)
    states = {kind: ClientStates({"p": np.zeros((9, 3)) if kind == "numpy" else torch.zeros(9, 3)}, 2)
              for kind in ("numpy", "torch")}
    for users_now, shuffle in (([1, 4, 6], False), ([0, 4, 7], True), ([6, 8], False), ([2], True)):
        users, items = [], []
        for u in users_now:
            chosen = np.sort(rng.choice(12, rng.integers(1, 5), replace=False))
            users += [u] * chosen.size
            items += chosen.tolist()
        users, items = np.array(users, np.int64), np.array(items, np.int64)
        values = rng.random((users.size, 3))
        if shuffle:
            order = rng.permutation(users.size)
            users, items, values = users[order], items[order], values[order]
        states["numpy"].set_fisher_rows(users, items, values)
        states["torch"].set_fisher_rows(*map(torch.from_numpy, (users, items, values)))
        got, want = states["numpy"].fisher_rows, states["torch"].fisher_rows
        for k in ("user", "item", "F"):
            assert isinstance(got[k], np.ndarray) and np.array_equal(got[k], want[k].numpy())
    assert set(got["user"].tolist()) == {0, 1, 2, 4, 6, 7, 8}
