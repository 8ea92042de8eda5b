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
                        shared_private=shared_start(cfg.backbone, cfg.quirks.emb_init, seed),
                        private_init_round0=cfg.quirks.private_init_round0, ewc_gamma=cfg.method.ewc_gamma,
                        eps=cfg.method.eps, topn=cfg.method.topn)


_SHARED_START: dict[tuple, dict[str, np.ndarray]] = {}


def shared_start(backbone, emb_init: str, seed: int) -> dict[str, np.ndarray]:
    """init_private(backbone, emb_init, seed, -1): the round-0 reset's start-up values (Q2), drawn once per
    (network, d, dtype, init, seed) in a process and handed out as fresh copies (a simulator may train them
    in place), instead of a generator made for them every round."""
    key = (backbone.name, backbone.dim, backbone.dtype, emb_init, seed)
    if key not in _SHARED_START:
        _SHARED_START[key] = init_private(backbone, emb_init, seed, -1, tensor=False)
    return {k: v.copy() for k, v in _SHARED_START[key].items()}


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
