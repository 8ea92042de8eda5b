"""N ranks of one module on this machine, as torchrun starts them, and one line when any of them fails.

    status = launch(2, ["--config", "flame/configs/smoke.yaml"], module="flame.main")
    python -m flame.launch --nproc 2 -- <flame.main arguments>        # each paper's launch.py wraps main()

Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a
free port unless --port); the paper joins the process group. Rank 0 prints and writes the run folder; the
other ranks' output is kept only to report their error. When a rank exits with an error the others are
stopped (SIGTERM, then SIGKILL after --grace-s) and the launch exits with that rank's status and one line on
stderr naming it, so a failing rank never leaves the others waiting in a collective. Standard library only.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from common.io import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_line(path: Path) -> str:
    """A rank's one-line error (run_cli's `error: ...`, or the last line it wrote)."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "interrupted"))]
    return (errors or lines or ["(no output)"])[-1]


def stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every rank still running, SIGKILL the ones still there after grace_s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(nproc: int, args: list[str], module: str, port: Optional[int] = None, grace_s: float = 10.0) -> int:
    """Run `python -m module args` as `nproc` ranks; returns the launch's exit status."""
    logs = Path(tempfile.mkdtemp(prefix=f"{module.partition('.')[0]}-launch-"))
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    env = dict(os.environ, OMP_NUM_THREADS=threads, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    errs = [open(logs / f"rank{r}.err", "w") for r in range(nproc)]
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=None if r == 0 else subprocess.DEVNULL, stderr=errs[r]) for r in range(nproc)]
    failed: Optional[int] = None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            time.sleep(0.05)
        failed = failed if failed is not None else next((r for r, p in enumerate(procs) if p.returncode), None)
    except KeyboardInterrupt:  # Ctrl-C reached every rank too: they keep their last checkpoint and exit
        for p in procs:
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
        failed = 0
    stop(procs, grace_s)
    for handle in errs:
        handle.close()
    if failed is None:
        sys.stderr.write((logs / "rank0.err").read_text(errors="replace"))   # rank 0's warnings, if any
        return 0
    status = procs[failed].returncode
    print(f"{error_line(logs / f'rank{failed}.err')} (rank {failed} of {nproc}, exit status {status}; "
          "the other ranks were stopped)", file=sys.stderr)
    return status if status and status > 0 else 1


def main(argv: Optional[list[str]], paper: str, description: str) -> int:
    """The command line of `python -m <paper>.launch`: options, then `--` and the paper's main arguments."""
    parser = argparse.ArgumentParser(description=description,
                                     usage=f"python -m {paper}.launch [--nproc N] [--port P] -- <{paper}.main arguments>")
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine (default 2)")
    parser.add_argument("--port", type=int, default=None, help="rendezvous port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--module", default=f"{paper}.main", help=f"the module every rank runs (default {paper}.main)")
    parser.add_argument("--grace-s", type=float, default=10.0, help="seconds a stopped rank gets before SIGKILL")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=f"the arguments of python -m {paper}.main")
    options = parser.parse_args(argv)
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    if options.nproc < 1:
        parser.error(f"--nproc {options.nproc}: need at least 1")
    return launch(options.nproc, args, options.module, options.port, options.grace_s)
