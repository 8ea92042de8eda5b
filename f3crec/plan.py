"""The shared randomness of one round (spec §13 "Shared randomness plan").

Both simulators consume the same `RoundPlan`, drawn from one generator seeded by (seed, block, round) and
laid out by sorted user id, so it does not depend on the order in which clients are visited. For every
participant it holds its negatives (§5: 4 per positive, uniform with replacement over |I^t|, rejecting the
excluded items), the shuffled order of its 5·n samples, and for every mini-batch step and sub-step a
random permutation of 0..N−1 whose first m_u entries are ARM's memory draw (uniform without replacement).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RoundPlan:
    users: np.ndarray          # (A,) participants, sorted
    offsets: np.ndarray        # (A+1,) client a owns samples offsets[a]:offsets[a+1]
    items: np.ndarray          # (S,) sample items, in each client's shuffled training order
    labels: np.ndarray         # (S,) 1.0 positive / 0.0 negative
    step_offsets: np.ndarray   # (A+1,) client a owns memory_perms[step_offsets[a]:step_offsets[a+1]]
    memory_perms: np.ndarray   # (total steps, sub-steps, N) permutations of 0..N-1
    batch_size: int

    def client(self, index: int) -> dict[str, np.ndarray]:
        """The slice of the plan that client `index` (position in `users`) receives."""
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return {"items": self.items[lo:hi], "labels": self.labels[lo:hi],
                "memory_perms": self.memory_perms[self.step_offsets[index]:self.step_offsets[index + 1]]}

    def subset(self, index: int) -> "RoundPlan":
        """The one-client plan of client `index`."""
        part = self.client(index)
        return RoundPlan(users=self.users[index:index + 1], offsets=np.array([0, len(part["items"])]),
                         items=part["items"], labels=part["labels"],
                         step_offsets=np.array([0, len(part["memory_perms"])]),
                         memory_perms=part["memory_perms"], batch_size=self.batch_size)


def draw_negatives(rng: np.random.Generator, owner: np.ndarray, n_items: int,
                   exclude_keys: np.ndarray) -> np.ndarray:
    """Uniform items for each entry of `owner` (client index), redrawn while (owner, item) is excluded.

    exclude_keys: sorted array of owner * n_items + item. Rejection keeps the draw uniform over the
    allowed items, as the reference's candidate walk does.
    """
    negatives = rng.integers(0, n_items, size=owner.size)
    bad = np.isin(owner * n_items + negatives, exclude_keys)
    while bad.any():
        negatives[bad] = rng.integers(0, n_items, size=int(bad.sum()))
        bad[bad] = np.isin(owner[bad] * n_items + negatives[bad], exclude_keys)
    return negatives


def make_plan(seed: int, block: int, round_idx: int, positives: dict[int, np.ndarray],
              exclude: dict[int, np.ndarray], n_items: int, num_neg: int = 4, batch_size: int = 512,
              topn: int = 30, n_sub: int = 1) -> RoundPlan:
    """Draw the plan of one round. positives/exclude: user -> item arrays (exclude ⊇ what to reject)."""
    rng = np.random.default_rng([seed, block, round_idx + 1])
    users = np.array(sorted(positives), dtype=np.int64)
    counts = np.array([len(positives[u]) for u in users], dtype=np.int64)
    for u in users:
        if len(np.unique(exclude[u])) >= n_items:
            raise ValueError(f"user {u} excludes all {n_items} items: no negative can be drawn")
    keys = np.concatenate([a * n_items + np.asarray(exclude[u], dtype=np.int64) for a, u in enumerate(users)]
                          + [np.zeros(0, np.int64)])
    neg_owner = np.repeat(np.arange(users.size), counts * num_neg)
    negatives = draw_negatives(rng, neg_owner, n_items, np.unique(keys))
    pos_owner = np.repeat(np.arange(users.size), counts)
    pos_items = np.concatenate([np.asarray(positives[u], dtype=np.int64) for u in users] + [np.zeros(0, np.int64)])
    owner = np.concatenate([pos_owner, neg_owner])
    items = np.concatenate([pos_items, negatives])
    labels = np.concatenate([np.ones(pos_items.size), np.zeros(negatives.size)])
    order = np.lexsort((rng.random(owner.size), owner))        # shuffle inside each client
    sizes = counts * (1 + num_neg)
    steps = -(-sizes // batch_size)                             # ⌈5 n_u / B⌉ mini-batches
    perms = np.argsort(rng.random((int(steps.sum()), n_sub, topn)), axis=-1)
    return RoundPlan(users=users, offsets=np.concatenate([[0], np.cumsum(sizes)]), items=items[order],
                     labels=labels[order], step_offsets=np.concatenate([[0], np.cumsum(steps)]),
                     memory_perms=perms, batch_size=batch_size)
