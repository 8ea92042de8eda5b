"""An in-process Flower Grid (§14): the ServerApp's messages go straight to ClientApps in this process, no
Ray, no sockets. Each node keeps its own `Context` (node config, run config, state) for the whole run.

Public Flower API only (`flwr.app`, `flwr.serverapp.Grid`): outside a Flower runtime no task identity is
set, so this grid makes each message with an explicit `flwr.app.Metadata` (`make_message`), its id included.

Delivery: messages are handled one after another when pushed. A node whose ClientApp raises answers with
an error reply (as a SuperNode does).
"""
from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import DEFAULT_TTL, Context, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid

ClientAppLike = Callable[[Message, Context], Message]
SERVER_NODE = 0


class LocalGrid(Grid):
    """node id -> (ClientApp, Context); `push_messages` calls the apps directly, `pull_messages` hands the
    replies over. A reply that took longer than `timeout` seconds is dropped (a real grid's deadline, per
    message here since the calls are sequential)."""

    def __init__(self, apps: dict[int, ClientAppLike], contexts: dict[int, Context], timeout: float | None = None):
        self.apps, self.contexts, self.timeout, self.run_id = apps, contexts, timeout, 1
        self._run, self._replies = None, {}
        self.messages = 0        # messages delivered (benchmarks: per-message overhead)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def make_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str) -> Message:
        metadata = Metadata(run_id=self.run_id, message_id=uuid4().hex, src_node_id=SERVER_NODE,
                            dst_node_id=dst_node_id, reply_to_message_id="", group_id=group_id,
                            created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
        return Message(content, metadata=metadata)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.make_message(content, message_type, dst_node_id, group_id)

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
            self.messages += 1
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
    contexts, by_node = {}, {}
    for partition in range(nodes):
        node_id = 1000 + partition
        node_config = {"partition-id": partition, "num-partitions": nodes}
        if node_state_dir:
            node_config["state-dir"] = node_state_dir
        contexts[node_id] = Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                                    run_config={"f3crec-config": config_json})
        by_node[node_id] = (apps or {}).get(partition, app)
    return LocalGrid(by_node, contexts, json.loads(config_json).get("federation", {}).get("reply_timeout"))
