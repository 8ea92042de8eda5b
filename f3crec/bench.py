"""Benchmark (§13): a whole run and its phases, one thread, beside the official code timed in the same sitting.

    python -m f3crec.bench                       # whole FedMF F3CRec run, released ML-100K blocks, 20 rounds/block
    python -m f3crec.bench --repeats 3 --reference /path/F3CRec-CIKM-25 --reference-python /path/python
                                                 # the same, alternating with the official code's whole process
    python -m f3crec.bench --compare vectorised,compiled --repeats 3 data.blocks=DIR backbone.dtype=float64
                                                 # whole runs of both simulators, alternating, same metrics?
    python -m f3crec.bench --per-round           # seconds per round of both simulators in D⁰ and D¹
    python -m f3crec.bench --per-round --simulators vectorised --clients 100000 --items 2000 --per-client 10
                                                 # synthetic scale test of the vectorised simulator
    python -m f3crec.bench --scale --sizes 1000 10000 100000   # ML-100K-shaped: CPU ms per round, peak RSS
    python -m f3crec.bench --scale --simulator compiled        # the same, the compiled simulator
    python -m f3crec.bench --flower [--nodes 2] [--no-deploy] [key=value ...]   # where a Flower message's seconds go

The whole run is `python -m f3crec.main` in a subprocess (OMP_NUM_THREADS=1, so imports and start-up are
counted), seed 42, 20 rounds in every block and no early stopping; with `--reference` the official
implementation's whole process does the same work (base block trained, same blocks and rounds, one thread),
alternating with ours. A ratio is printed only for two sides timed in one sitting. A block's phase is grow
+ rounds with validation + restore + test (results.json `blocks[t].seconds`); a round is plan drawing, local
training, aggregation and validation (metrics.jsonl `seconds`); the fixed cost is the whole process minus
its block phases (imports, block loading, end-of-block states, checkpoints, results).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common.config import load_config
from common.io import data_root

from .config import Config, resolve
from .data import Block, get_blocks
from .train import end_block, grow, make_simulator, round_context

CONFIG = Path(__file__).resolve().parent / "configs" / "ml-100k.yaml"
ROOT = Path(__file__).resolve().parent.parent
# The official implementation (github.com/Jaehyung-Lim/F3CRec-CIKM-25) run as a whole process: FedMF F3CRec,
# ML-100K, the README's hyper-parameters, base block trained (--load_model 0 --save_model 0), one thread.
REFERENCE_ARGS = ["--load_model", "0", "--save_model", "0", "--backbone", "fedmf", "--model", "fcrec", "--lr", "1.0",
                  "--dim", "32", "--patience", "30", "--client_cl", "--server_cl", "--reg_client_cl", "0.1",
                  "--eps", "0.006", "--topN", "30", "--beta", "0.9", "--dataset", "ml-100k", "--seed", "42"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TARGETS = {"base_round_s": 0.055, "incremental_round_s": 0.013, "fixed_s": 1.5}


def child_env() -> dict:
    """The timed children's environment: one thread, and Python's bytecode cache on as in a default Python
    (a PYTHONDONTWRITEBYTECODE inherited from the shell would make every start compile the sources of both
    sides, ≈ 0.07–0.09 s CPU of ours)."""
    env = {**os.environ, **ONE_THREAD}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _child_cpu() -> float:
    """CPU seconds (user + system) of every child process waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------ whole run
# `python -m f3crec.main` as a -c program that also reports its CPU seconds after the imports (f3crec.main, and
# torch, or numba's kernels for the compiled simulator): an exit handler, which run_and_leave runs.
_MAIN = ("import atexit, sys, time\nimport f3crec.main as m\n{extra}\nstarted = time.process_time()\n"
         "atexit.register(lambda: print(f'after-imports-cpu {{time.process_time() - started:.4f}}', file=sys.stderr))\n"
         "m.run_and_leave()\n")


def whole_run(overrides: list[str], rounds: int, simulator: str | None = None) -> dict:
    """Time one `python -m f3crec.main` process (CPU and wall, and CPU after its imports) and read its
    phases from the run folder; `simulator` sets federation.simulator."""
    with tempfile.TemporaryDirectory() as tmp:
        # the compiled simulator never imports torch (f3crec.main does not): its side imports numba's kernels,
        # the others torch, before the after-imports clock starts
        extra = "import f3crec.kernels, f3crec.eval_kernels" if simulator in ("compiled", "auto") else "import torch"
        cmd = [sys.executable, "-c", _MAIN.format(extra=extra), "--run-dir", str(Path(tmp) / "run"), *overrides,
               f"federation.rounds={rounds}", f"federation.patience={rounds + 1}", "train.share_base=false",
               "train.seed=42", "train.threads=1", *([f"federation.simulator={simulator}"] if simulator else [])]
        cpu, start = _child_cpu(), time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env())
        whole, cpu = time.perf_counter() - start, _child_cpu() - cpu
        if done.returncode != 0:
            said = [line for line in done.stderr.strip().splitlines() if not line.startswith("after-imports-cpu ")]
            raise RuntimeError(f"bench run failed: {(said or ['?'])[-1]}")
        after = [float(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("after-imports-cpu ")]
        results = json.loads((Path(tmp) / "run" / "results.json").read_text())
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    blocks = [b["seconds"] for b in results["blocks"]]
    per_round = lambda ts: float(np.median([r["seconds"] for r in records if r["block"] in ts]))  # noqa: E731
    return {"whole_s": whole, "whole_cpu_s": cpu, "base_block_s": blocks[0], "incremental_blocks_s": sum(blocks[1:]),
            "base_round_s": per_round({0}), "incremental_round_s": per_round({1, 2, 3}),
            "fixed_s": whole - sum(blocks), "after_imports_cpu_s": after[-1] if after else float("nan"),
            "rounds": [b["rounds_run"] for b in results["blocks"]], "simulator": results["simulator"],
            "summary": results["summary"]}


def reference_run(checkout: Path, python: str, rounds: int) -> dict:
    """Time the official implementation's whole process, CPU and wall, the same work as `whole_run`.
    `checkout` is a prepared copy of its repository (README "Speed and scale": pandas installed, its get_device
    pointed at the CPU, fcrec_data/dataset/ml-100k/total_blocks_timestamp.pickle rebuilt)."""
    cmd = [python, "main.py", *REFERENCE_ARGS, "--num_round", str(rounds)]
    cpu, start = _child_cpu(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout / "fcrec", env=child_env())
    whole, cpu = time.perf_counter() - start, _child_cpu() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"reference run failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return {"whole_s": whole, "whole_cpu_s": cpu}


def torch_import_seconds() -> float:
    """Wall time of a bare `python -c "import torch"`: the part of the fixed cost no code of ours can cut."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def report(ours: dict, reference: dict | None = None) -> str:
    """Markdown table of each phase; with `reference` (timed in the same sitting) its column and the ratio.
    A ratio against figures from another sitting is never printed."""
    rows = [("base block (rounds + validation + test)", "base_block_s"), ("per base round (incl. validation)",
            "base_round_s"), ("three incremental blocks", "incremental_blocks_s"),
            ("per incremental round (incl. validation)", "incremental_round_s"),
            ("fixed cost (outside the blocks)", "fixed_s"), ("… of which a bare `import torch`", "torch_import_s"),
            ("whole process, wall", "whole_s"), ("whole process, CPU", "whole_cpu_s"),
            ("whole process after its imports, CPU", "after_imports_cpu_s")]
    reference = reference or {}
    lines = ["| phase | ours (s) | reference implementation, same sitting (s) | ratio | target |",
             "|---|---|---|---|---|"]
    for label, key in rows:
        if key not in ours:
            continue
        ref = reference.get(key)
        ratio = f"{ref / ours[key]:.1f}×" if ref else "—"
        target = f"≤ {TARGETS[key]}" if key in TARGETS else "—"
        lines.append(f"| {label} | {ours[key]:.4g} | {f'{ref:.4g}' if ref else '—'} | {ratio} | {target} |")
    return "\n".join(lines)


def report_sides(sides: dict[str, dict], reference: dict | None = None) -> str:
    """`report` for several simulators timed in one sitting: one column each, the reference's beside them
    with its ratio to each (only when it was timed in the same sitting)."""
    keys = [("per base round (incl. validation)", "base_round_s"),
            ("per incremental round (incl. validation)", "incremental_round_s"),
            ("base block", "base_block_s"), ("three incremental blocks", "incremental_blocks_s"),
            ("fixed cost (outside the blocks), wall", "fixed_s"), ("whole process, wall", "whole_s"),
            ("whole process, CPU", "whole_cpu_s"), ("after imports, CPU", "after_imports_cpu_s")]
    names = list(sides)
    head = "| phase (s) | " + " | ".join(names) + (" | reference | " + " | ".join(f"ratio to {n}" for n in names)
                                                    if reference else "") + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + (1 + len(names) if reference else 0))]
    for label, key in keys:
        cells = [f"{sides[n][key]:.4g}" for n in names]
        if reference:
            ref = reference.get(key)
            cells += [f"{ref:.4g}" if ref else "—"] + [f"{ref / sides[n][key]:.1f}×" if ref else "—" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    same = all(sides[n]["summary"] == sides[names[0]]["summary"] for n in names)
    lines.append(f"\nsame metrics (results.json summary) across {', '.join(names)}: {'yes' if same else 'NO'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ per round
def scale_blocks(clients: int, items: int, per_client: int, seed: int = 0) -> list[Block]:
    """Two synthetic blocks of `clients` users each (half of block 1 returning), for the scale test."""
    rng = np.random.default_rng(seed)
    blocks = []
    for t, users in enumerate([np.arange(clients), np.arange(clients // 2, clients + clients // 2)]):
        train = {int(u): np.unique(rng.zipf(1.3, per_client) % items) for u in users}
        blocks.append(Block(train=train, valid={}, test={}, n_users=int(users.max()) + 1, n_items=items,
                            item_list=np.zeros(0, np.int64)))
    return blocks


def ml100k_shaped_blocks(clients: int, seed: int = 0) -> list[Block]:
    """Two blocks shaped like ML-100K's D⁰ and D¹ at `clients` base-block users: ≈ 1.2 items per user in
    all, ≈ 94 interactions per base-block user (80/10/10 per user), a popularity-skewed item choice; D¹ has
    ≈ 22 interactions per user for 37 % as many users, half of them returning. Time and memory are linear in
    the interactions (items drawn by inverse CDF against a fixed popularity table, dedup by one sort)."""
    rng = np.random.default_rng([seed, clients])
    n_items = max(int(1.22 * clients), 60)
    popularity = np.cumsum(1.0 / np.arange(10, n_items + 10) ** 0.9)
    blocks, first = [], 0
    for t, (users, per_user) in enumerate([(np.arange(clients), 94),
                                           (np.arange(int(0.8 * clients), int(1.17 * clients)), 22)]):
        owner = np.repeat(users, rng.poisson(per_user, users.size).clip(3))
        items = np.searchsorted(popularity, rng.random(owner.size) * popularity[-1]).clip(max=n_items - 1)
        pairs = np.unique(owner.astype(np.int64) * n_items + items)        # sorted by user, then item
        owner, items = pairs // n_items, pairs % n_items
        order = np.lexsort((rng.random(owner.size), owner))                 # random order within each user
        owner, items = owner[order], items[order]
        starts = np.searchsorted(owner, owner)                              # first index of each user's run
        counts = np.bincount(owner, minlength=int(owner.max()) + 1)[owner]
        rank = np.arange(owner.size) - starts
        split = np.where(rank < np.ceil(0.8 * counts), 0, np.where(rank < np.ceil(0.9 * counts), 1, 2))
        parts = []
        for which in range(3):   # each user's items: views into one array per split (O(interactions))
            keep = split == which
            mine, theirs = owner[keep], items[keep]
            bounds = np.flatnonzero(np.diff(mine, prepend=-1, append=-1))
            parts.append(dict(zip(mine[bounds[:-1]].tolist(), np.split(theirs, bounds[1:-1]))))
        first = max(first, int(users.max()) + 1)
        blocks.append(Block(train=parts[0], valid=parts[1], test=parts[2], n_users=first, n_items=n_items,
                            item_list=np.zeros(0, np.int64)))
    return blocks


def time_rounds(cfg, flags, blocks, rounds: int, device: torch.device) -> dict:
    """Seconds per round (plan + training + aggregation) in D⁰ and D¹ (after a real end-of-D⁰ state): a block's
    first round apart (it also lays out the block's plan), then the median of `rounds` steady rounds; the
    simulator's own validation once per block, after its last round (CPU, its first call of the block)."""
    sim = grow(None, lambda i, p: make_simulator(cfg, flags, i, p, blocks), cfg, blocks, 0, cfg.train.seed)
    out = {}
    for t in (0, 1):
        if t == 1:
            sim.save_slot("best")
            sim.save_slot("last")
            end_block(sim, cfg, blocks, 0, flags)
            sim = grow(sim, None, cfg, blocks, 1, cfg.train.seed)
        positives = blocks[t].train
        times, cpu = [], []
        for r in range(1 + rounds):
            ctx = round_context(cfg, flags, blocks, t, r + 1)
            start, cpu0 = time.perf_counter(), time.process_time()
            sim.train_round(None, ctx)   # the simulator draws the plan
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu0)
        cpu0 = time.process_time()
        if blocks[t].valid:   # the simulator's own validation, as the block loop calls it
            sim.validate(ctx, None)
        val = time.process_time() - cpu0
        steady, steady_cpu = times[1:] or times, cpu[1:] or cpu   # rounds=0: the first round alone
        per_round = float(np.median(steady))
        out[f"block{t}"] = {"clients": len(positives), "first_sec": round(times[0], 4),
                            "first_cpu_s": round(cpu[0], 4), "sec_per_round": round(per_round, 4),
                            "cpu_s_per_round": round(float(np.median(steady_cpu)), 4),
                            "steady_cpu_s": [round(c, 4) for c in cpu[1:]],
                            "validation_cpu_s": round(val, 4),
                            "clients_per_sec": round(len(positives) / per_round, 1)}
    out["simulator"] = type(sim).__name__   # what ran (the scale table names it)
    out["interactions"] = [int(b.stats()[0]) for b in blocks[:2]]
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def worker(args) -> dict:
    torch.set_num_threads(1)
    overrides = [f"federation.simulator={args.only}", *args.overrides]
    cfg, flags = resolve(load_config(Config, args.config, overrides))
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if args.scale:
        current: dict = {}
        if args.only == "flower":   # the in-process nodes read these synthetic blocks instead of block files
            from .flower import node
            node.get_blocks = lambda data, seed: (current["blocks"], "synthetic")
        if args.only in ("compiled", "flower"):   # load the compiled kernels first: a first round then times its layout
            current["blocks"] = ml100k_shaped_blocks(60)
            time_rounds(cfg, flags, current["blocks"], 0, device)
        blocks = current["blocks"] = ml100k_shaped_blocks(args.clients)
    elif args.clients:
        blocks = scale_blocks(args.clients, args.items, args.per_client)
    else:
        blocks = get_blocks(cfg.data, cfg.train.seed)[0]
    return time_rounds(cfg, flags, blocks, args.rounds, device)


def per_round(args) -> dict:
    """Each simulator in its own subprocess, so that its peak RSS (and CUDA peak) is its own."""
    out = {}
    for name in args.simulators:
        cmd = [sys.executable, "-m", "f3crec.bench", "--only", name, "--config", args.config, "--rounds",
               str(args.rounds), "--clients", str(args.clients), "--items", str(args.items), "--per-client",
               str(args.per_client), "--device", args.device, *(["--scale"] if args.scale else []), *args.overrides]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"bench worker {name} failed: {done.stderr.strip().splitlines()[-1]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:10s} {json.dumps(out[name])}")
    return out


def scale(args) -> dict:
    """ms per round (training, validation) and peak RSS at each of `args.sizes` ML-100K-shaped client counts,
    each size in its own process (its own peak RSS), `args.simulator` (vectorised or compiled), one thread."""
    out, name = {}, args.simulator
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(f"ML-100K-shaped synthetic blocks, {name} simulator, one thread, CPU ms: each block's first round "
          f"(with its plan layout), then the median of {args.rounds} steady rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit or '?'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| clients | items | base-block interactions | base first round | base round (steady) | its validation | "
          "incremental first round | incremental round (steady) | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for clients in args.sizes:
        args.clients, args.scale, args.simulators = clients, True, [name]
        try:
            res = per_round(args)[name]
        except RuntimeError as err:
            print(f"| {clients} | — | — | failed: {err} | | | | | |")
            break
        out[clients] = res
        b0, b1 = res["block0"], res["block1"]
        ms = lambda s: f"{1000 * s:.0f}"  # noqa: E731
        print(f"| {clients} | {max(int(1.22 * clients), 60)} | {res['interactions'][0]} | {ms(b0['first_cpu_s'])} | "
              f"{ms(b0['cpu_s_per_round'])} | {ms(b0['validation_cpu_s'])} | {ms(b1['first_cpu_s'])} | "
              f"{ms(b1['cpu_s_per_round'])} | {res['peak_rss_mb'] / 1024:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return out


def compare(args) -> dict:
    """Whole runs of each simulator in `args.compare` (and the reference code with --reference), alternating
    in one sitting; the fastest of `args.repeats` per side."""
    runs, refs, loads = {name: [] for name in args.compare}, [], [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name in args.compare:
            runs[name].append(whole_run(["--config", args.config, *args.overrides], args.block_rounds, name))
        if args.reference:
            refs.append(reference_run(Path(args.reference), args.reference_python, args.block_rounds))
        loads.append(os.getloadavg()[0])
    best = lambda rs: {k: min(r[k] for r in rs) if isinstance(rs[0][k], float) else rs[0][k]  # noqa: E731
                       for k in rs[0]}
    sides = {name: best(rs) for name, rs in runs.items()}
    ref = best(refs) if refs else None
    first = next(iter(sides.values()))
    print(f"{first['rounds']} rounds per block, one thread, bytecode cache on, best of {args.repeats}, load average "
          f"{min(loads):.1f}–{max(loads):.1f}, {time.strftime('%Y-%m-%d %H:%M %Z')}:\n" + report_sides(sides, ref))
    return {"sides": sides, "reference": ref}


def _median_round_seconds(run_dir: Path) -> float:
    return statistics.median(json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def flower(args) -> list[dict]:
    """Where a Flower message's seconds go (§14; extra fl), one smoke block on `--nodes` nodes, one thread.

    Rows: the reference simulator and the in-process grid (same client code, messages but no processes), then
    stock Flower processes on 127.0.0.1 (common/flower_ops.py: SuperLink + SuperNodes, TLS, node auth, Flower's
    process-per-message isolation; skipped with --no-deploy). For the deployment the ClientApp's trace
    (F3CREC_FLOWER_TIMING, flower/client_app.py) gives, per message, median wall and CPU seconds of: the
    ClientApp process up to the app's entry (its start, Flower's runtime, pulling the message and the FAB, this
    app's module import), the app module's import alone, the core's import (torch), the node's build from
    Context.state, the handler; `flower_wait_s` is what a round's two sequential exchanges (train, then
    validation) spend outside the ClientApp processes: Flower's polls and sleeps."""
    torch.set_num_threads(1)
    from .main import run
    overrides = ["train.stop_after_block=0", f"federation.nodes={args.nodes}", *args.overrides]
    rows, smoke = [], Path(__file__).resolve().parent / "configs" / "smoke.yaml"
    with tempfile.TemporaryDirectory(prefix="f3crec-flower-bench-") as tmp:
        root = Path(tmp)
        for name in ("reference", "flower"):
            cfg = load_config(Config, smoke, [*overrides, f"federation.simulator={name}"])
            cfg = replace(cfg, federation=replace(cfg.federation, node_state_dir=str(root / "nodes")))
            started, cpu = time.perf_counter(), time.process_time()
            run(cfg, root / name)
            rows.append({"path": name if name == "reference" else "in-process grid", "round_s": _median_round_seconds(root / name),
                         "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu})
        if not args.no_deploy:
            from common import flower_ops
            trace = root / "trace.jsonl"
            os.environ["F3CREC_FLOWER_TIMING"] = str(trace)
            started, children = time.perf_counter(), os.times()
            flower_ops.deploy(Path(__file__).resolve().parent / "flower" / "app", ["f3crec", "common"], args.nodes,
                              f'partition-id={{i}} num-partitions={{n}} state-dir="{root / "nodes-deployed"}"',
                              f'overrides="{" ".join(overrides)}" run-dir="{root / "deployed"}"', "report",
                              root / "deployment", timeout=3600)
            done = os.times()
            messages = [json.loads(line) for line in trace.read_text().splitlines()]
            median = lambda key, i: statistics.median(m[key][i] for m in messages if key in m)  # noqa: E731
            phases = {f"{k}_{unit}": median(k, i) for k in ("at_entry", "app_import", "core_import", "node_build", "handler")
                      for i, unit in enumerate(("s", "cpu"))}
            round_s = _median_round_seconds(root / "deployed")
            rows.append({"path": "stock Flower deployment", "round_s": round_s, "wall_s": time.perf_counter() - started,
                         "processes_cpu_s": done.children_user + done.children_system - children.children_user
                         - children.children_system, "messages": len(messages), **phases,
                         "flower_wait_s": round_s / 2 - phases["at_entry_s"] - phases["handler_s"]})
    print(f"# f3crec Flower bench: smoke block 0, {args.nodes} nodes, one thread; load {os.getloadavg()[0]:.2f}")
    for row in rows:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--data", default=None, help="dataset name (config f3crec/configs/<data>.yaml)")
    parser.add_argument("--block-rounds", type=int, default=20, help="rounds per block of the whole run")
    parser.add_argument("--repeats", type=int, default=1, help="whole runs; the fastest is reported")
    parser.add_argument("--per-round", action="store_true", help="time rounds of each simulator instead")
    parser.add_argument("--rounds", type=int, default=3, help="--per-round/--scale: steady rounds per block "
                        "(timed after the block's first round, which is reported apart)")
    parser.add_argument("--simulators", nargs="+", default=["vectorised", "reference"])
    parser.add_argument("--clients", type=int, default=0, help="--per-round: synthetic scale test, this many clients")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--per-client", type=int, default=60)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", action="store_true", help="ms per round and peak RSS at --sizes ML-100K-shaped "
                        "client counts (synthetic, linear-time generator)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--simulator", choices=["vectorised", "compiled", "flower"], default="vectorised",
                        help="--scale: the simulator timed (flower: the in-process grid, federation.nodes nodes)")
    parser.add_argument("--reference", default=None, help="a prepared checkout of the official code: time it too, "
                        "alternating with ours (README, Speed and scale)")
    parser.add_argument("--reference-python", default=sys.executable, help="the interpreter that has its pandas")
    parser.add_argument("--compare", type=lambda text: text.split(","), default=None, metavar="SIM,SIM",
                        help="whole runs of these simulators (e.g. vectorised,compiled) side by side, alternating")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--flower", action="store_true", help="where a Flower message's seconds go instead (extra fl)")
    parser.add_argument("--nodes", type=int, default=2, help="--flower: Flower nodes")
    parser.add_argument("--no-deploy", action="store_true", help="--flower: skip the stock Flower deployment")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.flower:   # in-process grid and a 127.0.0.1 deployment beside the reference (§14)
        return {"flower": flower(args)}
    if args.data:
        args.config = str(Path(__file__).resolve().parent / "configs" / f"{args.data}.yaml")
    if not args.overrides and not args.clients and not args.data and not args.scale:
        blocks = data_root() / "f3crec-ml-100k-blocks"
        args.overrides = [f"data.blocks={blocks}"] if (blocks / "block_0.json").is_file() else []
    if args.only:
        print(json.dumps(worker(args)))
        return {}
    if args.scale:
        return scale(args)
    if args.per_round:
        return per_round(args)
    if args.compare:
        return compare(args)
    runs, refs, loads = [], [], [os.getloadavg()[0]]
    for _ in range(args.repeats):   # alternating, so both sides meet the same load
        runs.append({**whole_run(["--config", args.config, *args.overrides], args.block_rounds),
                     "torch_import_s": torch_import_seconds()})
        if args.reference:
            refs.append(reference_run(Path(args.reference), args.reference_python, args.block_rounds))
        loads.append(os.getloadavg()[0])
    best = lambda rs: {k: min(r[k] for r in rs) if k != "rounds" else rs[0][k] for k in rs[0]}  # noqa: E731
    ours, ref = best(runs), best(refs) if refs else None
    print(f"FedMF F3CRec, {args.block_rounds} rounds per block (ran {ours['rounds']}), one thread, best of "
          f"{args.repeats}, load average {min(loads):.1f}–{max(loads):.1f}:\n" + report(ours, ref))
    return {"ours": ours, "reference": ref} if ref else ours


if __name__ == "__main__":
    main()
