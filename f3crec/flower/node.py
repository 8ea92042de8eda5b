"""The client side of one Flower node (§14): a shard of users, their own data and their private state.

A node hosts the users u with u mod num_partitions = partition and loads the block files itself, keeping only its
users' interactions. It runs the core's local simulator over them (`federation.node_simulator`), so its plan,
training, client state (ClientStates, a row per user id; rows of users hosted elsewhere stay zero, never read),
evaluation sums and block end are a local run's code (§13). `Received` is what it holds of the server: the table
last sent; the simulator's mean is caught there as the node's upload. No flwr here (client_app.py). A node sends
only its upload (its participants' summed row deltas: changed rows, values, count), exact metric sums with counts
and D_u/m_u; Φ_u, ŷ, Tᵘ, scores and each user's own delta stay here.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from common.checkpoints import load_checkpoint, save_checkpoint

from ..arrays import convert, numpy
from ..block_inputs import round_context
from ..client_state import spread_user_rows, user_rows
from ..config import resolve
from ..data import Block, get_blocks
from ..model import BACKBONES
from ..server import Server
from ..simulators import as_kind, local_simulator, simulator_kind
from .wire import owner


class Received(Server):
    """The table the server last sent; the simulator's mean (`aggregate_sum`, reached from `aggregate_deltas`
    too) is caught as the node's upload."""

    def __init__(self):
        super().__init__(None, 0.0, itm=False)
        self.upload: tuple[np.ndarray, np.ndarray, int] | None = None

    def aggregate_sum(self, total, num_clients: int) -> dict:
        total = numpy(total)                               # the simulator's reused buffer: the rows are copied
        rows = np.flatnonzero((total != 0).any(1))         # an unchanged row adds +0.0 on the server: left out
        self.upload = (rows, total[rows], num_clients)
        return {}

    def save_slot(self, *name: str) -> None:   # the server's slots and Q^{t−1}: kept on the server (§14)
        pass

    load_slot = end_block = save_slot


class Node:
    """One node: its users' blocks, their client state in a local simulator, the operations the server asks for."""

    def __init__(self, cfg, partition: int, num_partitions: int):
        if not 0 <= partition < num_partitions:
            raise ValueError(f"partition-id {partition} is not in [0, num-partitions={num_partitions})")
        self.cfg, self.flags = resolve(cfg)
        self.partition, self.num_partitions = partition, num_partitions
        blocks, self.blocks_id = get_blocks(self.cfg.data, self.cfg.train.seed)
        self.blocks = [self._own(b) for b in blocks]
        self.kind = simulator_kind(self.cfg, self.flags, self.cfg.federation.node_simulator)
        self.server, self._blas = Received(), None
        shapes = BACKBONES[self.cfg.backbone.name].private_shapes(self.cfg.backbone.dim)
        self.sim = self._simulator({k: np.zeros((0, *shape), self.cfg.backbone.dtype) for k, shape in shapes.items()})
        if self.kind == "compiled":   # one-thread BLAS in the node's calls, as a compiled run has (sim_compiled)
            from threadpoolctl import ThreadpoolController
            self._blas = ThreadpoolController()

    def _own(self, block: Block) -> Block:
        """This node's users' part of a block (the counts n_users, n_items are the public catalogue sizes)."""
        mine = lambda part: {u: v for u, v in part.items() if owner(u, self.num_partitions) == self.partition}  # noqa: E731
        return Block(mine(block.train), mine(block.valid), mine(block.test), block.n_users, block.n_items,
                     np.zeros(0, np.int64))

    def _simulator(self, private: dict, hosted=()):   # the local simulator of these rows, hosting `hosted`
        sim = local_simulator(self.kind, self.cfg, self.flags, self.server, self.server.items, private, self.blocks)
        sim.hosted = np.asarray(hosted, dtype=np.int64)
        return sim

    def _call(self, method: str, *args):
        """A call on the simulator, with BLAS on one thread for the compiled kind (its products' bits)."""
        with self._blas.limit(limits=1, user_api="blas") if self._blas else nullcontext():
            return getattr(self.sim, method)(*args)

    def receive(self, items) -> None:
        """The server's table (broadcast, best or evaluated), as the simulator's array kind."""
        self.server.items = as_kind(self.kind, self.cfg, items)

    def describe(self) -> dict:
        """Public facts: block sizes, this node's participant count per block, the blocks' fingerprint."""
        return {"partition": self.partition, "num_partitions": self.num_partitions,
                "n_users": [b.n_users for b in self.blocks], "n_items": [b.n_items for b in self.blocks],
                "participants": [len(b.train) for b in self.blocks], "blocks_id": self.blocks_id,
                "users": self.sim.hosted.size}

    # ------------------------------------------------------------------------------------------- state
    def grow(self, users, private: dict) -> None:
        """New users with their initial Φ (anchor and slots = the init); other nodes' users' rows stay zero."""
        users = np.asarray(numpy(users), dtype=np.int64)
        bad = users[(users % self.num_partitions != self.partition) | (users < self.sim.state.num_users())]
        if bad.size:
            raise ValueError(f"node {self.partition}: users {bad[:5].tolist()} are not new users of this node")
        self.sim.host(users, private)

    def set_rows(self, users, private: dict) -> None:
        """Re-initialise these users' Φ, the rows of `private` in the order of `users` (full_retrain's restart)."""
        self.sim.set_hosted(np.asarray(numpy(users), dtype=np.int64), private)

    # ------------------------------------------------------------------------------------------- round
    def train(self, t: int, r: int) -> tuple[dict, dict]:
        """Round r of block t on the received table; the reply: ({rows, values}: the rows its participants changed
        and their summed deltas there, {clients, D, m}: their count and D_u / m_u). Every client's draws come from
        its own streams, as in a local run (§13)."""
        ctx, broadcast = round_context(self.cfg, self.flags, self.blocks, t, r), self.server.items
        if broadcast.shape[0] != ctx.n_items:
            raise ValueError(f"node {self.partition}: broadcast has {broadcast.shape[0]} rows, block {t} {ctx.n_items}")
        if not self.blocks[t].train:   # no participant here this block: nothing to upload
            self.server.upload, stats = (np.zeros(0, np.int64), numpy(broadcast[:0]), 0), {}
        else:
            stats = self._call("train_round", None, ctx)
        rows, values, count = self.server.upload
        return {"rows": rows, "values": values}, {"clients": count, "D": list(stats.get("D", [])), "m": list(stats.get("m", []))}

    def validation_sums(self, t: int) -> dict:
        """Exact (sum, count) of NDCG@20 / Recall@20 over this node's validation users of block t (§8.2)."""
        return self._call("validation_sums", t)

    def test_sums(self, t: int, old_block_mask: str) -> list[dict]:
        """Exact (sum, count) of a_{t,i}, i = 0..t, over this node's test users (§10)."""
        return self._call("test_sums", t, old_block_mask)

    def finish_block(self, t: int) -> None:
        """ŷ, Tᵘ, anchors (and EWC's Fisher) of this node's users from the received best table (§8.5)."""
        ctx = round_context(self.cfg, self.flags, self.blocks, t, 0)
        trained = np.array(sorted(self.blocks[t].train), dtype=np.int64)
        self._call("end_block", ctx, trained, self.sim.fisher_plan(self.cfg, self.flags, self.blocks, t))

    # ------------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """Its users' ids and their rows of the client state (numpy): Context.state's and the checkpoints'."""
        clients = user_rows(convert(self.sim.states().state_dict(), False), self.sim.hosted)
        return {"kind": self.kind, "hosted": self.sim.hosted, "clients": clients}

    def load_state(self, state: dict) -> None:
        """Rebuild the simulator from `state()` output."""
        if state["kind"] != self.kind:
            raise ValueError(f"node {self.partition}: the saved state is a {state['kind']} simulator's, this node runs "
                             f"the {self.kind} one (federation.node_simulator must match the saved run)")
        hosted = state["hosted"]
        clients = as_kind(self.kind, self.cfg, spread_user_rows(state["clients"], hosted, int(hosted.max()) + 1 if hosted.size else 0))
        self.sim = self._simulator(dict(clients["private"]), hosted)
        self.sim.state.load_state_dict(clients)

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
