"""The ClientApp (§14): one node of users per SuperNode, its state in `Context.state`.

Node config: `partition-id`, `num-partitions` (user u lives on partition u mod num-partitions) and optional
`state-dir` (where this node keeps its block-boundary checkpoints). Run config: `f3crec-config`, the run's
config as JSON, or `config` + `overrides` (wire.config_from_run_config; app/pyproject.toml). Every message is
answered from this node's own users only (node.py).

`Context.state` holds the node's whole client state (`f3crec.state`: Node.state() as bytes) and a version
(`f3crec.meta`); within one process the live `Node` is kept and reused while its version matches the
state's, so the in-process grid does not rebuild it for every message, while a SuperNode that starts a
fresh ClientApp process per message rebuilds it from `Context.state` alone. torch and the node's code are
imported at the first message, not at import (a process that only loads the app stays cheap).
"""
from __future__ import annotations

import os
import time

_IMPORT_STARTED = time.perf_counter()
from pathlib import Path  # noqa: E402
from uuid import uuid4  # noqa: E402

from flwr.app import ConfigRecord, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

app = ClientApp()
_IMPORTED = time.perf_counter()
_LIVE: dict = {}       # (run, node) -> ((incarnation, version), Node)
_BUILD = [0.0]


def _process_age() -> float:
    """Seconds since this process started (Linux /proc), for the timing trace; NaN elsewhere."""
    try:
        start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError):
        return float("nan")


@app.lifespan()
def _trace(context: Context):
    """With F3CREC_FLOWER_TIMING=<file>: one JSON line per message — process age at entry, import time, the
    node's build time and the handler's time (where a message's seconds go, README)."""
    path = os.environ.get("F3CREC_FLOWER_TIMING")
    entered, age = time.perf_counter(), _process_age()
    _BUILD[0] = 0.0
    yield
    if path:
        import json
        with open(path, "a") as handle:
            handle.write(json.dumps({"node": context.node_id, "pid": os.getpid(), "age_at_entry": round(age, 3),
                                     "imports": round(_IMPORTED - _IMPORT_STARTED, 3), "node_build": round(_BUILD[0], 3),
                                     "handler": round(time.perf_counter() - entered, 3)}) + "\n")


def _node(context: Context):
    """The node's live state: the cached Node while its version matches Context.state's, else rebuilt."""
    from . import wire
    from .node import Node
    meta = context.state.get("f3crec.meta")
    if meta is None:   # first message of this run: a fresh node, tagged so a cache of another run never matches
        meta = context.state["f3crec.meta"] = ConfigRecord({"incarnation": uuid4().hex, "version": 0})
    tag, key = (str(meta["incarnation"]), int(meta["version"])), (context.run_id, context.node_id)
    live = _LIVE.get(key)
    if live is not None and live[0] == tag:
        return live[1]
    started = time.perf_counter()
    node = Node(wire.config_from_run_config(context.run_config), int(context.node_config["partition-id"]),
                int(context.node_config["num-partitions"]))
    if "f3crec.state" in context.state:
        node.load_state(wire.load(context.state["f3crec.state"]["torch"]))
    _LIVE[key] = (tag, node)
    _BUILD[0] += time.perf_counter() - started
    return node


def _store(context: Context, node) -> None:
    """Write the node's state into Context.state (a new version) after every change."""
    from . import wire
    meta = context.state["f3crec.meta"]
    tag = (str(meta["incarnation"]), int(meta["version"]) + 1)
    context.state["f3crec.state"] = ConfigRecord({"torch": wire.dump(node.state())})
    context.state["f3crec.meta"] = ConfigRecord({"incarnation": tag[0], "version": tag[1]})
    _LIVE[(context.run_id, context.node_id)] = (tag, node)


def _checkpoint(context: Context, node, run_key: str) -> Path:
    from common.io import cache_root
    folder = context.node_config.get("state-dir") or node.cfg.federation.node_state_dir
    root = Path(str(folder)) if folder else cache_root() / "f3crec" / "flower-nodes"
    return root / run_key / f"node-{node.partition}-of-{node.num_partitions}.pt"


def _serve(operation, changes_state: bool):
    """A handler: unpack the message, run `operation(node, tensors, config, context)` -> (tensors, config) of
    the reply, store the node's state when the operation changes it."""
    def handler(message: Message, context: Context) -> Message:
        from . import wire
        tensors, config = wire.unpack(message.content)
        node = _node(context)
        out, reply = operation(node, tensors, config, context)
        if changes_state:
            _store(context, node)
        return Message(wire.content(out, **reply), reply_to=message)
    return handler


def _train(node, tensors, config, context):
    """One round: the node's participants train on the broadcast; the reply is their uploads only."""
    results = node.train(int(config["block"]), int(config["round"]), tensors["items"])
    out, stats = {}, {}
    for user, (rows, values, user_stats) in results.items():
        out[f"{user}.rows"], out[f"{user}.values"] = rows, values
        stats[str(user)] = user_stats
    return out, {"users": sorted(results), "stats": stats}


def _sums(sums):
    from .wire import sums_to_json
    return sums_to_json(sums)


def _grow(node, tensors, config, context):
    """New users of this node with their initial Φ (public-seed values, §8.1)."""
    node.grow([int(u) for u in tensors.pop("users")], tensors)
    return None, {"users": len(node.clients.clients)}


def _set_rows(node, tensors, config, context):
    node.set_rows([int(u) for u in tensors.pop("users")], tensors)
    return None, {}


def _end_block(node, tensors, config, context):
    node.end_block(int(config["block"]), tensors["items"])
    return None, {}


def _slot(node, tensors, config, context):
    (node.save_slot if config["op"] == "save" else node.load_slot)(config["name"])
    return None, {}


def _save(node, tensors, config, context):
    """Block-boundary checkpoint of this node's users, kept on the node (the server never receives it)."""
    node.save(_checkpoint(context, node, config["run_key"]), int(config["block"]))
    return None, {}


def _restore(node, tensors, config, context):
    node.restore(_checkpoint(context, node, config["run_key"]), int(config["block"]))
    return None, {"users": len(node.clients.clients)}


def _valid(node, tensors, config, context):
    return None, {"sums": _sums(node.validate(int(config["block"]), tensors["items"]))}


def _test(node, tensors, config, context):
    row = node.test(int(config["block"]), tensors["items"], config["old_block_mask"])
    return None, {"row": [_sums(sums) for sums in row]}


for _name, _operation, _changes in [("describe", lambda node, *_: (None, node.describe()), False),
                                    ("grow", _grow, True), ("set_rows", _set_rows, True),
                                    ("end_block", _end_block, True), ("slot", _slot, True),
                                    ("save", _save, False), ("restore", _restore, True)]:
    app.query(_name)(_serve(_operation, _changes))
app.train()(_serve(_train, True))
app.evaluate("valid")(_serve(_valid, False))
app.evaluate("test")(_serve(_test, False))
