"""The server side of F3CRec on Flower (§14): `FlowerSimulator` answers the block loop's calls on a simulator
(train_round, validate, test_row, slots, end_block, grow, checkpoints) by asking its nodes through a Flower
`Grid`. It holds the public item table and its slots (server.py's `Server`: the unweighted mean over every
participant of the nodes' uploads, each their participants' summed row deltas, added in partition order; not
Flower's weighted FedAvg), the public block sizes and per node only counts; nodes report exact metric sums,
merged and rounded once here. Equal to the nodes' simulator bit for bit with one node, to rounding with more.
Fault rule (README, "Faults"): a node whose reply is an error or misses `federation.reply_timeout` is lost for
the run, its users counted in `lost_users`; below `federation.min_reply_fraction` of the block's users the run
stops in one line, resumable from the last block-boundary checkpoint. Invariant (tests/f3crec/test_flower.py):
nothing but the grid reaches a client's interaction, parameter, ŷ, Tᵘ or score; no client-side import.
"""
from __future__ import annotations

import time
from uuid import uuid4

import numpy as np
from flwr.app import Message

from ..arrays import like, numpy
from ..evaluate import finish, merge_sums
from . import wire

TRAIN, VALID, TEST = "train", "evaluate.valid", "evaluate.test"
POLL = 0.02   # seconds between pulls of the replies


class FlowerSimulator:
    def __init__(self, server, grid, min_reply_fraction: float = 1.0, reply_timeout: float | None = None,
                 run_key: str | None = None):
        self.server, self.grid = server, grid
        self.min_reply_fraction, self.reply_timeout = min_reply_fraction, reply_timeout
        self.run_key = run_key or uuid4().hex          # names the nodes' own checkpoints of this run
        self.lost: dict[int, str] = {}                   # node id -> why it was lost
        self.n_users, self.block = 0, -1
        self.nodes: dict[int, dict] = {}                 # node id -> its public description (counts only)
        for node, (_, info) in self._ask("query.describe", "describe", {}).items():
            self.nodes[node] = info
        if not self.nodes:
            raise ConnectionError("no Flower node answered: start the SuperNodes (or give the grid nodes)")
        counts = {(info["partition"], info["num_partitions"]) for info in self.nodes.values()}
        self.num_partitions = next(iter(counts))[1]
        if sorted(p for p, _ in counts) != list(range(self.num_partitions)) or len(counts) != self.num_partitions:
            raise ValueError(f"Flower nodes must be partitions 0..n-1 of one n, each once; got {sorted(counts)}")
        self.node_of = {info["partition"]: node for node, info in self.nodes.items()}

    # ------------------------------------------------------------------------------------ messaging
    def _live(self) -> list[int]:
        """The nodes that described themselves at the start and are not lost (before that, the grid's).
        Not the grid's list later: a real grid stops listing a dead node, which must count as lost."""
        known = self.nodes or self.grid.get_node_ids()
        return [n for n in sorted(known) if n not in self.lost]

    def _ask(self, kind: str, group: str, body: dict | None = None, *, bodies: dict[int, dict] | None = None,
             check: tuple[int, str] | None = None) -> dict[int, tuple[dict, dict]]:
        """Send every live node `body` (or each node its entry of `bodies`), {'tensors': ..., **config}; (tensors,
        config) of every good reply. Nodes that answer with an error or not at all are lost (§14 fault rule);
        with `check` = (block, where) the run stops if too few users' nodes answered."""
        bodies, messages = bodies if bodies is not None else {n: body for n in self._live()}, []
        for node, body in bodies.items():
            if node in self.lost:
                continue
            body = dict(body)
            content = wire.content(body.pop("tensors", None), **body)
            make = getattr(self.grid, "make_message", None)   # the in-process grid: no Flower runtime around it
            messages.append(make(content, kind, node, group) if make else Message(content, node, kind, group_id=group))
        replies = {}
        for reply in self._exchange(messages):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.lost[node] = f"{kind}: {(reply.error.reason or '').splitlines()[0][:200]}"
            else:
                replies[node] = wire.unpack(reply.content)
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in replies and node not in self.lost:
                self.lost[node] = f"{kind}: no reply within {self.reply_timeout} s"
        if check is not None:
            self._check(*check)
        return replies

    def _exchange(self, messages: list[Message]) -> list[Message]:
        """Push, then pull every POLL seconds until every reply is in or `reply_timeout` has passed (Flower's
        own Grid.send_and_receive waits 3 s between pulls: most of a smoke round). Public Grid API only."""
        pending = {mid for mid in self.grid.push_messages(messages) if mid}   # "": not accepted, no reply comes
        end = None if self.reply_timeout is None else time.monotonic() + self.reply_timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if not pending or (end is not None and time.monotonic() > end):
                return replies
            time.sleep(POLL)
        return replies

    def lost_users(self, t: int) -> int:
        return sum(self.nodes[n]["participants"][t] for n in self.lost if n in self.nodes)

    def _check(self, t: int, where: str) -> None:
        """The fault rule: stop when the live nodes hold fewer than min_reply_fraction of block t's users."""
        expected = sum(info["participants"][t] for info in self.nodes.values())
        kept = expected - self.lost_users(t)
        if self.lost and (kept == 0 or kept < self.min_reply_fraction * expected):
            why = "; ".join(f"node {n}: {reason}" for n, reason in sorted(self.lost.items()))
            raise ConnectionError(f"{where}: {kept} of {expected} users' nodes answered, below "
                                  f"federation.min_reply_fraction={self.min_reply_fraction} ({why}); the last "
                                  "block-boundary checkpoint is kept: restart the nodes and resume with --resume")

    # ------------------------------------------------------------------------------------------ round
    def train_round(self, plan, ctx) -> dict:
        """One round: broadcast Q, every node trains its participants and uploads their summed row deltas; the
        server adds the nodes' sums in partition order and takes the mean over every participant (§3)."""
        if plan is not None:
            raise ValueError("FlowerSimulator: clients draw their own plans (train_round(None, ctx))")
        broadcast = self.server.broadcast()
        body = {"tensors": {"items": broadcast}, "block": ctx.block, "round": ctx.round}
        replies = self._ask(TRAIN, f"{ctx.block}.{ctx.round}", body, check=(ctx.block, f"block {ctx.block} round {ctx.round}"))
        total, clients, out = np.zeros(tuple(broadcast.shape), numpy(broadcast[:0]).dtype), 0, {"D": [], "m": []}
        for node in sorted(replies, key=lambda n: self.nodes[n]["partition"]):
            tensors, config = replies[node]
            total[tensors["rows"]] += tensors["values"]    # a node's rows are distinct; the others add nothing
            clients, out = clients + config["clients"], {k: out[k] + config[k] for k in ("D", "m")}
        if not clients:
            raise ConnectionError(f"block {ctx.block} round {ctx.round}: no client uploaded")
        if self.lost:
            out["lost_users"] = self.lost_users(ctx.block)
        return {**out, **self.server.aggregate_sum(like(total, broadcast), clients)}

    def validate(self, ctx, decimals: int | None) -> dict[str, float]:
        """Validation NDCG@20 / Recall@20 of block ctx.block from the nodes' exact sums (§8.2)."""
        body = {"tensors": {"items": self.server.broadcast()}, "block": ctx.block}
        replies = self._ask(VALID, f"{ctx.block}.{ctx.round}.valid", body,
                            check=(ctx.block, f"block {ctx.block} round {ctx.round} validation"))
        return finish(merge_sums([wire.sums_from_json(config["sums"]) for _, config in replies.values()]), decimals)

    def test_row(self, t: int, old_block_mask: str, decimals: int | None) -> list[dict[str, float]]:
        """a_{t,i}, i = 0..t, from the nodes' exact sums (§10)."""
        body = {"tensors": {"items": self.server.broadcast()}, "block": t, "old_block_mask": old_block_mask}
        replies = self._ask(TEST, f"{t}.test", body, check=(t, f"block {t} test"))
        rows = [[wire.sums_from_json(sums) for sums in config["row"]] for _, config in replies.values()]
        return [finish(merge_sums([row[i] for row in rows]), decimals) for i in range(t + 1)]

    def fisher_plan(self, cfg, flags, blocks, t: int) -> None:
        """The block loop's call (local_loop.py): None, every node draws its own users' EWC plan (node.py)."""

    def end_block(self, ctx, trained=None, fisher_plan=None) -> None:
        """Each node builds ŷ, Tᵘ, anchors (and the Fisher) of its users from the best table (§8.5);
        `trained` and `fisher_plan` are the in-process simulators' inputs: nodes know their own."""
        body = {"tensors": {"items": self.server.broadcast()}, "block": ctx.block}
        self._ask("query.end_block", f"{ctx.block}.end", body, check=(ctx.block, f"block {ctx.block} end"))
        self.server.end_block()
        self.block = ctx.block

    # ------------------------------------------------------------------------------------------ state
    def save_slot(self, name: str) -> None:
        self.server.save_slot(name)
        self._ask("query.slot", f"slot.{name}", {"op": "save", "name": name})

    def load_slot(self, name: str) -> None:
        self.server.load_slot(name)
        self._ask("query.slot", f"slot.{name}", {"op": "load", "name": name})

    def _rows_by_node(self, first: int, private: dict) -> dict[int, dict]:
        """Initial Φ rows of users first.. for their nodes (public-seed values: no trained state)."""
        private = {k: numpy(v) for k, v in private.items()}
        users = np.arange(first, first + next(iter(private.values())).shape[0])
        bodies = {}
        for partition, node in self.node_of.items():
            mine = wire.owner(users, self.num_partitions) == partition
            bodies[node] = {"tensors": {"users": users[mine], **{k: v[mine] for k, v in private.items()}}}
        return bodies

    def grow(self, new_private: dict | None) -> None:
        """Users n..n+k−1 join: each node creates its own with their initial Φ (§8.1)."""
        if new_private is None:
            return
        self._ask("query.grow", "grow", bodies=self._rows_by_node(self.n_users, new_private))
        self.n_users += next(iter(new_private.values())).shape[0]

    def set_private(self, private: dict) -> None:
        """full_retrain's restart: every user's Φ re-drawn from the public seed."""
        self._ask("query.set_rows", "restart", bodies=self._rows_by_node(0, private))

    def state_dict(self) -> dict:
        """The server's part of a block-boundary checkpoint; each node saves its users' state itself."""
        self._ask("query.save", "save", {"run_key": self.run_key, "block": self.block},
                  check=(max(self.block, 0), f"block {self.block} checkpoint"))
        return {"federated": True, "server": self.server.state_dict(), "run_key": self.run_key,
                "n_users": self.n_users, "block": self.block, "num_partitions": self.num_partitions}

    def load_state_dict(self, state: dict) -> None:
        if state["num_partitions"] != self.num_partitions:
            raise ValueError(f"the checkpoint was written by {state['num_partitions']} Flower nodes, "
                             f"{self.num_partitions} are running: start the same number to resume")
        self.server.load_state_dict(state["server"])
        self.n_users, self.block = state["n_users"], state["block"]
        replies = self._ask("query.restore", "restore", {"run_key": self.run_key, "block": self.block})
        if self.lost:
            raise ConnectionError("resume: " + "; ".join(f"node {n}: {r}" for n, r in sorted(self.lost.items())))
        restored = sum(config["users"] for _, config in replies.values())
        if restored != self.n_users:
            raise ValueError(f"resume: the nodes restored {restored} users, the checkpoint has {self.n_users}")
