"""Evaluation (spec §10) and the block loop (§8): grow → rounds with validation and early stopping →
restore best → test a_{t,·} → end-of-block state → hand-off. Plain functions, no trainer class.

`oracle_scores` is the simulation-only evaluation oracle (§3): it assembles every user's scores from the
clients' state and the server's table; the server itself never sees them. NDCG@20 and Recall@20 are
per-user means, so a federated evaluation (each client reports a sum and a count) gives the same values.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from common.metrics import full_sort_metrics

from .data import SPLITS, Block
from .federated import RoundContext, plan_inputs
from .model import init_items, init_private, learning_rates, score_matrix, substeps
from .plan import PlanMaker, make_plan


# ----------------------------------------------------------------------------------------- evaluation
def oracle_scores(sim, users: torch.Tensor, backbone: str) -> torch.Tensor:
    """Scores [len(users), |I|] of the given users (simulation-only, §3)."""
    items = sim.server.broadcast()
    private = {k: v[users.to(items.device)] for k, v in sim.private_matrix().items()}
    return score_matrix(backbone, private, items).cpu()


def _mask(users: list[int], parts: list[dict[int, np.ndarray]], n_items: int) -> torch.Tensor:
    mask = torch.zeros(len(users), n_items, dtype=torch.bool)
    for row, user in enumerate(users):
        for part in parts:
            if user in part:
                mask[row, torch.from_numpy(part[user])] = True
    return mask


def evaluate(scores: torch.Tensor, users: list[int], positives: dict[int, np.ndarray],
             exclude: list[dict[int, np.ndarray]], decimals: int | None,
             masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """NDCG@20 and Recall@20 (Recall = hits / |test|) over `users`, excluded items at −∞ (§10).

    `masks` = (positives, excluded) as built by `eval_masks`, to reuse them across rounds.
    """
    pos_mask, exclude_mask = masks or eval_masks(users, positives, exclude, scores.shape[1])
    metrics = full_sort_metrics(scores, pos_mask, ks=(20,), exclude_mask=exclude_mask)
    out = {"ndcg": float(metrics["NDCG@20"].mean()), "recall": float(metrics["Recall@20"].mean())}
    return {k: round(v, decimals) if decimals is not None else v for k, v in out.items()}


def eval_masks(users: list[int], positives: dict[int, np.ndarray], exclude: list[dict[int, np.ndarray]],
               n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _mask(users, [positives], n_items), _mask(users, exclude, n_items)


def test_row(sim, blocks: list[Block], t: int, backbone: str, old_block_mask: str,
             decimals: int | None) -> list[dict[str, float]]:
    """a_{t,i} for i = 0..t (§10): test of D^i, masked with D^t's train+valid [Q] or cumulatively [D]."""
    row = []
    for i in range(t + 1):
        users = sorted(blocks[i].test)
        scores = oracle_scores(sim, torch.tensor(users, dtype=torch.long), backbone)[:, : blocks[t].n_items]
        if old_block_mask == "current":
            exclude = [blocks[t].train, blocks[t].valid]
        else:
            exclude = [b.split(s) for j, b in enumerate(blocks[: t + 1]) for s in SPLITS if s != "test" or j != i]
        row.append(evaluate(scores, users, blocks[i].test, exclude, decimals))
    return row


def la_ra_h(matrix: list[list[float]]) -> dict[str, float]:
    """LA_t = mean_i a_{i,i}, RA_t = mean_i a_{t,i} (base block included), H = harmonic mean (§10)."""
    t = len(matrix) - 1
    learning = sum(matrix[i][i] for i in range(t + 1)) / (t + 1)
    retained = sum(matrix[t][i] for i in range(t + 1)) / (t + 1)
    harmonic = 0.0 if learning + retained == 0 else 2 * learning * retained / (learning + retained)
    return {"LA": learning, "RA": retained, "H": harmonic}


def summarise(rows: list[list[dict[str, float]]]) -> dict:
    """a-matrices and LA/RA/H after every block, for NDCG@20 and Recall@20."""
    out = {}
    for metric in ("ndcg", "recall"):
        matrix = [[cell[metric] for cell in row] for row in rows]
        out[metric] = {"a": matrix, "per_block": [la_ra_h(matrix[: t + 1]) for t in range(len(matrix))]}
    return out


# ----------------------------------------------------------------------------------------- block loop
def block_data(blocks: list[Block], t: int, flags: dict, neg_exclude: str
               ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(train positives, negative exclusions) per participant of block t (§3, §5, full_retrain §11)."""
    if flags["full_retrain"]:  # [D] every user with data so far trains on the union of its train items
        data = {}
        for b in blocks[: t + 1]:
            for u, items in b.train.items():
                data[u] = np.concatenate([data.get(u, np.zeros(0, np.int64)), items])
    else:
        data = dict(blocks[t].train)
    if neg_exclude == "block_train":
        return data, data
    known = {u: np.concatenate([b.split(s)[u] for b in blocks[: t + 1] for s in SPLITS if u in b.split(s)])
             for u in data}
    return data, known


def grow(sim, server_factory, cfg, blocks: list[Block], t: int, seed: int):
    """Append item rows and clients for block t's newcomers (§8.1); full_retrain re-initialises all."""
    n_prev_users = blocks[t - 1].n_users if t else 0
    n_prev_items = blocks[t - 1].n_items if t else 0
    block = blocks[t]
    new_private = [init_private(cfg.model, seed, u) for u in range(n_prev_users, block.n_users)]
    stacked = {k: torch.stack([p[k] for p in new_private]) for k in new_private[0]} if new_private else None
    if sim is None:
        return server_factory(init_items(cfg.model, seed, 0, block.n_items), stacked)
    sim.server.grow(init_items(cfg.model, seed, t, block.n_items - n_prev_items))
    if stacked is not None:
        sim.grow(stacked)
    return sim


def run_block(sim, cfg, blocks: list[Block], t: int, flags: dict, log) -> dict:
    """Rounds of block t with validation, selection and early stopping (§8.2–8.3); ends on the best."""
    block, fed, ev = blocks[t], cfg.federation, cfg.eval
    seed = cfg.train.seed
    n_prev_users, n_prev_items = (blocks[t - 1].n_users, blocks[t - 1].n_items) if t else (0, 0)
    data, exclude = block_data(blocks, t, flags, flags["neg_exclude"])
    valid_users = sorted(block.valid)
    valid_index = torch.tensor(valid_users, dtype=torch.long)
    valid_masks = eval_masks(valid_users, block.valid, [block.train], block.n_items)
    best, best_round, stale, maker = -1.0, -1, 0, None
    for r in range(fed.rounds):
        started = time.perf_counter()
        ctx = RoundContext(block=t, round=r, n_items=block.n_items, n_prev_users=n_prev_users,
                           n_prev_items=n_prev_items, lrs=learning_rates(cfg.model, block.n_items), flags=flags,
                           cfg=cfg.model, seed=seed, ldp_scale=fed.ldp_scale,
                           shared_private=init_private(cfg.model, seed, -1), ewc_gamma=cfg.method.ewc_gamma,
                           eps=cfg.method.eps, topn=cfg.method.topn)
        if maker is None:  # positives and exclusions are fixed for the block (T^u included)
            positives, excluded = plan_inputs(data, sim.topn_lists() if flags["replay"] else {}, ctx)
            if flags["neg_exclude"] != "block_train":
                excluded = {u: np.concatenate([excluded[u], exclude[u]]) for u in positives}
            maker = PlanMaker(positives, excluded, block.n_items, fed.num_neg, fed.batch_size, cfg.method.topn,
                              len(substeps(cfg.model.backbone)))
        plan = maker.draw(seed, t, r)
        stats = sim.train_round(plan, ctx)
        scores = oracle_scores(sim, valid_index, cfg.model.backbone)
        val = evaluate(scores, valid_users, block.valid, [block.train], flags["metric_decimals"], valid_masks)
        value = val[ev.select_metric]
        record = {"block": t, "round": r, "val_ndcg": val["ndcg"], "val_recall": val["recall"],
                  "seconds": round(time.perf_counter() - started, 4), **_arm_summary(stats)}
        if value > best:  # strict improvement saves the full state (§8.3)
            best, best_round, stale = value, r, 0
            sim.save_slot("best")
        else:
            stale += 1
        log(record)
        if stale >= fed.patience:
            break
    sim.save_slot("last")
    sim.load_slot("best")
    return {"best_round": best_round, "best_val": best, "rounds_run": r + 1}


def _arm_summary(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if k not in ("D", "m")}
    if stats.get("D"):
        d, m = np.asarray(stats["D"]), np.asarray(stats["m"])
        out.update(D_mean=float(d.mean()), m_mean=float(m.mean()),
                   m_hist=np.bincount(np.minimum(m // 5, 6), minlength=7).tolist(),
                   D_hist=np.histogram(d, bins=[0, 50, 100, 200, 300, 567, 10**9])[0].tolist())
    return out


def end_block(sim, cfg, blocks: list[Block], t: int, flags: dict) -> None:
    """End-of-block state from the restored best (§8.5), then the hand-off to t+1 (§8.6)."""
    block = blocks[t]
    fisher_plan = None
    if flags["reg"] == "ewc":  # 4 negatives per positive drawn once (round index −1)
        data, exclude = block_data(blocks, t, flags, flags["neg_exclude"])
        fisher_plan = make_plan(cfg.train.seed, t, -1, data, exclude, block.n_items, cfg.federation.num_neg,
                                cfg.federation.batch_size, cfg.method.topn, 1)
    ctx = RoundContext(block=t, round=0, n_items=block.n_items, n_prev_users=0, n_prev_items=0, lrs={},
                       flags=flags, cfg=cfg.model, seed=cfg.train.seed, topn=cfg.method.topn)
    sim.end_block(ctx, np.array(sorted(block.train), dtype=np.int64), fisher_plan)
    if flags["handoff"] == "last":
        sim.load_slot("last")


def restart(sim, cfg, blocks: list[Block], t: int) -> None:
    """full_retrain (not warm): re-draw every parameter at the start of block t [D]."""
    seed = cfg.train.seed + 7919 * t
    block = blocks[t]
    device = sim.server.items.device
    sim.server.items = init_items(cfg.model, seed, 0, block.n_items).to(device)
    private = [init_private(cfg.model, seed, u) for u in range(block.n_users)]
    sim.set_private({k: torch.stack([p[k] for p in private]).to(device) for k in private[0]})
