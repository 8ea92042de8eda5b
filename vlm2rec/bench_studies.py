"""The VLM2Rec optimisation studies on the real ML-100K posters (`python -m vlm2rec.bench --visual-cache /
--step-shares / --workers / --tuned`): each times training steps of one setting against its alternative.

  bench_visual_cache  frozen vision tower with the visual cache off / on (tiny Qwen2-VL / 2.5-VL at 224^2)
  bench_step_shares   where a step's time goes (prep, vision tower, language model, optimiser)
  bench_workers       a trained-tower step with its inputs prepared by 0 or N DataLoader workers
  bench_tuned         the two-tower stand-in with tuned towers (configs/ml100k_tune.yaml) vs frozen ones
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .catalog import Catalog
from .config import (BackboneConfig, CRTRConfig, DataConfig, LoraSettings, LossConfig, TrainConfig, TwoTowerConfig,
                     WPCLConfig)
from .data import load_dataset
from .evaluate import split_sequences
from .model import VLM2Rec
from .timing import StepClock, time_model
from .train import make_accelerator, make_optimiser, prepared_loader, train_one_epoch


def bench_visual_cache(variant: str, cached: bool, root: str | None, batch_size: int = 8, steps: int = 2,
                       image_pixels: int = 50176) -> dict:
    """Training pairs/s and evaluation items/s of a tiny Qwen-VL at a realistic image budget on the real
    ML-100K posters, with or without the visual cache (its one-off fill is timed apart)."""
    device = torch.device("cpu")
    data = load_dataset(DataConfig(name="ml100k-posters", root=root))
    split = split_sequences(data["sequences"], 10)
    catalog = Catalog(data["titles"], data["images"], 224, keep_aspect=True)   # as main.py builds it for a VLM
    idx = torch.randperm(len(split["train"]["target"]), generator=torch.Generator().manual_seed(0))[:batch_size].numpy()
    batch = {"history": torch.as_tensor(split["train"]["history"][idx]),
             "target": torch.as_tensor(split["train"]["target"][idx])}
    items = torch.arange(1, 65)
    torch.manual_seed(0)
    cfg = BackboneConfig(name="tiny" if variant == "qwen2-vl" else "tiny-qwen2.5-vl", image_pixels=image_pixels,
                         visual_cache=cached, lora=LoraSettings(r=4, alpha=8))
    model = VLM2Rec(cfg, catalog, device, LossConfig(), WPCLConfig(), CRTRConfig())
    fill_s, filled = 0.0, 0
    if cached:   # what precompute does for the whole catalogue, here for the items this benchmark touches
        need = sorted((set(batch["history"].flatten().tolist()) - {0}) | set(batch["target"].tolist()) | set(items.tolist()))
        start = time.perf_counter()
        model.embedder.visual_cache.fill(model.embedder, need)
        fill_s, filled = time.perf_counter() - start, len(need)
    out = time_model(model, batch, items, steps, device)
    return {**out, "cache_fill_s": fill_s, "cache_images": filled}


def bench_step_shares(variant: str, mode: str, root: str | None, batch_size: int = 8, steps: int = 2,
                      image_pixels: int = 50176) -> dict:
    """Where a training step's time goes (StepClock), tiny Qwen-VL on the real ML-100K posters at a
    realistic budget; mode: "cache" (frozen tower, visual cache), "frozen" (frozen tower, no cache),
    "train-tower" (lora.include_vision: the processor and the tower run every step)."""
    device = torch.device("cpu")
    data = load_dataset(DataConfig(name="ml100k-posters", root=root))
    split = split_sequences(data["sequences"], 10)
    catalog = Catalog(data["titles"], data["images"], 224, keep_aspect=True)
    idx = torch.randperm(len(split["train"]["target"]), generator=torch.Generator().manual_seed(0))[:batch_size].numpy()
    torch.manual_seed(0)
    cfg = BackboneConfig(name="tiny" if variant == "qwen2-vl" else "tiny-qwen2.5-vl", image_pixels=image_pixels,
                         visual_cache=mode == "cache",
                         lora=LoraSettings(r=4, alpha=8, include_vision=mode == "train-tower"))
    model = VLM2Rec(cfg, catalog, device, LossConfig(), WPCLConfig(), CRTRConfig())
    clock = StepClock(model, device)
    clock.batch = {"history": torch.as_tensor(split["train"]["history"][idx]),
                   "target": torch.as_tensor(split["train"]["target"][idx])}
    if mode == "cache":
        need = sorted((set(clock.batch["history"].flatten().tolist()) - {0}) | set(clock.batch["target"].tolist()))
        model.embedder.visual_cache.fill(model.embedder, need)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    clock.step(optimizer)                                          # warm-up
    rows = [clock.step(optimizer) for _ in range(steps)]
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def bench_tuned(tuned: bool, root: str | None, batch_size: int = 64, steps: int = 3) -> dict:
    """The two-tower stand-in on the real ML-100K posters, configs/ml100k_tune.yaml's towers (one MiniLM
    layer with LoRA r 8, EfficientNet's last stage) or the same heads over frozen towers: training step
    time over real batches (3 latest pairs per user), the unique items a step encodes, the forward time
    of each tuned tower within it (their backward is in the rest of the step), and one no-grad pass over
    the catalogue (what an evaluation pays once)."""
    cfg = DataConfig(name="ml100k-posters", root=root)
    data = load_dataset(cfg)
    split = split_sequences(data["sequences"], cfg.max_history, 3)
    catalog = Catalog(data["titles"], data["images"], cfg.image_size)
    towers = TwoTowerConfig(hist_text="attention", max_text_tokens=64, tune_text_layers=1 if tuned else 0,
                            tune_image_stage=tuned, tower_lr=1e-4)
    backbone = BackboneConfig(name="two-tower", two_tower=towers, lora=LoraSettings(r=8, alpha=16))
    model = VLM2Rec(backbone, catalog, torch.device("cpu"), LossConfig(), WPCLConfig(), CRTRConfig())
    optimizer, _ = make_optimiser(model, len(split["train"]["target"]), TrainConfig(lr=1e-3, batch_size=batch_size), 1)
    spent = {"text": 0.0, "image": 0.0}
    tower = model.embedder
    encode = tower._encode

    def timed(kind, items):                  # this model's tuned towers only (an instance attribute)
        start = time.perf_counter()
        out = encode(kind, items)
        spent[kind] += time.perf_counter() - start
        return out
    tower._encode = timed
    order = np.random.default_rng(0).permutation(len(split["train"]["target"]))
    model.train()
    times, unique = [], []
    for step in range(steps + 1):                                     # step 0 warms up
        idx = order[step * batch_size:(step + 1) * batch_size]
        batch = {key: torch.as_tensor(split["train"][key][idx]) for key in ("history", "target")}
        unique.append(len(torch.unique(torch.cat([batch["history"].reshape(-1), batch["target"]]))) - 1)
        if step == 1:
            spent.update(text=0.0, image=0.0)                         # count the timed steps only
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    forward = dict(spent)                                             # the towers' forward in the timed steps
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        model.item_table(data["num_items"], "both", 256)
    table_s = time.perf_counter() - start
    step_s = sum(times[1:]) / steps
    return {"step_s": step_s, "train_pairs_per_s": batch_size / step_s, "unique_items_per_step": sum(unique[1:]) / steps,
            "text_tower_forward_s": forward["text"] / steps, "image_stage_forward_s": forward["image"] / steps,
            "catalogue_pass_s": table_s, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def bench_workers(variant: str, num_workers: int, root: str | None, batch_size: int = 8, steps: int = 2,
                  image_pixels: int = 50176) -> dict:
    """A trained-tower step (lora.include_vision: prompts, tokenizer and processor every step) through
    train_one_epoch, tiny Qwen-VL on the real ML-100K posters at a realistic budget, with its inputs prepared
    on the main process (num_workers=0) or by train.num_workers DataLoader workers. Wall seconds per step
    over an epoch of `steps` steps after a warm-up epoch (which starts the workers): `step_s` counts the
    epoch's first step, which waits for the workers' first batch, `steady_step_s` leaves it out."""
    device = torch.device("cpu")
    data = load_dataset(DataConfig(name="ml100k-posters", root=root))
    train = split_sequences(data["sequences"], 10)["train"]
    catalog = Catalog(data["titles"], data["images"], 224, keep_aspect=True)
    torch.manual_seed(0)
    cfg = BackboneConfig(name="tiny" if variant == "qwen2-vl" else "tiny-qwen2.5-vl", image_pixels=image_pixels,
                         lora=LoraSettings(r=4, alpha=8, include_vision=True))
    model = VLM2Rec(cfg, catalog, device, LossConfig(), WPCLConfig(), CRTRConfig())
    train_cfg = TrainConfig(batch_size=batch_size, max_steps_per_epoch=steps, grad_norm_every=0, log_every=1,
                            num_workers=num_workers)
    accelerator = make_accelerator(train_cfg, device)
    optimizer, scheduler = make_optimiser(model, len(train["target"]), train_cfg, 1)
    loader, _ = prepared_loader(model, train_cfg, device)
    ends: list[float] = []
    log = lambda record: ends.append(time.perf_counter())          # noqa: E731  (log_every=1: once per step)
    train_one_epoch(model, optimizer, scheduler, accelerator, train, train_cfg, 0, 0, 0, log, loader)   # warm-up
    ends.clear()
    start = time.perf_counter()
    train_one_epoch(model, optimizer, scheduler, accelerator, train, train_cfg, 0, 1, steps, log, loader)
    if loader is not None:
        loader.close()
    times = [b - a for a, b in zip([start] + ends[:-1], ends)]
    return {"num_workers": num_workers, "steps": len(times), "step_s": sum(times) / len(times),
            "steady_step_s": sum(times[1:]) / max(1, len(times) - 1), "first_step_s": times[0],
            "train_pairs_per_s": batch_size * len(times) / sum(times)}
