"""Throughput of SASRec (B1), FLAME and optionally B3 on the available device (spec §10).

    python -m flame.bench --data amazon-toys [--steps 20] [--models sasrec flame mutual] [key=value ...]
    python -m flame.bench --data amazon-toys --variants eager compile graphs bf16 cuda-graph  # one table
    (key=value are config overrides, e.g. train.bf16=true train.device=cuda)
A bounded number of training steps is timed (after warm-up) and extrapolated to one epoch, so the
whole benchmark takes about a minute on CPU. The frozen network is randomly initialised here: its
values do not change the cost. Peak memory is the CUDA allocator peak per model, or on CPU the
process's peak resident set so far (monotone across models, so read it as an upper bound).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `cd flame && python bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "flame"

import torch  # noqa: E402

from common.config import load_config  # noqa: E402
from common.utils import seed_everything  # noqa: E402

from .data import build_data, load_raw  # noqa: E402
from .ensemble import FLAME  # noqa: E402
from .main import PAPER_DIR, Config, setup_device  # noqa: E402
from .model import SASRec  # noqa: E402
from .train import GraphStep, check_graph_options, compiled_loss, evaluate, make_optimizer, synchronize, \
    train_one_epoch  # noqa: E402


def build(cfg: Config, kind: str, num_items: int) -> torch.nn.Module:
    learnable = SASRec(cfg.backbone, num_items)
    if kind == "sasrec":
        return learnable
    return FLAME(learnable, SASRec(cfg.backbone, num_items), cfg.flame, mutual=kind == "mutual",
                 ml_loss=cfg.baselines.ml_loss)


def bench_model(cfg: Config, kind: str, data, device: torch.device, steps: int, eval_users: int) -> dict:
    """Time `steps` training steps and the evaluation of `eval_users` validation users."""
    seed_everything(cfg.train.seed)
    model = build(cfg, kind, data.num_items).to(device)
    optimizer = make_optimizer(model, cfg.train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch = cfg.train.batch_size
    loss_fn = compiled_loss(model, cfg.train)  # as fit() does
    graph = GraphStep(model, data, optimizer, batch, device, cfg.train.bf16) if cfg.train.cuda_graph else None
    for _ in range(3):  # warm-up (the compiled graph or the CUDA graph is built here), then the timed steps
        train_one_epoch(model, data, optimizer, batch, 1.0, device, cfg.train.bf16, loss_fn, max_steps=2,
                        graph=graph)
    stats = train_one_epoch(model, data, optimizer, batch, 1.0, device, cfg.train.bf16, loss_fn, max_steps=steps,
                            graph=graph)
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
    return {"model": kind, "step_ms": 1000 * stats["train_seconds"] / stats["steps"],
            "samples_per_s": samples_per_s, "epoch_s": len(data.train_target) / samples_per_s,
            "eval_users_per_s": min(eval_users, len(data.valid_target)) / eval_seconds, "peak_mib": peak_mib}


# Speed variants: config overrides applied on top of the command line's.
VARIANTS = {"eager": [], "compile": ["train.compile=true"],
            "graphs": ["train.compile=true", "train.compile_mode=reduce-overhead"], "bf16": ["train.bf16=true"],
            "compile-bf16": ["train.compile=true", "train.bf16=true"],
            "cuda-graph": ["train.cuda_graph=true"], "cuda-graph-bf16": ["train.cuda_graph=true", "train.bf16=true"]}
# The reference implementation's FLAME epoch on an H200 at batch 256, four runs sharing the GPU (issue 3).
REFERENCE_EPOCH_S = {"amazon-toys": 17.0, "amazon-beauty": 20.0}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="dataset name (default: synthetic)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--eval-users", type=int, default=4096, help="validation users to score")
    parser.add_argument("--models", nargs="+", default=["sasrec", "flame"], choices=["sasrec", "flame", "mutual"])
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=list(VARIANTS),
                        help="speed options to time one after the other (default: eager fp32 only)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides (e.g. train.bf16=true) may follow --models: split them off first
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    config = PAPER_DIR / "configs" / f"{args.data}.yaml"
    rows, data = [], None
    for variant in args.variants:
        cfg = load_config(Config, config if config.is_file() else None,
                          [f"data.dataset={args.data}", *args.overrides, *VARIANTS[variant]])
        cfg.backbone.max_len = cfg.data.max_len
        device, _ = setup_device(cfg)
        if data is None:
            data = build_data(load_raw(cfg.data), cfg.data)
            data.train_seq, data.train_target = data.train_seq.to(device), data.train_target.to(device)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
                f"cpu ({torch.get_num_threads()} threads)"
            print(f"{args.data}: {len(data.train_target)} samples, {data.num_items} items, batch "
                  f"{cfg.train.batch_size}, {args.steps} steps timed, device {name}")
        if cfg.train.cuda_graph and device.type != "cuda":
            print(f"variant {variant}: skipped, CUDA graphs need a CUDA device")
            continue
        for kind in args.models:
            check_graph_options(cfg.train, cfg.flame if kind != "sasrec" else None, device)
            rows.append({"variant": variant, **bench_model(cfg, kind, data, device, args.steps, args.eval_users)})
    # The yardstick is a GPU figure: a ratio against a CPU epoch would mean nothing.
    reference = REFERENCE_EPOCH_S.get(args.data) if device.type == "cuda" else None
    print("| model | variant | ms/step | samples/s | s/epoch (extrapolated) | eval users/s | peak MiB |"
          + (" reference FLAME s/epoch ÷ this |" if reference else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if reference else ""))
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['step_ms']:.1f} | {r['samples_per_s']:.0f} | {r['epoch_s']:.1f} | "
              f"{r['eval_users_per_s']:.0f} | {r['peak_mib']:.0f} |"
              + (f" {reference / r['epoch_s']:.1f}× |" if reference else ""))
    if reference:
        print(f"reference: the authors' code, {reference:.0f} s per FLAME epoch on an H200 with four runs sharing it")
    return rows


if __name__ == "__main__":
    main()
