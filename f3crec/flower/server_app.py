"""The ServerApp (§14): Flower runs it inside a SuperLink (a deployment or the simulation runtime) and hands
it a Grid to the SuperNodes; it runs the unchanged block loop, `main.run`, with the FlowerSimulator talking
to that grid (polled through the public push/pull interface).

    flwr run <staged app> <superlink-connection> --run-config 'overrides="federation.rounds=2"'

Run config (app/pyproject.toml): the run's config (`f3crec-config` JSON, else `config` + `overrides`),
`run-dir`, `resume`, and `report`, a file this app writes its outcome to — {"ok": true, "run_dir", "summary"}
or {"ok": false, "error": <exception type>, "message": <one line>, "run_dir"} — which the launcher
(common/flower_ops.py) reports. A user error (a bad config key, a missing file, the fault rule) is one logged
line and exit status 2, no traceback; any other error is raised, so Flower shows it and marks the run failed.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from common.cli import USER_ERRORS
from common.io import atomic_write

from . import wire
from .launch import using_grid

app = ServerApp()
log = logging.getLogger("f3crec.flower")


class PollingGrid(Grid):
    """A Flower grid whose `send_and_receive` polls for replies every `interval` seconds (Flower's own
    waits 3 s between polls, which would be most of a smoke round); everything else is the wrapped grid's.
    Uses only the public Grid interface (push_messages / pull_messages)."""

    def __init__(self, grid: Grid, interval: float = 0.02):
        self.grid, self.interval = grid, interval

    @property
    def run(self):
        return self.grid.run

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = {mid for mid in self.push_messages(messages) if mid}   # None: not accepted, no reply comes
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if pending:
                time.sleep(self.interval)
        return replies


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    """Block until `count` SuperNodes are connected (a deployment starts its nodes beside the link)."""
    end = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > end:
            raise ConnectionError(f"{len(list(grid.get_node_ids()))} of {count} Flower nodes connected "
                                  f"within {timeout:.0f} s")
        time.sleep(0.2)


def _write_report(path: str, report: dict) -> None:
    if path:
        with atomic_write(Path(path), "w") as handle:
            json.dump(report, handle)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from common import runs
    from ..main import run   # the block loop, unchanged (imports torch: after Flower has set the app up)

    rc = context.run_config
    report = str(rc.get("report", "") or "")
    try:
        cfg = wire.config_from_run_config(rc)
        grid = PollingGrid(grid)
        wait_for_nodes(grid, cfg.federation.nodes, cfg.federation.reply_timeout)
        run_dir = str(rc.get("run-dir", "") or "") or None
        with using_grid(grid):
            results = run(cfg, Path(run_dir) if run_dir else None, resume=bool(rc.get("resume", False)))
        _write_report(report, {"ok": True, "run_dir": str(runs.CURRENT_RUN), "summary": results["summary"]})
    except Exception as err:   # one line in the log and the report; Flower marks the run failed
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not isinstance(err, USER_ERRORS):
            line = f"{type(err).__name__}: {line}"
        _write_report(report, {"ok": False, "error": type(err).__name__, "message": line,
                               "run_dir": str(runs.CURRENT_RUN) if runs.CURRENT_RUN else None})
        log.error("f3crec: %s", line)
        if isinstance(err, USER_ERRORS):
            raise SystemExit(2) from None   # a user error: its one line, no traceback
        raise
