"""F3CRec entry point: config → seed → blocks → base block (cached, shared by methods) → D¹..D³ → results.

    python -m f3crec.main                                    # the paper's setting: FedMF F3CRec on ML-100K
    python -m f3crec.main --config f3crec/configs/smoke.yaml # synthetic smoke run, seconds
    python -m f3crec.main "methods=[ft,arm,itm,f3crec]"      # several methods, one shared base block
    python -m f3crec.main --resume runs/f3crec/ml-100k/<run> # continue at the next block boundary
    python -m f3crec.main --run-dir DIR [--overwrite]        # a fresh run in DIR (--overwrite: its files move aside)
    cd f3crec && python main.py --config configs/smoke.yaml

A checkpoint (last.pt, a plain dict) is written at every block boundary; the end-of-D⁰ state is cached
(`train.base_cache`), keyed by everything that affects D⁰, so every method reuses one base block (§8.6).
"""
from __future__ import annotations

import atexit
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `cd f3crec && python main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent)); __package__ = "f3crec"  # noqa: E702

from common.cli import paused_gc, run_cli

with paused_gc():   # start-up imports: no collections while their long-lived objects are made
    import numpy as np

    from common.config import ConfigError, parse_cli
    from common.runs import log_metrics, run_name, start_run, write_results

    from .checks import check_blocks, check_resume_folder, preflight
    from .config import Config, check_config, resolve
    from .data import get_blocks
    from .evaluate import summarise
    from .simulators import holds_tensors, simulator_kind
    from .train import fit, format_row, round_line


def run(cfg: Config, run_dir: Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """One method, all blocks (§8): the results dict, also written to `run_dir`/results.json.
    Every check that can fail on the input runs before the run folder is claimed (or, on a resume, touched).
    `overwrite`: a fresh run may use a `run_dir` that holds files (they move into previous-<time>/)."""
    preflight(cfg, run_dir, resume, overwrite)                    # keys, folders, device, the resumed run
    blocks, blocks_id = get_blocks(cfg.data, cfg.train.seed)      # missing or bad data: a one-line error
    check_blocks(cfg, blocks)
    run_dir = start_run(cfg, "f3crec", cfg.data.name, tag=run_name(cfg.method.name, cfg.train.seed),
                        run_dir=run_dir, root=cfg.run_root, resume=resume, overwrite=overwrite)  # the unresolved config
    cfg, flags = resolve(cfg)
    print(f"plan: {cfg.method.name} ({cfg.backbone.name}) on {cfg.data.name}: {len(blocks)} blocks (D0 the base) of up "
          f"to {cfg.federation.rounds} rounds each, validation every round, a test after every block; "
          f"{cfg.federation.simulator} simulator. Time: estimated after the first block, below")
    kind = simulator_kind(cfg, flags)
    torch = None
    if holds_tensors(cfg, flags):   # the compiled simulator (and a Flower server of compiled nodes) never imports torch
        import torch
    seed_global(cfg.train.seed, torch)
    log = lambda record: (log_metrics(run_dir, record),  # noqa: E731  (jsonl: the whole record; console: one line)
                          None if record.get("reused") else print(round_line(record)))
    if kind != cfg.federation.simulator:
        print(f"[f3crec] federation.simulator={cfg.federation.simulator}: the {kind} simulator runs")
    # torch's intra-op threads: a sum's rounding depends on them, part of the run's identity. The compiled
    # simulator's kernels and numpy products are single-threaded whatever train.threads says: same numbers
    if torch:
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.train.threads)
    else:
        from .sim_compiled import single_blas
        limits = single_blas()
    try:
        out = fit(cfg, flags, blocks, blocks_id, run_dir, resume, log)
    finally:
        if torch:
            torch.set_num_threads(threads)
        else:
            limits.restore_original_limits()
    summary = summarise(out["rows"])
    results = {"dataset": cfg.data.name, "method": cfg.method.name, "variant": cfg.backbone.name,
               "metrics": results_metrics(summary, out["blocks"]),
               "summary": summary, "blocks": out["blocks"], "flags": flags, "seed": cfg.train.seed,
               "backbone": cfg.backbone.name, "blocks_sha": blocks_id,
               "simulator": kind, "fidelity": cfg.fidelity, "threads": cfg.train.threads}
    results = write_results(run_dir, results)
    print(results_table(results))
    print(f"run folder: {run_dir}")
    return results


def results_metrics(summary: dict, blocks: list[dict]) -> dict[str, float]:
    """The cross-paper metrics of results.json (common/results.py RESULT_KEYS) after the last block (§10):
    "test/ndcg@20" and "test/recall@20" are the H-mean (the README's headline), "test/la/..." and
    "test/ra/..." the learning and retention averages; "valid/ndcg@20" the last block's best validation."""
    out = {}
    for metric in ("ndcg", "recall"):
        last = summary[metric]["per_block"][-1]
        out[f"test/{metric}@20"] = float(last["H"])
        out.update({f"test/{part.lower()}/{metric}@20": float(last[part]) for part in ("LA", "RA")})
    if blocks and blocks[-1].get("best_val") is not None:
        out["valid/ndcg@20"] = float(blocks[-1]["best_val"])
    return out


def results_table(results: dict) -> str:
    """The run's a_{t,i} summary after each block (§10) as one table: LA, RA and H of both metrics."""
    s = results["summary"]
    lines = [f"\n{results['method']} ({results['backbone']}, seed {results['seed']}) after each block:",
             "block |  N@20 LA     RA      H  |  R@20 LA     RA      H  | best round / rounds run"]
    for t, (ndcg, recall, info) in enumerate(zip(s["ndcg"]["per_block"], s["recall"]["per_block"], results["blocks"])):
        cells = [" ".join(f"{row[k]:7.4f}" for k in ("LA", "RA", "H")) for row in (ndcg, recall)]
        lines.append(f"{t:5d} | {cells[0]}  | {cells[1]}  | {info['best_round']:4d} / {info['rounds_run']}")
    return "\n".join(lines)


def seed_global(seed: int, torch=None) -> None:
    """Seed the global generators (torch's too when the run uses it) as a safety net: every random number
    of a run comes from the explicit streams of model.py (inits) and streams.py (per-user draws, §13), never
    from these. Deterministic-kernel switches are not needed on the CPU paths (and importing them costs
    seconds)."""
    random.seed(seed)
    np.random.seed(seed)
    if torch is not None:
        torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> dict:
    args = list(argv) if argv is not None else sys.argv[1:]
    if "--resume" in args[:-1]:  # before parsing: a missing, foreign or old folder gets its own line
        check_resume_folder(Path(args[args.index("--resume") + 1]))
    cfg, options = parse_cli(argv, Config)
    check_config(cfg)     # before the methods are split into runs (each run checks its own copy again)
    methods = cfg.methods or [cfg.method.name]
    if options.resume is not None and len(methods) > 1:
        raise ConfigError(f"--resume takes one method's run folder; methods={methods} names {len(methods)}")
    results = {}
    for name in methods:
        one = replace(cfg, method=replace(cfg.method, name=name), methods=[])
        run_dir = options.resume or options.run_dir
        if options.run_dir is not None and len(methods) > 1:
            run_dir = options.run_dir / name
        results[name] = run(one, run_dir, resume=options.resume is not None, overwrite=options.overwrite)
    if len(methods) > 1:   # each run printed its own table; here the methods side by side
        print("\nmethod        | " + "NDCG@20 LA / RA / H          | Recall@20 LA / RA / H")
        for name, res in results.items():
            print(f"{name:13s} | {format_row(res['summary'])}")
    return results if len(methods) > 1 else results[methods[0]]


def run_and_leave() -> None:
    """The command line: run_cli(main), then exit without the interpreter's teardown (after torch it
    takes 0.4–0.6 s of freeing memory the OS reclaims anyway). Exit handlers run and both streams are
    flushed first; a traceback (an uncaught error, or REPRO_DEBUG=1) takes the ordinary exit."""
    try:
        run_cli(main)
        code = 0
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_leave()
