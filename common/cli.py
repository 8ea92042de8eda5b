"""The command-line contract of every entry point: user errors are one line on stderr, never a traceback.

    if __name__ == "__main__":
        run_cli(main)

Exit status 2 for a bad config, file or value and for an operating-system error (a full disk, a read-only
or missing folder, a name too long, a symlink loop, out of memory: one line naming the path and the
setting that chose it), every paper and tool alike, and for a collective that failed because another rank
of a launch (torchrun, accelerate launch) died (one line pointing to that rank's own error); 130 for Ctrl-C
and 143 for SIGTERM (both stop as Ctrl-C does: temp files removed, the last checkpoint kept). Set
REPRO_DEBUG=1 to see the traceback.
Standard library only, so data tools can use it without torch.
"""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

# ConfigError is a ValueError; OSError covers FileNotFoundError, PermissionError, ConnectionError, a full disk...
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, ConnectionError, PermissionError,
               NotADirectoryError, IsADirectoryError, FileExistsError, OSError, MemoryError)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No garbage collection inside the block; after it, every object made so far frozen (gc.freeze: left
    out of later collections, still freed by reference counting) and the previous setting back. For
    start-up imports: numpy, numba and the project make ~10^5 long-lived objects; the collections that ran
    while they were made, or that a paused collector runs after, traverse them all and find nothing to free
    (≈ 0.035 s CPU per process)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds as Ctrl-C does (finally blocks, temp files)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _setting(path: Any) -> str:
    try:
        from common.io import setting_for  # stdlib only; imported late so a broken env still gets a line
        runs = sys.modules.get("common.runs")
        return setting_for(path, getattr(runs, "CURRENT_RUN", None))
    except Exception:  # noqa: BLE001 - the message is better without a hint than not at all
        return ""


def describe_error(err: BaseException) -> str:
    """One line for a user error, an OSError (its reason, the path, the setting that chose the path) or an
    out-of-memory error."""
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and not isinstance(err, OSError)):
        text = _one_line(err) or "no detail"
        return (f"out of memory ({text[:200]}): lower the size that asked for it (the data size, "
                "batch size or model size)")
    if isinstance(err, OSError) and err.errno and err.strerror:
        text = _one_line(err.strerror)
        paths = [p for p in (err.filename, err.filename2) if p is not None]
        for path in paths:
            if os.fspath(path) not in text:
                text += f": {os.fspath(path)}"
        where = _setting(paths[0]) if paths else ""
        if where and where not in text:
            text += f" ({where})"
        return text
    return _one_line(err) or type(err).__name__


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


PEER_GONE = ("closed by peer", "reset by peer", "remote process exited", "communicator was aborted")


def _is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank of the launch died (gloo / NCCL's wording)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (type(err).__name__ in ("DistBackendError", "DistNetworkError")
                                              or any(phrase in text for phrase in PEER_GONE))


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def run_cli(main: Callable[[], Any]) -> None:
    """Entry point for `python -m <paper>.main`: a bad config, file or value, and any OSError or
    out-of-memory error, is one line on stderr and exit status 2, not a traceback; Ctrl-C (130) and SIGTERM
    (143) are one line saying how to continue (common.runs.interrupt_hint_text). REPRO_DEBUG=1: traceback."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _terminate)  # unwind: atomic writes remove their temp files
    try:
        main()
    except (*USER_ERRORS, RuntimeError) as err:  # a RuntimeError only when it is torch's out of memory
        if not os.environ.get("REPRO_DEBUG") and _is_peer_failure(err):  # under torchrun: the cause is elsewhere
            print(f"error: another rank of this launch failed ({_one_line(err)[:160]}); its own error says why",
                  file=sys.stderr)
            sys.exit(2)
        if os.environ.get("REPRO_DEBUG") or (isinstance(err, RuntimeError) and not _is_out_of_memory(err)):
            raise
        print(f"error: {describe_error(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        if os.environ.get("REPRO_DEBUG"):
            raise
        runs = sys.modules.get("common.runs")  # set by start_run when a run folder exists
        hint = runs.interrupt_hint_text() if runs is not None else ""
        print(f"{'terminated' if isinstance(err, Terminated) else 'interrupted'}{hint}", file=sys.stderr)
        sys.exit(143 if isinstance(err, Terminated) else 130)
