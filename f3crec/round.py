"""What one federated round is made of, shared by both simulators (§3, §5, §13).

`RoundContext` is what every participant is told for a round (public, no client data). `RoundPlan` is the
round's randomness (§13 "Per-user random streams"): every client draws from its own streams, keyed by
(seed, block, round, user), so a draw does not depend on which other clients take part or in which order
they are visited. For every participant it gives its negatives (§5: 4 per positive, uniform with
replacement over |I^t|, rejecting the excluded items), the shuffled order of its 5·n samples, and for every
mini-batch step and sub-step a random permutation of 0..N−1 whose first m_u entries are ARM's memory draw
(uniform without replacement). The client-side helpers both simulators call (plan inputs, LDP noise, end-of-block scores, EWC's Fisher)
live here too.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import streams
from .arrays import is_tensor, take_along, where, zeros
from .method import per_sample_grads
from .model import Backbone, score_matrix


class RoundPlan:
    """One round's randomness for the participants of a `PlanMaker`, from their per-user streams.

    `client(index)` is what one client draws alone from its own streams (the reference simulator);
    `items`, `labels` and `memory_perm` are the same draws for every client at once (the vectorised
    simulator), laid out by sorted user id. Both go through the same per-element functions of
    streams.py, so they are bit-identical (tests/f3crec/test_sim.py).
    """

    def __init__(self, maker: "PlanMaker", seed: int, block: int, round_idx: int):
        self.maker, self.seed, self.block, self.round = maker, seed, block, round_idx
        self.users, self.offsets, self.step_offsets = maker.users, maker.offsets, maker.step_offsets
        self.batch_size = maker.batch_size
        self._drawn: tuple[np.ndarray, np.ndarray] | None = None

    def _keys(self, purpose: int, users: np.ndarray | None = None) -> np.ndarray:
        return streams.keys(self.seed, self.block, self.round, self.users if users is None else users, purpose)

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        if self._drawn is None:
            m = self.maker
            negatives = draw_negatives(self._keys(streams.NEGATIVES)[m.neg_owner], m.neg_slot, m.neg_owner,
                                       m.n_items, m.excluded)
            items = m.base_items.copy()
            items[m.neg_at] = negatives
            order = shuffle_order(self._keys(streams.SHUFFLE)[m.owner], m.position, m.owner)
            self._drawn = items[order], m.labels[order]
        return self._drawn

    @property
    def items(self) -> np.ndarray:
        """(S,) sample items, each client's samples contiguous in its shuffled training order."""
        return self._draw()[0]

    @property
    def labels(self) -> np.ndarray:
        """(S,) 1.0 positive / 0.0 negative, aligned with `items`."""
        return self._draw()[1]

    def memory_perm(self, index: np.ndarray, step: int | np.ndarray, sub: int) -> np.ndarray:
        """(len(index), N) permutations of 0..N−1 of clients `index` for mini-batch `step`, sub-step `sub`:
        the first m_u entries are ARM's memory draw (uniform without replacement, §6)."""
        m = self.maker
        key = self._keys(streams.MEMORY, self.users[index])[:, None]
        counter = (np.asarray(step)[..., None] * m.n_sub + sub) * m.topn + np.arange(m.topn)
        return np.argsort(streams.values(key, counter), axis=-1, kind="stable")

    def client(self, index: int) -> dict[str, np.ndarray]:
        """What client `index` (position in `users`) draws from its own streams alone."""
        one = self.subset(index)
        steps = np.arange(int(one.step_offsets[-1]))
        perms = np.stack([one.memory_perm(np.zeros(steps.size, np.int64), steps, sub)
                          for sub in range(self.maker.n_sub)], axis=1) if steps.size else \
            np.zeros((0, self.maker.n_sub, self.maker.topn), np.int64)
        return {"items": one.items, "labels": one.labels, "memory_perms": perms}

    def subset(self, index: int) -> "RoundPlan":
        """The plan of client `index` alone, drawn from its own streams (a one-user maker)."""
        return RoundPlan(self.maker.single(index), self.seed, self.block, self.round)


def draw_negatives(key: np.ndarray, slot: np.ndarray, owner: np.ndarray, n_items: int, excluded) -> np.ndarray:
    """Uniform items for every negative slot, redrawn while (owner, item) is excluded.

    Attempt k of a slot is value slot + k·2³² of its client's stream, so a slot's draw depends only on its
    own stream. Rejection keeps the draw uniform over the allowed items, as the reference's candidate walk
    does. `excluded(owner, items)` is the membership test.
    """
    negatives = streams.below(streams.values(key, slot), n_items)
    bad = np.flatnonzero(excluded(owner, negatives))
    attempt = 0
    while bad.size:
        attempt += 1
        negatives[bad] = streams.below(streams.values(key[bad], slot[bad] + (attempt << 32)), n_items)
        bad = bad[excluded(owner[bad], negatives[bad])]
    return negatives


def shuffle_order(key: np.ndarray, position: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Each client's samples in the order of their stream values (a uniform shuffle inside clients).

    One stable sort of (owner, top 43 bits of the value) packed in an int64: inside a client it is the
    stable order of the values alone, so a client sorting its own samples gets the same order.
    """
    value = streams.values(key, position) >> np.uint64(21)
    if owner.size and owner[-1] >= 1 << 20:
        return np.lexsort((value, owner))
    import torch
    packed = torch.from_numpy(((owner.astype(np.uint64) << np.uint64(43)) | value).view(np.int64))
    return torch.sort(packed, stable=True).indices.numpy()


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    where = np.searchsorted(sorted_keys, keys).clip(max=max(sorted_keys.size - 1, 0))
    return sorted_keys[where] == keys if sorted_keys.size else np.zeros(keys.size, dtype=bool)


def _flat(arrays: list, n: int) -> np.ndarray:
    """The (n,) int64 concatenation of per-user item arrays (one numpy call, not a loop over users)."""
    return np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(n, np.int64)


class PlanMaker:
    """The per-block constant part of the plans (who trains on what, what is excluded, the sample layout);
    `draw` announces one round. Positives and exclusions do not change within a block, so they are laid
    out once: client a owns samples offsets[a]:offsets[a+1] (its positives, then 4 negative slots per
    positive, §5, before the shuffle) and mini-batches step_offsets[a]:step_offsets[a+1].

    What every simulator needs is laid out at once and in O(interactions) numpy work: the users, their
    positives and exclusions as flat arrays in user order (`pos_flat`, `exc_ptr`/`exc_flat`, what the
    compiled draw reads), the offsets. The per-sample layout of the vectorised draw (owner, position,
    labels, base items, negative slots: five arrays of 5 × interactions) and the exclusion test are built
    on first use, so the compiled simulator never pays for them (at 100,000 clients: 46 M samples each)."""

    def __init__(self, positives: dict[int, np.ndarray], exclude: dict[int, np.ndarray], n_items: int,
                 num_neg: int = 4, batch_size: int = 512, topn: int = 30, n_sub: int = 1):
        self.positives, self.exclude = positives, exclude
        order = sorted(positives)
        self.users = np.array(order, dtype=np.int64)
        pos = [positives[u] for u in order]
        exc = [exclude[u] for u in order]
        self.counts = np.fromiter(map(len, pos), np.int64, len(pos))
        self.n_items, self.num_neg, self.batch_size, self.topn, self.n_sub = n_items, num_neg, batch_size, topn, n_sub
        self.pos_flat = _flat(pos, 0)
        exc_counts = np.fromiter(map(len, exc), np.int64, len(exc))
        self.exc_ptr = np.concatenate([[0], np.cumsum(exc_counts)]).astype(np.int64)
        self.exc_flat = _flat(exc, 0)
        for a in np.flatnonzero(exc_counts >= n_items):    # only a user with ≥ |I| exclusions can exclude all
            if np.unique(self.exc_flat[self.exc_ptr[a]:self.exc_ptr[a + 1]]).size >= n_items:
                raise ValueError(f"user {self.users[a]} excludes all {n_items} items: no negative can be drawn")
        self.sizes = self.counts * (1 + num_neg)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        steps = -(-self.sizes // batch_size)                             # ⌈5 n_u / B⌉ mini-batches
        self.step_offsets = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
        self._single: dict[int, PlanMaker] = {}

    # ---- the vectorised draw's per-sample layout, built on first use
    @cached_property
    def owner(self) -> np.ndarray:
        return np.repeat(np.arange(self.users.size), self.sizes)

    @cached_property
    def position(self) -> np.ndarray:
        return np.arange(self.owner.size) - self.offsets[self.owner]

    @cached_property
    def _is_positive(self) -> np.ndarray:
        return self.position < self.counts[self.owner]

    @cached_property
    def labels(self) -> np.ndarray:
        return self._is_positive.astype(np.float64)

    @cached_property
    def base_items(self) -> np.ndarray:
        base = np.zeros(self.owner.size, dtype=np.int64)
        base[self._is_positive] = self.pos_flat
        return base

    @cached_property
    def neg_at(self) -> np.ndarray:
        return np.flatnonzero(~self._is_positive)

    @cached_property
    def neg_owner(self) -> np.ndarray:
        return self.owner[self.neg_at]

    @cached_property
    def neg_slot(self) -> np.ndarray:
        return self.position[self.neg_at] - self.counts[self.neg_owner]

    @cached_property
    def excluded(self):
        """Membership test for (client, item): a bitmap when it fits, else a sorted-key search."""
        n_items = self.n_items
        owner = np.repeat(np.arange(self.users.size), np.diff(self.exc_ptr))
        keys = owner * n_items + self.exc_flat
        if self.users.size * n_items <= 1 << 27:
            bitmap = np.zeros(self.users.size * n_items, dtype=bool)
            bitmap[keys] = True
            return lambda owner, items: bitmap[owner * n_items + items]
        keys = np.unique(keys)
        return lambda owner, items: _member(owner * n_items + items, keys)

    def draw(self, seed: int, block: int, round_idx: int) -> RoundPlan:
        """Round `round_idx` of `block` (−1: the block end); every client's draws come from its own streams."""
        return RoundPlan(self, seed, block, round_idx)

    def single(self, index: int) -> "PlanMaker":
        """The maker of client `index` alone (what that client knows of the plan)."""
        if index not in self._single:
            user = int(self.users[index])
            self._single[index] = PlanMaker({user: self.positives[user]}, {user: self.exclude[user]}, self.n_items,
                                            self.num_neg, self.batch_size, self.topn, self.n_sub)
        return self._single[index]


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
    shared_private: dict = field(default_factory=dict)  # round-0 start-up values (§4), numpy arrays
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


def ldp_noise(ctx: RoundContext, users: np.ndarray, shape: tuple[int, ...], dtype):
    """Laplace(0, b) noise (len(users), *shape) each client adds to every entry of its upload (§3), from its
    own stream: a tensor of torch dtype `dtype`, or a numpy array when `dtype` is a numpy dtype."""
    key = streams.keys(ctx.seed, ctx.block, ctx.round, np.asarray(users), streams.LDP)
    raw = streams.values(key[:, None], np.arange(int(np.prod(shape))))
    noise = streams.laplace(raw, ctx.ldp_scale).reshape(len(key), *shape)
    if isinstance(dtype, np.dtype):
        return noise.astype(dtype)
    import torch
    return torch.from_numpy(noise).to(dtype)


SCORE_BUDGET = 1 << 22  # score entries held at once by the end-of-block scoring (rows × items, float)


def previous_scores(net: Backbone, private: dict, items, topn: int, refresh=None, old_topn=None, old_yhat=None,
                    latest: bool = True, budget: int | None = None) -> tuple:
    """End-of-block T (U, N) (top-N, descending, nothing masked, ties to lower id) and ŷ at T (U, N) (§6).

    KD reads ŷ^{t−1} only at the items of T^u, so ŷ is kept aligned with T^u instead of over all of
    I^{t−1}. Users outside `refresh` keep `old_topn`; with `latest` their ŷ is re-read at it, else they keep
    `old_yhat` (Q7 `matched`). Users are scored a chunk of ⌊budget / |I|⌋ rows (SCORE_BUDGET) at a time: memory
    O(budget), never U × I (when U·|I| ≤ budget it is one product, as before). Tensors or numpy arrays."""
    count, n_items = next(iter(private.values())).shape[0], items.shape[0]
    rows = max(1, (budget or SCORE_BUDGET) // max(n_items, 1))
    if count == 0:
        return zeros(items, (0, topn), "int64"), zeros(items, (0, topn))
    # The outputs are allocated once and filled chunk by chunk: a list of small per-chunk results, each
    # allocated between two chunks' large temporaries, pins the heap and grew the RSS of a 100,000-client
    # end of block from 3.4 to over 13 GB (glibc cannot reuse or return the memory between them).
    n = min(topn, n_items)
    tops, yhats = zeros(items, (count, n), "int64"), zeros(items, (count, n))
    for lo in range(0, count, rows):
        scores = _scores(net, {k: v[lo:lo + rows] for k, v in private.items()}, items)
        top = top_n(scores, topn)
        if refresh is not None:
            keep = ~refresh[lo:lo + rows, None]
            top = where(keep, old_topn[lo:lo + rows], top)
        yhat = take_along(scores, top)
        if refresh is not None and not latest:
            yhat = where(keep, old_yhat[lo:lo + rows], yhat)
        tops[lo:lo + rows] = top
        yhats[lo:lo + rows] = yhat
    return tops, yhats


def _scores(net: Backbone, private: dict, items):
    """score_matrix; on numpy arrays a @ items.T with c added in place, and not at all where c is all zero
    (FedMF: adding 0 only turns a −0.0 score into +0.0, which ranks the same), as the compiled simulator's
    evaluation does: no second (rows × items) pass and temporary."""
    if is_tensor(items):
        return score_matrix(net, private, items)
    a, c = net.affine(private)
    scores = a @ items.T
    if c.dtype != scores.dtype:   # a wider c widens the scores, as score_matrix's sum does
        return scores + c[:, None]
    if c.any():
        scores += c[:, None]
    return scores


def top_n(scores, n: int):
    """The first n items of each row in a stable descending sort (ties to the lower id), without sorting
    the row: the candidates are the items scoring at least the row's n-th largest value."""
    n = min(n, scores.shape[1])
    if not is_tensor(scores) and n and "f3crec.eval_kernels" in sys.modules:   # the compiled simulator's run: one pass
        out = np.empty((scores.shape[0], n), np.int64)                     # per row (a running top-n)
        if sys.modules["f3crec.eval_kernels"].top_n_rows(np.ascontiguousarray(scores), out):
            return out
    if not is_tensor(scores):   # numpy: the same candidates, ordered by one lexsort (a non-finite row too)
        threshold = np.partition(scores, scores.shape[1] - n, axis=1)[:, scores.shape[1] - n, None]
        row, item = np.nonzero(scores >= threshold)                              # row-major, item ascending
        order = np.lexsort((item, -scores[row, item], row))                      # (row, −score, item)
        start = np.cumsum(np.bincount(row, minlength=scores.shape[0])) - np.bincount(row, minlength=scores.shape[0])
        return item[order][start[:, None] + np.arange(n)]
    import torch
    threshold = torch.topk(scores, n, dim=1).values[:, -1:]
    row, item = torch.nonzero(scores >= threshold, as_tuple=True)               # row-major, item ascending
    by_value = torch.sort(scores[row, item], descending=True, stable=True).indices
    order = by_value[torch.sort(row[by_value], stable=True).indices]             # (row, −score, item)
    start = torch.cumsum(torch.bincount(row, minlength=scores.shape[0]), 0) - torch.bincount(row, minlength=scores.shape[0])
    return item[order][start[:, None] + torch.arange(n, device=scores.device)]


def fisher(net: Backbone, private: dict, items, plan: RoundPlan) -> tuple:
    """EWC's diagonal empirical Fisher for the plan's clients [D] (§11).

    private: stacked (A, ...) states (θ*), items: Q^{t} (θ*). Returns (F_private (A, ...), row_owner (L,),
    row_item (L,), F_rows (L, d)) with the mean over each client's samples of squared per-sample gradients.
    """
    import torch
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
