"""The ClientApp (§14): one node of users per SuperNode, its state in `Context.state`.

Node config: `partition-id`, `num-partitions` (user u lives on partition u mod num-partitions) and optional
`state-dir` (where this node keeps its block-boundary checkpoints). Run config: `f3crec-config`, the run's
config as JSON, or `config` + `overrides` (wire.config_from_run_config; app/pyproject.toml). Every message is
answered from this node's own users only (node.py).

`Context.state` holds the node's whole client state (one ArrayRecord, stacked by user, and a version);
within one process the live `Node` is kept too and reused while its version matches the state's, so the
in-process grid does not rebuild it for every message, while a SuperNode that starts a fresh ClientApp
process per message rebuilds it from `Context.state` alone.
"""
from __future__ import annotations

import os
import time

_IMPORT_STARTED = time.perf_counter()
from pathlib import Path  # noqa: E402
from uuid import uuid4

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from common.io import cache_root

from . import wire
from .node import Node

app = ClientApp()
_IMPORTED = time.perf_counter()


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
                                     "imports": round(_IMPORTED - _IMPORT_STARTED, 3),
                                     "node_build": round(_BUILD[0], 3),
                                     "handler": round(time.perf_counter() - entered, 3)}) + "\n")


_BUILD = [0.0]
_LIVE: dict[tuple[int, int], tuple[tuple[str, int], Node]] = {}  # (run, node) -> ((incarnation, version), node)


def _node(context: Context) -> Node:
    """The node's live state: the cached Node while its version matches Context.state's, else rebuilt."""
    meta = context.state.get("f3crec.meta")
    key = (context.run_id, context.node_id)
    if meta is None:   # first message of this run: a fresh node, tagged so a cache of another run never matches
        meta = ConfigRecord({"incarnation": uuid4().hex, "version": 0})
        context.state["f3crec.meta"] = meta
    tag = (str(meta["incarnation"]), int(meta["version"]))
    live = _LIVE.get(key)
    if live is not None and live[0] == tag:
        return live[1]
    started = time.perf_counter()
    cfg = wire.config_from_run_config(context.run_config)
    node = Node(cfg, int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    if "f3crec.state" in context.state:
        arrays = {name: tensor.numpy() for name, tensor in wire.tensors(context.state["f3crec.state"]).items()}
        node.load_arrays(arrays, list(meta["slots"]) if "slots" in meta else [])
    _LIVE[key] = (tag, node)
    _BUILD[0] += time.perf_counter() - started
    return node


def _store(context: Context, node: Node) -> None:
    """Write the node's state into Context.state (a new version) after every change."""
    meta = context.state["f3crec.meta"]
    tag = (str(meta["incarnation"]), int(meta["version"]) + 1)
    context.state["f3crec.state"] = wire.arrays(node.state_arrays())
    slots = {"slots": list(node.clients.slot_names)} if node.clients.slot_names else {}
    context.state["f3crec.meta"] = ConfigRecord({"incarnation": tag[0], "version": tag[1], **slots})
    _LIVE[(context.run_id, context.node_id)] = (tag, node)


def _checkpoint_path(context: Context, node: Node, run_key: str) -> Path:
    folder = context.node_config.get("state-dir") or node.cfg.federation.node_state_dir
    root = Path(str(folder)) if folder else cache_root() / "f3crec" / "flower-nodes"
    return root / run_key / f"node-{node.partition}-of-{node.num_partitions}.pt"


def _reply(message: Message, tensors: dict | None = None, **config) -> Message:
    return Message(wire.content(tensors, **config), reply_to=message)


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    return _reply(message, **_node(context).describe())


@app.query("grow")
def grow(message: Message, context: Context) -> Message:
    """New users of this node with their initial Φ (public-seed values, §8.1)."""
    tensors, config = wire.unpack(message.content)
    node = _node(context)
    users = [int(u) for u in tensors.pop("users")]
    node.grow(users, tensors)
    _store(context, node)
    return _reply(message, users=len(node.clients.clients))


@app.query("set_rows")
def set_rows(message: Message, context: Context) -> Message:
    tensors, _ = wire.unpack(message.content)
    node = _node(context)
    node.set_rows([int(u) for u in tensors.pop("users")], tensors)
    _store(context, node)
    return _reply(message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round: the node's participants train on the broadcast; the reply is their uploads only."""
    tensors, config = wire.unpack(message.content)
    node = _node(context)
    results = node.train(int(config["block"]), int(config["round"]), tensors["items"])
    _store(context, node)
    out, stats = {}, {}
    for user, (rows, values, user_stats) in results.items():
        out[f"{user}.rows"], out[f"{user}.values"] = rows, values
        stats[str(user)] = user_stats
    return _reply(message, out, users=sorted(results), stats=stats)


@app.evaluate("valid")
def validate(message: Message, context: Context) -> Message:
    tensors, config = wire.unpack(message.content)
    sums = _node(context).validate(int(config["block"]), tensors["items"])
    return _reply(message, sums=wire.sums_to_json(sums))


@app.evaluate("test")
def test(message: Message, context: Context) -> Message:
    tensors, config = wire.unpack(message.content)
    row = _node(context).test(int(config["block"]), tensors["items"], config["old_block_mask"])
    return _reply(message, row=[wire.sums_to_json(sums) for sums in row])


@app.query("end_block")
def end_block(message: Message, context: Context) -> Message:
    tensors, config = wire.unpack(message.content)
    node = _node(context)
    node.end_block(int(config["block"]), tensors["items"])
    _store(context, node)
    return _reply(message)


@app.query("slot")
def slot(message: Message, context: Context) -> Message:
    _, config = wire.unpack(message.content)
    node = _node(context)
    (node.save_slot if config["op"] == "save" else node.load_slot)(config["name"])
    _store(context, node)
    return _reply(message)


@app.query("save")
def save(message: Message, context: Context) -> Message:
    """Block-boundary checkpoint of this node's users, kept on the node (the server never receives it)."""
    _, config = wire.unpack(message.content)
    node = _node(context)
    node.save(_checkpoint_path(context, node, config["run_key"]), int(config["block"]))
    return _reply(message)


@app.query("restore")
def restore(message: Message, context: Context) -> Message:
    _, config = wire.unpack(message.content)
    node = _node(context)
    node.restore(_checkpoint_path(context, node, config["run_key"]), int(config["block"]))
    _store(context, node)
    return _reply(message, users=len(node.clients.clients))
