"""F3CRec entry point: config → seed → blocks → base block (cached, shared by methods) → D¹..D³ → results.

    python -m f3crec.main                                    # the paper's setting: FedMF F3CRec on ML-100K
    python -m f3crec.main --config f3crec/configs/smoke.yaml # synthetic smoke run, seconds
    python -m f3crec.main "methods=[ft,arm,itm,f3crec]"      # several methods, one shared base block
    python -m f3crec.main --resume runs/f3crec/ml-100k/<run> # continue at the next block boundary
    cd f3crec && python main.py --config configs/smoke.yaml

A checkpoint (last.pt, a plain dict) is written at every block boundary; the end-of-D⁰ state is cached
(`train.base_cache`), keyed by everything that affects D⁰, so every method reuses one base block (§8.6).
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `cd f3crec && python main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent)); __package__ = "f3crec"  # noqa: E702

import numpy as np
import torch
import yaml

from common.config import ConfigError, parse_cli
from common.runs import log_metrics, start_run, write_results
from common.cli import run_cli
from common.utils import seed_everything

from .config import Config, resolve
from .data import get_blocks
from .evaluate import summarise
from .train import fit, format_row


def run(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict:
    """One method, all blocks (§8): the results dict, also written to `run_dir`/results.json."""
    blocks, blocks_id = get_blocks(cfg.data, cfg.train.seed)      # first: missing data is a one-line error
    run_dir = start_run(cfg, "f3crec", cfg.data.name, tag=f"{cfg.method.name}-s{cfg.train.seed}",
                        run_dir=run_dir, root=cfg.run_root)      # config.yaml holds the unresolved config
    cfg, flags = resolve(cfg)
    seed_global(cfg.train.seed)
    log = lambda record: (log_metrics(run_dir, record), print(json.dumps(record)))  # noqa: E731
    out = fit(cfg, flags, blocks, blocks_id, run_dir, resume, log)
    results = {"summary": summarise(out["rows"]), "blocks": out["blocks"], "flags": flags, "seed": cfg.train.seed,
               "method": cfg.method.name, "backbone": cfg.backbone.name, "blocks_sha": blocks_id,
               "simulator": cfg.federation.simulator, "fidelity": cfg.fidelity}
    return write_results(run_dir, results)


def seed_global(seed: int) -> None:
    """Seed the global generators as a safety net: every random number of a run comes from the explicit
    streams of model.py (inits) and streams.py (per-user draws, §13), never from these. Deterministic-kernel
    switches are not needed on the CPU paths (and importing them costs seconds)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_resumable(run_dir: Path) -> None:
    """A run folder from before the `model:` → `backbone:` rename cannot resume: say so in one line."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if "model" in saved:
        raise ConfigError(f"{run_dir} was written with config keys model.* (and method.target_scores); this "
                          "version names them backbone.* (model.backbone -> backbone.name, model.emb_init / "
                          "model.private_init_round0 -> quirks.*) — rerun, or edit its config.yaml")


def main(argv: list[str] | None = None) -> dict:
    args = list(argv) if argv is not None else sys.argv[1:]
    if "--resume" in args[:-1]:  # before parsing: an old config.yaml would fail on its first unknown key
        check_resumable(Path(args[args.index("--resume") + 1]))
    cfg, options = parse_cli(argv, Config)
    methods = cfg.methods or [cfg.method.name]
    results = {}
    for name in methods:
        one = replace(cfg, method=replace(cfg.method, name=name), methods=[])
        run_dir = options.resume or options.run_dir
        if options.run_dir is not None and len(methods) > 1:
            run_dir = options.run_dir / name
        results[name] = run(one, run_dir, resume=options.resume is not None)
    print("\nmethod        | " + "NDCG@20 LA / RA / H          | Recall@20 LA / RA / H")
    for name, res in results.items():
        print(f"{name:13s} | {format_row(res['summary'])}")
    return results if len(methods) > 1 else results[methods[0]]


if __name__ == "__main__":
    run_cli(main)
