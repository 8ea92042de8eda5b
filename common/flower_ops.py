"""Run a Flower App on this machine with Flower's own public CLIs: `flwr build`, `flower-superlink`,
`flower-supernode`, `flwr supernode register` and `flwr run` (no Flower module is imported here; generic:
no paper is imported either). Operations tooling, kept out of the paper folders.

    python -m common.flower_ops build  --app APP_DIR --package f3crec --package common [--out DIR]
    python -m common.flower_ops deploy --app APP_DIR --package ... --nodes K
                                       [--node-config 'partition-id={i} num-partitions={n}'] [--run-config 'k=v ...']
                                       [--report-key KEY] [--folder DIR] [--timeout S] [--host 127.0.0.1]
                                       [--simulation] [--runtime-install] [--flower-bin OTHER_VENV/bin]
                                       [--private-network]
    python -m common.flower_ops certs  --folder DIR --host IP [--host IP ...] --nodes K     (multi-host, README)

`build` stages the app's pyproject.toml with the listed packages (each a folder of the repository) in one
folder and bundles it with `flwr build`: the FAB holds the code it runs, and the pyproject declares what
to install beside it. `deploy` makes a deployment folder (mode 0700) holding a per-deployment CA, the
SuperLink's TLS certificate, one node-authentication key per SuperNode and a SuperExec secret; starts one
SuperLink (TLS, SuperNode authentication on) and registers each node's public key before any node
starts; starts K SuperNodes (TLS to the link, their own key, their Runtime API on TLS with the secret);
runs the app with `flwr run --stream` through a connection that trusts only this deployment's CA; and
stops every process it started, and every descendant seen, by pid — on success, on an error, on Ctrl-C.
`--simulation`: one SuperLink with `--simulation` (TLS too) and a connection with `options.num-supernodes`
(Flower's simulation runtime, needs Ray). `--flower-bin`: the CLIs (and so the Python that runs the app)
of another venv, e.g. one holding only the FAB's dependencies. `--private-network`: every process (SuperLink,
SuperNodes, the `flwr` calls) in one new unprivileged user + network namespace (`unshare`, `nsenter`), so
nothing listens on the host and no other local process can reach the SuperLink's unauthenticated Control API.

Every wait has a deadline (`--timeout`, default 600 s for the run, 60 s for each start). With
`--report-key KEY` the run config gets KEY=<folder>/report.json: the app writes {"ok": bool, "message": ...}
there, and a failed run is reported in that one line. The folder (its logs) is removed after a
successful run with no --folder given; it is kept, and named, whenever something failed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "app")   # a package's own app folder is the FAB root


class DeployError(ConnectionError):
    """A deployment step failed; the message is one line and names a log that exists."""


# ----------------------------------------------------------------------------------------------- bundle
def stage(app: Path, packages: list[str], out: Path) -> Path:
    """`out`/<project name>: the app's pyproject.toml beside copies of `packages` (repository folders)."""
    project = tomllib.loads((app / "pyproject.toml").read_text())["project"]["name"]
    folder = out / project
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy2(app / "pyproject.toml", folder / "pyproject.toml")
    for package in packages:
        shutil.copytree(REPO / package, folder / package, ignore=SKIP)
    return folder


def build(app: Path, packages: list[str], out: Path) -> Path:
    """The FAB of `app` with `packages` inside (`flwr build` run in `out`)."""
    folder = stage(app, packages, out)
    done = subprocess.run([str(BIN / "flwr"), "build", "--app", str(folder)], cwd=out, capture_output=True,
                          text=True, timeout=120, env=_env(out))
    fabs = sorted(out.glob("*.fab"), key=lambda p: p.stat().st_mtime)
    if done.returncode or not fabs:
        raise DeployError(f"flwr build failed: {(done.stdout + done.stderr).strip().splitlines()[-1:]}")
    return fabs[-1]


# --------------------------------------------------------------------------------------------- secrets
def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificates(folder: Path, hosts: list[str], nodes: int) -> dict[str, Path]:
    """A fresh CA, a server certificate for `hosts` (IPs or names) signed by it, `nodes` SuperNode keys
    (OpenSSH EC keys, Flower's node-auth format) and a SuperExec secret, written into `folder` (0700)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"deployment CA {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key",
             "secret": folder / "superexec.secret"}
    files = {"ca": ca.public_bytes(serialization.Encoding.PEM), "cert": cert.public_bytes(serialization.Encoding.PEM),
             "key": _pem_key(key), "secret": secrets.token_hex(32).encode()}
    for i in range(nodes):
        node = ec.generate_private_key(ec.SECP384R1())
        paths[f"node-{i}"], paths[f"node-{i}.pub"] = folder / f"node-{i}.key", folder / f"node-{i}.pub"
        files[f"node-{i}"] = node.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption())
        files[f"node-{i}.pub"] = node.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                serialization.PublicFormat.OpenSSH)
    for name, data in files.items():
        descriptor = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
    return paths


# ------------------------------------------------------------------------------------------- processes
def _env(home: Path, bin_dir: Path = BIN) -> dict:
    """Flower's environment for a deployment in `home`, its CLIs from `bin_dir` (another venv: no PYTHONPATH)."""
    base = dict(os.environ) if bin_dir == BIN else {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**base, "FLWR_HOME": str(home / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            # the libraries' DeprecationWarnings (typer/click in every Flower CLI) are no news to a user's log
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")   # Flower's logger colours its level names whatever the stream


def spawn_logged(argv: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """Start `argv` (own session, no stdin) with its output, colour codes removed, copied line by line into
    `log` by a daemon thread: a log file gets plain text (Flower offers no switch for its colours)."""
    import threading
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w")   # exists (empty) from the start, as a redirected output file would
    try:
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True, cwd=cwd)
    except BaseException:
        out.close()
        raise

    def copy(source, out) -> None:
        with out:
            for raw in iter(source.readline, b""):
                out.write(ANSI.sub("", raw.decode(errors="replace")))
                out.flush()
        source.close()

    threading.Thread(target=copy, args=(popen.stdout, out), daemon=True, name=f"log {log.name}").start()
    return popen


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _check_free(host: str, port: int, what: str) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise DeployError(f"{host}:{port} for {what} is taken by another process: choose another port") from None


def _listens(pids: list[int], port: int) -> bool:
    """Whether one of `pids` holds a socket listening on `port` (Linux /proc, read in the namespace of the
    first pid, so a process in another network namespace is seen too)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                return True
    return False


class Deployment:
    """One SuperLink and `nodes` SuperNodes with TLS and node authentication (a context manager; leaving it
    stops every process started here and every descendant seen, by pid)."""

    def __init__(self, folder: Path, nodes: int, node_config: str = "", host: str = "127.0.0.1",
                 start_timeout: float = 60.0, runtime_install: bool = False, ports: list[int] | None = None,
                 simulation: bool = False, bin_dir: Path = BIN, link_prefix: tuple = (), node_prefix: tuple = (),
                 private_network: bool = False):
        self.folder, self.n, self.node_config, self.host = Path(folder), nodes, node_config, host
        self.bin = Path(bin_dir)     # the venv whose Flower CLIs run (its Python runs the app)
        # argv prefixes placing the SuperLink, and the SuperNodes with the `flwr` CLI, on other hosts or network
        # namespaces (e.g. ("ip", "netns", "exec", "a")); then `host` is the SuperLink's address there
        self.link_prefix, self.node_prefix = list(link_prefix), list(node_prefix)
        self.start_timeout, self.runtime_install, self.ports = start_timeout, runtime_install, ports
        self.simulation = simulation   # Flower's simulation runtime: `nodes` virtual SuperNodes on Ray
        # every process of the deployment in one new (unprivileged) user + network namespace: its loopback, and so
        # the SuperLink's Control API, is reachable by no other process on the host (README, "Who may use")
        self.private_network = private_network
        if private_network and (link_prefix or node_prefix or host != "127.0.0.1"):
            raise ValueError("--private-network runs every process on one private loopback: no prefixes, host 127.0.0.1")
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.seen: set[int] = set()
        self.env = _env(self.folder, self.bin)
        if simulation:   # Ray's session folder holds AF_UNIX sockets (paths <= 107 bytes): a short one, removed in stop()
            self.ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
            self.env.update({"RAY_TMPDIR": self.ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"})

    def log(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.log(name)
        popen = spawn_logged(argv, log, env or self.env, self.folder)
        self.procs.append((name, popen, log))
        return popen

    def _last(self, log: Path) -> str:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.exists() else []
        return lines[-1][:200] if lines else "(no output)"

    def wait_listening(self, name: str, popen: subprocess.Popen, port: int) -> None:
        """Until `popen` (or a child of it) listens on `port`; one line naming its log on exit or deadline."""
        import psutil
        end = time.monotonic() + self.start_timeout
        while True:
            if popen.poll() is not None:
                raise DeployError(f"{name} exited at start (status {popen.returncode}): {self._last(self.log(name))} "
                                  f"(log {self.log(name)})")
            try:
                if _listens([popen.pid, *(c.pid for c in psutil.Process(popen.pid).children(recursive=True))], port):
                    return
            except psutil.NoSuchProcess:
                pass
            if time.monotonic() > end:
                raise DeployError(f"{name} did not listen on {self.host}:{port} within {self.start_timeout:.0f} s "
                                  f"(log {self.log(name)})")
            time.sleep(0.1)

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([*self.node_prefix, str(self.bin / "flwr"), *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout, cwd=self.folder)

    def isolate(self) -> None:
        """Start a process holding a new user + network namespace (loopback up) and run every Flower process of
        the deployment in it through `nsenter`: nothing listens on the host's network."""
        missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
        if missing:
            raise DeployError(f"--private-network needs {', '.join(missing)} (util-linux, iproute2) on PATH")
        holder = self.spawn("netns", ["unshare", "--user", "--map-root-user", "--net", "sh", "-c",
                                      "ip link set lo up && echo ready && exec sleep 2147483647"])
        end = time.monotonic() + self.start_timeout
        while "ready" not in (self.log("netns").read_text(errors="replace") if self.log("netns").exists() else ""):
            if holder.poll() is not None or time.monotonic() > end:
                raise DeployError(f"could not make a private network namespace (unprivileged user namespaces off?): "
                                  f"{self._last(self.log('netns'))} (log {self.log('netns')})")
            time.sleep(0.05)
        # --preserve-credentials: a non-root user keeps its uid (mapped to the namespace's root), no setgroups
        self.link_prefix = self.node_prefix = ["nsenter", "--preserve-credentials", f"--target={holder.pid}",
                                               "--user", "--net"]

    def start(self) -> "Deployment":
        if self.private_network and not self.link_prefix:   # (isolate() may have been called already)
            self.isolate()
        # the SuperNodes' Runtime APIs listen on their own host's loopback: the certificate names it too
        self.keys = certificates(self.folder / "secrets", list(dict.fromkeys([self.host, "127.0.0.1", "localhost"])), self.n)
        link_port, *node_ports = self.ports or free_ports(1 + (0 if self.simulation else self.n),
                                                          "127.0.0.1" if self.link_prefix else self.host)
        checks = [("the SuperLink", link_port)] if not self.link_prefix else []
        for what, port in [*checks, *[(f"SuperNode {i}", p) for i, p in enumerate(node_ports)]]:
            _check_free(self.host if what == "the SuperLink" else "127.0.0.1", port, what)
        self.address = f"{self.host}:{link_port}"
        tls = ["--ssl-ca-certfile", str(self.keys["ca"]), "--ssl-certfile", str(self.keys["cert"]),
               "--ssl-keyfile", str(self.keys["key"]), "--superexec-auth-secret-file", str(self.keys["secret"])]
        install = [] if self.runtime_install else ["--disable-runtime-dependency-installation"]
        mode = ["--simulation"] if self.simulation else ["--enable-supernode-auth"]
        link = self.spawn("superlink", [*self.link_prefix, str(self.bin / "flower-superlink"), *tls, *mode,
                                        "--host", self.host, "--port", str(link_port), *install])
        self.wait_listening("superlink", link, link_port)
        home = self.folder / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.keys["ca"]}"\n' + (
                f'\n[superlink.deployment.options]\nnum-supernodes = {self.n}\n\n'
                '[superlink.deployment.options.backend]\nname = "ray"\n\n'
                '[superlink.deployment.options.backend.client-resources]\nnum-cpus = 1\n\n'
                '[superlink.deployment.options.backend.init-args]\nnum-cpus = 1\n' if self.simulation else ""))
        self.nodes = []
        if self.simulation:
            self.watch()
            return self
        for i in range(self.n):
            done = self.flwr("supernode", "register", str(self.keys[f"node-{i}.pub"]), "deployment")
            if done.returncode:
                raise DeployError(f"flwr supernode register failed for node {i}: "
                                  f"{(done.stdout + done.stderr).strip().splitlines()[-1:]}")
        for i, port in enumerate(node_ports):
            config = self.node_config.format(i=i, n=self.n)
            self.nodes.append(self.spawn(f"supernode-{i}", [
                *self.node_prefix, str(self.bin / "flower-supernode"), "--superlink", self.address, "--root-certificates", str(self.keys["ca"]),
                "--auth-supernode-private-key", str(self.keys[f"node-{i}"]), *tls, "--host", "127.0.0.1",
                "--port", str(port), *(["--node-config", config] if config else []),
                *(["--allow-runtime-dependency-installation"] if self.runtime_install else [])],
                # a FLWR_HOME per node, as on its own host: Flower names a run's runtime environment by the run id
                # under FLWR_HOME and each ClientApp process removes it at exit, so nodes sharing one would race
                env={**self.env, "FLWR_HOME": str(self.folder / f"node-{i}" / "flwr-home")}))
        for i, (node, port) in enumerate(zip(self.nodes, node_ports)):
            self.wait_listening(f"supernode-{i}", node, port)
        self.watch()
        return self

    def watch(self) -> None:
        import psutil
        for _, popen, _ in self.procs:
            try:
                self.seen |= {c.pid for c in psutil.Process(popen.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass

    def run(self, app: Path, run_config: str = "", timeout: float = 600.0, report: Path | None = None) -> dict:
        """`flwr run app deployment --stream` with a deadline; the app's report (if any) or the exit status."""
        argv = [*self.node_prefix, str(self.bin / "flwr"), "run", str(app), "deployment", "--stream"]
        if run_config:
            argv += ["--run-config", run_config]
        name = f"flwr-run-{len(self.procs)}"
        client = self.spawn(name, argv)
        end = time.monotonic() + timeout
        while client.poll() is None and not (report is not None and report.exists()):
            self.watch()
            if time.monotonic() > end:
                raise DeployError(f"the run did not finish within {timeout:.0f} s (logs in {self.folder / 'logs'})")
            time.sleep(0.1)
        if report is not None:
            grace = time.monotonic() + 10
            while not report.exists() and time.monotonic() < grace:
                time.sleep(0.1)
            if report.exists():
                return json.loads(report.read_text())
        if client.wait(timeout=max(1.0, end - time.monotonic())) != 0 or report is not None:
            raise DeployError(f"flwr run ended (status {client.returncode}) without a report: "
                              f"{self._last(self.log(name))} (log {self.log(name)})")
        return {"ok": True}

    def pids(self) -> set[int]:
        return {p.pid for _, p, _ in self.procs} | self.seen

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every process started here and every descendant seen, then SIGKILL to what is left."""
        self.watch()
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in sorted(alive(pids)):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            end = time.monotonic() + grace
            while alive(pids) and time.monotonic() < end:
                for _, popen, _ in self.procs:
                    popen.poll()
                time.sleep(0.05)
            if not alive(pids):
                break
        for _, popen, _ in self.procs:
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if self.simulation:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> "Deployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def alive(pids) -> list[int]:
    """The pids of `pids` still running (zombies do not count)."""
    import psutil
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(out)


def deploy(app: Path, packages: list[str], nodes: int, node_config: str = "", run_config: str = "",
           report_key: str | None = None, folder: Path | None = None, timeout: float = 600.0,
           host: str = "127.0.0.1", runtime_install: bool = False, simulation: bool = False,
           bin_dir: Path = BIN, private_network: bool = False) -> dict:
    """Build, start, run, stop (module docstring). Returns the report (or {"ok": True}) with the pids used."""
    if nodes < 1:
        raise ValueError(f"--nodes {nodes}: needs at least one SuperNode")
    if simulation and importlib.util.find_spec("ray") is None:
        raise ValueError("Flower's simulation runtime needs Ray, not installed: pip install 'flwr[simulation]' "
                         "(in this repository: pip install -e '.[fl-sim]')")
    scratch = folder is None
    folder = Path(folder or tempfile.mkdtemp(prefix="flower-deploy-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ok = False
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        staged = stage(app, packages, folder / "app")
        report = folder / "report.json" if report_key else None
        if report is not None:
            run_config = f"{run_config} {report_key}={json.dumps(str(report))}".strip()
        with Deployment(folder, nodes, node_config, host, runtime_install=runtime_install,
                        simulation=simulation, bin_dir=bin_dir, private_network=private_network) as deployment:
            kind = "virtual SuperNodes on Ray" if simulation else "SuperNodes (TLS, node authentication)"
            print(f"[flower_ops] SuperLink {deployment.address}; {nodes} {kind}; folder {folder}", flush=True)
            outcome = deployment.run(staged, run_config, timeout, report)
        outcome["pids"] = sorted(deployment.pids())
        if not outcome.get("ok"):
            raise DeployError(f"{outcome.get('message', 'the run failed')} (logs in {folder / 'logs'})")
        ok = True
        return outcome
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ok and scratch:
            shutil.rmtree(folder, ignore_errors=True)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt   # SIGTERM stops the launcher as Ctrl-C does: `finally` stops every process by pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.flower_ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "deploy"):
        p = sub.add_parser(name)
        p.add_argument("--app", type=Path, required=True, help="folder holding the app's pyproject.toml")
        p.add_argument("--package", action="append", default=[], help="a repository folder to bundle (repeat)")
    sub.choices["build"].add_argument("--out", type=Path, default=Path("build/fab"))
    d = sub.choices["deploy"]
    d.add_argument("--nodes", type=int, required=True)
    d.add_argument("--node-config", default="", help="per node; {i} is the node's index, {n} the node count")
    d.add_argument("--run-config", default="")
    d.add_argument("--report-key", default=None)
    d.add_argument("--folder", type=Path, default=None)
    d.add_argument("--timeout", type=float, default=600.0)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--runtime-install", action="store_true", help="let Flower install the FAB's dependencies")
    d.add_argument("--simulation", action="store_true", help="Flower's simulation runtime (Ray): virtual nodes")
    d.add_argument("--flower-bin", type=Path, default=BIN, help="the bin/ of the venv whose Flower runs the app")
    d.add_argument("--private-network", action="store_true",
                   help="run every Flower process in a new network namespace: no other local process reaches the "
                        "SuperLink (its Control API has no authentication in open-source Flower)")
    c = sub.add_parser("certs")
    c.add_argument("--folder", type=Path, required=True)
    c.add_argument("--host", action="append", required=True)
    c.add_argument("--nodes", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            args.out.mkdir(parents=True, exist_ok=True)
            print(build(args.app, args.package, args.out.resolve()))
        elif args.command == "certs":
            print("\n".join(f"{k}: {v}" for k, v in certificates(args.folder, args.host, args.nodes).items()))
        else:
            outcome = deploy(args.app, args.package, args.nodes, args.node_config, args.run_config, args.report_key,
                             args.folder, args.timeout, args.host, args.runtime_install, args.simulation, args.flower_bin,
                             args.private_network)
            print(json.dumps({k: v for k, v in outcome.items() if k != "pids"}))
    except (DeployError, ValueError, OSError, subprocess.TimeoutExpired) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
