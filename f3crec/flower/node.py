"""The client side of one Flower node (§14): a shard of users, their own data and their private state.

A node hosts the users u with u mod num_partitions = partition (one device or one silo) and loads the block
files itself, keeping only its users' interactions. `Node` is the reference simulator over those users and
blocks: the round plan and validation sums (local_loop.py), the local step, block end, slots and restart
(sim_reference.py) and the test sums (evaluate.oracle_test_sums) are the core's code (§13). No flwr here:
client_app.py turns messages into these calls; every message that carries the server's table sets
`server.items` first. Invariant: a node sends only uploads (the rows of its users' local tables that differ from the
broadcast), exact metric sums with counts, per-user D_u/m_u and counts; Φ_u, ŷ, Tᵘ and scores stay here.
"""
from __future__ import annotations

import numpy as np
import torch

from common.checkpoints import load_checkpoint, save_checkpoint

from ..block_inputs import round_context
from ..config import resolve
from ..data import Block, get_blocks
from ..evaluate import oracle_test_sums
from ..model import BACKBONES
from ..sim_reference import Client, ReferenceSimulator
from .wire import owner


class _Received:
    """What a node holds of the server: the table it was last sent. The server's slots, Q^{t−1} and
    aggregation live on the server, so the reference simulator's calls to them do nothing here."""
    items: torch.Tensor | None = None

    def broadcast(self) -> torch.Tensor:
        return self.items

    def save_slot(self, *name: str) -> None:
        pass

    load_slot = end_block = save_slot


class Node(ReferenceSimulator):
    """One node: its users' blocks (loaded here), their `Client`s (ids are the users') and the operations the
    server asks for."""

    def __init__(self, cfg, partition: int, num_partitions: int):
        if not 0 <= partition < num_partitions:
            raise ValueError(f"partition-id {partition} is not in [0, num-partitions={num_partitions})")
        cfg, flags = resolve(cfg)
        self.partition, self.num_partitions = partition, num_partitions
        blocks, self.blocks_id = get_blocks(cfg.data, cfg.train.seed)
        self.attach(cfg, flags, [self._own(b) for b in blocks])
        self.server, self.clients, self.slot_names = _Received(), {}, []

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
                "users": len(self.clients)}

    # ------------------------------------------------------------------------------------------- state
    def grow(self, users: list[int], private: dict[str, torch.Tensor]) -> None:
        """New clients with their initial Φ (as ReferenceSimulator.grow: anchor and slots = the init)."""
        bad = [u for u in users if owner(u, self.num_partitions) != self.partition or u in self.clients]
        if bad:
            raise ValueError(f"node {self.partition}: users {bad[:5]} are not new users of this node")
        for j, user in enumerate(users):
            client = self.clients[user] = Client(user, {k: v[j].clone() for k, v in private.items()})
            client.anchor = {k: v.clone() for k, v in client.private.items()}
            client.slots = {s: {k: v.clone() for k, v in client.private.items()} for s in self.slot_names}

    def set_rows(self, users: list[int], private: dict[str, torch.Tensor]) -> None:
        """Re-initialise these users' Φ, the rows of `private` in the order of `users` (full_retrain's restart)."""
        self.set_private({k: dict(zip(users, v)) for k, v in private.items()})

    def save_slot(self, name: str) -> None:
        if name not in self.slot_names:
            self.slot_names.append(name)
        super().save_slot(name)

    # ------------------------------------------------------------------------------------------- round
    def train(self, t: int, r: int) -> dict[int, tuple[torch.Tensor, torch.Tensor, dict]]:
        """Round r of block t for this node's participants on the broadcast: user -> (changed rows, their
        values, stats). The plan is LocalLoop.plan over this node's blocks: each client's draws come from its
        own streams, so they equal the reference's (§13)."""
        ctx, broadcast, out = round_context(self.cfg, self.flags, self.blocks, t, r), self.server.items, {}
        if broadcast.shape[0] != ctx.n_items:
            raise ValueError(f"node {self.partition}: broadcast has {broadcast.shape[0]} rows, block {t} {ctx.n_items}")
        for user, upload, stats in self.local_round(self.plan(ctx), ctx):
            # Lossless transport: the rows equal to the broadcast are left out and refilled by the server.
            rows = torch.nonzero((upload != broadcast).any(1)).squeeze(1)
            out[user] = (rows, upload[rows], stats)
        return out

    def finish_block(self, t: int) -> None:
        """ŷ, Tᵘ, anchors (and EWC's Fisher, LocalLoop.fisher_plan) from the broadcast best table (§8.5), as
        train.end_block asks of every simulator; the server sends the hand-off's slot load itself."""
        self.end_block(round_context(self.cfg, self.flags, self.blocks, t, 0),
                       np.array(sorted(self.blocks[t].train), dtype=np.int64), self.fisher_plan(self.cfg, self.flags, self.blocks, t))

    def test_sums(self, t: int, old_block_mask: str) -> list[dict]:
        """Exact (sum, count) of a_{t,i}, i = 0..t, over this node's test users (§10)."""
        return oracle_test_sums(self, self.blocks, t, BACKBONES[self.cfg.backbone.name], old_block_mask)

    # ------------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """Every client's attributes (tensors, dicts of tensors, None, ints; a numpy array as a tensor, named in
        `_numpy`) and the slot names: what Context.state and the node's checkpoints hold (wire.dump, bit-exact)."""
        clients = {}
        for user, client in self.clients.items():
            attrs = vars(client)
            clients[user] = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
            clients[user]["_numpy"] = [k for k, v in attrs.items() if isinstance(v, np.ndarray)]
        return {"slots": list(self.slot_names), "clients": clients}

    def load_state(self, state: dict) -> None:
        """Rebuild every client from `state()` output."""
        self.slot_names, self.clients = list(state["slots"]), {}
        for user, attrs in state["clients"].items():
            client = self.clients[user] = Client.__new__(Client)
            client.__dict__.update({k: v.numpy() if k in attrs["_numpy"] else v for k, v in attrs.items() if k != "_numpy"})

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
