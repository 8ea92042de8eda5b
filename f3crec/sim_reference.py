"""Per-client reference simulator (§13): the ground truth, written to read like federated learning.

Each `Client` owns its private Φ_u, its replay state (ŷ^{t−1}, T^u), its EWC/anchor state and its data;
`Client.local_train(broadcast, plan, ctx)` copies the broadcast table, runs the local SGD steps and returns
only its upload (whole local table, plus Laplace noise when LDP is on). The `Server` (server.py) sees only
uploads. `ReferenceSimulator` loops over clients, collects uploads and aggregates. The pieces both
simulators share (round context, plan, end-of-block scores, Fisher) are in round.py.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .client_state import ClientStates
from .local_loop import LocalLoop
from .method import kd_terms, memory_size, target_ranks
from .model import Backbone, Private, sgd_step
from .round import RoundContext, RoundPlan, fisher, ldp_noise, previous_scores


class LocalModel(nn.Module):
    """One client's model: a local copy of the public item table Q plus its private Φ_u."""

    def __init__(self, net: Backbone, items: torch.Tensor, private: Private):
        super().__init__()
        self.net = net
        self.items = nn.Parameter(items.detach().clone())                      # (I, d) local copy of Q
        self.private = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in private.items()})

    def params(self) -> dict[str, nn.Parameter]:
        """Tensors by the names `learning_rates` uses."""
        return {"Q": self.items, **dict(self.private)}

    def score_items(self, items: torch.Tensor) -> torch.Tensor:
        a, c = self.net.affine(dict(self.private))
        return (self.items[items] * a).sum(-1) + c                               # (B,)

    def score_all(self) -> torch.Tensor:
        a, c = self.net.affine(dict(self.private))
        return self.items @ a + c                                                # (I,)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_rec (§5): mean BCE-with-logits over the mini-batch; repeated items accumulate gradient."""
        logits = self.score_items(batch["items"])
        return F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="mean")


class Client:
    """One user's device: private Φ_u, replay state, continual-learning anchors and its own data."""

    def __init__(self, user: int, private: dict[str, torch.Tensor]):
        self.user = user
        self.private = private
        self.slots: dict[str, dict[str, torch.Tensor]] = {}
        self.data: np.ndarray = np.zeros(0, np.int64)     # this block's train positives
        self.topn: torch.Tensor | None = None             # T^u
        self.yhat: torch.Tensor | None = None             # ŷ^{t−1} at T^u's items (KD reads nothing else)
        self.anchor: dict[str, torch.Tensor] = {}         # emb_reg/EWC θ*: best Φ_u of its last block
        self.fisher: dict[str, torch.Tensor] = {}         # EWC: F of Φ_u, F rows, row ids
        self.anchor_items: torch.Tensor | None = None     # received copy of Q^{t−1} (θ* of the item rows)

    def returning(self, ctx: RoundContext) -> bool:
        return ctx.block > 0 and self.user < ctx.n_prev_users

    def local_train(self, broadcast: torch.Tensor, plan: dict[str, np.ndarray], ctx: RoundContext
                    ) -> tuple[torch.Tensor, dict]:
        """One local epoch (§5) with the continual terms of §6/§11; returns (upload, stats)."""
        start = {k: torch.as_tensor(v) for k, v in ctx.shared_private.items()} if ctx.reset_private else self.private
        model = LocalModel(ctx.net, broadcast, start)
        params = model.params()
        items, labels = torch.from_numpy(plan["items"]), torch.from_numpy(plan["labels"]).to(broadcast.dtype)
        batch_size, stats = ctx.flags["batch_size"], {"D": [], "m": []}
        for step, lo in enumerate(range(0, len(items), batch_size)):
            batch = {"items": items[lo:lo + batch_size], "labels": labels[lo:lo + batch_size]}
            for sub, names in enumerate(ctx.net.substeps):
                loss = model.loss(batch) + self._continual_loss(model, plan["memory_perms"][step, sub], ctx, stats)
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                sgd_step(params, names, grads, ctx.lrs)
        self.private = {k: v.detach().clone() for k, v in model.private.items()}
        upload = model.items.detach().clone()
        if ctx.ldp_scale > 0:
            upload = upload + ldp_noise(ctx, np.array([self.user]), tuple(upload.shape), upload.dtype)[0]
        return upload, stats

    def _continual_loss(self, model: LocalModel, perm: np.ndarray, ctx: RoundContext, stats: dict):
        """λ·L_KD (ARM / top-N KD) plus the emb_reg or EWC penalty, for returning users only."""
        if not self.returning(ctx):
            return 0.0
        loss = 0.0
        if ctx.flags["arm"] != "off":
            scores = model.score_all()                                         # (I,) with gradient
            if ctx.flags["arm"] == "full":                                     # top-N KD: m_u = N
                slots = torch.arange(len(self.topn))
            else:
                ranks = target_ranks(scores.detach()[None], self.topn[None])
                discrepancy, _, size = memory_size(ranks, ctx.eps, ctx.topn)
                stats["D"].append(int(discrepancy[0]))
                stats["m"].append(int(size[0]))
                slots = torch.from_numpy(perm[: int(size[0])])
            if len(slots):   # the memory: T^u's items at `slots`, with ŷ^{t−1} at the same slots
                loss = loss + ctx.flags["kd_weight"] * kd_terms(scores[self.topn[slots]], self.yhat[slots]).mean()
        if ctx.flags["reg"] == "emb":
            penalty = ((model.items[: ctx.n_prev_items] - self.anchor_items) ** 2).sum()
            if "p" in self.anchor:
                penalty = penalty + ((model.private["p"] - self.anchor["p"]) ** 2).sum()
            loss = loss + ctx.flags["reg_d"] * penalty
        if ctx.flags["reg"] == "ewc" and self.fisher:
            rows = self.fisher["rows"]
            penalty = (self.fisher["F_rows"] * (model.items[rows] - self.anchor_items[rows]) ** 2).sum()
            for name, value in model.private.items():
                penalty = penalty + (self.fisher[name] * (value - self.anchor[name]) ** 2).sum()
            loss = loss + 0.5 * ctx.ewc_gamma * penalty
        return loss


class ReferenceSimulator(LocalLoop):
    """Loop over clients: broadcast → local copy → train → upload → aggregate (§13a)."""

    def __init__(self, server, states: ClientStates):
        self.server = server
        self.clients: dict[int, Client] = {}
        self.load_states(states)

    def train_round(self, plan: RoundPlan | None, ctx: RoundContext) -> dict:
        plan = self.plan(ctx) if plan is None else plan
        uploads, stats = [], {"D": [], "m": []}
        for _, upload, client_stats in self.local_round(plan, ctx):
            uploads.append(upload)
            for key in stats:
                stats[key] += client_stats[key]
        return {**stats, **self.server.aggregate(uploads)}

    def local_round(self, plan: RoundPlan, ctx: RoundContext) -> list[tuple[int, torch.Tensor, dict]]:
        """(user, upload, stats) of every participant in user order; a Flower node runs this same loop for
        its own users (§14), so both paths train with one local step."""
        broadcast = self.server.broadcast()
        return [(int(user), *self.clients[int(user)].local_train(broadcast, plan.client(index), ctx))
                for index, user in enumerate(plan.users)]

    def end_block(self, ctx: RoundContext, trained: np.ndarray, fisher_plan: RoundPlan | None) -> None:
        """Each client computes ŷ and (if it trained in this block) T^u from the broadcast best Q (§8 step 5)."""
        best, trained_set = self.server.broadcast(), set(trained.tolist())
        for user, client in self.clients.items():
            refresh = user in trained_set or client.topn is None
            keep = None if refresh else (torch.zeros(1, dtype=torch.bool), client.topn[None], client.yhat[None])
            topn, yhat = previous_scores(ctx.net, {k: v[None] for k, v in client.private.items()}, best, ctx.topn,
                                         *(keep or ()), latest=ctx.flags["target_scores"] == "latest")
            client.topn, client.yhat = topn[0], yhat[0]
            client.anchor_items = best.clone()
            if user in trained_set:
                client.anchor = {k: v.clone() for k, v in client.private.items()}
        for index, user in enumerate(fisher_plan.users if fisher_plan is not None else []):
            client = self.clients[int(user)]
            f_private, _, rows, f_rows = fisher(ctx.net, {k: v[None] for k, v in client.private.items()},
                                                best, fisher_plan.subset(index))
            client.fisher = {**{k: v[0] for k, v in f_private.items()}, "rows": rows, "F_rows": f_rows}
        self.server.end_block()

    # ---------------------------------------------------- conversion to/from the stacked checkpoint form
    def states(self) -> ClientStates:
        """The clients' state stacked by user id (for the evaluation oracle and checkpoints only)."""
        users = sorted(self.clients)
        first = self.clients[users[0]]
        out = ClientStates({k: torch.stack([self.clients[u].private[k] for u in users]) for k in first.private},
                           len(first.topn) if first.topn is not None else self.topn)
        names = first.slots.keys()
        out.slots = {s: {k: torch.stack([self.clients[u].slots[s][k] for u in users]) for k in first.private}
                     for s in names}
        for u in users:
            client = self.clients[u]
            if client.topn is not None:
                out.topn[u], out.yhat[u], out.has_topn[u] = client.topn, client.yhat, True
            for k in first.private:
                out.anchor[k][u] = client.anchor.get(k, client.private[k])
                if client.fisher:
                    out.fisher[k][u] = client.fisher[k]
            out.fisher_valid[u] = bool(client.fisher)
        out.anchor_items = first.anchor_items
        with_rows = [u for u in users if self.clients[u].fisher]
        if with_rows:
            out.set_fisher_rows(torch.cat([torch.full_like(self.clients[u].fisher["rows"], u) for u in with_rows]),
                                torch.cat([self.clients[u].fisher["rows"] for u in with_rows]),
                                torch.cat([self.clients[u].fisher["F_rows"] for u in with_rows]))
        return out

    def load_states(self, states: ClientStates) -> None:
        """Hand every client its own row of a stacked state (resume, or grow)."""
        self.topn = states.topn.shape[1]
        rows = states.fisher_rows
        for u in range(states.num_users()):
            client = self.clients.setdefault(u, Client(u, {}))
            client.private = {k: v[u].clone() for k, v in states.private.items()}
            client.slots = {s: {k: v[u].clone() for k, v in slot.items()} for s, slot in states.slots.items()}
            client.topn = states.topn[u].clone() if bool(states.has_topn[u]) else None
            client.yhat = states.yhat[u].clone() if bool(states.has_topn[u]) else None
            client.anchor = {k: v[u].clone() for k, v in states.anchor.items()}
            client.anchor_items = states.anchor_items
            client.fisher = {}
            if bool(states.fisher_valid[u]):
                mine = rows["user"] == u
                client.fisher = {**{k: v[u].clone() for k, v in states.fisher.items()},
                                 "rows": rows["item"][mine], "F_rows": rows["F"][mine]}

    def private_matrix(self) -> dict[str, torch.Tensor]:
        """Every client's Φ in the row of its user id (for the evaluation oracle only). A Flower node holds
        some users only (§14): the other rows are zero and never read."""
        users = sorted(self.clients)
        index = torch.tensor(users)
        return {k: v.new_zeros(users[-1] + 1, *v.shape).index_copy_(0, index, torch.stack([self.clients[u].private[k] for u in users]))
                for k, v in self.clients[users[0]].private.items()}

    def grow(self, new_private: dict[str, torch.Tensor]) -> None:
        start = len(self.clients)
        count = next(iter(new_private.values())).shape[0]
        for j in range(count):
            client = Client(start + j, {k: v[j].clone() for k, v in new_private.items()})
            client.anchor = {k: v.clone() for k, v in client.private.items()}
            client.slots = {s: {k: v.clone() for k, v in client.private.items()}
                            for s in (self.clients[0].slots if self.clients else {})}
            self.clients[start + j] = client

    def save_slot(self, name: str) -> None:
        self.server.save_slot(name)
        for client in self.clients.values():
            client.slots[name] = {k: v.clone() for k, v in client.private.items()}

    def load_slot(self, name: str) -> None:
        self.server.load_slot(name)
        for client in self.clients.values():
            client.private = {k: v.clone() for k, v in client.slots[name].items()}

    def set_private(self, private: dict[str, torch.Tensor]) -> None:
        """Re-initialise every client's Φ (full_retrain's per-block restart)."""
        for u, client in self.clients.items():
            client.private = {k: v[u].clone() for k, v in private.items()}

    def topn_lists(self) -> dict[int, np.ndarray]:
        return {u: c.topn.numpy() for u, c in self.clients.items() if c.topn is not None}
