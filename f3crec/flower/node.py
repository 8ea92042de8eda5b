"""The client side of one Flower node (§14): a shard of users, their own data and their private state.

A node hosts the users u with u mod num_partitions = partition (one node = one device or one silo). It
loads the block files itself and keeps only its own users' interactions; it trains them with the reference
simulator's clients (`NodeClients` is a `ReferenceSimulator` over this node's users, so the local step, the
end-of-block scores and EWC's Fisher are the same code, §13), draws every random number from the per-user
streams (round.py), scores its own users for evaluation and reports exact metric sums. Its logic uses no
flwr: `client_app.py` turns messages into these calls and the state into `Context.state` records.

Invariant: every value a node sends is an upload (the rows of its users' local tables that differ from the
broadcast), an exact metric sum with its count, a per-user D_u/m_u statistic or a count. Interactions,
Φ_u, ŷ, Tᵘ and scores stay here.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from common.runs import load_checkpoint, save_checkpoint

from ..config import resolve
from ..data import Block, get_blocks
from ..evaluate import eval_masks, metric_sums, test_exclude, user_scores
from ..model import BACKBONES
from ..round import PlanMaker, RoundContext, make_plan, plan_inputs
from ..sim_reference import Client, ReferenceSimulator
from ..block_inputs import block_data, round_context
from .wire import owner


class _Received:
    """What a node holds of the server: the table it was last sent. The server's slots, Q^{t−1} and
    aggregation live on the server, so the ReferenceSimulator's calls to them are no-ops here."""

    def __init__(self):
        self.items: torch.Tensor | None = None

    def broadcast(self) -> torch.Tensor:
        return self.items

    def save_slot(self, name: str) -> None:
        pass

    def load_slot(self, name: str) -> None:
        pass

    def end_block(self) -> None:
        pass


class NodeClients(ReferenceSimulator):
    """The reference simulator's `Client`s of one node's users (ids are the users', not 0..n−1)."""

    def __init__(self, topn: int):
        self.server = _Received()
        self.clients: dict[int, Client] = {}
        self.topn = topn
        self.slot_names: list[str] = []

    def add(self, users: list[int], private: dict[str, torch.Tensor]) -> None:
        """New clients with their initial Φ (as ReferenceSimulator.grow: anchor and slots = the init)."""
        for j, user in enumerate(users):
            client = Client(user, {k: v[j].clone() for k, v in private.items()})
            client.anchor = {k: v.clone() for k, v in client.private.items()}
            client.slots = {s: {k: v.clone() for k, v in client.private.items()} for s in self.slot_names}
            self.clients[user] = client

    def save_slot(self, name: str) -> None:
        if name not in self.slot_names:
            self.slot_names.append(name)
        super().save_slot(name)

    def set_rows(self, users: list[int], private: dict[str, torch.Tensor]) -> None:
        """Re-initialise these users' Φ (full_retrain's per-block restart)."""
        for j, user in enumerate(users):
            self.clients[user].private = {k: v[j].clone() for k, v in private.items()}


class Node:
    """One node: its users' blocks (loaded here), their clients, and the operations the server asks for."""

    def __init__(self, cfg, partition: int, num_partitions: int):
        if not 0 <= partition < num_partitions:
            raise ValueError(f"partition-id {partition} is not in [0, num-partitions={num_partitions})")
        self.cfg, self.flags = resolve(cfg)
        self.partition, self.num_partitions = partition, num_partitions
        blocks, self.blocks_id = get_blocks(self.cfg.data, self.cfg.train.seed)
        self.blocks = [self._own(b) for b in blocks]
        self.net = BACKBONES[self.cfg.backbone.name]
        self.clients = NodeClients(self.cfg.method.topn)
        self._maker: tuple[int, PlanMaker] | None = None

    def _own(self, block: Block) -> Block:
        """This node's users' part of a block (the counts n_users, n_items are the public catalogue sizes)."""
        mine = lambda part: {u: v for u, v in part.items() if owner(u, self.num_partitions) == self.partition}  # noqa: E731
        return Block(mine(block.train), mine(block.valid), mine(block.test), block.n_users, block.n_items,
                     np.zeros(0, np.int64))

    def describe(self) -> dict:
        """Public facts: block sizes, this node's participant count per block, the blocks' fingerprint."""
        return {"partition": self.partition, "num_partitions": self.num_partitions,
                "n_users": [b.n_users for b in self.blocks], "n_items": [b.n_items for b in self.blocks],
                "participants": [len(b.train) for b in self.blocks], "blocks_id": self.blocks_id,
                "users": len(self.clients.clients)}

    # ------------------------------------------------------------------------------------------- state
    def grow(self, users: list[int], private: dict[str, torch.Tensor]) -> None:
        bad = [u for u in users if owner(u, self.num_partitions) != self.partition or u in self.clients.clients]
        if bad:
            raise ValueError(f"node {self.partition}: users {bad[:5]} are not new users of this node")
        self.clients.add(users, private)

    def set_rows(self, users: list[int], private: dict[str, torch.Tensor]) -> None:
        self.clients.set_rows(users, private)

    def save_slot(self, name: str) -> None:
        self.clients.save_slot(name)

    def load_slot(self, name: str) -> None:
        self.clients.load_slot(name)

    # ------------------------------------------------------------------------------------------- round
    def train(self, t: int, r: int, broadcast: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, dict]]:
        """Round r of block t for this node's participants: user -> (changed rows, their values, stats).

        The plan inputs are what train.run_block builds for every user, restricted to this node's users;
        each client's draws come from its own streams, so they equal the reference's (§13)."""
        ctx = round_context(self.cfg, self.flags, self.blocks, t, r)
        if broadcast.shape[0] != ctx.n_items:
            raise ValueError(f"node {self.partition}: broadcast has {broadcast.shape[0]} rows, block {t} {ctx.n_items}")
        if r == 0 or self._maker is None or self._maker[0] != t:   # fixed for the block (Tᵘ included)
            data, exclude = block_data(self.blocks, t, self.flags, self.flags["neg_exclude"])
            positives, excluded = plan_inputs(data, self.clients.topn_lists() if self.flags["replay"] else {}, ctx)
            if self.flags["neg_exclude"] != "block_train":
                excluded = {u: np.concatenate([excluded[u], exclude[u]]) for u in positives}
            fed = self.cfg.federation
            self._maker = (t, PlanMaker(positives, excluded, ctx.n_items, fed.num_neg, fed.batch_size,
                                        self.cfg.method.topn, len(self.net.substeps)))
        self.clients.server.items = broadcast
        out = {}
        for user, upload, stats in self.clients.local_round(self._maker[1].draw(self.cfg.train.seed, t, r), ctx):
            # Lossless transport: the rows equal to the broadcast are left out and refilled by the server.
            rows = torch.nonzero((upload != broadcast).any(1)).squeeze(1)
            out[user] = (rows, upload[rows], stats)
        return out

    def end_block(self, t: int, best: torch.Tensor) -> None:
        """ŷ, Tᵘ, anchors (and EWC's Fisher) from the broadcast best table, as train.end_block (§8.5)."""
        block, fed = self.blocks[t], self.cfg.federation
        fisher_plan = None
        if self.flags["reg"] == "ewc" and block.train:
            data, exclude = block_data(self.blocks, t, self.flags, self.flags["neg_exclude"])
            fisher_plan = make_plan(self.cfg.train.seed, t, -1, data, exclude, block.n_items, fed.num_neg,
                                    fed.batch_size, self.cfg.method.topn, 1)
        ctx = RoundContext(block=t, round=0, n_items=block.n_items, n_prev_users=0, n_prev_items=0, lrs={},
                           flags=self.flags, net=self.net, seed=self.cfg.train.seed, topn=self.cfg.method.topn)
        self.clients.server.items = best
        self.clients.end_block(ctx, np.array(sorted(block.train), dtype=np.int64), fisher_plan)

    # -------------------------------------------------------------------------------------- evaluation
    def _scores(self, users: list[int], items: torch.Tensor) -> torch.Tensor:
        clients = self.clients.clients
        private = {k: torch.stack([clients[u].private[k] for u in users]) for k in clients[users[0]].private}
        return user_scores(self.net, private, items)

    def validate(self, t: int, items: torch.Tensor) -> dict[str, tuple[Fraction, int]]:
        """Exact NDCG@20/Recall@20 sums over this node's validation users of block t (§8.2)."""
        block = self.blocks[t]
        users = sorted(block.valid)
        if not users:
            return metric_sums(items.new_zeros(0, 0), [], {}, [])
        masks = eval_masks(users, block.valid, [block.train], block.n_items)
        return metric_sums(self._scores(users, items), users, block.valid, [block.train], masks)

    def test(self, t: int, items: torch.Tensor, old_block_mask: str) -> list[dict[str, tuple[Fraction, int]]]:
        """Exact sums of a_{t,i}, i = 0..t, over this node's test users (§10)."""
        row = []
        for i in range(t + 1):
            users = sorted(self.blocks[i].test)
            if not users:
                row.append(metric_sums(items.new_zeros(0, 0), [], {}, []))
                continue
            scores = self._scores(users, items)[:, : self.blocks[t].n_items]
            row.append(metric_sums(scores, users, self.blocks[i].test, test_exclude(self.blocks, t, i, old_block_mask)))
        return row

    # ------------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """Every client's attributes (tensors, dicts of tensors, None, ints; a numpy array as a tensor, named in
        `_numpy`) and the slot names: what Context.state and the node's checkpoints hold (wire.dump, bit-exact)."""
        clients = {}
        for user, client in self.clients.clients.items():
            attrs = vars(client)
            clients[user] = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
            clients[user]["_numpy"] = [k for k, v in attrs.items() if isinstance(v, np.ndarray)]
        return {"slots": list(self.clients.slot_names), "clients": clients}

    def load_state(self, state: dict) -> None:
        """Rebuild every client from `state()` output."""
        self.clients = NodeClients(self.cfg.method.topn)
        self.clients.slot_names = list(state["slots"])
        for user, attrs in state["clients"].items():
            client = Client.__new__(Client)
            client.__dict__.update({k: v.numpy() if k in attrs["_numpy"] else v for k, v in attrs.items() if k != "_numpy"})
            self.clients.clients[user] = client

    def save(self, path, block: int) -> None:
        save_checkpoint(path, {"state": self.state(), "block": block, "partition": self.partition,
                               "num_partitions": self.num_partitions})

    def restore(self, path, block: int) -> None:
        state = load_checkpoint(path)
        if (state["block"], state["partition"], state["num_partitions"]) != (block, self.partition, self.num_partitions):
            raise ValueError(f"{path}: node checkpoint of block {state['block']}, node {state['partition']} of "
                             f"{state['num_partitions']}; the run needs block {block}, node {self.partition} of "
                             f"{self.num_partitions}")
        self.load_state(state["state"])
