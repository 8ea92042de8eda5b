"""F3CRec's Flower App on stock Flower processes (method.md §14), launched by common/flower_ops.py:

- fast (always): a taken port and a process that never listens are one line, each before any wait ends
  without a deadline; the ServerApp's config error is one line (tests/f3crec/test_flower.py);
- opt-in (REPRO_FLOWER_DEPLOY=1, `make test-deploy`; each starts a SuperLink and SuperNodes, 1–5 min on 2
  busy cores): the deployment (TLS + SuperNode authentication) gives the in-process grid's and the reference
  simulator's records; a SuperNode killed mid-run stops the run in one line and a resume on fresh nodes ends
  with the uninterrupted results; a foreign `flwr run` (without the deployment's CA, or insecure) and a
  foreign SuperNode (its own key, or insecure) are refused; every process started is gone afterwards.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("psutil")

from common import flower_ops  # noqa: E402
from common.config import load_config  # noqa: E402
from common.flower_ops import BIN, DeployError, Deployment, alive, free_ports, stage  # noqa: E402
from common.checkpoints import load_checkpoint  # noqa: E402
from f3crec.config import Config  # noqa: E402
from f3crec.main import run  # noqa: E402

from conftest import FLOWER_APP as APP, FLOWER_PACKAGES as PACKAGES, FLOWER_SHORT as SHORT  # noqa: E402
from conftest import F3CREC_SMOKE as SMOKE, flower_records as _records  # noqa: E402
deployment = pytest.mark.skipif(os.environ.get("REPRO_FLOWER_DEPLOY") != "1",
                                reason="starts a SuperLink and SuperNodes (minutes): set REPRO_FLOWER_DEPLOY=1")


def _oracle(tmp_path: Path, simulator: str, nodes: int, extra=()) -> dict:
    cfg = load_config(Config, SMOKE, [*SHORT, f"federation.simulator={simulator}", f"federation.nodes={nodes}",
                                      f"federation.node_state_dir={tmp_path / f'nodes-{simulator}'}", *extra])
    out_dir = tmp_path / f"oracle-{simulator}-{nodes}"
    results = run(cfg, out_dir)
    return {"results": results, "records": _records(out_dir)}


def _run_config(overrides: list[str], run_dir: Path, resume: bool = False) -> str:
    return (f'overrides="{" ".join(overrides)}" run-dir="{run_dir}"' + (" resume=true" if resume else ""))


def _assert_equals_in_process_grid(outcome: dict, out: Path, short: list[str], tmp_path: Path) -> None:
    """The deployment's summary and every round record equal the same config on the in-process grid (2 nodes)."""
    cfg = load_config(Config, SMOKE, [*short, "federation.simulator=flower", "federation.nodes=2",
                                      f"federation.node_state_dir={tmp_path / 'nodes-grid'}"])
    assert outcome["summary"] == run(cfg, tmp_path / "grid")["summary"]
    assert _records(out) == _records(tmp_path / "grid")


def _node_config(tmp_path: Path) -> str:
    return f'partition-id={{i}} num-partitions={{n}} state-dir="{tmp_path / "nodes"}"'


# ------------------------------------------------------------------------------------------------- fast
def test_a_taken_port_is_one_line_before_any_process(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        d = Deployment(tmp_path / "d", 1, ports=[free_ports(1)[0], taken])
        with pytest.raises(DeployError) as err:
            d.start()
    assert f"127.0.0.1:{taken} for SuperNode 0 is taken by another process" in str(err.value)
    assert d.procs == [] and "\n" not in str(err.value)


def test_a_process_that_never_listens_hits_the_deadline_and_names_a_log_that_exists(tmp_path):
    d = Deployment(tmp_path / "d", 1, start_timeout=1.0)
    started = time.monotonic()
    sleeper = d.spawn("sleeper", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"])
    try:
        with pytest.raises(DeployError) as err:
            d.wait_listening("sleeper", sleeper, free_ports(1)[0])
    finally:
        d.stop()
    assert time.monotonic() - started < 10 and alive([sleeper.pid]) == []
    line = str(err.value)
    assert "within 1 s" in line and Path(line.rsplit("(log ", 1)[1].rstrip(")")).is_file(), line


def test_a_private_network_is_reachable_inside_only(tmp_path):
    """--private-network: a process started through the deployment's prefix listens on the private loopback;
    the same address on the host's loopback refuses a connection; stop() ends the namespace holder by pid."""
    d = Deployment(tmp_path / "d", 1, private_network=True)
    try:
        try:
            d.isolate()
        except DeployError as err:
            pytest.skip(f"no unprivileged user + network namespaces here: {err}")
        port = free_ports(1)[0]
        server = d.spawn("listener", [*d.link_prefix, sys.executable, "-c",
                                      "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', %d)); s.listen(); "
                                      "print('up', flush=True); c, _ = s.accept(); c.sendall(b'inside'); time.sleep(60)" % port])
        d.wait_listening("listener", server, port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        inside = subprocess.run([*d.link_prefix, sys.executable, "-c",
                                 "import socket; print(socket.create_connection(('127.0.0.1', %d), 5).recv(6).decode())" % port],
                                capture_output=True, text=True, timeout=60)
        assert inside.stdout.strip() == "inside", inside.stderr
    finally:
        d.stop()
    assert alive(d.pids()) == []
    with pytest.raises(ValueError, match="private-network"):
        Deployment(tmp_path / "e", 1, host="10.0.0.1", private_network=True)


def test_deploy_cli_bad_input_is_one_line(tmp_path, capsys):
    assert flower_ops.main(["deploy", "--app", str(APP), "--nodes", "0", "--folder", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --nodes 0: needs at least one SuperNode" and not (tmp_path / "d").exists()


def test_the_bundle_holds_the_code_it_runs_and_declares_its_dependencies(tmp_path):
    """`flwr build` of the staged app: f3crec's core and common/ inside, flwr/torch/numpy/pyyaml and the compiled
    nodes' numba/threadpoolctl declared."""
    import tomllib
    import zipfile
    fab = flower_ops.build(APP, PACKAGES, tmp_path)
    with zipfile.ZipFile(fab) as bundle:
        names = set(bundle.namelist())
        project = tomllib.loads(bundle.read("pyproject.toml").decode())
    for needed in ("f3crec/flower/client_app.py", "f3crec/flower/server_app.py", "f3crec/train.py",
                   "f3crec/configs/smoke.yaml", "common/runs.py"):
        assert needed in names, needed
    assert not any(n.startswith(("flame/", "vlm2rec/", "tests/")) for n in names)
    deps = " ".join(project["project"]["dependencies"])
    assert all(name in deps for name in ("flwr", "torch", "numpy", "pyyaml", "tqdm", "numba", "threadpoolctl"))
    assert "f3crec/simulators.py" in names and "f3crec/kernels.py" in names     # the compiled nodes' code


# ------------------------------------------------------------------------------------------- deployments
@pytest.mark.slow
@deployment
def test_deployment_gives_the_in_process_and_reference_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "deployed"
    outcome = flower_ops.deploy(APP, PACKAGES, 2, _node_config(tmp_path), _run_config([*SHORT, "federation.nodes=2"], out),
                                "report", tmp_path / "d", timeout=900)
    assert outcome["ok"] and Path(outcome["run_dir"]) == out
    assert alive(outcome["pids"]) == [] and len(outcome["pids"]) >= 3
    deployed = json.loads((out / "results.json").read_text())
    for simulator in ("flower", "reference"):
        oracle = _oracle(tmp_path, simulator, 2)
        assert deployed["summary"] == oracle["results"]["summary"], simulator       # a-matrices, LA/RA/H
        records, expected = _records(out), oracle["records"]
        if simulator == "reference":   # compiled nodes: ITM's float32 mean weight to rounding (README)
            itm = [(r.pop("itm_w", 0.0), e.pop("itm_w", 0.0)) for r, e in zip(records, expected)]
            assert all(a == pytest.approx(b, rel=1e-6) for a, b in itm)
        assert records == expected, simulator                                         # every round's record


@pytest.mark.slow
@deployment
def test_node_killed_mid_run_stops_in_one_line_and_resume_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    # vectorised nodes: a compiled node's first training message compiles numba's kernels (tens of seconds on this
    # machine, once per staged copy), which this 20 s deadline would count as a lost node
    fed = ["federation.nodes=3", "federation.reply_timeout=20", f"federation.node_state_dir={tmp_path / 'nodes'}",
           "federation.node_simulator=vectorised"]
    run_dir, outcome = tmp_path / "run", {}
    with Deployment(tmp_path / "d1", 3, _node_config(tmp_path)) as first:
        staged = stage(APP, PACKAGES, tmp_path / "app")
        report = tmp_path / "report-1.json"
        worker = threading.Thread(target=lambda: outcome.update(first.run(
            staged, _run_config([*SHORT, *fed], run_dir) + f' report="{report}"', 900, report)))
        worker.start()
        while worker.is_alive() and not ((run_dir / "metrics.jsonl").exists()
                                         and any(r["block"] == 1 for r in _records(run_dir))):
            time.sleep(0.2)
        killed = first.nodes[1].pid
        first.nodes[1].kill()
        worker.join(900)
    assert alive(first.pids()) == [] and not outcome["ok"], outcome
    line = outcome["message"]
    assert "\n" not in line and "min_reply_fraction=1.0" in line and "--resume" in line, line
    assert alive([killed]) == [] and load_checkpoint(run_dir / "last.pt")["block"] == 0
    resumed = flower_ops.deploy(APP, PACKAGES, 3, _node_config(tmp_path), _run_config([], run_dir, resume=True),
                                "report", tmp_path / "d2", timeout=900)
    oracle = _oracle(tmp_path, "flower", 3, fed[1:])
    assert resumed["summary"] == oracle["results"]["summary"]
    expected = [r for r in oracle["records"] if r["block"] == 1]
    assert [r for r in _records(run_dir) if r["block"] == 1][-len(expected):] == expected


@pytest.mark.slow
@deployment
def test_foreign_run_and_foreign_node_are_refused(tmp_path):
    """Another local user's `flwr run` (no CA of this deployment, or insecure) and another SuperNode (its own
    key, or insecure) get nothing: no run is created, no foreign node is listed, and nothing they sent ran."""
    mark = tmp_path / "foreign-ran.json"
    with Deployment(tmp_path / "d", 1) as d:
        staged = stage(APP, PACKAGES, tmp_path / "foreign-app")
        env = {**flower_ops._env(tmp_path / "foreign"), "PYTHONPATH": str(staged)}
        Path(env["FLWR_HOME"]).mkdir(parents=True)
        for extra in ("", "insecure = true\n"):
            (Path(env["FLWR_HOME"]) / "config.toml").write_text(
                f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{d.address}"\n{extra}')
            done = subprocess.run([str(BIN / "flwr"), "run", str(staged), "x", "--run-config", f'report="{mark}"'],
                                  capture_output=True, text=True, env=env, timeout=120)
            assert done.returncode != 0, done.stdout + done.stderr
        keys = flower_ops.certificates(tmp_path / "foreign-keys", ["127.0.0.1"], 1)
        logs = [tmp_path / "own-key.log", tmp_path / "insecure.log"]
        foreign = [subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
                   for log, argv in zip(logs, [
                       [str(BIN / "flower-supernode"), "--superlink", d.address, "--root-certificates", str(d.keys["ca"]),
                        "--auth-supernode-private-key", str(keys["node-0"]), "--port", str(free_ports(1)[0])],
                       [str(BIN / "flower-supernode"), "--superlink", d.address, "--insecure",
                        "--port", str(free_ports(1)[0])]])]
        try:
            assert foreign[0].wait(timeout=120) != 0                  # refused: it exits by itself
            assert "Failed to activate SuperNode" in logs[0].read_text()
            time.sleep(5)
            runs = json.loads(d.flwr("ls", "deployment", "--format", "json").stdout)
            nodes = json.loads(d.flwr("supernode", "ls", "deployment", "--format", "json").stdout)
        finally:
            for proc in foreign:                                       # each with the SuperExec it started
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    assert runs.get("runs", []) == [], runs
    assert len([n for n in nodes["nodes"] if n.get("status") == "online"]) == 1, nodes
    assert not mark.exists() and alive(d.pids()) == []


@pytest.mark.slow
@deployment
def test_the_bundle_runs_on_a_fresh_venv_with_only_its_dependencies(tmp_path, monkeypatch):
    """A venv made here (no system site-packages, not this repository) gets only the FAB's declared
    dependencies; stock flower-superlink / flower-supernode from it run the bundle (runtime dependency
    installation off), with the in-process grid's results. REPRO_FLOWER_FRESH_VENV=<dir> reuses a venv."""
    import tomllib
    import zipfile
    venv = Path(os.environ.get("REPRO_FLOWER_FRESH_VENV") or tmp_path / "venv")
    fab = flower_ops.build(APP, PACKAGES, tmp_path / "fab")
    with zipfile.ZipFile(fab) as bundle:
        deps = tomllib.loads(bundle.read("pyproject.toml").decode())["project"]["dependencies"]
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *deps], check=True, timeout=1800,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import f3crec"], cwd=tmp_path, env=clean,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'f3crec'" in probe.stderr    # only the bundle brings it
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    out, short = tmp_path / "fresh", ["federation.rounds=2", "federation.patience=1", "train.stop_after_block=0"]
    outcome = flower_ops.deploy(APP, PACKAGES, 2, _node_config(tmp_path), _run_config([*short, "federation.nodes=2"], out),
                                "report", tmp_path / "d", timeout=900, bin_dir=venv / "bin")
    assert outcome["ok"] and alive(outcome["pids"]) == []
    _assert_equals_in_process_grid(outcome, out, short, tmp_path)


@pytest.mark.slow
@deployment
def test_deployment_across_two_network_namespaces(tmp_path, monkeypatch):
    """Outgrowing one machine, shown: the SuperLink in network namespace A (10.213.0.1), the SuperNodes and
    `flwr run` in namespace B (10.213.0.2), joined by a veth pair made here (TLS + node authentication over
    it); the in-process grid's results. Skipped where namespaces cannot be made (not root, no `ip`)."""
    tag = f"{os.getpid() % 100000}"
    a, b = f"f3c{tag}a", f"f3c{tag}b"
    steps = [["netns", "add", a], ["netns", "add", b], ["link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"],
             ["link", "set", f"v{tag}a", "netns", a], ["link", "set", f"v{tag}b", "netns", b],
             ["-n", a, "addr", "add", "10.213.0.1/24", "dev", f"v{tag}a"], ["-n", b, "addr", "add", "10.213.0.2/24", "dev", f"v{tag}b"],
             ["-n", a, "link", "set", f"v{tag}a", "up"], ["-n", b, "link", "set", f"v{tag}b", "up"],
             ["-n", a, "link", "set", "lo", "up"], ["-n", b, "link", "set", "lo", "up"]]
    try:
        try:
            for step in steps:
                subprocess.run(["ip", *step], check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.CalledProcessError) as err:
            pytest.skip(f"cannot make network namespaces here: {err}")
        monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
        out, short = tmp_path / "two-hosts", ["federation.rounds=2", "federation.patience=1", "train.stop_after_block=0"]
        staged = stage(APP, PACKAGES, tmp_path / "app")
        report = tmp_path / "report.json"
        with Deployment(tmp_path / "d", 2, _node_config(tmp_path), host="10.213.0.1",
                        link_prefix=("ip", "netns", "exec", a), node_prefix=("ip", "netns", "exec", b)) as d:
            assert d.address.startswith("10.213.0.1:")
            outcome = d.run(staged, _run_config([*short, "federation.nodes=2"], out) + f' report="{report}"', 900, report)
        assert outcome["ok"] and alive(d.pids()) == []
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    _assert_equals_in_process_grid(outcome, out, short, tmp_path)


@pytest.mark.slow
@deployment
def test_a_private_network_deployment_admits_only_its_own(tmp_path, monkeypatch):
    """--private-network: the SuperLink (Control API included) listens in a network namespace of its own, so a
    foreign `flwr run` on the host at the deployment's address is refused even holding the deployment's CA or
    skipping verification (nothing listens there), and no run is created; the deploying user's run works and
    gives the in-process grid's records."""
    mark = tmp_path / "foreign-ran.json"
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    out, short = tmp_path / "private", ["federation.rounds=2", "federation.patience=1", "train.stop_after_block=0"]
    staged = stage(APP, PACKAGES, tmp_path / "app")
    report = tmp_path / "report.json"
    d = Deployment(tmp_path / "d", 2, _node_config(tmp_path), private_network=True)
    try:
        d.isolate()
    except DeployError as err:
        d.stop()
        pytest.skip(f"no unprivileged user + network namespaces here: {err}")
    try:
        d.start()
        env = {**flower_ops._env(tmp_path / "foreign"), "PYTHONPATH": str(staged)}
        Path(env["FLWR_HOME"]).mkdir(parents=True)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(d.address.rsplit(":", 1)[1])), timeout=5).close()
        for extra in (f'root-certificates = "{d.keys["ca"]}"\n', "insecure = true\n"):
            (Path(env["FLWR_HOME"]) / "config.toml").write_text(
                f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{d.address}"\n{extra}')
            done = subprocess.run([str(BIN / "flwr"), "run", str(staged), "x", "--run-config", f'report="{mark}"'],
                                  capture_output=True, text=True, env=env, timeout=120)
            assert done.returncode != 0, done.stdout + done.stderr
        assert json.loads(d.flwr("ls", "deployment", "--format", "json").stdout).get("runs", []) == []
        outcome = d.run(staged, _run_config([*short, "federation.nodes=2"], out) + f' report="{report}"', 900, report)
    finally:
        d.stop()
    assert outcome["ok"] and alive(d.pids()) == [] and not mark.exists()
    _assert_equals_in_process_grid(outcome, out, short, tmp_path)


def _wheelhouse(folder: Path, requirements: list[str]) -> Path:
    """Wheels of the requirements' whole dependency tree, each at the version this venv has (any version where it
    has none, e.g. a dependency of another platform), fetched by `pip download --no-deps` from pip's configured
    sources (this machine: its local index and wheel folder, PyPI for the rest; pip's cache after the first run)."""
    import importlib.metadata as metadata
    from packaging.requirements import Requirement
    seen, todo = {}, [Requirement(r) for r in requirements]
    while todo:   # every platform's and Python's branch (uv locks for all), an extra's only where it is asked for
        req = todo.pop()
        package = req.name.lower().replace("_", "-")
        if package in seen and req.extras <= seen[package]:
            continue
        asked = seen[package] = seen.get(package, set()) | req.extras
        try:
            for dep in map(Requirement, metadata.requires(package) or []):
                extra = str(dep.marker or "")
                if "extra ==" not in extra or any(f'extra == "{e}"' in extra for e in asked):
                    todo.append(dep)
        except metadata.PackageNotFoundError:
            pass
    pins = []
    for package in sorted(seen):
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    subprocess.run([str(BIN / "pip"), "download", "--no-deps", "-q", "-d", str(folder), *pins], check=True, timeout=1800,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return folder


@pytest.mark.slow
@pytest.mark.heavy
@deployment
@pytest.mark.xfail(raises=DeployError, strict=False,
                   reason="flwr 1.40-1.42: a ClientApp process deletes the run's runtime environment at exit, while the "
                          "next message's process (same run, same folder) may already import from it (README)")
def test_the_bundle_runs_with_runtime_dependency_installation(tmp_path, monkeypatch):
    """Runtime dependency installation on (`flower-supernode --allow-runtime-dependency-installation`, the
    SuperLink's left on): Flower runs `uv sync` on the FAB's pyproject into a runtime environment per run and
    puts it first on the app's sys.path. uv is kept offline, reading only a wheel folder made here from this
    venv's versions of the FAB's dependencies (REPRO_FLOWER_WHEELS=<dir> reuses one); making that folder is the
    one step that may use the network. The installation ran on every node and the server (their logs say so)
    and the run gives the in-process grid's records. A lost node (DeployError) is Flower's race, xfail; wrong
    records still fail."""
    import tomllib
    import zipfile
    wheels = Path(os.environ.get("REPRO_FLOWER_WHEELS") or tmp_path / "wheels")
    with zipfile.ZipFile(flower_ops.build(APP, PACKAGES, tmp_path / "fab")) as bundle:
        deps = tomllib.loads(bundle.read("pyproject.toml").decode())["project"]["dependencies"]
    if not any(wheels.glob("flwr-*.whl")):
        _wheelhouse(wheels, deps)
    for key, value in {"UV_NO_INDEX": "1", "UV_FIND_LINKS": str(wheels), "UV_OFFLINE": "1", "UV_NO_PROGRESS": "1",
                       "REPRO_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    out, short = tmp_path / "installed", ["federation.rounds=2", "federation.patience=1", "train.stop_after_block=0"]
    outcome = flower_ops.deploy(APP, PACKAGES, 2, _node_config(tmp_path), _run_config([*short, "federation.nodes=2"], out),
                                "report", tmp_path / "d", timeout=1800, runtime_install=True)
    assert outcome["ok"] and alive(outcome["pids"]) == []
    logs = [(tmp_path / "d" / "logs" / f"{name}.log").read_text() for name in ("supernode-0", "supernode-1", "flwr-run-3")]
    assert all("installed successfully via uv sync" in log for log in logs), [log[-2000:] for log in logs]
    _assert_equals_in_process_grid(outcome, out, short, tmp_path)
