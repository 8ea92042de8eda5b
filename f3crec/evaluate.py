"""The evaluation protocol (§10): full ranking over every item known so far, NDCG@20 and Recall@20, the
a_{t,i} matrix and LA / RA / H-mean.

`oracle_scores` is the simulation-only evaluation oracle (§3): it assembles every user's scores from the
clients' state and the server's table; the server itself never sees them. NDCG@20 and Recall@20 are
per-user means, so a federated evaluation (each client reports a sum and a count) gives the same values.
`evaluate` is the one entry point for a metric pair; `test_row` and `summarise` build the protocol on it.
"""
from __future__ import annotations

import numpy as np
import torch

from common.metrics import full_sort_metrics

from .data import SPLITS, Block
from .model import Backbone, score_matrix


def oracle_scores(sim, users: torch.Tensor, net: Backbone) -> torch.Tensor:
    """Scores (len(users), |I|) of the given users (simulation-only, §3)."""
    items = sim.server.broadcast()
    private = {k: v[users.to(items.device)] for k, v in sim.private_matrix().items()}
    return score_matrix(net, private, items).cpu()


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


def test_row(sim, blocks: list[Block], t: int, net: Backbone, old_block_mask: str,
             decimals: int | None) -> list[dict[str, float]]:
    """a_{t,i} for i = 0..t (§10): test of D^i, masked with D^t's train+valid [Q4] or cumulatively [D]."""
    row = []
    for i in range(t + 1):
        users = sorted(blocks[i].test)
        scores = oracle_scores(sim, torch.tensor(users, dtype=torch.long), net)[:, : blocks[t].n_items]
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
