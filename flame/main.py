"""FLAME entry point: config -> seed -> data -> (stage 1) -> model -> fit -> evaluate -> results.json.

    python -m flame.main                                  # the paper's setting on amazon-toys (needs the data)
    python -m flame.main --config flame/configs/smoke.yaml                 # offline, seconds on CPU
    python -m flame.main --config flame/configs/amazon-toys.yaml method.name=sasrec
    python -m flame.main --resume runs/flame/amazon-toys/<run>            # continue from last.pt
    python -m flame.main --run-dir DIR [--overwrite]   # a fresh run in DIR (--overwrite: its files move aside)
    cd flame && python main.py --config configs/smoke.yaml
method.name = flame (default) | sasrec (B1) | ensemble (B2) | mutual (B3), docs/method.md §11.
Data parallel: `torchrun --nproc-per-node 2 -m flame.main <the same arguments>` (or `accelerate launch`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # script mode: `cd flame && python main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "flame"

from common.checkpoints import save_checkpoint
from common.cli import run_cli
from common.config import config_to_dict, parse_cli
from common.runs import checkpoint_identity, run_name, start_run, write_results
from common.utils import seed_everything

from . import parallel, stage1
from .checks import check_fits, check_resume_folder, preflight
from .config import Config
from .data import build_data, load_raw
from .ensemble import build_model
from .evaluate import convergence, evaluate_ensemble, final_metrics, print_table, results_metrics
from .fast import check_graph_options, keep_freed_memory
from .model import sasrec_state
from .train import fit, make_optimizer, setup_device

_resume_option = argparse.ArgumentParser(add_help=False)
_resume_option.add_argument("--resume", type=Path)


def recorded_frozen(run_dir: Path) -> tuple[Optional[Path], Optional[Path]] | None:
    """The frozen net (and its stage-1 folder) a resumed run recorded in its last.pt, or None when it
    recorded none: a resume builds on the same net wherever today's run root is (§6)."""
    inputs = (checkpoint_identity(run_dir) or {}).get("inputs") or {}
    if not inputs.get("frozen"):
        return None
    frozen = Path(inputs["frozen"])
    if not frozen.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: the frozen net this run was started on, {frozen} "
                                "(recorded in its last.pt), is missing; restore it, or start a new run")
    return frozen, Path(inputs["stage1"]) if inputs.get("stage1") else None


def run(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False, overwrite: bool = False) -> dict:
    """One run of cfg.method.name, after the stage-1 nets it builds on (stage1.build); returns the
    results dict also written to results.json.
    `overwrite`: a fresh run may use a `run_dir` that holds files (they move into previous-<time>/)."""
    device, is_main = setup_device(cfg.train.device)
    check_graph_options(cfg.train, cfg.flame if cfg.method.name in ("flame", "mutual") else None, device)
    preflight(cfg, run_dir, resume, overwrite)  # run folder, given files, resumed checkpoint: before expensive work
    recorded = recorded_frozen(Path(run_dir)) if resume and run_dir is not None else None
    # the shipped weights are missing: one line, now
    frozen, stage1_dir = recorded if recorded is not None else stage1.frozen_checkpoint(cfg)
    data = build_data(load_raw(cfg.data), cfg.data)
    if recorded is None:  # the SASRecs this run builds on; a Ctrl-C there names the user's run, not stage 1's
        again = (f"resume with --resume {run_dir}" if resume else f"run the same command (--run-dir {run_dir}) again"
                 if run_dir is not None else "run the same command again")
        stage1.build(cfg, again, is_main, train_stage1)
    return train_and_test(cfg, data, frozen, stage1_dir, run_dir, resume, overwrite, device, is_main)


def train_stage1(sub: Config, folder: Path) -> dict:
    """Stage 1's trainer (§6): the plain SASRec `sub` in its cache folder, continued from its last.pt
    when there is one (the folder is the cache's own: an attempt stopped before its first checkpoint
    moves aside)."""
    resume = (folder / "last.pt").exists()
    device, is_main = setup_device(sub.train.device)
    check_graph_options(sub.train, None, device)
    preflight(sub, folder, resume, True)
    data = build_data(load_raw(sub.data), sub.data)
    return train_and_test(sub, data, None, None, folder, resume, True, device, is_main)


def train_and_test(cfg: Config, data, frozen: Optional[Path], stage1_dir: Optional[Path], run_dir: Optional[Path],
                   resume: bool, overwrite: bool, device, is_main: bool) -> dict:
    """Model -> run folder -> fit (or B2's evaluation) -> test -> results.json, on the frozen net
    `frozen` (from stage-1 folder `stage1_dir`) where the method has one."""
    method = cfg.method.name
    members = stage1.ensemble_members(cfg)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    # built before the run folder exists: a checkpoint of another shape fails without leaving one
    model = build_model(cfg, data.num_items, frozen, [path for path, _ in members]).to(device)
    if resume and run_dir is not None and (Path(run_dir) / "last.pt").exists():
        check_fits(model, Path(run_dir) / "last.pt")
    tag = run_name(method, cfg.train.seed)
    inputs = {"frozen": os.path.abspath(frozen), "stage1": os.path.abspath(stage1_dir) if stage1_dir else None} \
        if frozen else None  # recorded in last.pt: a resume builds on this net, whatever its run root
    run_dir = (start_run(cfg, "flame", cfg.data.name, tag, run_dir, root=cfg.run_root, resume=resume,
                         overwrite=overwrite, inputs=inputs) if is_main else run_dir)
    run_dir = Path(parallel.broadcast(str(run_dir)))  # every rank uses rank 0's run folder
    data.training_to(device)  # the whole training set on the device (no loader)
    if is_main:
        tc = cfg.train
        print(f"plan: {'evaluate' if method == 'ensemble' else 'train'} {method} on {cfg.data.name} "
              f"({data.num_users:,} users, {data.num_items:,} items, {len(data.train_target):,} training samples)"
              + ("" if method == "ensemble" else
                 f": up to {tc.max_epochs} epochs of {-(-len(data.train_target) // tc.batch_size):,} steps "
                 f"(batch {tc.batch_size}), validation every epoch, stop after {tc.patience} without gain")
              + "; then one test. Time: estimated from the first step, below")
    if method == "ensemble":
        summary = evaluate_ensemble(model, data, members, cfg, device)
    else:
        summary = fit(model, data, make_optimizer(model, cfg.train), cfg, run_dir, device, resume, is_main)
    if method == "sasrec" and is_main:  # the 36-key layout of §5: usable as a frozen net
        save_checkpoint(run_dir / "frozen.pt", sasrec_state(model))
    results = {"method": method, "dataset": cfg.data.name, "seed": cfg.train.seed, "select": cfg.train.select,
               **summary, **final_metrics(model, data, cfg, device), "num_users": data.num_users,
               "num_items": data.num_items, "train_samples": int(len(data.train_target)),
               "frozen": str(frozen) if frozen else None, "config": config_to_dict(cfg)}
    results["metrics"] = results_metrics(results)
    if is_main:
        if method in ("flame", "mutual"):  # measured against B1 (§12); B2 trains nothing here
            results["convergence"] = convergence(cfg, run_dir, results["test"]["reference"]["NDCG@20"], stage1_dir)
        results = write_results(run_dir, results)
        print_table(results)
        print(f"run folder: {run_dir}")
    parallel.barrier()  # other ranks may read frozen.pt / results.json of this run next
    return {**results, "run_dir": str(run_dir)}


def main(argv: Optional[list[str]] = None) -> dict:
    resumed, _ = _resume_option.parse_known_args(argv)
    if resumed.resume is not None:  # before parse_cli reads its config.yaml: a missing, foreign or old
        check_resume_folder(resumed.resume)  # folder gets a one-line explanation
    cfg, options = parse_cli(argv, Config)
    keep_freed_memory()  # freed tensors stay in the process: no page faults re-zeroing them every step
    return run(cfg, options.resume or options.run_dir, resume=options.resume is not None, overwrite=options.overwrite)


if __name__ == "__main__":
    run_cli(main)
