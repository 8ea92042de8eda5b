"""Modality-collapse diagnostics (§11): branch gradient norms, geometry of each modality's
embeddings (effective rank, uniformity, modality gap, cross-modal alignment) and a plot over training.

    python -m vlm2rec.diagnostics runs/vlm2rec/<dataset>/<run>   # writes diagnostics.png from metrics.jsonl
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common.runs import read_metrics


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of the centred matrix (Roy & Vetterli 2007)."""
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(x)
    if float(singular.sum()) == 0.0:
        return 0.0
    p = singular / singular.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def uniformity(x: torch.Tensor, pairs: int = 4096, seed: int = 0) -> float:
    """log E exp(-2 ||x - y||^2) over random pairs of unit vectors (Wang & Isola 2020), fixed seed."""
    x = F.normalize(x.double(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(len(x), (pairs,), generator=generator)
    b = torch.randint(len(x), (pairs,), generator=generator)
    keep = a != b
    dist = (x[a[keep]] - x[b[keep]]).pow(2).sum(dim=1)
    return float(torch.log(torch.exp(-2 * dist).mean()))


def geometry(tables: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-modality geometry of item tables {mode: [I+1, d]} (row 0 padding is skipped)."""
    out = {}
    for mode, table in tables.items():
        out[f"erank_{mode}"] = effective_rank(table[1:].cpu())
        out[f"uniformity_{mode}"] = uniformity(table[1:].cpu())
    if "text" in tables and "image" in tables:
        text, image = F.normalize(tables["text"][1:].double(), dim=-1), F.normalize(tables["image"][1:].double(), dim=-1)
        out["modality_gap"] = float((text.mean(0) - image.mean(0)).norm())
        out["alignment"] = float((text * image).sum(1).mean())   # mean cos(e^T_i, e^V_i), same item
        # Relational agreement: correlation of the item-item similarity structure of the two modalities.
        n = min(len(text), 2000)
        sim_t, sim_v = (text[:n] @ text[:n].T).flatten(), (image[:n] @ image[:n].T).flatten()
        out["topology_corr"] = float(torch.corrcoef(torch.stack([sim_t, sim_v]))[0, 1])
    return out


def branch_grad_norms(named: dict[str, torch.Tensor]) -> dict[str, float]:
    """Batch-mean L2 norm of dL/d(branch embedding) for u^T, u^V, e^T, e^V and text/image ratios.

    `named` are the raw pooled branch outputs (before L2), which had retain_grad() before the single
    backward (§11.2: never a second backward).
    """
    out = {}
    for name, tensor in named.items():
        if tensor.grad is not None:
            out[f"grad_{name}"] = float(tensor.grad.norm(dim=-1).mean())
    for side in ("u", "e"):
        text, image = out.get(f"grad_{side}_text"), out.get(f"grad_{side}_image")
        if text is not None and image is not None:
            out[f"grad_ratio_{side}"] = text / max(image, 1e-12)
    return out


PLOT_KEYS = ("grad_ratio_u", "grad_ratio_e", "loss_text", "loss_image", "gamma", "valid_full_image_NDCG@10",
             "valid_erank_image", "valid_erank_text")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Curves of the collapse diagnostics over training steps; None when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(run_dir)
    keys = [k for k in PLOT_KEYS if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("step")
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / "diagnostics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Plot a VLM2Rec run's collapse diagnostics")
    parser.add_argument("run_dir", type=Path)
    print(plot_run(parser.parse_args().run_dir))
