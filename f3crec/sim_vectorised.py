"""Vectorised simulator (§13): every client of a round trained at once with batched tensors.

Clients are independent within a round given the broadcast Q, and plain SGD has no state, so batching is
exact. Each client's local table is stored sparsely as the rows it can change (its sample items, its
T^u, all old rows for emb_reg, every row under LDP) in one flat tensor W [L, d]; untouched rows equal the
broadcast. Step k processes every client that has a k-th mini-batch: the loss is the sum over clients of
each client's own masked mean, so autograd hands each client exactly its own gradient. Step 1, where
every local row still equals the broadcast, runs through one dense A × |I| score matrix when that is small
(`dense_limit`): every logit, the BCE's and ARM's alike, is an entry of it, so one-step clients (with or
without replay) finish there and upload their summed delta, and only multi-step clients keep local rows.
ARM ranks T^u of all replaying clients at once, a chunk of clients at a time (method.target_ranks counts,
it does not sort the catalogue). The upload is every multi-step client's row deltas plus the one-step
clients' summed delta, which the server adds and averages (server.py). The client-side state of all users is held stacked
(one row per user) in `self.state`; the server object never receives it.

Memory at scale: a round of more than `group_samples` samples is trained a group of clients at a time
(their deltas summed in client order, so the aggregate is unchanged); ARM ranks ⌊rank_budget / |I|⌋
clients at a time; nothing users × items is allocated (ŷ^{t−1} is kept at T^u only, client_state.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .local_loop import StackedSimulator
from .method import kd_terms, memory_size, target_ranks
from .model import sgd_step
from .round import RoundContext, RoundPlan, ldp_noise


@dataclass
class _LocalRows:
    """One round's flat layout: participants, their local rows (L of them) and their samples (S)."""
    users: torch.Tensor          # (A,) participants, sorted
    n_clients: int
    owner: torch.Tensor          # (S,) client index of each sample; samples ordered by mini-batch step
    returning: torch.Tensor      # (A,) returning users (id < n_{t−1}, t ≥ 1)
    replay: torch.Tensor         # (A,) clients that run ARM this round
    dense_first: bool            # step 1 runs through the dense score matrix
    one_shot: torch.Tensor       # (A,) one-step clients, finished by the dense first step (no local rows)
    keys: torch.Tensor           # (L,) sorted client·|I| + item of every local row
    row_owner: torch.Tensor      # (L,) client index of each local row
    row_item: torch.Tensor       # (L,) item of each local row
    table: torch.Tensor          # (L, d) the local rows' current values
    sample_row: torch.Tensor     # (S,) local row of each sample (−1 for one-shot clients)
    sample_items: torch.Tensor   # (S,)
    labels: torch.Tensor         # (S,)
    step_bounds: np.ndarray      # (max steps + 1,) step k's samples are step_bounds[k]:step_bounds[k+1]
    steps: torch.Tensor          # (A,) mini-batches per client
    ewc_rows: tuple | None       # (keys, F rows, client) of stored Fisher rows (EWC only)


class _PlanSlice:
    """Clients lo:hi of a RoundPlan, as the plan of a group of them (their samples, their memory draws)."""

    def __init__(self, plan: RoundPlan, lo: int, hi: int):
        self.plan, self.lo = plan, lo
        self.users = plan.users[lo:hi]
        first, last = int(plan.offsets[lo]), int(plan.offsets[hi])
        self.offsets = plan.offsets[lo:hi + 1] - first
        self.step_offsets = plan.step_offsets[lo:hi + 1] - plan.step_offsets[lo]
        self.items, self.labels = plan.items[first:last], plan.labels[first:last]
        self.batch_size = plan.batch_size

    def memory_perm(self, index: np.ndarray, step, sub: int) -> np.ndarray:
        return self.plan.memory_perm(np.asarray(index) + self.lo, step, sub)


def unique_keys(keys: torch.Tensor, span: int, bitmap_limit: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique keys, inverse) of keys in [0, span): a bitmap and a running count when the span is
    small enough, else a sort (torch.unique)."""
    if span > bitmap_limit:
        return torch.unique(keys, return_inverse=True)
    seen = torch.zeros(span, dtype=torch.bool, device=keys.device)
    seen[keys] = True
    unique = torch.nonzero(seen).squeeze(1)
    index = torch.empty(span, dtype=torch.long, device=keys.device)
    index[unique] = torch.arange(unique.numel(), device=keys.device)
    return unique, index[keys]


class VectorisedSimulator(StackedSimulator):
    """Same interface as ReferenceSimulator; client state kept stacked in `state` (see ClientStates)."""

    def __init__(self, server, state, rank_chunk: int = 4096, dense_limit: int = 1 << 25,
                 rank_budget: int = 1 << 22, group_samples: int = 1 << 22):
        self.server = server
        self.state = state           # ClientStates: stacked client-side tensors, one row per user
        self.rank_chunk = rank_chunk  # clients ranked per call (bounds the (R, |I|) scores for 1e5 clients)
        self.rank_budget = rank_budget  # ... and at most ⌊rank_budget / |I|⌋ of them (memory, large catalogues)
        self.group_samples = group_samples  # clients trained together: about this many samples (see train_round)
        self.dense_limit = dense_limit  # largest A·|I| for which step 1 uses the dense score matrix

    # ------------------------------------------------------------------------------------------ round
    def train_round(self, plan: RoundPlan, ctx: RoundContext) -> dict:
        """One round of every participant at once (§3, §5, §6): local steps, then the summed upload.

        Clients are independent within a round, so on a large round they are trained a group of about
        `group_samples` samples at a time (memory O(group), not O(round)): each group's row deltas are added
        to one running sum in client order, which is the order one flat upload adds them in, so the
        aggregate equals the ungrouped sparse round bit for bit (tests/f3crec/test_scale.py). A grouped round
        takes every client through the sparse path (the dense first step is for small rounds)."""
        plan = self.plan(ctx) if plan is None else plan
        bounds = self._groups(plan, ctx)
        if len(bounds) == 2:
            stats, r, summed = self._train_group(plan, ctx, dense=True)
            return {**stats, **self.server.aggregate_deltas(*self._upload(plan, ctx, r), r.n_clients, summed)}
        q = self.server.broadcast()
        total, stats = torch.zeros_like(q), {"D": [], "m": []}
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = _PlanSlice(plan, int(lo), int(hi))
            group_stats, r, _ = self._train_group(part, ctx, dense=False)
            total.index_add_(0, *self._upload(part, ctx, r))
            for key in stats:
                stats[key] += group_stats[key]
            del r
        empty = torch.zeros(0, dtype=torch.long, device=q.device)
        return {**stats, **self.server.aggregate_deltas(empty, q.new_zeros(0, q.shape[1]), len(plan.users), total)}

    def _groups(self, plan: RoundPlan, ctx: RoundContext) -> np.ndarray:
        """Client boundaries [0, …, A] of groups of about `group_samples` samples plus local rows each."""
        n_clients = len(plan.users)
        dense_rows = ctx.n_items if ctx.ldp_scale > 0 else (ctx.n_prev_items if ctx.flags["reg"] == "emb" else 0)
        weight = np.asarray(plan.offsets) * 2 + np.arange(n_clients + 1) * dense_rows   # samples + their rows
        if n_clients == 0 or weight[-1] <= self.group_samples * 2:
            return np.array([0, n_clients])
        bounds = [0]
        while bounds[-1] < n_clients:
            nxt = int(np.searchsorted(weight, weight[bounds[-1]] + self.group_samples * 2, side="right")) - 1
            bounds.append(min(max(nxt, bounds[-1] + 1), n_clients))
        return np.array(bounds)

    def _train_group(self, plan, ctx: RoundContext, dense: bool) -> tuple[dict, "_LocalRows", torch.Tensor | None]:
        """Local steps of the plan's clients; returns (stats, their local rows, the one-step clients' summed delta)."""
        r = self._local_rows(plan, ctx, dense)
        start = ({k: torch.as_tensor(v, device=r.table.device).expand(r.n_clients, *v.shape).clone()
                  for k, v in ctx.shared_private.items()}
                 if ctx.reset_private else {k: v[r.users].clone() for k, v in self.state.private.items()})
        stats, summed = {"D": [], "m": []}, None
        for step in range(len(r.step_bounds) - 1):
            idx = slice(int(r.step_bounds[step]), int(r.step_bounds[step + 1]))      # this step's samples
            active = r.steps > step                                                  # (A,) clients stepping
            count = torch.bincount(r.owner[idx], minlength=r.n_clients).clamp(min=1).to(r.table.dtype)
            if step == 0 and r.dense_first:
                r.table, summed = self._dense_first_step(plan, ctx, r.users, start, r.table, r.keys, r.row_owner,
                                                         r.owner[idx], r.sample_items[idx], r.labels[idx], count,
                                                         active & r.replay, r.one_shot, stats)
                continue
            start = self._sparse_step(plan, ctx, r, start, step, idx, active, count, stats)
        for k, v in start.items():
            self.state.private[k][r.users] = v
        return stats, r, summed

    def _local_rows(self, plan: RoundPlan, ctx: RoundContext, dense: bool = True) -> "_LocalRows":
        """Each client's local row set, flat: the rows it can change, as (client, item) keys.

        A client can change its sample items, T^u when it replays, every old row under emb_reg, its stored
        Fisher rows under EWC and every row under LDP (noise touches all of them); any other row of its
        local table equals the broadcast and is never stored. A one-step client is finished by the dense
        first step (`one_shot`) and needs no rows at all.
        """
        st, q = self.state, self.server.broadcast()
        n_items, dev = q.shape[0], q.device
        put = lambda x: torch.as_tensor(x, device=dev)  # noqa: E731  plan arrays (numpy) -> q's device
        users = put(plan.users)
        n_clients = users.numel()
        owner_np = np.repeat(np.arange(n_clients), np.diff(plan.offsets))
        returning = (users < ctx.n_prev_users) & (ctx.block > 0)
        replay = returning & st.has_topn[users] if ctx.flags["arm"] != "off" else torch.zeros_like(returning)
        steps_np = np.diff(plan.step_offsets)
        dense_first = dense and ctx.flags["reg"] is None and ctx.ldp_scale == 0 and n_clients * n_items <= self.dense_limit
        one_shot = steps_np == 1 if dense_first else np.zeros(n_clients, dtype=bool)
        kept = ~one_shot[owner_np]
        key_parts = [owner_np[kept] * n_items + plan.items[kept]]
        if bool((replay & ~put(one_shot)).any()):
            rep = torch.nonzero(replay & ~put(one_shot)).squeeze(1)
            key_parts.append((rep[:, None] * n_items + st.topn[users[rep]]).reshape(-1).cpu().numpy())
        dense_rows = n_items if ctx.ldp_scale > 0 else (ctx.n_prev_items if ctx.flags["reg"] == "emb" else 0)
        if dense_rows:
            key_parts.append((np.arange(n_clients)[:, None] * n_items + np.arange(dense_rows)).reshape(-1))
        ewc_rows = None
        if ctx.flags["reg"] == "ewc" and st.fisher_rows is not None and bool(returning.any()):
            ewc_rows = self._ewc_rows(users, returning, n_items)
            key_parts.append(ewc_rows[0].cpu().numpy())
        keys, inverse = unique_keys(put(np.concatenate(key_parts)), n_clients * n_items)
        row_item = keys % n_items
        sample_row = torch.full((plan.items.size,), -1, dtype=torch.long, device=dev)
        sample_row[put(kept)] = inverse[: int(kept.sum())]                           # sample -> local row
        step_of = (np.arange(plan.items.size) - plan.offsets[owner_np]) // plan.batch_size
        step_of = step_of.astype(np.int16) if steps_np.size and steps_np.max() < 1 << 15 else step_of  # radix sort
        by_step = np.argsort(step_of, kind="stable")           # step-major, client order kept inside a step
        by_step_t = put(by_step)
        return _LocalRows(users=users, n_clients=n_clients, owner=put(owner_np[by_step]), returning=returning,
                          replay=replay, dense_first=dense_first, one_shot=put(one_shot), keys=keys,
                          row_owner=keys // n_items, row_item=row_item, table=q.index_select(0, row_item),
                          sample_row=sample_row[by_step_t], sample_items=put(plan.items[by_step]),
                          labels=put(plan.labels[by_step]).to(q.dtype),
                          step_bounds=np.concatenate([[0], np.cumsum(np.bincount(step_of))]),
                          steps=put(steps_np), ewc_rows=ewc_rows)

    def _sparse_step(self, plan: RoundPlan, ctx: RoundContext, r: "_LocalRows", start: dict, step: int,
                     idx: torch.Tensor, active: torch.Tensor, count: torch.Tensor, stats: dict) -> dict:
        """Mini-batch `step` of every client that has one, on its local rows; returns the updated Φ.

        Only the rows of stepping clients can change, so a later step works on their sub-table (`part`),
        reached from the full row index through `local`, and writes it back into `r.table`.
        """
        rows_k = None if bool(active.all()) else torch.nonzero(active[r.row_owner]).squeeze(1)
        if rows_k is None:
            local, part = (lambda x: x), r.table
        else:
            remap = torch.full((r.keys.numel(),), -1, dtype=torch.long, device=r.keys.device)
            remap[rows_k] = torch.arange(rows_k.numel(), device=r.keys.device)
            local, part = (lambda x: remap[x]), r.table.index_select(0, rows_k)
        o = r.owner[idx]
        for sub, names in enumerate(ctx.net.substeps):
            leaves = {"Q": part.requires_grad_(True), **{k: v.requires_grad_(True) for k, v in start.items()}}
            a, c = ctx.net.affine(start)                                             # (A, d), (A,)
            logits = (part.index_select(0, local(r.sample_row[idx])) * a.index_select(0, o)).sum(-1) + c[o]
            per_sample = F.binary_cross_entropy_with_logits(logits, r.labels[idx], reduction="none")
            loss = (per_sample / count[o]).sum()                                     # Σ_u mean_u (§13)
            live = active & r.replay
            if bool(live.any()):
                loss = loss + self._kd(plan, ctx, r.users, r.keys, part, local, a, c, live, step, sub, stats)
            if ctx.flags["reg"] is not None and bool((active & r.returning).any()):
                loss = loss + self._penalty(ctx, r.users, start, part, local, r.row_owner, r.row_item,
                                            r.keys, active & r.returning, r.ewc_rows)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
            sgd_step(leaves, names, grads, ctx.lrs)
            part = part.detach()
            start = {k: v.detach() for k, v in start.items()}
        if rows_k is None:
            r.table = part
        else:
            r.table.index_copy_(0, rows_k, part)
        return start

    def _upload(self, plan: RoundPlan, ctx: RoundContext, r: "_LocalRows") -> tuple[torch.Tensor, torch.Tensor]:
        """Every client's (row, delta) pairs (plus its LDP noise) as one flat upload; the server averages them."""
        q = self.server.broadcast()
        n_items, dim = q.shape
        row_item, delta = r.row_item, r.table - q.index_select(0, r.row_item)
        if ctx.ldp_scale > 0:  # every row is local under LDP: client a's rows are one contiguous (I, d) block
            noise = ldp_noise(ctx, plan.users, (n_items, dim), q.dtype).reshape(-1, dim).to(q.device)
            delta = delta + noise
        return row_item, delta

    def _dense_first_step(self, plan, ctx, users, start, table, keys, row_owner, owner, items, labels, count,
                          live, one_shot, stats) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step 1 of every client at once through the dense score matrix (exact, faster at small |I|).

        At the first step every local row still equals the broadcast, so every logit, the BCE's and ARM's
        alike, is an entry of S = a Qᵀ + c (A × I), and ARM ranks T^u in S itself. With G = ∂L/∂S:
        ∂L/∂q_i of client u = G[u, i]·a_u and the private gradient is G backpropagated through S.
        One-step clients (`one_shot`) hold no rows: their summed delta −lr·G_oneᵀ a_one is returned
        alongside the updated rows of the others.
        """
        summed = None
        q = self.server.broadcast()
        for sub, names in enumerate(ctx.net.substeps):
            for value in start.values():
                value.requires_grad_(True)
            a, c = ctx.net.affine(start)
            scores = a @ q.T + c[:, None]                                            # (A, I)
            dense = scores.detach().requires_grad_(True)
            flat = owner * q.shape[0] + items                                         # (S,) into A × I
            per_sample = F.binary_cross_entropy_with_logits(dense.view(-1)[flat], labels, reduction="none")
            loss = (per_sample / count[owner]).sum()
            if bool(live.any()):
                loss = loss + self._kd_dense(plan, ctx, users, dense, live, sub, stats)
            grads = torch.autograd.grad(loss, [dense] + list(start.values()), allow_unused=True, retain_graph=True)
            through = self._through_scores(a, c, q, grads[0], start)
            a_old = a.detach().clone()
            # Φ's gradient: its direct terms plus the dense gradient backpropagated through S.
            private_names = tuple(name for name in start if name in names)
            total = [[g for g in (grads[1 + j], through[j]) if g is not None]
                     for j, name in enumerate(start) if name in names]
            sgd_step(start, private_names, [sum(t) if t else None for t in total], ctx.lrs)
            if "Q" in names:
                with torch.no_grad():
                    row_grad = grads[0].view(-1)[keys][:, None] * a_old.index_select(0, row_owner)
                    sgd_step({"Q": table}, ("Q",), [row_grad], ctx.lrs)
                    if bool(one_shot.any()):
                        summed = -ctx.lrs["Q"] * (grads[0][one_shot].T @ a_old[one_shot])   # (I, d)
            for name in list(start):
                start[name] = start[name].detach()
        return table, summed

    @staticmethod
    def _through_scores(a, c, q, grad_scores, start) -> tuple:
        """∂L/∂Φ through S = a Qᵀ + c given G = ∂L/∂S: (∂L/∂a, ∂L/∂c) = (G Q, G·1), then back through the
        affine map. A scalar backward: autograd with an explicit output gradient imports sympy (seconds)."""
        grad_a, grad_c = grad_scores @ q, grad_scores.sum(1)
        return torch.autograd.grad((a * grad_a).sum() + (c * grad_c).sum(), list(start.values()), allow_unused=True)

    def _kd_dense(self, plan, ctx, users, dense, live, sub, stats):
        """ARM (§6) at step 1 on the dense scores: rank T^u in S, size and draw the memory, KD on S."""
        st, n_items = self.state, dense.shape[1]
        rep = torch.nonzero(live).squeeze(1)
        topn = st.topn[users[rep]]                                                   # (R, N)
        size, perm = self._memory(plan, ctx, rep, topn, lambda chunk: dense.detach()[chunk], 0, sub, stats)
        chosen = torch.arange(topn.shape[1], device=dense.device)[None] < size[:, None]
        if not bool(chosen.any()):
            return 0.0
        owner = rep[:, None].expand_as(topn)[chosen]
        items = topn.gather(1, perm)[chosen]
        logits = dense.view(-1)[owner * n_items + items]
        weight = size.to(dense.dtype).clamp(min=1)[torch.searchsorted(rep, owner)]
        previous = st.yhat[users[rep]].gather(1, perm)[chosen]                       # ŷ is aligned with T^u
        return ctx.flags["kd_weight"] * (kd_terms(logits, previous) / weight).sum()

    def _memory(self, plan, ctx, rep, topn, scores_of, step, sub, stats) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_u, the permutation whose first m_u entries are the memory) of replaying clients `rep`;
        `scores_of(chunk)` gives their current full-catalogue scores, ranked a chunk at a time."""
        if ctx.flags["arm"] == "full":                                               # top-N KD: m_u = N
            size = torch.full((rep.numel(),), topn.shape[1], dtype=torch.long, device=topn.device)
            return size, torch.arange(topn.shape[1], device=topn.device).expand_as(topn)
        chunk = max(1, min(self.rank_chunk, self.rank_budget // max(self.server.broadcast().shape[0], 1)))
        with torch.no_grad():   # (chunk, |I|) scores and a few same-sized temporaries at a time
            ranks = torch.cat([target_ranks(scores_of(rep[lo:lo + chunk]), topn[lo:lo + chunk])
                               for lo in range(0, rep.numel(), chunk)])
        discrepancy, _, size = memory_size(ranks, ctx.eps, ctx.topn)
        stats["D"] += discrepancy.tolist()
        stats["m"] += size.tolist()
        perm = torch.arange(topn.shape[1], device=topn.device).repeat(rep.numel(), 1)
        drawing = torch.nonzero(size > 0).squeeze(1)                                 # only they read a draw
        if drawing.numel():
            perm[drawing] = torch.as_tensor(plan.memory_perm(rep[drawing].cpu().numpy(), step, sub), device=topn.device)
        return size, perm

    def _kd(self, plan, ctx, users, keys, table, local, a, c, live, step, sub, stats):
        """Batched ARM (§6) after step 1: rank T^u in each client's current local scores (broadcast rows
        overridden by its local rows), size and draw the memory, KD on the local rows."""
        st, q = self.state, self.server.broadcast()
        n_items = q.shape[0]
        rep = torch.nonzero(live).squeeze(1)
        topn = st.topn[users[rep]]                                                   # (R, N)

        def local_scores(chunk: torch.Tensor) -> torch.Tensor:
            scores = a[chunk] @ q.T + c[chunk, None]                                 # (R, I) broadcast rows
            lo, hi = torch.searchsorted(keys, torch.stack([chunk.min() * n_items, (chunk.max() + 1) * n_items])).tolist()
            rows = torch.arange(lo, hi, device=keys.device)                          # keys are sorted by client
            rows = rows[torch.isin(keys[rows] // n_items, chunk)]
            client = keys[rows] // n_items
            scores[torch.searchsorted(chunk, client), keys[rows] % n_items] = \
                (table[local(rows)] * a[client]).sum(-1) + c[client]
            return scores

        size, perm = self._memory(plan, ctx, rep, topn, local_scores, step, sub, stats)
        chosen = torch.arange(topn.shape[1], device=q.device)[None] < size[:, None]  # first m_u of the perm
        if not bool(chosen.any()):
            return 0.0
        owner = rep[:, None].expand_as(topn)[chosen]
        items = topn.gather(1, perm)[chosen]
        rows = local(torch.searchsorted(keys, owner * n_items + items))
        logits = (table[rows] * a[owner]).sum(-1) + c[owner]
        weight = size.to(table.dtype).clamp(min=1)[torch.searchsorted(rep, owner)]
        previous = st.yhat[users[rep]].gather(1, perm)[chosen]                       # ŷ is aligned with T^u
        return ctx.flags["kd_weight"] * (kd_terms(logits, previous) / weight).sum()

    def _penalty(self, ctx, users, private, table, local, row_owner, row_item, keys, live, ewc_rows):
        """emb_reg or EWC penalty (§11) of every stepping returning client, summed over clients."""
        st = self.state
        if ctx.flags["reg"] == "emb":
            old = torch.nonzero(live[row_owner] & (row_item < ctx.n_prev_items)).squeeze(1)
            penalty = ((table[local(old)] - st.anchor_items[row_item[old]]) ** 2).sum()
            if "p" in private:
                penalty = penalty + ((private["p"][live] - st.anchor["p"][users[live]]) ** 2).sum()
            return ctx.flags["reg_d"] * penalty
        has = live & st.fisher_valid[users]
        penalty = sum((st.fisher[k][users[has]] * (v[has] - st.anchor[k][users[has]]) ** 2).sum()
                      for k, v in private.items())
        if ewc_rows is not None:
            row_keys, f_rows, client = ewc_rows
            keep = live[client]
            rows = torch.searchsorted(keys, row_keys[keep])
            penalty = penalty + (f_rows[keep] * (table[local(rows)] - st.anchor_items[row_item[rows]]) ** 2).sum()
        return 0.5 * ctx.ewc_gamma * penalty

    def _ewc_rows(self, users, returning, n_items):
        """(keys, F rows, client index) of the stored Fisher rows of this round's returning clients."""
        st = self.state
        lookup = torch.full((st.num_users(),), -1, dtype=torch.long, device=users.device)
        lookup[users] = torch.arange(users.numel(), device=users.device)
        client = lookup[st.fisher_rows["user"]]
        keep = client >= 0
        keep[keep.clone()] = returning[client[keep]]
        return client[keep] * n_items + st.fisher_rows["item"][keep], st.fisher_rows["F"][keep], client[keep]
