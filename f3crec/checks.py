"""What a run can check before it reads data or trains anything: the rules between keys, the run folder,
the base-block cache folder, the folder it resumes and that folder's last.pt. Every failure is one line
naming the key or the file (a user error, exit 2), raised before anything is written.

    check_resume_folder(path)          # main: before the CLI reads that folder's config.yaml
    preflight(cfg, run_dir, resume)    # run: before data, the base block and training
    check_blocks(cfg, blocks)          # run: the keys that depend on the data, before the run folder
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from common.checkpoints import load_checkpoint
from common.config import ConfigError, config_to_dict, flatten
from common.io import check_writable
from common.run_folder import refused_folder
from common.runs import (check_resume_folder as common_check_resume_folder, checkpoint_identity, default_run_root,
                         paper_of as logged_paper)
from common.utils import get_device

from .config import Config, base_cache_dir, check_config, method_flags

# The fields fit() writes into last.pt (train.py::fit); a file without them is not an F3CRec checkpoint.
LAST_KEYS = ("sim", "rows", "info", "block", "config")
# Top-level config sections that only the other papers of this repository have.
FOREIGN_SECTIONS = {"flame": "flame", "wpcl": "vlm2rec", "crtr": "vlm2rec", "seqrec": "vlm2rec",
                    "loss": "vlm2rec", "zero_shot": "vlm2rec", "tag": "vlm2rec"}
# Keys a resume may change: they decide where and how fast a run goes, not its numbers. Every other key
# must equal the resumed run's, or the records would mix two runs (§8: one checkpoint per block boundary).
RESUME_FREE = set(Config.RESUME_FREE)


def paper_of(run_dir: Path) -> Optional[str]:
    """The paper that wrote a run folder: the `[paper] run dir` line of its log.txt, else its config's
    sections; None when neither tells."""
    logged = logged_paper(run_dir)
    if logged is not None:
        return logged
    saved = _saved_config(run_dir, strict=False)
    others = {FOREIGN_SECTIONS[key] for key in saved if key in FOREIGN_SECTIONS}
    return others.pop() if len(others) == 1 else None


def _saved_config(run_dir: Path, strict: bool = True) -> dict:
    """The run folder's config.yaml as a mapping; strict: an unreadable one is a one-line error."""
    path = run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError as err:
        if not strict:
            return {}
        raise ValueError(f"{path}: not readable YAML ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(saved, dict):
        if not strict:
            return {}
        raise ValueError(f"{path}: not a config mapping; --resume takes a folder that an F3CRec run wrote")
    return saved or {}


def check_resume_folder(run_dir: Path) -> dict:
    """--resume RUN_DIR names an F3CRec run folder with a readable last.pt; returns that checkpoint.
    Checked before the CLI reads the folder's config.yaml, so an old or foreign folder gets its own line."""
    run_dir = common_check_resume_folder(run_dir, "f3crec", "an F3CRec", writer=paper_of)
    if "model" in _saved_config(run_dir):
        raise ConfigError(f"{run_dir} was written with config keys model.* (and method.target_scores); this "
                          "version names them backbone.* (model.backbone -> backbone.name, model.emb_init / "
                          "model.private_init_round0 -> quirks.*) — rerun, or edit its config.yaml")
    last = run_dir / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no last.pt, the run stopped before block 0 ended "
                                "(nothing to resume); start the run again")
    ckpt = load_checkpoint(last)     # truncated or not a torch file: one ValueError line naming it
    missing = [key for key in LAST_KEYS if key not in ckpt]
    if missing:
        raise ValueError(f"{last}: not an F3CRec checkpoint (no {', '.join(missing)})")
    checkpoint_identity(run_dir)     # a last.pt of another run (another seed's, copied in) is refused
    return ckpt


def check_same_run(cfg: Config, run_dir: Path) -> None:
    """The resumed run's keys that decide its numbers equal this command's (RESUME_FREE aside); the
    simulator is one of them (a Flower run's last.pt keeps no client state: the nodes do, §14)."""
    saved, now = flatten(_saved_config(run_dir)), flatten(config_to_dict(cfg))
    changed = [key for key in sorted(set(saved) | set(now))
               if key not in RESUME_FREE and saved.get(key, now.get(key)) != now.get(key)]
    if changed:
        key = changed[0]
        raise ConfigError(f"--resume {run_dir}: its run has {key}={saved.get(key)!r}, this command asks for "
                          f"{now.get(key)!r}" + (f" (and {len(changed) - 1} more key(s))" if len(changed) > 1 else "")
                          + "; a resume continues the same run: start a new run for another setting")


def _writable_target(folder: Path, what: str, hint: str) -> None:
    """`folder` exists as a writable directory, or can be created: its nearest existing ancestor is a
    directory where a probe file can be written. Creates no folder."""
    check_writable(folder, what, hint)


def preflight(cfg: Config, run_dir: Optional[Path], resume: bool, overwrite: bool = False) -> None:
    """Everything run() can check before reading data or training: the key rules, the run folder, the
    base-block cache folder, the device, and on a resume the folder, its last.pt and its keys."""
    check_config(cfg)
    root = Path(cfg.run_root).expanduser() if cfg.run_root is not None else default_run_root()
    target = Path(run_dir) if run_dir is not None else root / "f3crec" / cfg.data.name
    _writable_target(target, "run folder", "set run_root or $REPRO_RUNS, or --run-dir")
    if run_dir is not None and not resume:
        refused_folder(Path(run_dir), overwrite)   # a folder with records, or another run's: one line, now
    if cfg.train.share_base and cfg.federation.simulator != "flower" and not resume:  # a resume is past block 0
        _writable_target(base_cache_dir(cfg.train), "base-block cache",
                         "set train.base_cache, or train.share_base=false")
    if cfg.federation.simulator == "compiled":   # the CPU, numba importable: anything else, one line now
        from .train import simulator_kind
        simulator_kind(cfg, method_flags(cfg.method))
    if cfg.federation.simulator == "vectorised":
        get_device(cfg.train.device)   # cuda asked for but absent: one line now, not after block 0's data
    if resume:
        if run_dir is None:
            raise ConfigError("resume=True needs the run folder to resume")
        check_resume_folder(Path(run_dir))
        check_same_run(cfg, Path(run_dir))


def check_blocks(cfg: Config, blocks: list) -> None:
    """The keys whose range depends on the data: T^u (method.topn) ranks the items of block 0."""
    if cfg.method.topn > blocks[0].n_items:
        raise ConfigError(f"method.topn={cfg.method.topn}: larger than block 0's catalogue of "
                          f"{blocks[0].n_items} items (T^u ranks them, §6)")
