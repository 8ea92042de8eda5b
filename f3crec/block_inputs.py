"""What a round of block t is built from (§3, §5, §8): the public round context every participant is told,
and each participant's train positives and negative exclusions. Shared by the block loop (train.py) and
the Flower nodes (flower/node.py), which build the same inputs for their own users."""
from __future__ import annotations

import numpy as np

from .data import SPLITS, Block
from .model import BACKBONES, init_private, learning_rates
from .round import RoundContext


def round_context(cfg, flags: dict, blocks: list[Block], t: int, r: int) -> RoundContext:
    """What every participant of round r of block t is told (public, no client data)."""
    prev = blocks[t - 1] if t else None
    seed = cfg.train.seed
    return RoundContext(block=t, round=r, n_items=blocks[t].n_items, n_prev_users=prev.n_users if prev else 0,
                        n_prev_items=prev.n_items if prev else 0,
                        lrs=learning_rates(cfg.backbone, blocks[t].n_items), flags=flags,
                        net=BACKBONES[cfg.backbone.name], seed=seed, ldp_scale=cfg.federation.ldp_scale,
                        shared_private=init_private(cfg.backbone, cfg.quirks.emb_init, seed, -1, tensor=False),
                        private_init_round0=cfg.quirks.private_init_round0, ewc_gamma=cfg.method.ewc_gamma,
                        eps=cfg.method.eps, topn=cfg.method.topn)


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
