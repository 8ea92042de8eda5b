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
# key -> (panel title, y-axis label); panels whose values are compared share a row and a y axis
PLOT_LABELS = {
    "grad_ratio_u": ("user branch: text / image gradient", "grad-norm ratio (log)"),
    "grad_ratio_e": ("item branch: text / image gradient", "grad-norm ratio (log)"),
    "loss_text": ("text InfoNCE", "loss"),
    "loss_image": ("image InfoNCE", "loss"),
    "gamma": ("WPCL weight γ", "γ"),
    "valid_full_image_NDCG@10": ("validation NDCG@10 (image, full)", "NDCG@10"),
    "valid_erank_image": ("effective rank: image", "effective rank"),
    "valid_erank_text": ("effective rank: text", "effective rank"),
}
SHARED_Y = (("grad_ratio_u", "grad_ratio_e"), ("loss_text", "loss_image"), ("valid_erank_image", "valid_erank_text"))
PLOT_COLUMNS = 4


def diagnostics_figure(records: list[dict], title: str = ""):
    """The diagnostics panels in a grid of PLOT_COLUMNS columns, each with a title and axis labels; the
    pairs that are compared (the two gradient ratios, the two losses, the two effective ranks) share their
    y axis. None when no record holds a key of PLOT_KEYS."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in PLOT_KEYS if any(k in r for r in records)]
    if not keys:
        return None
    cols = min(PLOT_COLUMNS, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows + 0.5), squeeze=False,
                             layout="constrained")
    panel = {}
    for axis, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        name, ylabel = PLOT_LABELS.get(key, (key, key))
        axis.set(title=name, xlabel="training step", ylabel=ylabel)
        axis.title.set_fontsize(9)
        if key.startswith("grad_ratio") and points and min(p[1] for p in points) > 0:
            axis.set_yscale("log")
            axis.axhline(1.0, color="grey", lw=0.8, ls="--")  # balanced modalities
        panel[key] = axis
    for pair in SHARED_Y:
        shown = [panel[k] for k in pair if k in panel]
        if len(shown) == 2:
            shown[1].sharey(shown[0])
    for axis in list(axes.flat)[len(keys):]:
        axis.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Curves of the collapse diagnostics over training steps; None when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = diagnostics_figure(read_metrics(run_dir), f"VLM2Rec collapse diagnostics: {Path(run_dir).name}")
    if fig is None:
        return None
    path = Path(out) if out is not None else Path(run_dir) / "diagnostics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Plot a VLM2Rec run's collapse diagnostics")
    parser.add_argument("run_dir", type=Path)
    print(plot_run(parser.parse_args().run_dir))
