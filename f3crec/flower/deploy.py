"""F3CRec on a real Flower deployment on this machine (§14): one SuperLink and K SuperNodes as separate
processes on 127.0.0.1, user u on node u mod K, and the ServerApp submitted with `flwr run`.

    python -m f3crec.flower.deploy --config f3crec/configs/smoke.yaml --nodes 4 [key=value ...]
    python -m f3crec.flower.deploy --nodes 4 --resume runs/f3crec/synthetic/<run>      # same K as the run

It checks the config and the data first, claims the run folder, starts the SuperLink, the SuperNodes
(node config `partition-id`, `num-partitions`) and one ClientApp executor per node (executor.py), waits
until each listens, runs the app (app/pyproject.toml) and stops every process it started — and what those
started — by pid in a `finally`, on success, on an error and on Ctrl-C, so nothing is left running.

Transport: plain HTTP on the loopback interface (`--insecure` for every Flower process); nothing listens
beyond 127.0.0.1. A deployment across machines needs Flower's TLS options instead.

Options of its own (before the usual --config / --resume / --run-dir / key=value):
  --nodes K           SuperNodes (default: federation.nodes)
  --isolation MODE    process (default): one long-lived ClientApp executor per node; subprocess: Flower's
                      default, a fresh ClientApp process for every message (seconds each, README)
  --node-poll S       the SuperNodes' idle poll in seconds (default 0.05; 3 is Flower's own, supernode.py)
  --timeout S         stop the deployment when the run has not finished after S seconds
  --logs DIR          keep the processes' logs there (default: a temporary folder, removed at the end)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import psutil
import tomli_w

from common.cli import run_cli
from common.config import ConfigError, parse_cli
from common.io import REPO
from common.runs import claim_run_dir as common_claim_run_dir, default_run_root

from ..config import Config
from . import wire

APP = Path(__file__).resolve().parent / "app"
BIN = Path(sys.executable).parent
_ERRORS = {e.__name__: e for e in (ValueError, ConnectionError, FileNotFoundError, FloatingPointError,
                                   PermissionError, NotADirectoryError, IsADirectoryError)}


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound together, then released, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    known: set[int] = field(default_factory=set)   # pids of its descendants seen so far

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def last_line(self) -> str:
        lines = [l for l in self.log.read_text(errors="replace").splitlines() if l.strip()] if self.log.exists() else []
        return lines[-1].strip()[:200] if lines else "(no output)"


class Deployment:
    """A SuperLink and `nodes` SuperNodes on 127.0.0.1 (a context manager: leaving it stops them all).

    Invariant: every process this object started, and every descendant of one seen while it ran, is
    stopped by pid in `stop()`; `leftover()` lists those still alive (empty after stop)."""

    def __init__(self, nodes: int, logs: Path, isolation: str = "process", node_poll: float = 0.05,
                 node_state_dir: str | None = None, cwd: Path | None = None):
        if isolation not in ("process", "subprocess"):
            raise ValueError(f"--isolation must be process or subprocess, got {isolation!r}")
        if not node_poll > 0:
            raise ValueError(f"--node-poll must be > 0 seconds, got {node_poll}")
        self.n, self.logs, self.isolation, self.node_poll = nodes, Path(logs), isolation, node_poll
        self.node_state_dir, self.cwd = node_state_dir, Path(cwd or os.getcwd())
        self.procs: list[Proc] = []
        self.link: Proc | None = None
        self.nodes: list[Proc] = []          # SuperNode i hosts partition i
        self.executors: list[Proc] = []
        self.home = self.logs / "flwr-home"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    # ---------------------------------------------------------------------------------------- processes
    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "w") as out:
            # A session of its own: Ctrl-C reaches this process only, which then stops the others in order.
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.cwd, env=self.env, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _watch(self) -> None:
        """Remember the descendants of every started process (a SuperExec's task processes among them)."""
        for proc in self.procs:
            try:
                proc.known |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass

    def _wait_listening(self, proc: Proc, port: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not _listening(port):
            if not proc.alive():
                raise ConnectionError(f"{proc.name} exited at start (status {proc.popen.returncode}): "
                                      f"{proc.last_line()} (log {proc.log})")
            if time.monotonic() > end:
                raise ConnectionError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s "
                                      f"(log {proc.log})")
            time.sleep(0.1)

    def start(self, timeout: float = 120.0) -> "Deployment":
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        link_port, *node_ports = free_ports(1 + self.n)
        self.address = f"127.0.0.1:{link_port}"
        self.link = self._spawn("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                              "--port", str(link_port), "--disable-runtime-dependency-installation"])
        self._wait_listening(self.link, link_port, timeout)
        for i, port in enumerate(node_ports):
            node_config = f"partition-id={i} num-partitions={self.n}"
            if self.node_state_dir:
                node_config += f" state-dir={json.dumps(str(self.node_state_dir))}"
            self.nodes.append(self._spawn(f"supernode-{i}", [
                sys.executable, "-m", "f3crec.flower.supernode", "--poll", str(self.node_poll), "--insecure",
                "--superlink", self.address, "--host", "127.0.0.1", "--port", str(port),
                "--isolation", self.isolation, "--node-config", node_config]))
        for i, (node, port) in enumerate(zip(self.nodes, node_ports)):
            self._wait_listening(node, port, timeout)
            if self.isolation == "process":
                self.executors.append(self._spawn(f"executor-{i}", [
                    sys.executable, "-m", "f3crec.flower.executor", "--runtime-api-address", f"127.0.0.1:{port}",
                    "--parent-pid", str(node.pid)]))
        with open(self.home / "config.toml", "wb") as handle:
            tomli_w.dump({"superlink": {"default": "f3crec-deploy",
                                        "f3crec-deploy": {"address": self.address, "insecure": True}}}, handle)
        self._watch()
        return self

    def kill_node(self, i: int) -> int:
        """Kill SuperNode i by its pid (SIGKILL: no goodbye to the SuperLink); its executor follows it."""
        self._watch()
        self.nodes[i].popen.kill()
        self.nodes[i].popen.wait()
        return self.nodes[i].pid

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every started process and every descendant seen, then SIGKILL to what is left."""
        self._watch()
        pids = {pid for proc in self.procs for pid in (proc.pid, *proc.known)}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in sorted(pids):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            end = time.monotonic() + grace
            while time.monotonic() < end and self.leftover(pids):
                for proc in self.procs:
                    proc.popen.poll()            # reap our own children
                time.sleep(0.05)
            if not self.leftover(pids):
                break
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass

    def leftover(self, pids: set[int] | None = None) -> list[int]:
        """Pids started here (or descendants seen) that are still running (zombies do not count)."""
        if pids is None:
            pids = {pid for proc in self.procs for pid in (proc.pid, *proc.known)}
        return alive(pids)

    def __enter__(self) -> "Deployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------------- run
    def run(self, cfg: Config, run_dir: Path, resume: bool = False, timeout: float | None = None,
            on_wait: Callable[["Deployment"], None] | None = None) -> dict:
        """Submit the app with `cfg` (its run in `run_dir`) and wait for the ServerApp's report.
        A user error of the ServerApp is raised here with its one line; `on_wait(self)` runs every poll."""
        report = self.logs / f"report-{time.time_ns()}.json"
        run_config = self.logs / f"run-config-{time.time_ns()}.toml"
        with open(run_config, "wb") as handle:
            tomli_w.dump({"f3crec-config": wire.config_to_json(cfg), "run-dir": str(run_dir), "resume": resume,
                          "report": str(report)}, handle)
        client = self._spawn(f"flwr-run-{len(self.procs)}", [str(BIN / "flwr"), "run", str(APP), "f3crec-deploy",
                                                             "--run-config", str(run_config), "--stream"])
        echo = threading.Thread(target=_follow, args=(client.log, client, report), daemon=True)
        echo.start()
        end = None if timeout is None else time.monotonic() + timeout
        exited_at = None
        while not report.exists():
            self._watch()
            if on_wait is not None:
                on_wait(self)
            if not self.link.alive():
                raise ConnectionError(f"the SuperLink exited (status {self.link.popen.returncode}): "
                                      f"{self.link.last_line()} (log {self.link.log})")
            if not client.alive():
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 10:   # the stream ends with the run: the report is written first
                    raise ConnectionError(f"the Flower run ended without a report from the ServerApp: "
                                          f"{client.last_line()} (logs in {self.logs})")
            if end is not None and time.monotonic() > end:
                raise ConnectionError(f"the run did not finish within {timeout:.0f} s (logs in {self.logs})")
            time.sleep(0.2)
        outcome = json.loads(report.read_text())
        echo.join(timeout=2)
        if not outcome["ok"]:
            raise _ERRORS.get(outcome["error"], RuntimeError)(outcome["message"])
        return outcome


def _follow(log: Path, proc: Proc, report: Path) -> None:
    """Echo the `flwr run --stream` output (the ServerApp's log) to stdout while the run lasts."""
    with open(log, errors="replace") as handle:
        while True:
            line = handle.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            elif not proc.alive() or report.exists():
                rest = handle.read()
                if rest:
                    sys.stdout.write(rest)
                return
            else:
                time.sleep(0.1)


def claim_run_dir(cfg: Config) -> Path:
    """A fresh run folder named as main.run names one (common.runs.claim_run_dir: mkdir is the claim)."""
    base = Path(cfg.run_root).expanduser() if cfg.run_root is not None else default_run_root()
    name = f"{time.strftime('%Y%m%d-%H%M%S')}_{cfg.method.name}-s{cfg.train.seed}"
    return common_claim_run_dir((base / "f3crec" / cfg.data.name).resolve(), name)


OWN_OPTIONS = {"--nodes": int, "--isolation": str, "--node-poll": float, "--timeout": float, "--logs": Path}


def split_options(args: list[str], spec: dict) -> tuple[dict, list[str]]:
    """Take the launcher's own `--name value` options (spec: option -> type) out of argv; the rest goes to
    parse_cli. Keys are the option names with dashes as underscores."""
    own, rest, i = {}, [], 0
    while i < len(args):
        if args[i] in spec:
            if i + 1 >= len(args):
                raise ConfigError(f"{args[i]} needs a value")
            try:
                own[args[i][2:].replace("-", "_")] = spec[args[i]](args[i + 1])
            except ValueError:
                raise ConfigError(f"{args[i]} {args[i + 1]}: not a {spec[args[i]].__name__}") from None
            i += 2
        else:
            rest.append(args[i])
            i += 1
    return own, rest


def flower_cli(argv: list[str] | None, spec: dict, what: str, nodes_of: str) -> tuple[Config, object, dict]:
    """(cfg on the Flower simulator with --nodes, the CLI's --resume/--run-dir, the launcher's own
    options) of a deploy or simulate command line, after the checks both launchers share: `what` names
    the launcher ("deployment"), `nodes_of` its nodes ("SuperNode") in the one-line errors."""
    own, rest = split_options(list(argv) if argv is not None else sys.argv[1:], spec)
    cfg, options = parse_cli(rest, Config)
    nodes = own.get("nodes", cfg.federation.nodes)
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: needs at least one {nodes_of}")
    if cfg.methods:
        raise ConfigError(f"the {what} runs one method: give method.name=..., not methods=[...]")
    return replace(cfg, federation=replace(cfg.federation, simulator="flower", nodes=nodes)), options, own


def alive(pids) -> list[int]:
    """The pids of `pids` still running (zombies do not count), sorted."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(running)


def main(argv: list[str] | None = None) -> dict:
    cfg, options, own = flower_cli(argv, OWN_OPTIONS, "deployment", "SuperNode")
    nodes = cfg.federation.nodes
    from ..data import get_blocks   # data errors are one line now, before any process starts; warms the cache
    get_blocks(cfg.data, cfg.train.seed)
    resume = options.resume is not None
    if resume and not (options.resume / "last.pt").is_file():
        raise FileNotFoundError(f"--resume {options.resume}: no last.pt (the run stopped before its first block ended)")
    claimed = None
    if resume:
        run_dir = options.resume.resolve()
    elif options.run_dir is not None:
        run_dir = options.run_dir.resolve()
    else:
        run_dir = claimed = claim_run_dir(cfg)
    from common import runs
    runs.CURRENT_RUN = run_dir if resume else None     # Ctrl-C names it once it holds a checkpoint
    with session(claimed, own.get("logs"), "f3crec-deploy-") as folder:
        with Deployment(nodes, folder, own.get("isolation", "process"), own.get("node_poll", 0.05),
                        cfg.federation.node_state_dir) as deployment:
            print(f"[f3crec deploy] SuperLink {deployment.address} (pid {deployment.link.pid}); SuperNodes "
                  f"{[n.pid for n in deployment.nodes]}; isolation {deployment.isolation}", flush=True)
            outcome = deployment.run(cfg, run_dir, resume, own.get("timeout"),
                                     on_wait=lambda d: _note_checkpoint(run_dir))
        outcome["pids"] = sorted({pid for proc in deployment.procs for pid in (proc.pid, *proc.known)})
    return report(cfg, outcome)


@contextlib.contextmanager
def session(claimed: Path | None, logs: Path | None, prefix: str):
    """What a Flower launcher holds around its processes: SIGTERM stops them as Ctrl-C does (every
    `finally` stops its processes by pid), the logs go to `logs` or a scratch folder removed at the end,
    and a claimed run folder that nothing was written into is removed. Yields the logs folder."""
    scratch = None if logs else Path(tempfile.mkdtemp(prefix=prefix))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield logs or scratch
    finally:
        signal.signal(signal.SIGTERM, previous)
        if claimed is not None and claimed.is_dir() and not any(claimed.iterdir()):
            claimed.rmdir()                   # nothing was written: leave no empty run folder behind
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def report(cfg: Config, outcome: dict) -> dict:
    """The run's results table line and its folder, as main.run ends."""
    from ..train import format_row
    print(f"\n{cfg.method.name:13s} | {format_row(outcome['summary'])}\nrun folder: {outcome['run_dir']}")
    return outcome


def _note_checkpoint(run_dir: Path) -> None:
    from common import runs
    if (run_dir / "last.pt").is_file():
        runs.CURRENT_RUN = run_dir


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt   # SIGTERM stops a launcher as Ctrl-C does (finally: every process by pid)


if __name__ == "__main__":
    run_cli(main)
