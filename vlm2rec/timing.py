"""The instruments of the VLM2Rec benchmarks: a device sync, the peak memory, item-encoding and training
throughput of a model (`time_model`), and a per-part timer of one training step (`StepClock`)."""
from __future__ import annotations

import resource
import time

import torch

from .model import VLM2Rec


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB -> MiB (process peak RSS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(model: VLM2Rec, batch: dict, items: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Items/s of item encoding (both branches) and training pairs/s (forward + backward + AdamW)."""
    with torch.no_grad():
        model.encode("item", items[:2])                                   # warm-up
        sync(device)
        start = time.perf_counter()
        model.encode("item", items)
        sync(device)
        encode_s = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    model.loss(batch).backward()                                          # warm-up step
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        optimizer.step()
    sync(device)
    train_s = time.perf_counter() - start
    return {"items_encoded": len(items), "pairs_per_step": len(batch["target"]), "steps": steps,
            "encode_items_per_s": len(items) / encode_s, "train_pairs_per_s": steps * len(batch["target"]) / train_s,
            "train_step_s": train_s / steps, "peak_memory_mb": peak_memory_mb(device)}


class StepClock:
    """Explicit timers over one training step of a VLM embedder: data prep (prompt building, tokenizer,
    image processor or visual-cache lookup: `VLMEmbedder.prepare`; the copy to the device counts in the forward), the vision tower's forward (hooks on
    `model.visual`), the rest of the model's forward (the language model), the backward and the
    optimiser. With a frozen tower the backward is the language model's alone (nothing before the
    LM needs a gradient); with a trained tower its backward is timed apart on the step's own pixels."""

    def __init__(self, model: VLM2Rec, device: torch.device):
        self.model, self.device, self.times = model, device, {}
        self.pixels: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replaying = False
        embedder = model.embedder
        prepare = embedder.prepare

        def timed_prepare(what, ids, drop=None):
            start = time.perf_counter()
            out = prepare(what, ids, drop)
            self._add("prep", time.perf_counter() - start)
            return out
        embedder.prepare = timed_prepare        # instance attribute: this benchmark's model only
        visual = embedder.model.visual
        visual.register_forward_pre_hook(self._vision_start, with_kwargs=True)
        visual.register_forward_hook(self._vision_end)

    def _add(self, key: str, seconds: float) -> None:
        self.times[key] = self.times.get(key, 0.0) + seconds

    def _vision_start(self, module, args, kwargs):
        if self.replaying:                       # _vision_backward's own passes are not the step's
            return
        sync(self.device)
        self._start = time.perf_counter()
        if any(p.requires_grad for p in module.parameters()):
            self.pixels.append((args[0].detach(), (args[1] if len(args) > 1 else kwargs["grid_thw"]).detach()))

    def _vision_end(self, module, args, output):
        if self.replaying:
            return
        sync(self.device)
        self._add("vision_forward", time.perf_counter() - self._start)

    def step(self, optimizer) -> dict:
        """One timed step; returns seconds per part and each part's share of the step."""
        self.times, self.pixels = {}, []
        start = time.perf_counter()
        loss = self.model.loss(self.batch)
        sync(self.device)
        forward = time.perf_counter() - start
        mark = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(self.device)
        backward = time.perf_counter() - mark
        mark = time.perf_counter()
        optimizer.step()
        sync(self.device)
        opt = time.perf_counter() - mark
        total = time.perf_counter() - start
        prep, vision_fwd = self.times.get("prep", 0.0), self.times.get("vision_forward", 0.0)
        vision_bwd = self._vision_backward()
        parts = {"prep_s": prep, "vision_forward_s": vision_fwd, "vision_backward_s": vision_bwd,
                 "lm_forward_s": forward - prep - vision_fwd, "lm_backward_s": backward - vision_bwd,
                 "optimizer_s": opt, "step_s": total}
        parts["outside_lm_share"] = (prep + vision_fwd + vision_bwd + opt) / total
        parts["prep_share"], parts["vision_share"] = prep / total, (vision_fwd + vision_bwd) / total
        return parts

    def _vision_backward(self) -> float:
        """A trained tower's backward: its forward + backward on the step's pixels, less that forward."""
        visual, total = self.model.embedder.model.visual, 0.0
        self.replaying = True
        for pixels, grid in self.pixels:
            start = time.perf_counter()
            out = visual(pixels, grid_thw=grid)
            sync(self.device)
            mid = time.perf_counter()
            (out.pooler_output if hasattr(out, "pooler_output") else out).float().sum().backward()
            sync(self.device)
            total += time.perf_counter() - mid
        self.replaying = False
        for p in visual.parameters():
            p.grad = None
        return total
