"""The evaluation protocol (§9) and the measurements of §12; § numbers refer to docs/method.md.

    metrics = evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, seen_mask="reference")
    report = final_metrics(model, data, cfg, device)        # valid + test under both masks
    summary = evaluate_ensemble(model, data, members, cfg, device)   # B2: nothing to train
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from common.io import load_json
from common.results import flat_metrics
from common.metrics import rank_metrics
from common.runs import read_metrics

from .model import AveragedLogits

REPORT = ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")  # §9, x100


def seen_adjust(scores: torch.Tensor, hist: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply eval.seen_mask to item logits (B, I) given 0-padded histories (B, H) (§9, quirks 7-8).

    reference: items seen exactly once get logit 0 (duplicates add up in the reference's count
    matrix, then `== 1` is tested, so items seen twice keep their raw logit); zero: every seen item
    gets 0; neg_inf: every seen item gets -inf (the clean protocol); none: no change.
    """
    if mode == "none":
        return scores
    counts = torch.zeros(scores.shape[0], scores.shape[1] + 1, device=scores.device)
    counts.scatter_add_(1, hist, torch.ones_like(hist, dtype=counts.dtype))
    counts = counts[:, 1:]  # column c = item c+1; the padding id 0 drops out
    if mode == "reference":
        return scores.masked_fill(counts == 1, 0.0)
    if mode == "zero":
        return scores.masked_fill(counts > 0, 0.0)
    if mode == "neg_inf":
        return scores.masked_fill(counts > 0, float("-inf"))
    raise ValueError(f"eval.seen_mask={mode!r}: expected reference, zero, neg_inf or none")


def leave_one_out_ranks(scores: torch.Tensor, target: torch.Tensor, rank: str) -> torch.Tensor:
    """0-based rank of each row's one held-out item, column target-1 (§9). strict: the number of strictly
    greater logits. argsort: the target's position in a descending unstable sort, as the reference's double
    argsort; it differs from strict only where the target's logit is tied, so only those rows are sorted.
    A NaN logit is refused (it would compare false with everything and rank the target first)."""
    nan = torch.isnan(scores)
    if bool(nan.any()):
        raise ValueError(f"flame.evaluate.leave_one_out_ranks: {int(nan.sum())} NaN logit(s); "
                         "metrics of such scores are meaningless (check the model for a NaN output)")
    column = (target - 1).unsqueeze(1)
    chosen = scores.gather(1, column)  # (B, 1)
    greater = (scores > chosen).sum(1)
    if rank == "strict":
        return greater
    if rank != "argsort":
        raise ValueError(f"eval.rank={rank!r}: expected argsort or strict")
    tied = ((scores == chosen).sum(1) > 1).nonzero().flatten()
    if len(tied):
        order = torch.argsort(scores[tied], dim=1, descending=True)
        greater[tied] = (order == column[tied]).int().argmax(1)
    return greater


@torch.no_grad()
def evaluate(model: torch.nn.Module, seq: torch.Tensor, target: torch.Tensor, hist: torch.Tensor,
             seen_mask: str = "reference", rank: str = "argsort", batch_size: int = 256,
             device: Optional[torch.device] = None) -> dict[str, float]:
    """Full-ranking leave-one-out metrics x100 (§9) over all users, in batches."""
    model.eval()
    device = device or seq.device
    seq, target, hist = seq.to(device), target.to(device), hist.to(device)  # on the device once, sliced per batch
    ranks = []
    for first in range(0, len(target), batch_size):
        part = slice(first, first + batch_size)
        scores = model.score_all({"seq": seq[part]})[:, 1:].float()  # (B, I): drop padding
        scores = seen_adjust(scores, hist[part], seen_mask)
        ranks.append(leave_one_out_ranks(scores, target[part], rank))
    per_user = rank_metrics(torch.cat(ranks).cpu(), ks=(1, 5, 10, 20))
    return {key: 100.0 * float(per_user[key].mean()) for key in REPORT}


def final_metrics(model: torch.nn.Module, data: Any, cfg: Any, device: torch.device) -> dict:
    """The restored model on validation (configured mask) and on test under the configured mask,
    `reference` and `neg_inf` (§9); B3 adds the mean of both networks' logits as a side number (§11)."""
    ec = cfg.eval
    out = {"valid": evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, ec.seen_mask, ec.rank,
                             ec.batch_size, device), "test": {}}
    for mask in dict.fromkeys((ec.seen_mask, "reference", "neg_inf")):
        out["test"][mask] = evaluate(model, data.test_seq, data.test_target, data.test_hist, mask, ec.rank,
                                     ec.batch_size, device)
    if cfg.method.name == "mutual":
        pair = AveragedLogits([model.learnable, model.frozen])
        out["test_mean_ab"] = evaluate(pair, data.test_seq, data.test_target, data.test_hist, ec.seen_mask,
                                       ec.rank, ec.batch_size, device)
    return out


def results_metrics(results: dict) -> dict[str, float]:
    """The run's metrics in the cross-paper form of results.json (common/results.py RESULT_KEYS): fractions,
    "valid/ndcg@20" (configured seen mask), "test/ndcg@20" under the reference mask (the paper's tables),
    "test/<mask>/..." under the others, "test/mean_ab/..." for B3's averaged logits (§9, §11)."""
    out = flat_metrics(results.get("valid", {}), "valid", 0.01)
    for mask, values in results.get("test", {}).items():
        out.update(flat_metrics(values, "test" if mask == "reference" else f"test/{mask}", 0.01))
    if "test_mean_ab" in results:
        out.update(flat_metrics(results["test_mean_ab"], "test/mean_ab", 0.01))
    return out


def evaluate_ensemble(model: torch.nn.Module, data: Any, members: list[tuple[Path, Optional[dict]]], cfg: Any,
                      device: torch.device) -> dict:
    """B2 trains nothing here (§11): its summary in fit's form, from the validation score and the members'
    training records (members: (checkpoint, results.json or None for a bare checkpoint))."""
    records = [record for _, record in members]
    known = all(r is not None for r in records)  # a bare checkpoint: training cost unknown
    ec = cfg.eval
    valid = evaluate(model, data.valid_seq, data.valid_target, data.valid_hist, ec.seen_mask, ec.rank,
                     ec.batch_size, device)
    cost = sum(r["train_seconds"] for r in records) if known else None
    return {"best_valid": valid[cfg.train.select],
            "best_epoch": max(r["best_epoch"] for r in records) if known else None,
            "time_to_best_s": cost, "train_seconds": cost, "members": [str(f) for f, _ in members]}


def convergence(cfg: Any, run_dir: Path, test_ndcg: float, stage1: Optional[Path]) -> dict:
    """§12 for a FLAME or B3 run: against train.sasrec_run, else the stage-1 run."""
    baseline = Path(cfg.train.sasrec_run) if cfg.train.sasrec_run else stage1
    if baseline is None:
        return {"note": "no SASRec run given (train.sasrec_run) and no stage-1 run"}
    return convergence_against(read_metrics(run_dir), cfg.train.select, cfg.train.seed, test_ndcg, baseline, stage1)


def convergence_against(records: list[dict], select: str, seed: int, test_ndcg: float, baseline_dir: Path,
                        stage1: Optional[Path] = None) -> dict:
    """Epochs and seconds to reach SASRec's best validation score, and the relative test gain (§12), of
    one run's metrics.jsonl records against a finished SASRec run folder."""
    base = load_json(baseline_dir / "results.json")
    target = base["best_valid"]
    first = next((r for r in records if r[f"valid/{select}"] >= target), None)
    out = {"sasrec_run": str(baseline_dir), "sasrec_seed": base["seed"], "sasrec_best_valid": target,
           "sasrec_best_epoch": base["best_epoch"], "sasrec_time_to_best_s": base["time_to_best_s"],
           "epochs_to_sasrec_best": "not reached", "seconds_to_sasrec_best": "not reached",
           "test_ndcg20_gain_rel": (test_ndcg - base["test"]["reference"]["NDCG@20"])
           / base["test"]["reference"]["NDCG@20"]}
    if base["seed"] != seed:
        print(f"warning: the SASRec run has seed {base['seed']}, this run {seed}")
    if first is not None:
        seconds = first["train/cumulative_seconds"]
        out.update(epochs_to_sasrec_best=first["epoch"], seconds_to_sasrec_best=seconds,
                   speedup_epochs=base["best_epoch"] / first["epoch"],
                   speedup_seconds=base["time_to_best_s"] / max(seconds, 1e-9))
        if stage1 is not None:  # FLAME's time including the whole stage-1 run (§12)
            out["seconds_to_sasrec_best_with_stage1"] = seconds + load_json(stage1 / "results.json")["train_seconds"]
    return out


def print_table(results: dict) -> None:
    """Test metrics under both masks, and the convergence numbers when there are any."""
    print(f"\n{results['method']} on {results['dataset']} (seed {results['seed']}), best epoch "
          f"{results['best_epoch']}, valid {results['select']} {results['valid'][results['select']]:.2f}")
    print("| mask | " + " | ".join(REPORT) + " |\n|---|" + "---|" * len(REPORT))
    for mask, metrics in results["test"].items():
        print(f"| {mask} | " + " | ".join(f"{metrics[k]:.2f}" for k in REPORT) + " |")
    for key, value in results.get("convergence", {}).items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
