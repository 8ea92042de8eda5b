"""Benchmark of the two simulators (§13): seconds per round, clients per second, peak memory.

    python -m f3crec.bench                          # ML-100K reference blocks (or our ML-100K blocks)
    python -m f3crec.bench --rounds 3 --clients 100000 --items 5000   # synthetic scale test (vectorised)
    python -m f3crec.bench --full                   # plus one whole vectorised run (base + 3 blocks)

Each simulator is timed in its own subprocess so that its peak RSS (and CUDA peak, on a GPU) is its own.
A round is timed from plan drawing to aggregation, in D⁰ (no ARM) and D¹ (ARM + ITM on, FedMF F3CRec).
The whole-run figure for the per-client simulator is extrapolated: its seconds per round in each block
times the rounds the vectorised run actually took (both simulators run the same rounds, tested equal).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `cd f3crec && python bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent)); __package__ = "f3crec"  # noqa: E702

import numpy as np
import torch

from common.config import load_config
from common.io import data_root
from common.runs import default_run_root

from .config import Config, resolve
from .data import Block, get_blocks
from .main import run
from .model import BACKBONES
from .round import PlanMaker, plan_inputs
from .train import end_block, grow, make_simulator, round_context

CONFIG = Path(__file__).resolve().parent / "configs" / "ml-100k.yaml"


def scale_blocks(clients: int, items: int, per_client: int, seed: int = 0) -> list[Block]:
    """Two synthetic blocks of `clients` users each (half of block 1 returning), for the scale test."""
    rng = np.random.default_rng(seed)
    blocks = []
    for t, users in enumerate([np.arange(clients), np.arange(clients // 2, clients + clients // 2)]):
        train = {int(u): np.unique(rng.zipf(1.3, per_client) % items) for u in users}
        blocks.append(Block(train=train, valid={}, test={}, n_users=int(users.max()) + 1, n_items=items,
                            item_list=np.zeros(0, np.int64)))
    return blocks


def time_rounds(cfg, flags, blocks, rounds: int, device: torch.device) -> dict:
    """Seconds per round in D⁰ and D¹ (after a real end-of-D⁰ state) for the configured simulator."""
    sim = grow(None, lambda i, p: make_simulator(cfg, flags, i.to(device), {k: v.to(device) for k, v in p.items()}),
               cfg, blocks, 0, cfg.train.seed)
    out = {}
    for t in (0, 1):
        if t == 1:
            sim.save_slot("best")
            sim.save_slot("last")
            end_block(sim, cfg, blocks, 0, flags)
            sim = grow(sim, None, cfg, blocks, 1, cfg.train.seed)
        ctx = round_context(cfg, flags, blocks, t, 1)
        positives, exclude = plan_inputs(dict(blocks[t].train), {}, ctx)
        maker = PlanMaker(positives, exclude, blocks[t].n_items, cfg.federation.num_neg, cfg.federation.batch_size,
                          cfg.method.topn, len(BACKBONES[cfg.backbone.name].substeps))
        times = []
        for r in range(rounds):
            start = time.perf_counter()
            sim.train_round(maker.draw(cfg.train.seed, t, r), ctx)
            times.append(time.perf_counter() - start)
        per_round = float(np.median(times))
        out[f"block{t}"] = {"clients": len(positives), "sec_per_round": round(per_round, 4),
                            "clients_per_sec": round(len(positives) / per_round, 1)}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def worker(args) -> dict:
    overrides = [f"federation.simulator={args.only}", *args.overrides]
    cfg, flags = resolve(load_config(Config, args.config, overrides))
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if args.clients:
        blocks = scale_blocks(args.clients, args.items, args.per_client)
    else:
        blocks, _ = get_blocks(cfg.data, cfg.train.seed)
    return time_rounds(cfg, flags, blocks, args.rounds, device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--data", default=None, help="dataset name (config f3crec/configs/<data>.yaml)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per block and simulator")
    parser.add_argument("--simulators", nargs="+", default=["vectorised", "reference"])
    parser.add_argument("--clients", type=int, default=0, help="synthetic scale test with this many clients")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--per-client", type=int, default=60)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full", action="store_true", help="also time one whole vectorised run")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.data:
        args.config = str(Path(__file__).resolve().parent / "configs" / f"{args.data}.yaml")
    if not args.overrides and not args.clients and not args.data:
        blocks = data_root() / "f3crec-ml-100k-blocks"
        args.overrides = [f"data.blocks={blocks}"] if (blocks / "block_0.json").is_file() else []
    if args.only:
        print(json.dumps(worker(args)))
        return {}
    report = {}
    for name in args.simulators:
        cmd = [sys.executable, "-m", "f3crec.bench", "--only", name, "--config", args.config, "--rounds",
               str(args.rounds), "--clients", str(args.clients), "--items", str(args.items), "--per-client",
               str(args.per_client), "--device", args.device, *args.overrides]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            raise RuntimeError(f"bench worker {name} failed: {done.stderr.strip().splitlines()[-1]}")
        report[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:10s} {json.dumps(report[name])}")
    if args.full:
        start = time.perf_counter()
        full = load_config(Config, args.config, [*args.overrides, "train.share_base=false"])
        res = run(full, Path(full.run_root or default_run_root()) / "f3crec" / "bench-full")
        report["full_run_seconds"] = round(time.perf_counter() - start, 1)
        rounds = [b["rounds_run"] for b in res["blocks"]]
        report["rounds_per_block"] = rounds
        if "reference" in report:
            per = [report["reference"]["block0"]["sec_per_round"]] + [report["reference"]["block1"]["sec_per_round"]] * 3
            report["reference_full_run_estimate_seconds"] = round(sum(r * s for r, s in zip(rounds, per)), 1)
        print(json.dumps({k: v for k, v in report.items() if k not in args.simulators}))
    return report


if __name__ == "__main__":
    main()
