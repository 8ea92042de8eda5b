"""Throughput of SASRec (B1), FLAME and optionally B3 on the available device (§10 of docs/method.md).

    python -m flame.bench --data amazon-toys [key=value ...] [--steps 20] [--models sasrec flame mutual]
    python -m flame.bench --data amazon-toys --variants eager compile graphs bf16 cuda-graph  # one table
    (key=value are config overrides, e.g. train.bf16=true train.device=cuda; they go before a
    list option such as --models, or after `--`)
A bounded number of training steps is timed (after warm-up) and extrapolated to one epoch, so the
whole benchmark takes about a minute on CPU. The frozen network is randomly initialised here: its
values do not change the cost. Peak memory is the CUDA allocator peak per model, or on CPU the
process's peak resident set so far (monotone across models, so read it as an upper bound).
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import time
from pathlib import Path

import torch

from common.config import load_config
from common.utils import seed_everything

from .config import Config
from .data import build_data, load_raw
from .ensemble import build_model
from .evaluate import evaluate
from .fast import check_graph_options, keep_freed_memory
from .train import make_optimizer, make_step, setup_device, synchronize, train_one_epoch

PAPER_DIR = Path(__file__).resolve().parent


def bench_model(cfg: Config, data, device: torch.device, steps: int, eval_users: int) -> dict:
    """Time `steps` training steps of cfg.method.name and the evaluation of `eval_users` validation
    users. FLAME's and B3's second network stays randomly initialised: its values do not change the cost."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg, data.num_items).to(device)
    optimizer = make_optimizer(model, cfg.train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch = cfg.train.batch_size
    step = make_step(model, data, optimizer, cfg.train, device)  # as fit() does
    for _ in range(3):  # warm-up (the compiled graph or the CUDA graph is built here), then the timed steps
        train_one_epoch(model, data, step, batch, 1.0, device, max_steps=2)
    cpu = time.process_time()
    stats = train_one_epoch(model, data, step, batch, 1.0, device, max_steps=steps)
    cpu_ms = 1000 * (time.process_time() - cpu) / stats["steps"]
    samples_per_s = stats["samples"] / stats["train_seconds"]
    users = slice(0, eval_users)
    synchronize(device)
    start = time.perf_counter()
    evaluate(model, data.valid_seq[users], data.valid_target[users], data.valid_hist[users], cfg.eval.seen_mask,
             cfg.eval.rank, cfg.eval.batch_size, device)
    synchronize(device)
    eval_seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": cfg.method.name, "step_ms": 1000 * stats["train_seconds"] / stats["steps"], "cpu_ms": cpu_ms,
            "samples_per_s": samples_per_s, "epoch_s": len(data.train_target) / samples_per_s,
            "eval_users_per_s": min(eval_users, len(data.valid_target)) / eval_seconds, "peak_mib": peak_mib}


def bench_stack(cfg: Config, data, device: torch.device, runs: int, steps: int) -> dict:
    """Samples/s of `runs` stacked runs of cfg.method.name (flame/stack.py) trained as one program: the
    table's step (eager on the CPU with per-run dropout generators; the CUDA-graph step under train.cuda_graph)."""
    from .fast import GraphStep
    from .stack import StackedFLAME, StackedSASRec

    seed_everything(cfg.train.seed)
    models = [build_model(cfg, data.num_items) for _ in range(runs)]
    net = (StackedSASRec.from_nets(models) if cfg.method.name == "sasrec" else StackedFLAME.from_models(models))
    net = net.to(device).train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.train.lr,
                                 capturable=cfg.train.cuda_graph)
    generators = [torch.Generator().manual_seed(k) for k in range(runs)]
    batch = cfg.train.batch_size
    lam = torch.full((runs,), 0.5, device=device)
    graph = GraphStep(net, data, optimizer, batch, device, runs=runs) if cfg.train.cuda_graph else None

    def one() -> None:
        index = torch.stack([torch.randint(0, len(data.train_target), (batch,), generator=g) for g in generators])
        index = index.to(device)
        if graph is not None:
            graph(index, lam)
            return
        optimizer.zero_grad(set_to_none=True)
        terms = net.loss_terms({"seq": data.train_seq[index], "target": data.train_target[index], "lam": lam},
                               generators)
        terms["loss"].sum().backward()
        optimizer.step()

    for _ in range(5 if graph is not None else 2):  # warm-up (and the capture)
        one()
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        one()
    synchronize(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"model": cfg.method.name, "runs": runs, "step_ms": 1000 * seconds / steps, "cpu_ms": 1000 * cpu / steps,
            "samples_per_s": runs * batch * steps / seconds, "cpu_samples_per_s": runs * batch * steps / cpu}


# Speed variants: train.* values applied on top of the command line's.
VARIANTS = {"eager": {}, "compile": {"compile": True},
            "graphs": {"compile": True, "compile_mode": "reduce-overhead"}, "bf16": {"bf16": True},
            "compile-bf16": {"compile": True, "bf16": True},
            "cuda-graph": {"cuda_graph": True}, "cuda-graph-bf16": {"cuda_graph": True, "bf16": True}}
# The reference implementation's time per FLAME epoch on an H200 at batch 256 with four runs on the GPU
# at once (quoted in flame/README.md, not measured by this code).
REFERENCE_EPOCH_S = {"amazon-toys": 17.0, "amazon-beauty": 20.4}


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """The options and the base config of a benchmark command line (what a dry run checks)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="dataset name (default: synthetic)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--eval-users", type=int, default=4096, help="validation users to score")
    parser.add_argument("--models", nargs="+", default=["sasrec", "flame"], choices=["sasrec", "flame", "mutual"])
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=list(VARIANTS),
                        help="speed options to time one after the other (default: eager fp32 only)")
    parser.add_argument("--stack", type=int, nargs="*", default=[], metavar="K",
                        help="also time K stacked runs of each model as one program (flame.table's step), e.g. 1 4 16")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.bf16=true")
    args = parser.parse_intermixed_args(argv)
    config = PAPER_DIR / "configs" / f"{args.data}.yaml"
    base = load_config(Config, config if config.is_file() else None, [f"data.name={args.data}", *args.overrides])
    return args, base


def main(argv: list[str] | None = None) -> list[dict]:
    args, base = parse(argv)
    keep_freed_memory()  # as a training run does (flame.main)
    rows, data = [], None
    for variant in args.variants:
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, **VARIANTS[variant]))
        device, _ = setup_device(cfg.train.device)
        if data is None:
            data = build_data(load_raw(cfg.data), cfg.data)
            data.training_to(device)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
                f"cpu ({torch.get_num_threads()} threads)"
            print(f"{args.data}: {len(data.train_target)} samples, {data.num_items} items, batch "
                  f"{cfg.train.batch_size}, {args.steps} steps timed, device {name}")
        if cfg.train.cuda_graph and device.type != "cuda":
            print(f"variant {variant}: skipped, CUDA graphs need a CUDA device")
            continue
        for kind in args.models:
            check_graph_options(cfg.train, cfg.flame if kind != "sasrec" else None, device)
            method = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=kind))
            rows.append({"variant": variant, **bench_model(method, data, device, args.steps, args.eval_users)})
    # The yardstick is a GPU figure: a ratio against a CPU epoch would mean nothing.
    reference = REFERENCE_EPOCH_S.get(args.data) if device.type == "cuda" else None
    print(f"backbone.kernels={base.backbone.kernels}")
    print("| model | variant | ms/step | CPU ms/step | samples/s | s/epoch (extrapolated) | eval users/s | peak MiB |"
          + (" reference FLAME s/epoch ÷ this |" if reference else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if reference else ""))
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | {r['samples_per_s']:.0f} | "
              f"{r['epoch_s']:.1f} | {r['eval_users_per_s']:.0f} | {r['peak_mib']:.0f} |"
              + (f" {reference / r['epoch_s']:.1f}× |" if reference else ""))
    if reference:
        print(f"reference: the authors' code, {reference:.0f} s per FLAME epoch on an H200 with four runs sharing it")
    if args.stack:
        stacked = []
        for kind in args.models:
            if kind == "mutual":
                continue
            method = dataclasses.replace(base, method=dataclasses.replace(base.method, name=kind))
            for runs in args.stack:
                stacked.append(bench_stack(method, data, device, runs, args.steps))
        print("\n| model | stacked runs K | ms/step (K runs) | CPU ms/step | samples/s (all runs) | CPU samples/s |")
        print("|---|---|---|---|---|---|")
        for r in stacked:
            print(f"| {r['model']} | {r['runs']} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | {r['samples_per_s']:.0f} | "
                  f"{r['cpu_samples_per_s']:.0f} |")
        rows += stacked
    return rows


if __name__ == "__main__":
    main()
