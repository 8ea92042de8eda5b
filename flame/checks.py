"""What can be checked before a run reads its data or trains anything: the run folder, the files it
builds on, the folder it resumes. Every failure is one line naming the file (a user error, exit 2).

    check_resume_folder(path)            # before the CLI reads that folder's config.yaml
    preflight(cfg, run_dir, resume)      # before data, stage 1 and training
    ckpt = read_checkpoint(path, KEYS)   # common.checkpoints.load_checkpoint + the keys a FLAME file must hold
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
import yaml

from common.checkpoints import load_checkpoint
from common.io import check_writable
from common.config import ConfigError
from common.run_folder import refused_folder
from common.runs import (check_resume_folder as common_check_resume_folder, checkpoint_identity, default_run_root,
                         paper_of as logged_paper, saved_config)

from .config import Config, check_config, check_saved_config

# The fields fit() writes into last.pt (train.py::_save_last); a file without them is not a FLAME checkpoint.
LAST_KEYS = ("model", "optimizer", "epoch", "best_val", "best_epoch", "train_time", "time_to_best", "rng")
# Top-level config sections that only the other papers of this repository have.
FOREIGN_SECTIONS = {"federation": "f3crec", "quirks": "f3crec", "wpcl": "vlm2rec", "crtr": "vlm2rec",
                    "seqrec": "vlm2rec", "loss": "vlm2rec"}


def read_checkpoint(path: Path, keys: Iterable[str] = (), what: str = "checkpoint") -> dict:
    """common.checkpoints.load_checkpoint (weights_only; a truncated, pickled or foreign file is one ValueError line
    naming it) of a checkpoint dict that must hold `keys`; a missing file is one line naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    state = load_checkpoint(path)
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{path}: not a FLAME checkpoint (no {', '.join(missing)})")
    return state


def paper_of(run_dir: Path) -> Optional[str]:
    """The paper that wrote a run folder: the `[paper] run dir` line of its log.txt, else its config's
    sections; None when neither tells."""
    logged = logged_paper(run_dir)
    if logged is not None:
        return logged
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            saved = yaml.safe_load(config.read_text())
        except yaml.YAMLError:
            return None
        if isinstance(saved, dict):
            others = {FOREIGN_SECTIONS[key] for key in saved if key in FOREIGN_SECTIONS}
            if len(others) == 1:
                return others.pop()
    return None


def check_resume_folder(run_dir: Path) -> None:
    """--resume RUN_DIR names a FLAME run folder with a readable last.pt (checked before its config is read)."""
    run_dir = common_check_resume_folder(run_dir, "flame", "a FLAME", writer=paper_of)
    check_saved_config(run_dir)
    if not (run_dir / "last.pt").exists():
        raise FileNotFoundError(f"nothing to resume: {run_dir / 'last.pt'} does not exist")
    read_checkpoint(run_dir / "last.pt", LAST_KEYS)  # a foreign or damaged file: its own line first
    checkpoint_identity(run_dir)  # a last.pt of another run (another seed's, copied in) is refused


def _writable_target(folder: Path, what: str) -> None:
    """`folder` exists as a writable directory, or can be created: its nearest existing ancestor is a
    directory where a probe file can be written. Creates no folder."""
    check_writable(folder, what, "--run-dir, run_root or $REPRO_RUNS")


def _run_parent(cfg: Config) -> Path:
    root = Path(cfg.run_root).expanduser() if cfg.run_root is not None else default_run_root()
    return root / "flame" / cfg.data.name


def preflight(cfg: Config, run_dir: Optional[Path], resume: bool, overwrite: bool = False) -> None:
    """Everything run() can check before reading data or training: the key constraints, the run
    folder (and the stage-1 folders beside it), the files given by flame.frozen,
    method.ensemble_members and train.sasrec_run, and the checkpoint a resume starts from."""
    check_config(cfg)
    _writable_target(Path(run_dir) if run_dir is not None else _run_parent(cfg), "run folder")
    if run_dir is not None and not resume:
        refused_folder(Path(run_dir), overwrite)  # a folder with records, or another run's: one line, now
    fc, method = cfg.flame, cfg.method
    if fc.frozen and method.name in ("flame", "sasrec"):
        state = read_checkpoint(Path(fc.frozen), what="flame.frozen: frozen checkpoint")
        if not isinstance(state, dict) or "item_emb.weight" not in state:
            raise ValueError(f"flame.frozen={fc.frozen}: not a SASRec state dict in the 36-key layout (§5)")
    if method.name == "ensemble":
        for entry in map(Path, method.ensemble_members):
            if not (entry.is_dir() or entry.is_file()):
                raise FileNotFoundError(f"method.ensemble_members: {entry} is neither a run folder nor a checkpoint")
        if method.ensemble_members and len(method.ensemble_members) < 2:
            raise ValueError(f"method.ensemble_members: an ensemble needs at least 2 members, "
                             f"got {len(method.ensemble_members)}")
    if cfg.train.sasrec_run and method.name in ("flame", "mutual"):
        record = Path(cfg.train.sasrec_run) / "results.json"
        if not record.is_file():
            raise FileNotFoundError(f"train.sasrec_run={cfg.train.sasrec_run}: not a finished run (no results.json)")
    if resume and run_dir is not None and (Path(run_dir) / "last.pt").exists():
        read_checkpoint(Path(run_dir) / "last.pt", LAST_KEYS)
    if resume and run_dir is not None:
        check_more_epochs(cfg, Path(run_dir))


def check_more_epochs(cfg: Config, run_dir: Path) -> None:
    """A resume may raise train.max_epochs (Config.RESUME_FREE) only where it moves nothing but the stop:
    FLAME's and B3's λ horizon is max_epochs unless flame.lambda_horizon is set (quirk 10)."""
    saved = saved_config(run_dir).get("train", {}).get("max_epochs")
    if saved is None or saved == cfg.train.max_epochs:
        return
    if cfg.method.name in ("flame", "mutual") and not cfg.flame.lambda_horizon:
        raise ConfigError(f"--resume {run_dir}: train.max_epochs={cfg.train.max_epochs} (the run has {saved}) would "
                          "move λ's horizon, which is max_epochs while flame.lambda_horizon is not set (quirk 10): "
                          "start a new run for more epochs")


def check_fits(model: torch.nn.Module, last: Path) -> None:
    """The network saved in `last` (a resumed last.pt) loads into `model`: checked before the run folder
    is touched, so a resume with another network or method leaves the folder as it was."""
    try:
        model.load_state_dict(read_checkpoint(last, LAST_KEYS)["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{last} does not fit this run's network ({first[:160]})") from None
