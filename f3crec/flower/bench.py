"""Where a Flower message's seconds go (§14), one smoke block on 2 nodes, one thread:

    python -m f3crec.flower.bench [--nodes 2] [--no-deploy] [key=value ...]      (python -m f3crec.bench --flower)

Rows: the reference simulator and the in-process grid (same client code, messages but no processes), then stock
Flower processes on 127.0.0.1 (common/flower_ops.py: SuperLink + SuperNodes, TLS, node auth, Flower's
process-per-message isolation). For the deployment the ClientApp's trace (F3CREC_FLOWER_TIMING) gives, per
message, median wall and CPU seconds of: the ClientApp process up to the app's entry (its start, Flower's
runtime, pulling the message and the FAB, this app's module import), the app module's import alone, the core's
import (torch), the node's build from Context.state, the handler; `flower_wait_s` is what a round's two
sequential exchanges (train, then validation) spend outside the ClientApp processes: Flower's polls and sleeps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common.config import load_config

from ..config import Config

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


def _round_seconds(run_dir: Path) -> float:
    return statistics.median(json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--no-deploy", action="store_true", help="skip the stock Flower deployment")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from ..main import run
    overrides = ["train.stop_after_block=0", f"federation.nodes={args.nodes}", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="f3crec-flower-bench-") as tmp:
        root = Path(tmp)
        for name in ("reference", "flower"):
            cfg = load_config(Config, SMOKE, [*overrides, f"federation.simulator={name}"])
            cfg = replace(cfg, federation=replace(cfg.federation, node_state_dir=str(root / "nodes")))
            started, cpu = time.perf_counter(), time.process_time()
            run(cfg, root / name)
            rows.append({"path": name if name == "reference" else "in-process grid", "round_s": _round_seconds(root / name),
                         "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu})
        if not args.no_deploy:
            from common import flower_ops
            trace = root / "trace.jsonl"
            os.environ["F3CREC_FLOWER_TIMING"] = str(trace)
            started, children = time.perf_counter(), os.times()
            flower_ops.deploy(Path(__file__).resolve().parent / "app", ["f3crec", "common"], args.nodes,
                              f'partition-id={{i}} num-partitions={{n}} state-dir="{root / "nodes-deployed"}"',
                              f'overrides="{" ".join(overrides)}" run-dir="{root / "deployed"}"', "report",
                              root / "deployment", timeout=3600)
            done = os.times()
            messages = [json.loads(line) for line in trace.read_text().splitlines()]
            median = lambda key, i: statistics.median(m[key][i] for m in messages if key in m)  # noqa: E731
            phases = {f"{k}_{unit}": median(k, i) for k in ("at_entry", "app_import", "core_import", "node_build", "handler")
                      for i, unit in enumerate(("s", "cpu"))}
            round_s = _round_seconds(root / "deployed")
            rows.append({"path": "stock Flower deployment", "round_s": round_s, "wall_s": time.perf_counter() - started,
                         "processes_cpu_s": done.children_user + done.children_system - children.children_user
                         - children.children_system, "messages": len(messages), **phases,
                         "flower_wait_s": round_s / 2 - phases["at_entry_s"] - phases["handler_s"]})
    print(f"# f3crec Flower bench: smoke block 0, {args.nodes} nodes, one thread; load {os.getloadavg()[0]:.2f}")
    for row in rows:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


if __name__ == "__main__":
    main()
