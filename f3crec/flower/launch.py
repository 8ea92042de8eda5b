"""Which grid a FlowerSimulator talks to (§14). Inside a ServerApp (`server_app.py`: a deployment or the simulation
runtime) that is Flower's grid, set with `using_grid`; otherwise `federation.nodes` nodes of `client_app.app` in
this process, on `LocalGrid` — `federation.simulator=flower` in any command.

LocalGrid: the ServerApp's messages go straight to ClientApps in this process (no Ray, no sockets), each node
with its own `Context` (node config, run config, state) for the whole run. Public Flower API only (`flwr.app`,
`flwr.serverapp.Grid`); outside a Flower runtime no task identity is set, so it makes each message with an
explicit `flwr.app.Metadata` (`make_message`). A message is handled when pushed; a ClientApp that raises
answers with an error reply (as a SuperNode does).
"""
from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from contextvars import ContextVar
from uuid import uuid4

from flwr.app import DEFAULT_TTL, Context, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid

from ..server import Server
from .simulator import FlowerSimulator

ClientAppLike = Callable[[Message, Context], Message]
_GRID: ContextVar = ContextVar("f3crec_flower_grid", default=None)


class LocalGrid(Grid):
    """node id -> (ClientApp, Context); `push_messages` calls the apps directly, `pull_messages` hands the
    replies over. A reply that took longer than `timeout` seconds is dropped (a real grid's deadline, per
    message here since the calls are sequential)."""

    def __init__(self, apps: dict[int, ClientAppLike], contexts: dict[int, Context], timeout: float | None = None):
        self.apps, self.contexts, self.timeout = apps, contexts, timeout
        self.run_id = next(iter(contexts.values())).run_id if contexts else 0
        self._run, self._replies = None, {}

    def set_run(self, run) -> None:
        self._run = run

    run = property(lambda self: self._run)

    def make_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                     ttl: float | None = None) -> Message:
        return Message(content, metadata=Metadata(
            run_id=self.run_id, message_id=uuid4().hex, src_node_id=0, dst_node_id=dst_node_id, reply_to_message_id="",
            group_id=group_id, created_at=time.time(), ttl=ttl or DEFAULT_TTL, message_type=message_type))

    create_message = make_message

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            node, mid = message.metadata.dst_node_id, message.metadata.message_id
            if node not in self.apps:
                ids.append("")                                       # no such node: nothing comes back
                continue
            started = time.perf_counter()
            try:
                reply = self.apps[node](message, self.contexts[node])
            except Exception as err:                                 # noqa: BLE001 — a node's failure is data
                reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
                reply = Message(Error(code=1, reason=reason), reply_to=message)
            if self.timeout is None or time.perf_counter() - started <= self.timeout:
                self._replies[mid] = reply                           # else too late: the round went on without it
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def local_grid(app: ClientAppLike, config_json: str, nodes: int, node_state_dir: str | None = None,
               apps: dict[int, ClientAppLike] | None = None) -> LocalGrid:
    """`nodes` nodes running `app` (or `apps[partition]` where given, e.g. a faulty node in a test), with the
    config's federation.reply_timeout as the grid's deadline."""
    contexts, by_node, run_id = {}, {}, uuid4().int >> 65   # a run id of its own, as Flower gives every run
    for partition in range(nodes):
        node_config = {"partition-id": partition, "num-partitions": nodes}
        if node_state_dir:
            node_config["state-dir"] = node_state_dir
        contexts[1000 + partition] = Context(run_id=run_id, node_id=1000 + partition, node_config=node_config,
                                             state=RecordDict(), run_config={"f3crec-config": config_json})
        by_node[1000 + partition] = (apps or {}).get(partition, app)
    return LocalGrid(by_node, contexts, json.loads(config_json).get("federation", {}).get("reply_timeout"))


@contextmanager
def using_grid(grid):
    """Run train.fit against `grid` (a Flower Grid) instead of an in-process one."""
    token = _GRID.set(grid)
    try:
        yield grid
    finally:
        _GRID.reset(token)


def flower_simulator(cfg, flags: dict, items=None, private=None, state: dict | None = None) -> FlowerSimulator:
    """Block 0: the server with table `items`, each node creating its users with their rows of `private`;
    --resume (`state`): the server's table from `state`, every node's users from the node's own checkpoint."""
    fed, grid = cfg.federation, _GRID.get()
    if grid is None:
        from . import client_app, wire
        grid = local_grid(client_app.app, wire.config_to_json(cfg), fed.nodes, fed.node_state_dir)
    server = Server(state["server"]["items"] if state else items, cfg.method.beta, itm=flags["itm"])
    sim = FlowerSimulator(server, grid, fed.min_reply_fraction, fed.reply_timeout, state["run_key"] if state else None)
    if state:
        sim.load_state_dict(state)
    else:
        sim.grow(private)
    return sim
