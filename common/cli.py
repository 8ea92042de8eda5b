"""The command-line contract of every entry point: user errors are one line on stderr, never a traceback.

    if __name__ == "__main__":
        run_cli(main)

Exit status 2 for a bad config, file or value (every paper and tool alike), 130 for Ctrl-C; set
REPRO_DEBUG=1 to see the traceback. Standard library only, so data tools can use it without torch.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, ConnectionError, PermissionError,
               NotADirectoryError, IsADirectoryError, FileExistsError)  # ConfigError is a ValueError


def run_cli(main: Callable[[], Any]) -> None:
    """Entry point for `python -m <paper>.main`: a bad config, file or value is one line on stderr and
    exit status 2, not a traceback; Ctrl-C is one line naming the run to resume, exit status 130.
    Set REPRO_DEBUG=1 to see the traceback."""
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("REPRO_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("REPRO_DEBUG"):
            raise
        runs = sys.modules.get("common.runs")  # set by start_run when a run folder exists
        run_dir = getattr(runs, "CURRENT_RUN", None)
        hint = f"; its last checkpoint is kept: resume with --resume {run_dir}" if run_dir else ""
        print(f"interrupted{hint}", file=sys.stderr)
        sys.exit(130)
