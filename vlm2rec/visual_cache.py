"""The frozen vision tower's outputs per item image, cached on disk by content (§5.1): a VLM embedder with a
frozen tower reads them instead of re-running the image processor and the tower every pass."""
from __future__ import annotations

import hashlib
import warnings
import torch
import torch.nn as nn

from common.checkpoints import load_checkpoint, save_checkpoint
from common.io import cache_root

from .console import bar

def _digest_module(module: nn.Module) -> str:
    """SHA-1 over a module's parameters and buffers (names, dtypes, values): what its outputs depend on."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class VisualCache:
    """The frozen vision tower's merged-patch embeddings per item image, computed once and kept on disk at
    <cache_root>/vlm2rec/visual/<key>.pt. The file key is the tower's weights digest + the processor's
    settings + `settings` (the backbone and dtype); the entry key is Catalog.image_key (the image file's
    content digest, size and noise), so a replaced image or another processor never reuses a stale entry.
    A file that fails its check on loading is discarded, not trusted."""

    def __init__(self, embedder: nn.Module, settings: str):
        proc = embedder.image_processor
        spec = (f"{settings}|visual={_digest_module(embedder.model.visual)}|size={dict(proc.size)}"
                f"|patch={proc.patch_size}|merge={proc.merge_size}|temporal={proc.temporal_patch_size}"
                f"|mean={list(proc.image_mean)}|std={list(proc.image_std)}")
        self.path = cache_root() / "vlm2rec" / "visual" / f"{hashlib.sha1(spec.encode()).hexdigest()[:16]}.pt"
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dirty = False
        if self.path.exists():
            try:
                saved = load_checkpoint(self.path)
                entries = {k: (f, g) for k, f, g in zip(saved["keys"], saved["features"], saved["grids"], strict=True)}
                ok = all(f.dim() == 2 and g.shape == (3,) and int(g.prod()) // embedder.merge == f.shape[0]
                         and bool(torch.isfinite(f).all()) for f, g in entries.values())
            except Exception:               # torch.load raises many types on a damaged file
                ok = False
            if ok:
                self.entries = entries
            else:
                warnings.warn(f"visual cache {self.path} failed its check; recomputing it", stacklevel=2)

    @torch.no_grad()
    def fill(self, embedder: nn.Module, items: list[int], batch: int = 32) -> None:
        """Compute the entries `items` lack, a batch of images per tower pass, and save the file."""
        catalog = embedder.catalog
        todo = list(dict.fromkeys(i for i in items if catalog.image_key(i) not in self.entries))
        if not todo:
            return
        device, dtype = next(embedder.model.parameters()).device, next(embedder.model.parameters()).dtype
        for start in bar(range(0, len(todo), batch), "visual cache"):
            chunk = todo[start:start + batch]
            vision = embedder.image_processor(images=[catalog.image(i) for i in chunk], return_tensors="pt")
            grid = vision["image_grid_thw"]
            out = embedder.model.get_image_features(vision["pixel_values"].to(device, dtype), grid.to(device),
                                                    return_dict=True).pooler_output
            for item, feats, thw in zip(chunk, out, grid):
                self.entries[catalog.image_key(item)] = (feats.detach().cpu(), thw.clone())
        keys = list(self.entries)
        save_checkpoint(self.path, {"keys": keys, "features": [self.entries[k][0] for k in keys],
                                    "grids": [self.entries[k][1] for k in keys]})

    def get(self, embedder: nn.Module, items: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-image embeddings (tokens_i, hidden) and the (n, 3) grid of the images of `items`."""
        self.fill(embedder, items)
        pairs = [self.entries[embedder.catalog.image_key(i)] for i in items]
        return [f for f, _ in pairs], torch.stack([g for _, g in pairs])
