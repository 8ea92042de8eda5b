"""Benchmark of the Flower paths (§14), measured in one run, one thread, next to the in-process simulators:

    python -m f3crec.flower.bench [--nodes 2] [--no-subprocess] [--no-simulation] [key=value ...]
                                                                              (python -m f3crec.bench --flower)

Every path runs the same smoke config (block 0 only, so Flower's per-message subprocess fits) and prints
seconds per round (median of metrics.jsonl `seconds`: a round's training and validation) and the
per-client-message overhead: (the path's run wall time − the reference simulator's) / client messages, the
reference simulator being the same client code with no messages. Paths: vectorised, reference, the
in-process grid (`federation.simulator=flower`), Flower's simulation runtime (simulate.py: virtual nodes on
Ray, one CPU; skipped without Ray; its run time includes starting Ray), the 127.0.0.1 deployment with one
long-lived ClientApp executor per node (deploy.py's default) and with Flower's default isolation (a fresh
ClientApp process per message). The deployment rows also give the start-up (SuperLink + SuperNodes listening) apart, and the
cost of a bare `import torch, flwr` in a fresh process, which every message pays in the last mode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common.config import load_config

from ..config import Config

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def _round_seconds(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in records)


def _in_process(cfg, root: Path, name: str) -> dict:
    from ..main import run
    from . import simulator as flower_sim
    counted = []
    original = flower_sim.FlowerSimulator._ask

    def ask(self, kind, bodies, group):   # count client messages (one per live node per ask)
        counted.append(len([n for n in bodies if n not in self.lost]))
        return original(self, kind, bodies, group)

    flower_sim.FlowerSimulator._ask = ask
    try:
        started = time.perf_counter()
        run(cfg, root / name)
        wall = time.perf_counter() - started
    finally:
        flower_sim.FlowerSimulator._ask = original
    return {"path": name, "wall_s": wall, "round_s": _round_seconds(root / name), "messages": sum(counted)}


def _deployed(cfg, root: Path, name: str, isolation: str) -> dict:
    from .deploy import Deployment
    started = time.perf_counter()
    with Deployment(cfg.federation.nodes, root / f"logs-{name}", isolation=isolation) as deployment:
        up = time.perf_counter() - started
        begun = time.perf_counter()
        deployment.run(cfg, root / name, timeout=3600)
        wall = time.perf_counter() - begun
    return {"path": name, "wall_s": wall, "round_s": _round_seconds(root / name), "startup_s": up}


def _simulated(cfg, root: Path, name: str) -> dict:
    from .simulate import Simulation
    started = time.perf_counter()
    with Simulation(cfg.federation.nodes, root / f"logs-{name}", cpus=1) as simulation:
        up = time.perf_counter() - started
        begun = time.perf_counter()
        simulation.run(cfg, root / name, timeout=3600)
        wall = time.perf_counter() - begun
    return {"path": name, "wall_s": wall, "round_s": _round_seconds(root / name), "startup_s": up}


def bare_import() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, flwr"], check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--no-subprocess", action="store_true", help="skip Flower's per-message-process isolation")
    parser.add_argument("--no-simulation", action="store_true", help="skip Flower's simulation runtime (Ray)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch_threads()
    base = load_config(Config, SMOKE, ["train.stop_after_block=0", f"federation.nodes={args.nodes}", *args.overrides])
    rows = []
    with tempfile.TemporaryDirectory(prefix="f3crec-flower-bench-") as tmp:
        root = Path(tmp)
        flower = replace(base, federation=replace(base.federation, simulator="flower",
                                                  node_state_dir=str(root / "nodes")))
        for name in ("vectorised", "reference"):
            rows.append(_in_process(replace(base, federation=replace(base.federation, simulator=name)), root, name))
        rows.append(_in_process(flower, root, "flower in-process grid"))
        messages = rows[-1]["messages"]
        if not args.no_simulation:
            from .simulate import ray_available
            if ray_available():
                rows.append(_simulated(flower, root, "simulation runtime, Ray, 1 CPU"))
            else:
                print("simulation runtime skipped: Ray is not installed (extra fl-sim)")
        rows.append(_deployed(flower, root, "deployment, executor per node", "process"))
        if not args.no_subprocess:
            rows.append(_deployed(flower, root, "deployment, Flower's process per message", "subprocess"))
    reference = rows[1]["wall_s"]
    print(f"# f3crec Flower bench: smoke block 0, {args.nodes} nodes, {messages} client messages, one thread")
    print(f"{'path':42s} {'s/round':>8s} {'run s':>8s} {'overhead s/message':>19s} {'start-up s':>10s}")
    for row in rows:
        overhead = (row["wall_s"] - reference) / messages if row["path"] not in ("vectorised", "reference") else None
        row["overhead_s_per_message"] = overhead
        print(f"{row['path']:42s} {row['round_s']:8.3f} {row['wall_s']:8.2f} "
              f"{'' if overhead is None else f'{overhead:.4f}':>19s} {row.get('startup_s', float('nan')):10.2f}")
    print(f"bare `import torch, flwr` in a fresh process: {bare_import():.2f} s")
    return rows


def torch_threads() -> None:
    import torch
    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
