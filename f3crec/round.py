"""What one federated round is made of, shared by both simulators (§3, §5, §13).

`RoundContext` is what every participant is told for a round (public, no client data). `RoundPlan` is the
round's shared randomness (§13 "Shared randomness"): drawn from one generator seeded by (seed, block, round)
and laid out by sorted user id, so it does not depend on the order in which clients are visited. For every
participant it holds its negatives (§5: 4 per positive, uniform with replacement over |I^t|, rejecting the
excluded items), the shuffled order of its 5·n samples, and for every mini-batch step and sub-step a
random permutation of 0..N−1 whose first m_u entries are ARM's memory draw (uniform without replacement).
The client-side helpers both simulators call (plan inputs, LDP noise, end-of-block scores, EWC's Fisher)
live here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .method import per_sample_grads
from .model import Backbone, score_matrix


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

    exclude_keys: sorted unique owner * n_items + item. Rejection keeps the draw uniform over the allowed
    items, as the reference's candidate walk does. Membership uses a bitmap when it fits, else a search.
    """
    span = (int(owner.max()) + 1) * n_items if owner.size else 0
    if span <= 1 << 27:
        bitmap = np.zeros(span, dtype=bool)
        bitmap[exclude_keys] = True
        excluded = lambda keys: bitmap[keys]  # noqa: E731
    else:
        excluded = lambda keys: _member(keys, exclude_keys)  # noqa: E731
    negatives = rng.integers(0, n_items, size=owner.size)
    bad = np.flatnonzero(excluded(owner * n_items + negatives))
    while bad.size:
        negatives[bad] = rng.integers(0, n_items, size=bad.size)
        bad = bad[excluded(owner[bad] * n_items + negatives[bad])]
    return negatives


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    where = np.searchsorted(sorted_keys, keys).clip(max=max(sorted_keys.size - 1, 0))
    return sorted_keys[where] == keys if sorted_keys.size else np.zeros(keys.size, dtype=bool)


class PlanMaker:
    """The per-block constant part of the plans (who trains on what, what is excluded); `draw` makes one
    round's plan. Positives and exclusions do not change within a block, so they are laid out once."""

    def __init__(self, positives: dict[int, np.ndarray], exclude: dict[int, np.ndarray], n_items: int,
                 num_neg: int = 4, batch_size: int = 512, topn: int = 30, n_sub: int = 1):
        self.users = np.array(sorted(positives), dtype=np.int64)
        self.counts = np.array([len(positives[u]) for u in self.users], dtype=np.int64)
        excluded = [np.asarray(exclude[u], dtype=np.int64) for u in self.users]
        self.keys = np.unique(np.repeat(np.arange(self.users.size), [len(e) for e in excluded]) * n_items
                              + np.concatenate(excluded + [np.zeros(0, np.int64)]))
        full = np.flatnonzero(np.bincount(self.keys // n_items, minlength=self.users.size) >= n_items)
        if full.size:
            raise ValueError(f"user {self.users[full[0]]} excludes all {n_items} items: no negative can be drawn")
        self.pos_owner = np.repeat(np.arange(self.users.size), self.counts)
        self.pos_items = np.concatenate([np.asarray(positives[u], dtype=np.int64) for u in self.users]
                                        + [np.zeros(0, np.int64)])
        self.neg_owner = np.repeat(np.arange(self.users.size), self.counts * num_neg)
        self.owner = np.concatenate([self.pos_owner, self.neg_owner])
        self.labels = np.concatenate([np.ones(self.pos_items.size), np.zeros(self.neg_owner.size)])
        sizes = self.counts * (1 + num_neg)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        steps = -(-sizes // batch_size)                                  # ⌈5 n_u / B⌉ mini-batches
        self.step_offsets = np.concatenate([[0], np.cumsum(steps)])
        self.n_items, self.batch_size, self.topn, self.n_sub = n_items, batch_size, topn, n_sub

    def draw(self, seed: int, block: int, round_idx: int) -> RoundPlan:
        """One round's plan from the (seed, block, round) stream; independent of client visiting order."""
        rng = np.random.default_rng([seed, block, round_idx + 1])
        negatives = draw_negatives(rng, self.neg_owner, self.n_items, self.keys)
        items = np.concatenate([self.pos_items, negatives])
        order = np.argsort(self.owner + rng.random(self.owner.size), kind="stable")  # shuffle inside clients
        perms = np.argsort(rng.random((int(self.step_offsets[-1]), self.n_sub, self.topn)), axis=-1)
        return RoundPlan(users=self.users, offsets=self.offsets, items=items[order], labels=self.labels[order],
                         step_offsets=self.step_offsets, memory_perms=perms, batch_size=self.batch_size)


def make_plan(seed: int, block: int, round_idx: int, positives: dict[int, np.ndarray],
              exclude: dict[int, np.ndarray], n_items: int, num_neg: int = 4, batch_size: int = 512,
              topn: int = 30, n_sub: int = 1) -> RoundPlan:
    """Draw the plan of one round. positives/exclude: user -> item arrays (exclude ⊇ what to reject)."""
    return PlanMaker(positives, exclude, n_items, num_neg, batch_size, topn, n_sub).draw(seed, block, round_idx)


@dataclass
class RoundContext:
    """What every participant is told for one round (public, no client data)."""
    block: int
    round: int
    n_items: int                 # |I^t|
    n_prev_users: int            # n_{t−1}: ids below are returning users (0 in the base block)
    n_prev_items: int            # |I^{t−1}|
    lrs: dict[str, float]        # SGD learning rate per tensor name (§4)
    flags: dict                  # the run's resolved flags (config.resolve)
    net: Backbone                # the network (§4)
    seed: int
    ldp_scale: float = 0.0
    shared_private: dict[str, torch.Tensor] = field(default_factory=dict)  # round-0 start-up values (§4)
    private_init_round0: str = "shared"   # Q2, resolved
    ewc_gamma: float = 0.0
    eps: float = 0.006
    topn: int = 30

    @property
    def reset_private(self) -> bool:
        """[Q2] §4: FedNCF/PFedRec participants restart from the shared start-up values in round 0."""
        return self.round == 0 and self.net.round0_reset and self.private_init_round0 == "shared"


def plan_inputs(data: dict[int, np.ndarray], topn: dict[int, np.ndarray], ctx: RoundContext
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(positives, excluded) per participant. naive_replay adds T^u as pseudo-positives [D] (§11)."""
    positives, exclude = {}, {}
    for user, items in data.items():
        positives[user], exclude[user] = items, items
        if ctx.flags["replay"] and user < ctx.n_prev_users and user in topn:
            extra = np.setdiff1d(topn[user], items, assume_unique=False)
            extra = extra[: ctx.flags.get("replay_size", len(extra))]
            positives[user] = np.concatenate([items, extra])
            exclude[user] = np.concatenate([items, topn[user]])
    return positives, exclude


def ldp_noise(ctx: RoundContext, user: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Laplace(0, b) noise a client adds to every entry of its upload (§3), from its own stream."""
    rng = np.random.default_rng([ctx.seed, ctx.block, ctx.round + 1, 7, user])
    return torch.from_numpy(rng.laplace(0.0, ctx.ldp_scale, size=shape)).to(dtype)


def previous_scores(net: Backbone, private: dict[str, torch.Tensor], items: torch.Tensor, topn: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """End-of-block ŷ (U, I) and T (U, N) (top-N, descending, nothing masked, ties to lower id) (§6)."""
    scores = score_matrix(net, private, items)
    chunk = 4096  # the argsort's int64 index matrix is the memory peak for 10⁵ users: sort in chunks
    top = [torch.argsort(scores[lo:lo + chunk], dim=1, descending=True, stable=True)[:, :topn]
           for lo in range(0, scores.shape[0], chunk)]
    return scores, torch.cat(top)


def fisher(net: Backbone, private: dict[str, torch.Tensor], items: torch.Tensor, plan: RoundPlan
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """EWC's diagonal empirical Fisher for the plan's clients [D] (§11).

    private: stacked (A, ...) states (θ*), items: Q^{t} (θ*). Returns (F_private (A, ...), row_owner (L,),
    row_item (L,), F_rows (L, d)) with the mean over each client's samples of squared per-sample gradients.
    """
    put = lambda x: torch.as_tensor(x, device=items.device)  # noqa: E731
    owner = put(np.repeat(np.arange(plan.users.size), np.diff(plan.offsets)))
    sample_items = put(plan.items)
    labels = put(plan.labels).to(items.dtype)
    count = put(np.diff(plan.offsets)).to(items.dtype)
    grads, row_grads = per_sample_grads(net, {k: v[owner] for k, v in private.items()},
                                        items[sample_items], labels)
    f_private = {k: torch.zeros_like(v).index_add_(0, owner, g ** 2) / count.view(-1, *[1] * (v.dim() - 1))
                 for (k, g), v in zip(grads.items(), private.values())}
    keys, inverse = torch.unique(owner * items.shape[0] + sample_items, return_inverse=True)
    f_rows = torch.zeros(keys.numel(), items.shape[1], dtype=items.dtype, device=items.device).index_add_(0, inverse, row_grads ** 2)
    row_owner = keys // items.shape[0]
    return f_private, row_owner, keys % items.shape[0], f_rows / count[row_owner, None]
