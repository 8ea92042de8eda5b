"""VLM2Rec entry point: config -> seed -> data -> model -> contrastive SFT with validation selection ->
test once (both protocols, all modality modes, robustness) -> SASRec downstream -> results.json.

    python -m vlm2rec.main                                     # the paper's setting (GPU, weights, Amazon)
    python -m vlm2rec.main --config vlm2rec/configs/smoke.yaml # tiny VLM, synthetic data, CPU, seconds
    cd vlm2rec && python main.py --config configs/ml-100k.yaml wpcl.enabled=false
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `cd vlm2rec && python main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "vlm2rec"

import torch

from common.checkpoints import save_checkpoint
from common.config import parse_cli
from common.io import cache_root, check_writable
from common.results import flat_metrics
from common.run_folder import refused_folder
from common.runs import default_run_root, run_name, start_run, write_results
from common.cli import run_cli
from common.utils import get_device, seed_everything

from .backbones import HF_NAMES, missing_requirements
from .catalog import Catalog
from .config import Config, check_config, check_resume
from .console import results_table
from .data import load_dataset
from .diagnostics import plot_run
from .evaluate import evaluate_test, split_negatives, split_sequences
from .model import VLM2Rec
from .seqrec import fit_seqrec
from .train import steps_per_epoch, fit, make_accelerator
from .two_tower import LABEL

OFFLINE_CONFIGS = "configs/ml-100k.yaml (real data, CPU) or configs/smoke.yaml (synthetic, seconds)"


def preflight(cfg: Config) -> dict:
    """Check the config, the backbone's requirements (without loading it) and load the data; ONE
    message names everything that is missing."""
    check_config(cfg)
    missing = missing_requirements(cfg.backbone, cfg.train.device)
    data = None
    try:
        data = load_dataset(cfg.data)
    except FileNotFoundError as err:
        missing.append(f"the {cfg.data.name} data ({err})")
    if missing:
        raise FileNotFoundError(f"vlm2rec: cannot run this config: missing {'; '.join(missing)}. "
                                f"Nothing was downloaded. Offline configs: {OFFLINE_CONFIGS}.")
    return data


def check_folders(cfg: Config, run_dir: str | Path | None, resume: bool, overwrite: bool) -> None:
    """The run folder and the cache can be written, and a fresh run's folder is free: one line before the
    data, the backbone or the item features are touched."""
    root = Path(cfg.run_root).expanduser() if cfg.run_root is not None else default_run_root()
    check_writable(Path(run_dir) if run_dir is not None else root / "vlm2rec", "run folder",
                   "--run-dir, run_root or $REPRO_RUNS")
    if run_dir is not None and not resume:
        refused_folder(Path(run_dir), overwrite)
    check_writable(cache_root(), "cache", "$REPRO_CACHE")


def run(cfg: Config, run_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """One run; `resume=True` continues the run folder `run_dir` from its last.pt; `overwrite`: a fresh
    run may use a `run_dir` that holds files (they move into previous-<time>/)."""
    check_config(cfg)
    check_folders(cfg, run_dir, resume, overwrite)
    data = preflight(cfg)
    seed_everything(cfg.train.seed)
    accelerator = make_accelerator(cfg.train, get_device(cfg.train.device))
    # Under `accelerate launch` every process trains its shard and evaluates identically; only the main
    # process owns the run folder and writes.
    writes = accelerator.is_main_process
    split = split_sequences(data["sequences"], cfg.data.max_history, cfg.train.instances_per_user)
    num_items = data["num_items"]
    negs, neg_sha = split_negatives(data["sequences"], num_items, cfg.eval, data["name"])
    # The two-tower stand-in's EfficientNet takes the square data.image_size input whatever keep_aspect says.
    keep_aspect = cfg.backbone.keep_aspect and cfg.backbone.name != "two-tower"
    catalog = Catalog(data["titles"], data["images"], cfg.data.image_size, keep_aspect=keep_aspect)
    model = VLM2Rec(cfg.backbone, catalog, accelerator.device, cfg.loss, cfg.wpcl, cfg.crtr)
    plan = ()
    if writes:
        tc = cfg.train
        steps = steps_per_epoch(len(split["train"]["target"]), tc.batch_size, accelerator.num_processes,
                                tc.max_steps_per_epoch)
        seqrec = ", SASRec on the item table" if cfg.seqrec.enabled else ""
        plan = (f"plan: {method_name(cfg)} ({cfg.backbone.name}) on {data['name']} ({len(data['sequences']):,} users, "
                f"{num_items:,} items): item features first (cached for later runs), then {tc.max_epochs} epochs of "
                f"{steps:,} steps, validation every epoch, one test{seqrec}. Time: estimated from the first steps, below",)
        print(plan[0])
    model.embedder.precompute([h for s in ("train", "valid", "test") for h in split[s]["history"]])
    # The run folder is claimed only now: a split, negatives or backbone that fails leaves no folder behind.
    out_dir = start_run(cfg, "vlm2rec", data["name"], run_name(method_name(cfg), cfg.train.seed, cfg.tag), run_dir,
                        root=cfg.run_root,
                        resume=resume, overwrite=overwrite, preface=plan) if writes else None
    print(f"backbone {model.embedder.identifier}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
          f"trainable parameters; {len(split['train']['target']):,} training pairs; "
          f"{len(data['sequences']):,} users; {num_items:,} items")
    core, summary = fit(model, accelerator, split, negs, num_items, cfg, out_dir, Path(run_dir) if resume else None)
    results = {"label": LABEL if cfg.backbone.name == "two-tower" else f"VLM embedder {core.embedder.identifier}",
               **summary}
    # The best weights' adapters also in peft's format: PeftModel.from_pretrained(base, <run>/adapter).
    if writes and hasattr(core.embedder, "save_adapter"):
        core.embedder.save_adapter(out_dir / "adapter", cfg.backbone.source if cfg.backbone.name in HF_NAMES
                                   else core.embedder.identifier)
    results["test"] = evaluate_test(core, split["test"], negs["test"], num_items, cfg.eval, out_dir)
    table = core.item_table(num_items, "both", cfg.eval.batch_size).cpu()
    if writes:
        save_checkpoint(out_dir / "item_embeddings.pt", {"ids": torch.arange(num_items + 1), "emb": table})
    if cfg.seqrec.enabled:
        results["seqrec"] = fit_seqrec(cfg.seqrec, split, table, negs, cfg.eval, cfg.train.seed, accelerator.device)
    results.update({"dataset": data["name"], "method": method_name(cfg), "variant": cfg.backbone.name,
                    "metrics": results_metrics(results, cfg.eval.select_on),
                    "select_on": cfg.eval.select_on, "seed": cfg.train.seed, "backbone": core.embedder.identifier, "data_stats": data.get("stats", {}), "ties": cfg.eval.ties,
                    "negatives_sha1": neg_sha, "run_dir": str(out_dir)})
    if writes:
        results["plot"] = str(plot_run(out_dir))
        results = write_results(out_dir, results)   # with the provenance (commit, versions, ...) compare reads
        print_summary(results)
    return results


def method_name(cfg: Config) -> str:
    """The method a config runs, by its two terms (vlm2rec/compare.py's four variants): "vlm2rec" (WPCL and
    CRTR), "wpcl", "crtr" or "plain" (contrastive SFT alone)."""
    terms = [name for name, on in (("wpcl", cfg.wpcl.enabled), ("crtr", cfg.crtr.enabled)) if on]
    return "vlm2rec" if len(terms) == 2 else terms[0] if terms else "plain"


def results_metrics(results: dict, select_on: str) -> dict[str, float]:
    """The cross-paper metrics of results.json (common/results.py RESULT_KEYS): "test/<scenario>/<protocol>/
    <mode>/<metric>@k", each part left out at the paper's headline (clean, sampled = P1, both), so
    "test/ndcg@10" is the paper's number and "test/full/text/ndcg@10" P2 on the text mode; "test/seqrec/..."
    the SASRec on the item table; "valid/<select_on>" the best validation score."""
    out = {}
    for scenario, protocols in results.get("test", {}).items():
        for protocol, modes in protocols.items():
            for mode, values in modes.items():
                if not isinstance(values, dict) or protocol == "geometry":
                    continue
                parts = [p for p, default in ((scenario, "clean"), (protocol, "sampled"), (mode, "both")) if p != default]
                out.update(flat_metrics(values, "/".join(["test", *parts])))
    for protocol, values in results.get("seqrec", {}).get("test", {}).items():
        out.update(flat_metrics(values, "test/seqrec" + ("" if protocol == "sampled" else f"/{protocol}")))
    if results.get("best_valid") is not None:
        protocol, mode, metric = select_on.split("/")
        parts = [p for p, default in ((protocol, "sampled"), (mode, "both")) if p != default]
        out["/".join(["valid", *parts, metric.lower()])] = float(results["best_valid"])
    return out


def print_summary(results: dict) -> None:
    """The closing lines of a run: one results table and where everything was written."""
    print(results_table(results))
    print(f"best epoch {results['best_epoch']} (valid {results['select_on']} {results['best_valid']:.4f}); "
          f"run folder: {results['run_dir']}")


def main(argv: list[str] | None = None) -> dict:
    check_resume(argv)               # an old run folder is refused in one line, before its config is read
    cfg, options = parse_cli(argv, Config)
    if options.resume is not None:
        return run(cfg, options.resume, resume=True)
    return run(cfg, options.run_dir, overwrite=options.overwrite)


if __name__ == "__main__":
    run_cli(main)
