"""The block loop (§8): `fit` runs grow → rounds with validation and early stopping → restore best →
test a_{t,·} → end-of-block state → hand-off for every block, with a checkpoint at each block boundary and
the end-of-D⁰ state shared across methods (§8.6). Plain functions, no trainer class.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from common.checkpoints import load_checkpoint, save_checkpoint
from common.config import config_to_dict
from common.io import exclusive
from common.progress import Progress
from common.runs import truncate_metrics
from common.selection import Selection

from .arrays import convert, is_tensor, like
from .client_state import ClientStates
from .config import base_cache_dir
from .data import Block
from .evaluate import summarise
from .model import BACKBONES, init_items, init_private_rows
from .round import RoundContext
from .server import Server
from .block_inputs import block_data, round_context  # noqa: F401  (shared with the Flower nodes, §14)
from .simulators import holds_tensors, local_simulator, simulator_kind


# ------------------------------------------------------------------------------------------ simulators
def make_simulator(cfg, flags: dict, items, private: dict, blocks: list[Block] | None = None):
    """A server with table `items` and one client per row of `private` (numpy arrays or tensors), in the
    configured simulator; with `blocks`, a local simulator also answers the block loop's calls (local_loop.py:
    plans, evaluation). The compiled simulator holds numpy arrays and never imports torch; the others hold
    tensors (the Flower server holds its nodes' kind: numpy arrays where they run the compiled simulator)."""
    keep_freed_memory()
    kind = simulator_kind(cfg, flags)
    if kind == "flower":  # optional extra: flwr is imported only when asked for (§14)
        from .flower.launch import flower_simulator
        tensor = holds_tensors(cfg, flags)
        return flower_simulator(cfg, flags, convert(items, tensor), convert(private, tensor))
    return local_simulator(kind, cfg, flags, Server(None, cfg.method.beta, itm=flags["itm"]), items, private, blocks)


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of returning it to the OS: a round allocates and frees
    the same few-MB tensors every step, and fresh pages from the OS cost more than the arithmetic on them.
    A no-op where glibc's mallopt is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 25)   # M_MMAP_THRESHOLD: blocks up to 32 MB come from the heap
    libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
    libc.mallopt(-2, 1 << 26)   # M_TOP_PAD: grow the heap 64 MB at a time


def sim_state(sim) -> dict:
    """Every simulator's own checkpoint form (Flower's: the server's table; each node keeps its users, §14)."""
    return sim.state_dict()


def load_sim(cfg, flags: dict, state: dict, blocks: list[Block]):
    if state.get("federated"):
        from .flower.launch import flower_simulator
        return flower_simulator(cfg, flags, state=state)
    sim = make_simulator(cfg, flags, state["server"]["items"], dict(state["clients"]["private"]), blocks)
    # A checkpoint's arrays (torch's last.pt holds tensors, the compiled simulator's numpy arrays) made the
    # kind this simulator holds, on its device.
    tensor = holds_tensors(cfg, flags)
    device = sim.server.items.device if tensor else None
    sim.server.load_state_dict(convert(state["server"], tensor, device))
    states = ClientStates(dict(sim.states().private), cfg.method.topn)
    states.load_state_dict(convert(state["clients"], tensor, device))
    sim.load_states(states)
    return sim


# ----------------------------------------------------------------------------------------- block loop
def grow(sim, make_sim: Callable | None, cfg, blocks: list[Block], t: int, seed: int):
    """Append item rows and clients for block t's newcomers (§8.1); `make_sim(items, private)` builds the
    simulator in block 0."""
    n_prev_users = blocks[t - 1].n_users if t else 0
    n_prev_items = blocks[t - 1].n_items if t else 0
    block, emb_init = blocks[t], cfg.quirks.emb_init   # drawn as numpy arrays; each simulator makes them its kind
    stacked = init_private_rows(cfg.backbone, emb_init, seed, range(n_prev_users, block.n_users), tensor=False)
    if sim is None:
        return make_sim(init_items(cfg.backbone, emb_init, seed, 0, block.n_items, tensor=False), stacked)
    sim.server.grow(init_items(cfg.backbone, emb_init, seed, t, block.n_items - n_prev_items, tensor=False))
    if stacked is not None:
        sim.grow(convert(stacked, is_tensor(sim.server.items)))
    return sim


def run_block(sim, cfg, blocks: list[Block], t: int, flags: dict, log) -> dict:
    """Rounds of block t with validation, selection and early stopping (§8.2–8.3); ends on the best."""
    fed, ev = cfg.federation, cfg.eval
    select = Selection(patience=fed.patience, best=-1.0)  # every score in [0, 1] beats the start
    report = Progress(fed.rounds, f"f3crec block {t}", "round")  # the time left, in a log too (lines)
    for r in range(fed.rounds):
        started = time.perf_counter()
        ctx = round_context(cfg, flags, blocks, t, r)
        # Named by the server's finiteness check (server.py::_finish), which every simulator's aggregate runs.
        sim.server.where = f"block {t} round {r} (the server's mean of the uploads; backbone.lr={cfg.backbone.lr:g})"
        stats = sim.train_round(None, ctx)          # each simulator draws the round's plan itself
        val = sim.validate(ctx, flags["metric_decimals"])
        value = val[ev.select_metric]
        record = {"block": t, "round": r, "val_ndcg": val["ndcg"], "val_recall": val["recall"],
                  "seconds": round(time.perf_counter() - started, 4), **_arm_summary(stats)}
        if select.update(value, r):  # strict improvement saves the full state (§8.3)
            sim.save_slot("best")
        log(record)
        report.update()
        if select.should_stop:
            break
    report.close()
    sim.save_slot("last")
    sim.load_slot("best")
    return {"best_round": select.best_at, "best_val": select.best, "rounds_run": r + 1}


def _arm_summary(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if k not in ("D", "m")}
    if stats.get("D"):
        d, m = np.asarray(stats["D"]), np.asarray(stats["m"])
        out.update(D_mean=float(d.mean()), m_mean=float(m.mean()),
                   m_hist=np.bincount(np.minimum(m // 5, 6), minlength=7).tolist(),
                   D_hist=np.histogram(d, bins=[0, 50, 100, 200, 300, 567, 10**9])[0].tolist())
    return out


def end_block(sim, cfg, blocks: list[Block], t: int, flags: dict) -> None:
    """End-of-block state from the restored best (§8.5), then the hand-off to t+1 (§8.6)."""
    block = blocks[t]
    fisher_plan = sim.fisher_plan(cfg, flags, blocks, t)   # EWC's plan (round −1), or None; Flower's nodes draw theirs
    ctx = RoundContext(block=t, round=0, n_items=block.n_items, n_prev_users=0, n_prev_items=0, lrs={},
                       flags=flags, net=BACKBONES[cfg.backbone.name], seed=cfg.train.seed, topn=cfg.method.topn)
    sim.end_block(ctx, np.array(sorted(block.train), dtype=np.int64), fisher_plan)
    if flags["handoff"] == "last":
        sim.load_slot("last")


def restart(sim, cfg, blocks: list[Block], t: int) -> None:
    """full_retrain (not warm): re-draw every parameter at the start of block t [D]."""
    seed = cfg.train.seed + 7919 * t
    block, emb_init = blocks[t], cfg.quirks.emb_init
    sim.server.items = like(init_items(cfg.backbone, emb_init, seed, 0, block.n_items, tensor=False), sim.server.items)
    private = init_private_rows(cfg.backbone, emb_init, seed, range(block.n_users), tensor=False)
    sim.set_private(convert(private, is_tensor(sim.server.items)))


# ------------------------------------------------------------------------------------------------ fit
def base_cache_path(cfg, flags: dict, blocks_id: str) -> Path | None:
    """Where the shared end-of-D⁰ state of this configuration lives, or None when sharing is off."""
    if not cfg.train.share_base or cfg.federation.simulator == "flower":  # no node state in a shared cache
        return None
    return base_cache_dir(cfg.train) / f"{base_key(cfg, flags, blocks_id)}.pt"


def base_key(cfg, flags: dict, blocks_id: str) -> str:
    """Everything that changes D⁰ training (not the method: ARM/ITM are off in D⁰, §8.6)."""
    # The code is part of the key: a cached base state from older code must never be reused silently.
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))))
    tree = config_to_dict(cfg)
    fed = {**tree["federation"], "simulator": simulator_kind(cfg, flags)}   # auto keyed by what it runs
    relevant = {"blocks": blocks_id, "backbone": tree["backbone"], "fed": fed, "eval": tree["eval"],
                "seed": cfg.train.seed, "quirks": tree["quirks"], "fidelity": cfg.fidelity,
                "device": cfg.train.device, "code": code.hexdigest(), "threads": cfg.train.threads,
                "flags": {k: flags[k] for k in ("metric_decimals", "neg_exclude")}}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def claimed(cache: Path | None) -> Iterator[None]:
    """Hold the exclusive lock of base-cache entry `cache` (nothing to hold when None): one process trains
    a base block at a time, a second one waits and then loads what the first saved."""
    if cache is None:
        yield
        return
    with exclusive(cache, f"[f3crec] base block {cache} is being trained by another run: waiting for it"):
        yield


def load_base(cache: Path | None) -> dict | None:
    """The cached end-of-D⁰ state, or None when there is none or it does not load (a damaged file is
    never trusted: the base block is trained again and the entry rewritten)."""
    if cache is None or not cache.is_file():
        return None
    try:
        base = load_checkpoint(cache)
    except ValueError as err:
        print(f"[f3crec] base block cache not used, training it again: {err}")
        return None
    return base if all(key in base for key in ("sim", "rows", "info", "records")) else None


def fit(cfg, flags: dict, blocks: list[Block], blocks_id: str, run_dir: Path, resume: bool, log) -> dict:
    """Every block of §8 with block-boundary checkpoints (`last.pt`); returns rows of a and block infos.
    metrics.jsonl then holds exactly the records of the blocks in last.pt: a resume drops what the
    interrupted run logged after it (a cut-short line included); a fresh start finds none (start_run
    removed an earlier run's)."""
    sim, rows, info, start = None, [], [], 0
    if cfg.federation.simulator == "flower":  # the server side sees block sizes only; clients load their data
        blocks = [Block({}, {}, {}, b.n_users, b.n_items, np.zeros(0, np.int64)) for b in blocks]
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        sim, rows, info = load_sim(cfg, flags, ckpt["sim"], blocks), ckpt["rows"], ckpt["info"]
        start = ckpt["block"] + 1
    if resume:
        truncate_metrics(run_dir, lambda record: record.get("block", len(blocks)) < start)
    cache = base_cache_path(cfg, flags, blocks_id) if start == 0 else None
    last = len(blocks) if cfg.train.stop_after_block is None else min(len(blocks), cfg.train.stop_after_block + 1)
    report = Progress(last, "f3crec", "block", initial=start)  # after block 0: the whole run's estimate
    for t in range(start, len(blocks)):
        with claimed(cache if t == 0 else None):   # two runs needing one base block train it once
            base = load_base(cache) if t == 0 else None
            if base is not None:
                sim, rows, info = load_sim(cfg, flags, base["sim"], blocks), base["rows"], base["info"]
                info[0]["reused_from"] = str(cache)
                for record in base["records"]:   # the run folder tells the whole story: block 0's rounds too
                    log({**record, "reused": True, "reused_from": cache.name})
                print(f"[f3crec] base block loaded from {cache} ({len(base['records'])} round records copied "
                      "into metrics.jsonl, marked reused)")
            else:
                started, records = time.perf_counter(), []
                sim = grow(sim, lambda items, private: make_simulator(cfg, flags, items, private, blocks), cfg, blocks,
                           t, cfg.train.seed)
                if flags["full_retrain"] and t > 0 and not cfg.method.full_retrain_warm:
                    restart(sim, cfg, blocks, t)
                info.append(run_block(sim, cfg, blocks, t, flags, lambda record: (records.append(record), log(record))))
                rows.append(sim.test_row(t, flags["old_block_mask"], flags["metric_decimals"]))
                info[-1]["seconds"] = round(time.perf_counter() - started, 3)    # grow, rounds, restore, test
                if t == 0 and cache is not None:
                    save_checkpoint(cache, {"sim": sim_state(sim), "rows": rows, "info": info, "records": records,
                                            "key_config": config_to_dict(cfg)})
        end_block(sim, cfg, blocks, t, flags)
        save_checkpoint(run_dir / "last.pt", {"sim": sim_state(sim), "rows": rows, "info": info, "block": t,
                                              "config": config_to_dict(cfg)})
        print(f"[f3crec] block {t}: " + format_row(summarise(rows)))
        report.update()
        if cfg.train.stop_after_block is not None and t >= cfg.train.stop_after_block:
            break
    report.close()
    return {"rows": rows, "blocks": info}


def round_line(record: dict) -> str:
    """One compact console line per round (metrics.jsonl keeps the whole record)."""
    arm = f"  D {record['D_mean']:6.1f} m {record['m_mean']:5.1f}" if "D_mean" in record else ""
    return (f"[f3crec] block {record['block']} round {record['round']:3d}  val N@20 {record['val_ndcg']:.4f} "
            f"R@20 {record['val_recall']:.4f}{arm}  {record['seconds']:.2f} s")


def format_row(summary: dict) -> str:
    """LA / RA / H after the last block so far, for both metrics, on one line."""
    parts = []
    for metric, label in (("ndcg", "N@20"), ("recall", "R@20")):
        last = summary[metric]["per_block"][-1]
        parts.append(f"{label} LA {last['LA']:.4f} RA {last['RA']:.4f} H {last['H']:.4f}")
    return " | ".join(parts)
