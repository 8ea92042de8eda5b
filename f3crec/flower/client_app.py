"""The ClientApp (§14): one node of users per SuperNode (node.py), its state in `Context.state`.

Node config: `partition-id`, `num-partitions` (user u lives on partition u mod num-partitions), optional
`state-dir` (its block-boundary checkpoints). Run config: wire.config_from_run_config (app/pyproject.toml).
`Context.state["f3crec.state"]` holds the node's client state (`bytes`: Node.state() as bytes) and its
`version`, per run (run ids are unique): a process keeps its live `Node` while the versions match (the
in-process grid, Flower's simulation runtime); a SuperNode's fresh ClientApp process per message rebuilds it
from `Context.state`.
Importing this module loads flwr and numpy only; the core (and torch, unless the node runs the compiled
simulator) comes with the first message.
"""
from __future__ import annotations

import os
import time

_IMPORT_STARTED = time.perf_counter(), time.process_time()
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

from flwr.app import ConfigRecord, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from common.checkpoints import from_bytes, to_bytes  # noqa: E402  (numpy: no torch)

from . import wire  # noqa: E402  (flwr, numpy: no torch)

app = ClientApp()
_PHASES: dict = {"app_import": (time.perf_counter() - _IMPORT_STARTED[0], time.process_time() - _IMPORT_STARTED[1])}
_LIVE: dict = {}       # (run, node) -> (version, Node)


@contextmanager
def _phase(name: str):
    """Wall and CPU seconds of one phase of this message, for the timing trace."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    _PHASES[name] = (time.perf_counter() - wall, time.process_time() - cpu)


def _process_age() -> float:
    """Seconds since this process started (Linux /proc), for the timing trace; NaN elsewhere."""
    try:
        start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError):
        return float("nan")


@app.lifespan()
def _trace(context: Context):
    """With F3CREC_FLOWER_TIMING=<file>: one JSON line per message, (wall, CPU) seconds — the process's age and
    CPU when the app is entered (its start, Flower's runtime, pulling the message, this module's import), this
    module's import, the core's import (torch), the node's build and the whole handler (README;
    `python -m f3crec.bench --flower` reads it)."""
    path, times = os.environ.get("F3CREC_FLOWER_TIMING"), os.times()
    entry = (_process_age(), times.user + times.system)
    with _phase("handler"):
        yield
    if path:
        import json
        with open(path, "a") as handle:
            handle.write(json.dumps({"node": context.node_id, "pid": os.getpid(), "at_entry": entry, **_PHASES}) + "\n")
    for name in ("core_import", "node_build"):
        _PHASES.pop(name, None)


def _journal(context: Context) -> Path | None:
    """The node-local copy of this run's state (with `state-dir`): Flower 1.40-1.42 push a ClientApp's context
    back only at its process's exit, after its reply (and, with runtime dependency installation, after removing
    the runtime environment), so the next message's process may be handed the previous context (README)."""
    folder = context.node_config.get("state-dir")
    return Path(str(folder)) / "live" / f"run-{context.run_id}-node-{context.node_id}.pt" if folder else None


def _version(context: Context) -> int:
    return int(context.state["f3crec.state"]["version"]) if "f3crec.state" in context.state else 0


def _node(context: Context):
    """The node's live state: the cached Node while its version matches Context.state's, else rebuilt (from the
    node-local journal where Context.state is behind it)."""
    version, key, journal = _version(context), (context.run_id, context.node_id), _journal(context)
    if key in _LIVE and _LIVE[key][0] == version:   # this process wrote that state: the context is current
        return _LIVE[key][1]
    saved = journal.read_bytes() if journal is not None and journal.exists() else b""
    if saved and int.from_bytes(saved[:8], "little") > version:   # the journal: 8 bytes of version, the state
        version = int.from_bytes(saved[:8], "little")
        context.state["f3crec.state"] = ConfigRecord({"bytes": saved[8:], "version": version})
    from .node import Node
    with _phase("node_build"):
        node = Node(wire.config_from_run_config(context.run_config), int(context.node_config["partition-id"]),
                    int(context.node_config["num-partitions"]))
        if "f3crec.state" in context.state:
            node.load_state(from_bytes(context.state["f3crec.state"]["bytes"]))
    _LIVE[key] = (version, node)
    return node


def _store(context: Context, node) -> None:
    """Write the node's state into Context.state (a new version), and the node-local journal, after every change."""
    from common.io import atomic_write
    version, state = _version(context) + 1, to_bytes(node.state())
    context.state["f3crec.state"] = ConfigRecord({"bytes": state, "version": version})
    _LIVE[(context.run_id, context.node_id)] = (version, node)
    if (journal := _journal(context)) is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(journal, "wb") as handle:
            handle.write(version.to_bytes(8, "little") + state)


def _checkpoint(context: Context, node, run_key: str) -> Path:
    from common.io import cache_root
    folder = context.node_config.get("state-dir") or node.cfg.federation.node_state_dir
    root = Path(str(folder)) if folder else cache_root() / "f3crec" / "flower-nodes"
    return root / run_key / f"node-{node.partition}-of-{node.num_partitions}.pt"


# message type -> (operation(node, tensors, config, context) -> (tensors, config) of the reply, whether it changes
# the node's state). The state-changing calls return None, so `(call, reply)` is the reply with no tensors.
OPERATIONS = {
    "query.describe": (lambda node, x, c, ctx: (None, node.describe()), False),
    "query.grow": (lambda node, x, c, ctx: (node.grow(x.pop("users"), x), {"users": node.sim.hosted.size}), True),
    "query.set_rows": (lambda node, x, c, ctx: (node.set_rows(x.pop("users"), x), {}), True),
    "query.end_block": (lambda node, x, c, ctx: (node.finish_block(int(c["block"])), {}), True),
    "query.slot": (lambda node, x, c, ctx: (getattr(node.sim, f"{c['op']}_slot")(c["name"]), {}), True),
    # block-boundary checkpoint of this node's users, kept on the node (the server never receives it)
    "query.save": (lambda node, x, c, ctx: (node.save(_checkpoint(ctx, node, c["run_key"]), int(c["block"])), {}), False),
    "query.restore": (lambda node, x, c, ctx: (node.restore(_checkpoint(ctx, node, c["run_key"]), int(c["block"])),
                                               {"users": node.sim.hosted.size}), True),
    "train": (lambda node, x, c, ctx: node.train(int(c["block"]), int(c["round"])), True),   # the summed upload
    "evaluate.valid": (lambda node, x, c, ctx: (None, {"sums": wire.sums_to_json(node.validation_sums(int(c["block"])))}), False),
    "evaluate.test": (lambda node, x, c, ctx: (None, {"row": [wire.sums_to_json(s) for s in node.test_sums(
        int(c["block"]), c["old_block_mask"])]}), False),
}


def _serve(operation, changes_state: bool):
    def handler(message: Message, context: Context) -> Message:
        with _phase("core_import"):
            from . import node  # noqa: F401  the F3CRec core: at the first message, not at import
        tensors, config = wire.unpack(message.content)
        node = _node(context)
        if "items" in tensors:   # the server's table (broadcast, best or evaluated): all a node holds of the server
            node.receive(tensors.pop("items"))
        out, reply = operation(node, tensors, config, context)
        if changes_state:
            _store(context, node)
        return Message(wire.content(out, **reply), reply_to=message)
    return handler


for _kind, (_operation, _changes) in OPERATIONS.items():
    _family, _, _action = _kind.partition(".")
    getattr(app, _family)(*[_action] if _action else [])(_serve(_operation, _changes))
