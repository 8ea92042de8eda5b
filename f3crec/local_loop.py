"""The block loop's side of a local simulator (§8, §13): what `train.fit` asks of every simulator, so the
loop has no special case for any of them. A simulator that runs in this process (vectorised, reference)
gets it from `LocalLoop`; the Flower simulator (flower/simulator.py) answers the same calls by asking its
nodes, which draw their own plans and evaluate their own users (§14).

    sim.train_round(None, ctx)              # draws the round's plan itself (from the per-user streams)
    sim.validate(ctx, decimals)             # validation NDCG/Recall@20 of block ctx.block
    sim.test_row(t, old_block_mask, decimals)   # a_{t,i}, i = 0..t
    sim.fisher_plan(cfg, flags, blocks, t)  # EWC's end-of-block plan (round −1), or None
    sim.state_dict()                        # what last.pt and the base cache keep of the simulator

The round plan is built here and only here: positives and exclusions (T^u included) are fixed for a
block, so the `PlanMaker` is made at the block's first round and draws every round from it.

`StackedSimulator` is the block end and state plumbing of the simulators that hold every client's state
stacked (client_state.ClientStates): the vectorised one (torch tensors) and the compiled one (numpy arrays).
"""
from __future__ import annotations

import numpy as np

from .arrays import clone, like, numpy, zeros
from .block_inputs import block_data
from .client_state import spread
from .evaluate import finish, oracle_sums, oracle_test_sums, sparse_masks
from .model import BACKBONES
from .round import PlanMaker, RoundContext, RoundPlan, fisher, make_plan, plan_inputs, previous_scores


class LocalLoop:
    """Mixin: the block-loop calls answered from the run's blocks (set by `attach`) and the simulator's own
    state. `train_round(plan, ctx)` with an explicit plan (the equality tests) never needs `attach`."""

    cfg = flags = blocks = None
    _maker: tuple[int, PlanMaker] | None = None
    _valid: tuple[int, list[int], list] | None = None

    def attach(self, cfg, flags: dict, blocks: list) -> "LocalLoop":
        self.cfg, self.flags, self.blocks = cfg, flags, blocks
        self._maker = self._valid = None
        return self

    def plan(self, ctx: RoundContext) -> RoundPlan:
        """Round ctx.round of block ctx.block, drawn from every participant's own streams."""
        if self._maker is None or self._maker[0] != ctx.block:
            cfg, flags, block = self.cfg, self.flags, self.blocks[ctx.block]
            data, exclude = block_data(self.blocks, ctx.block, flags, flags["neg_exclude"])
            positives, excluded = plan_inputs(data, self.topn_lists() if flags["replay"] else {}, ctx)
            if flags["neg_exclude"] != "block_train":
                excluded = {u: np.concatenate([excluded[u], exclude[u]]) for u in positives}
            self._maker = (ctx.block, PlanMaker(positives, excluded, block.n_items, cfg.federation.num_neg,
                                                cfg.federation.batch_size, cfg.method.topn,
                                                len(BACKBONES[cfg.backbone.name].substeps)))
        return self._maker[1].draw(self.cfg.train.seed, ctx.block, ctx.round)

    def validate(self, ctx: RoundContext, decimals: int | None) -> dict[str, float]:
        """Validation of block ctx.block, only its train masked (§8.2)."""
        return finish(self.validation_sums(ctx.block), decimals)

    def validation_sums(self, t: int) -> dict:
        """Exact NDCG@20/Recall@20 sums over block t's validation users that this simulator holds (a Flower
        node: its own, §14); sparse masks built once a block."""
        if self._valid is None or self._valid[0] != t:
            block = self.blocks[t]
            users = sorted(block.valid)
            self._valid = (t, users, sparse_masks(users, block.valid, [block.train], n_items=block.n_items))
        _, users, masks = self._valid
        return oracle_sums(self, BACKBONES[self.cfg.backbone.name], users, masks, self.blocks[t].n_items)

    def test_row(self, t: int, old_block_mask: str, decimals: int | None) -> list[dict[str, float]]:
        """a_{t,i} for i = 0..t (§10): test of D^i, masked with D^t's train+valid [Q4] or cumulatively [D]."""
        return [finish(sums, decimals) for sums in self.test_sums(t, old_block_mask)]

    def test_sums(self, t: int, old_block_mask: str) -> list[dict]:
        """The exact sums of a_{t,i}, i = 0..t, over the test users this simulator holds (a Flower node: its own)."""
        return oracle_test_sums(self, self.blocks, t, BACKBONES[self.cfg.backbone.name], old_block_mask)

    def state_dict(self) -> dict:
        """The server's state and every client's (ClientStates form), for last.pt and the base cache."""
        return {"server": self.server.state_dict(), "clients": self.states().state_dict()}

    def fisher_plan(self, cfg, flags: dict, blocks: list, t: int) -> RoundPlan | None:
        """EWC's end-of-block plan: 4 negatives per train positive, drawn once at round −1 (§11); None
        for every other method."""
        if flags["reg"] != "ewc":
            return None
        data, exclude = block_data(blocks, t, flags, flags["neg_exclude"])
        return make_plan(cfg.train.seed, t, -1, data, exclude, blocks[t].n_items, cfg.federation.num_neg,
                         cfg.federation.batch_size, cfg.method.topn, 1)


class StackedSimulator(LocalLoop):
    """A local simulator whose client state is `self.state` (ClientStates, one row per user) beside
    `self.server`: the end of a block and the state plumbing, the same code for tensors and numpy arrays."""

    server = state = None
    hosted = None   # the user rows this simulator hosts (a Flower node: its users' ids); None: every row

    def private_matrix(self) -> dict:
        return self.state.private

    def end_block(self, ctx: RoundContext, trained: np.ndarray, fisher_plan: RoundPlan | None) -> None:
        """ŷ for every user, T^u for those who trained, anchors and Fisher, from the restored best (§8.5)."""
        st, best = self.state, self.server.broadcast()
        trained = like(trained, st.topn)
        refresh = zeros(st.has_topn, (st.num_users(),))
        refresh[trained] = True
        refresh |= ~st.has_topn
        latest = ctx.flags["target_scores"] == "latest"
        if self.hosted is None:
            st.topn, st.yhat = previous_scores(ctx.net, st.private, best, ctx.topn, refresh, st.topn, st.yhat, latest)
            st.has_topn |= refresh
        else:   # only the hosted users' rows are scored; the others stay as they are (zero, never read)
            rows = like(self.hosted, st.topn)
            st.topn[rows], st.yhat[rows] = previous_scores(ctx.net, {k: v[rows] for k, v in st.private.items()}, best,
                                                           ctx.topn, refresh[rows], st.topn[rows], st.yhat[rows], latest)
            st.has_topn[rows] = True
        st.anchor_items = clone(best)
        mask = zeros(st.has_topn, (st.num_users(),))
        mask[trained] = True
        for k, v in st.private.items():
            st.anchor[k][mask] = v[mask]
        if fisher_plan is not None:   # EWC
            users = like(fisher_plan.users, st.topn)
            f_private, owner, items, f_rows = self.fisher_of(ctx.net, {k: v[users] for k, v in st.private.items()},
                                                             best, fisher_plan)
            for k, v in f_private.items():
                st.fisher[k][users] = v
            st.fisher_valid[users] = True
            st.set_fisher_rows(users[owner], items, f_rows)
        self.server.end_block()

    def fisher_of(self, net, private: dict, items, plan: RoundPlan) -> tuple:
        """EWC's Fisher of the plan's clients (round.fisher's contract; the compiled simulator's in closed form)."""
        return fisher(net, private, items, plan)

    # -------------------------------------------------------------------------------- state plumbing
    def states(self):
        return self.state

    def load_states(self, states) -> None:
        self.state = states

    def grow(self, new_private: dict) -> None:
        self.state.grow(new_private)

    def save_slot(self, name: str) -> None:
        self.server.save_slot(name)
        self.state.save_slot(name)

    def load_slot(self, name: str) -> None:
        self.server.load_slot(name)
        self.state.load_slot(name)

    def set_private(self, private: dict) -> None:
        """Every client's Φ replaced (full_retrain's restart): arrays of any kind, made the state's."""
        self.state.private = {k: clone(like(v, self.state.private[k])) for k, v in private.items()}

    # ---------------------------------------------------------- hosting some users only (a Flower node)
    def _rows(self, users: np.ndarray, private: dict, count: int) -> dict:
        """`count` rows of Φ: `private`'s (any kind) at `users`, zero elsewhere (users hosted by others)."""
        return {k: spread(like(v, self.state.private[k]), like(users, self.state.topn), count) for k, v in private.items()}

    def host(self, users: np.ndarray, private: dict) -> None:
        """New users `users` (ids beyond every row so far) with their initial Φ, the rows of `private`: rows
        up to the last of them are added, the ids between them that are not hosted here stay zero."""
        have = self.state.num_users()
        if users.size:
            self.grow(self._rows(users - have, private, int(users.max()) + 1 - have))
            self.hosted = np.concatenate([self.hosted, users])

    def set_hosted(self, users: np.ndarray, private: dict) -> None:
        """set_private for the hosted users `users` (full_retrain's restart)."""
        self.set_private(self._rows(users, private, self.state.num_users()))

    def topn_lists(self) -> dict[int, np.ndarray]:
        topn = numpy(self.state.topn)
        return {int(u): topn[u] for u in np.flatnonzero(numpy(self.state.has_topn))}
