"""Stage 1 (§6): the plain SASRecs a run needs before it can start, and where they are cached.

    build(cfg, again, is_main, train)           # the SASRec runs not finished yet, each trained by
                                                # train(sub, folder) under the folder's lock
    frozen, stage1 = frozen_checkpoint(cfg)     # FLAME's frozen net (§5, §6)
    members = ensemble_members(cfg)             # B2's nets (§11)

A stage-1 folder is keyed by every config section that changes its result and by the content of the
raw data file, so a changed setting or a replaced file trains a new net instead of reusing a stale one. A folder is built by one process at a time (an
exclusive `fcntl.flock` on `<folder>.lock` beside it, released when the builder ends, even by kill -9):
a second run needing the same net waits, then reuses it, or resumes it if the builder was killed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from common.config import config_to_dict
from common.io import data_root, exclusive, load_json
from common.prepare import find_raw, raw_digest
from common.runs import default_run_root, interrupt_hint

from . import parallel
from .config import Config, FlameConfig, MethodConfig


def stage1_run(cfg: Config, seed: int) -> tuple[Config, Path]:
    """Config and cache folder of the plain SASRec with `seed`: keyed by data, backbone, train (without
    the device and the tracker: neither changes its numbers) and eval, under <run root>/flame/<dataset>/stage1/seed<seed>_<hash>."""
    train = dataclasses.replace(cfg.train, seed=seed, sasrec_run=None)
    sub = dataclasses.replace(cfg, method=MethodConfig(name="sasrec"), train=train, flame=FlameConfig())
    keyed = {k: v for k, v in config_to_dict(sub).items() if k in ("data", "backbone", "train", "eval")}
    keyed["train"] = {k: v for k, v in keyed["train"].items() if k not in ("device", "track")}
    keyed["raw_sha256"] = _raw_digest(cfg)
    key = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.run_root).expanduser() if cfg.run_root is not None else default_run_root()
    return sub, root / "flame" / cfg.data.name / "stage1" / f"seed{seed}_{key}"


def _raw_digest(cfg: Config) -> Optional[str]:
    """sha256 of the dataset's raw file (None for generated data, or when the file is not there yet:
    then loading the data fails with its own message before any net is trained)."""
    if cfg.data.name == "synthetic":
        return None
    try:
        return raw_digest(cfg.data.name, find_raw(cfg.data.name, cfg.data.root))
    except FileNotFoundError:
        return None


def finished(folder: Path) -> bool:
    """A stage-1 folder is usable once its last two files exist (results.json is written last)."""
    return (folder / "results.json").exists() and (folder / "frozen.pt").exists()


@contextlib.contextmanager
def claimed(folder: Path, lock: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of stage-1 `folder` (waiting for another process that holds it).
    lock=False: a data-parallel rank other than 0, which follows rank 0's decision instead."""
    if not lock:
        yield
        return
    with exclusive(folder, f"[stage 1] {folder} is being trained by another run: waiting for it"):
        yield


def _seeds(cfg: Config) -> list[int]:
    """The seeds of the stage-1 runs this run uses."""
    name, fc = cfg.method.name, cfg.flame
    if name == "flame" and not fc.frozen and fc.frozen_source == "own":
        return [cfg.train.seed]
    if name == "ensemble" and not cfg.method.ensemble_members:
        return [cfg.train.seed + i for i in range(cfg.method.ensemble_n)]
    return []


def pending(cfg: Config) -> list[tuple[Config, Path]]:
    """The stage-1 runs this run needs that are not finished (an unfinished folder is resumed)."""
    runs = [stage1_run(cfg, seed) for seed in _seeds(cfg)]
    for _, folder in runs:
        print(f"[stage 1] {'reusing' if finished(folder) else 'needs SASRec'} {folder}")
    return [(sub, folder) for sub, folder in runs if not finished(folder)]


def build(cfg: Config, again: str, is_main: bool, train: Callable[[Config, Path], Any]) -> None:
    """Stage 1 as one step: every SASRec run `cfg` needs and no earlier run finished is trained by
    train(sub, folder) (flame.main.train_stage1), one builder per folder across processes (its lock),
    rank 0 deciding for every data-parallel rank. `again`: what the user does after a Ctrl-C here
    (it names the user's run, not the stage-1 folder)."""
    for sub, folder in pending(cfg):
        hint = f"stopped in stage 1 ({folder}): {again}; stage 1 continues from its last checkpoint"
        with claimed(folder, lock=is_main), interrupt_hint(hint):  # one builder per folder
            if parallel.broadcast(not finished(folder)):  # another run may have finished it while we waited
                train(sub, folder)


def frozen_checkpoint(cfg: Config) -> tuple[Optional[Path], Optional[Path]]:
    """(frozen checkpoint, stage-1 folder or None) of a FLAME run, or of a SASRec run seeded from
    flame.frozen; (None, None) for the other methods. flame.frozen, else the shipped weights, else stage 1."""
    name, fc = cfg.method.name, cfg.flame
    if fc.frozen and name in ("flame", "sasrec"):
        return Path(fc.frozen), None
    if name != "flame":
        return None, None
    if fc.frozen_source == "shipped":
        path = data_root(cfg.data.root) / "flame" / "frozen_weights" / f"{cfg.data.name}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"shipped frozen weights not found: {path} (use flame.frozen_source=own "
                                    f"to pretrain them, or the offline smoke config --config flame/configs/smoke.yaml)")
        return path, None
    _, folder = stage1_run(cfg, cfg.train.seed)
    return folder / "frozen.pt", folder


def ensemble_members(cfg: Config) -> list[tuple[Path, Optional[dict]]]:
    """B2's members (§11) as (36-key checkpoint, results.json or None): method.ensemble_members when
    given, else the stage-1 runs with seeds seed, seed+1, ... ([] for the other methods)."""
    if cfg.method.name != "ensemble":
        return []
    if not cfg.method.ensemble_members:
        folders = [stage1_run(cfg, seed)[1] for seed in _seeds(cfg)]
        return [(folder / "frozen.pt", load_json(folder / "results.json")) for folder in folders]
    members = []
    for entry in map(Path, cfg.method.ensemble_members):
        if entry.is_dir():
            record = entry / "results.json"
            members.append((entry / "frozen.pt", load_json(record) if record.is_file() else None))
        elif entry.is_file():
            members.append((entry, None))  # a bare checkpoint: its training record is unknown
        else:
            raise FileNotFoundError(f"method.ensemble_members: {entry} is neither a run folder nor a checkpoint")
    if len(members) < 2:
        raise ValueError(f"method.ensemble_members: an ensemble needs at least 2 members, got {len(members)}")
    return members
