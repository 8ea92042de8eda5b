"""F3CRec on Flower's simulation runtime (§14): `flwr run` against a local SuperLink started with
`--simulation`, which runs the same ServerApp and ClientApp (app/pyproject.toml) with N virtual nodes on
Ray (extra `fl-sim`, `flwr[simulation]`); user u lives on virtual node u mod N, as in a deployment.

    python -m f3crec.flower.simulate --config f3crec/configs/smoke.yaml --nodes 2 [key=value ...]

Flower's own `:local:` connection starts a detached SuperLink on fixed ports that outlives the command;
this wrapper starts its own on free 127.0.0.1 ports instead, in a SuperLink connection with
`options.num-supernodes = N` and Ray sized to `--cpus` (default 1: one ClientApp actor, so every node's
live state stays in one process), and stops it — with every descendant seen, Ray's GCS, raylet and
workers among them — by pid in a `finally`, on success, on an error and on Ctrl-C.

Options of its own (before the usual --config / --run-dir / key=value):
  --nodes N     virtual SuperNodes (default: federation.nodes)
  --cpus C      CPUs Ray may use (init-args.num-cpus; each ClientApp actor takes one)
  --timeout S   stop when the run has not finished after S seconds
  --logs DIR    keep the SuperLink's and the run's logs there (default: a temporary folder, removed)
No --resume here: resume a Flower run with deploy.py or main.py.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

import tomli_w

from common.cli import run_cli
from common.config import ConfigError

from ..config import Config
from .deploy import BIN, Deployment, claim_run_dir, flower_cli, free_ports, report, session


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class Simulation(Deployment):
    """A SuperLink in simulation mode whose runs get `nodes` virtual SuperNodes on Ray (a context manager:
    leaving it stops the link and every descendant seen — the run's simulation process and Ray's).

    Invariant (Deployment's): every process started here, and every descendant seen while it ran, is
    stopped by pid in `stop()`; `leftover()` is empty afterwards."""

    def __init__(self, nodes: int, logs: Path, cpus: int = 1, cwd: Path | None = None):
        if cpus < 1:
            raise ValueError(f"--cpus must be at least 1, got {cpus}")
        super().__init__(nodes, logs, cwd=cwd)
        self.cpus = cpus
        # Ray's session folder holds AF_UNIX sockets (paths of at most 107 bytes): a short folder of its own
        # under /tmp, not under `logs`; removed in stop().
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="f3r-", dir="/tmp"))
        self.env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(self.ray_tmp), "RAY_DEDUP_LOGS": "0"})

    def start(self, timeout: float = 120.0) -> "Simulation":
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (link_port,) = free_ports(1)
        self.address = f"127.0.0.1:{link_port}"
        self.link = self._spawn("superlink", [str(BIN / "flower-superlink"), "--insecure", "--simulation",
                                              "--host", "127.0.0.1", "--port", str(link_port),
                                              "--disable-runtime-dependency-installation"])
        self._wait_listening(self.link, link_port, timeout)
        backend = {"name": "ray", "client-resources": {"num-cpus": 1},
                   "init-args": {"num-cpus": self.cpus, "log-to-driver": True}}
        with open(self.home / "config.toml", "wb") as handle:   # Deployment.run submits to "f3crec-deploy"
            tomli_w.dump({"superlink": {"default": "f3crec-deploy", "f3crec-deploy": {
                "address": self.address, "insecure": True,
                "options": {"num-supernodes": self.n, "backend": backend}}}}, handle)
        self._watch()
        return self

    def run(self, cfg: Config, run_dir: Path, resume: bool = False, timeout: float | None = None,
            on_wait=None) -> dict:
        """Deployment.run; when the simulation crashes before the ServerApp reports (Ray failing to start,
        say), the one-line error also names the first exception the run's log shows."""
        try:
            return super().run(cfg, run_dir, resume, timeout, on_wait)
        except ConnectionError as err:
            cause = _first_exception(self.logs)
            raise ConnectionError(f"{err}; first error in the run's log: {cause}" if cause else str(err)) from None

    def stop(self, grace: float = 5.0) -> None:
        super().stop(grace)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _first_exception(logs: Path) -> str | None:
    """The first 'SomeError: message' line of the `flwr run` logs in `logs`."""
    pattern = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
    for log in sorted(logs.glob("flwr-run-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            found = pattern.match(line)
            if found:
                return f"{found.group(1)}: {found.group(2).strip()}"[:300]
    return None


OWN_OPTIONS = {"--nodes": int, "--cpus": int, "--timeout": float, "--logs": Path}


def main(argv: list[str] | None = None) -> dict:
    cfg, options, own = flower_cli(argv, OWN_OPTIONS, "simulation", "virtual SuperNode")
    nodes = cfg.federation.nodes
    if own.get("cpus", 1) < 1:
        raise ConfigError(f"--cpus {own['cpus']}: needs at least one CPU")
    if options.resume is not None:
        raise ConfigError("--resume is not offered on the simulation runtime: resume a Flower run with "
                          "python -m f3crec.flower.deploy --resume <run> or python -m f3crec.main")
    if not ray_available():
        raise ConfigError("Flower's simulation runtime needs Ray, not installed: pip install -e \".[fl-sim]\"")
    from ..data import get_blocks   # data errors are one line now, before any process starts; warms the cache
    get_blocks(cfg.data, cfg.train.seed)
    run_dir = options.run_dir.resolve() if options.run_dir is not None else None
    claimed = None
    if run_dir is None:
        run_dir = claimed = claim_run_dir(cfg)
    logs = own.get("logs")
    with session(claimed, logs, "f3crec-sim-") as folder:
        with Simulation(nodes, folder, own.get("cpus", 1)) as simulation:
            print(f"[f3crec simulate] SuperLink {simulation.address} (pid {simulation.link.pid}), simulation "
                  f"runtime, {nodes} virtual nodes on Ray ({simulation.cpus} CPU)", flush=True)
            started = time.perf_counter()
            outcome = simulation.run(cfg, run_dir, False, own.get("timeout"))
            outcome["wall_s"] = time.perf_counter() - started
        outcome["pids"] = sorted({pid for proc in simulation.procs for pid in (proc.pid, *proc.known)})
        outcome["leftover"], outcome["ray_tmp"] = simulation.leftover(), str(simulation.ray_tmp)
    return report(cfg, outcome)


if __name__ == "__main__":
    run_cli(main)
