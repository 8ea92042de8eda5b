"""The ServerApp (§14): Flower runs it inside a SuperLink (a deployment or the simulation runtime) and hands
it a Grid to the SuperNodes; it runs the unchanged block loop, `main.run`, with the FlowerSimulator talking
to that grid (through the public push/pull interface, polled every 0.02 s: simulator.py).

    flwr run <staged app> <superlink-connection> --run-config 'overrides="federation.rounds=2"'

Run config (app/pyproject.toml): the run's config (`f3crec-config` JSON, else `config` + `overrides`),
`run-dir`, `resume`, and `report`, a file this app writes its outcome to — {"ok": true, "run_dir", "summary"}
or {"ok": false, "error": <exception type>, "message": <one line>, "run_dir"} — which the launcher
(common/flower_ops.py) reports. A user error (a bad config key, a missing file, the fault rule) is one logged
line and exit status 2, no traceback; any other error is raised, so Flower shows it and marks the run failed.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.cli import USER_ERRORS, describe_error
from common.io import save_json

from . import wire
from .launch import using_grid

app = ServerApp()
log = logging.getLogger("f3crec.flower")


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
        save_json(path, report)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from common import runs
    from ..main import run   # the block loop, unchanged (imports torch: after Flower has set the app up)

    rc = context.run_config
    report = str(rc.get("report", "") or "")
    try:
        cfg = wire.config_from_run_config(rc)
        wait_for_nodes(grid, cfg.federation.nodes, cfg.federation.reply_timeout)
        run_dir = str(rc.get("run-dir", "") or "") or None
        with using_grid(grid):
            results = run(cfg, Path(run_dir) if run_dir else None, resume=bool(rc.get("resume", False)))
        _write_report(report, {"ok": True, "run_dir": str(runs.CURRENT_RUN), "summary": results["summary"]})
    except Exception as err:   # one line in the log and the report; Flower marks the run failed
        line = describe_error(err) if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {(str(err) + chr(10)).splitlines()[0]}"
        _write_report(report, {"ok": False, "error": type(err).__name__, "message": line,
                               "run_dir": str(runs.CURRENT_RUN) if runs.CURRENT_RUN else None})
        log.error("f3crec: %s", line)
        if isinstance(err, USER_ERRORS):
            raise SystemExit(2) from None   # a user error: its one line, no traceback
        raise
