"""Speed of the VLM2Rec embedder: items/s when encoding, training pairs/s, peak memory.

    python -m vlm2rec.bench                 # tiny + two-tower on the CPU; a Qwen2.5-VL-3B-sized model on a GPU
    make bench-vlm2rec ARGS="--steps 20"

`tiny` is the random-init test VLM; `two-tower` the MiniLM + EfficientNet-Lite0 stand-in (tower throughput
uncached, then the cached training path); `qwen2.5-vl-3b-sized` builds Qwen2.5-VL-3B's architecture from
hard-coded config values with random bf16 weights (no download) and reports MFU against the GPU's dense
bf16 peak. The GPU part is skipped on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from .catalog import Catalog
from .config import (BackboneConfig, CRTRConfig, DataConfig, LoraSettings, LossConfig, TrainConfig, TwoTowerConfig,
                     WPCLConfig)
from .data import load_dataset
from .encoder import VLMEmbedder, apply_lora, byte_tokenizer, image_processor_for
from .evaluate import split_sequences
from .model import VLM2Rec
from .train import make_accelerator, make_optimiser, prepared_loader, train_one_epoch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device-name substring.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
# Qwen2.5-VL-3B-Instruct's config.json values, hard-coded so nothing is downloaded.
QWEN25_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, max_position_embeddings=128000, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=2048, num_heads=16,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB -> MiB (process peak RSS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(model: VLM2Rec, batch: dict, items: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Items/s of item encoding (both branches) and training pairs/s (forward + backward + AdamW)."""
    with torch.no_grad():
        model.encode("item", items[:2])                                   # warm-up
        _sync(device)
        start = time.perf_counter()
        model.encode("item", items)
        _sync(device)
        encode_s = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    model.loss(batch).backward()                                          # warm-up step
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        optimizer.step()
    _sync(device)
    train_s = time.perf_counter() - start
    return {"items_encoded": len(items), "pairs_per_step": len(batch["target"]), "steps": steps,
            "encode_items_per_s": len(items) / encode_s, "train_pairs_per_s": steps * len(batch["target"]) / train_s,
            "train_step_s": train_s / steps, "peak_memory_mb": peak_memory_mb(device)}


def _synthetic(image_size: int, max_history: int = 10):
    data = load_dataset(DataConfig(name="synthetic", num_users=64, num_items=64, image_size=image_size,
                                   max_history=max_history))
    split = split_sequences(data["sequences"], max_history)
    return data, split, Catalog(data["titles"], data["images"], image_size)


def bench_cpu(kind: str, batch_size: int, steps: int) -> dict:
    device = torch.device("cpu")
    image_size = 56 if kind == "tiny" else 224
    data, split, catalog = _synthetic(image_size)
    cfg = BackboneConfig(name=kind, image_pixels=image_size ** 2, lora=LoraSettings(enabled=kind == "tiny", r=4, alpha=8))
    model = VLM2Rec(cfg, catalog, device, LossConfig(), WPCLConfig(), CRTRConfig())
    out = {}
    if kind == "two-tower":   # uncached tower throughput first: what filling the feature cache costs
        tower = model.embedder
        titles, images = data["titles"][1:33], [catalog.image(i) for i in range(1, 17)]
        with torch.inference_mode():
            tower._minilm(titles[:2]), tower._effnet(images[:2])
            start = time.perf_counter(); tower._minilm(titles); minilm_s = time.perf_counter() - start
            start = time.perf_counter(); tower._effnet(images); effnet_s = time.perf_counter() - start
        out = {"minilm_titles_per_s": len(titles) / minilm_s, "effnet_images_per_s": len(images) / effnet_s}
        model.embedder.precompute(list(split["train"]["history"][:batch_size]))
    batch = {"history": torch.as_tensor(split["train"]["history"][:batch_size]),
             "target": torch.as_tensor(split["train"]["target"][:batch_size])}
    items = torch.arange(1, data["num_items"] + 1)
    return {**out, **time_model(model, batch, items, steps, device)}


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


class StepClock:
    """Explicit timers over one training step of a VLM embedder: data prep (prompt building, tokenizer,
    image processor or visual-cache lookup: `VLMEmbedder.inputs`), the vision tower's forward (hooks on
    `model.visual`), the rest of the model's forward (the language model), the backward and the
    optimiser. With a frozen tower the backward is the language model's alone (nothing before the
    LM needs a gradient); with a trained tower its backward is timed apart on the step's own pixels."""

    def __init__(self, model: VLM2Rec, device: torch.device):
        self.model, self.device, self.times = model, device, {}
        self.pixels: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replaying = False
        embedder = model.embedder
        inputs = embedder.inputs

        def timed_inputs(texts, images):
            start = time.perf_counter()
            out = inputs(texts, images)
            _sync(device)
            self._add("prep", time.perf_counter() - start)
            return out
        embedder.inputs = timed_inputs          # instance attribute: this benchmark's model only
        visual = embedder.model.visual
        visual.register_forward_pre_hook(self._vision_start, with_kwargs=True)
        visual.register_forward_hook(self._vision_end)

    def _add(self, key: str, seconds: float) -> None:
        self.times[key] = self.times.get(key, 0.0) + seconds

    def _vision_start(self, module, args, kwargs):
        if self.replaying:                       # _vision_backward's own passes are not the step's
            return
        _sync(self.device)
        self._start = time.perf_counter()
        if any(p.requires_grad for p in module.parameters()):
            self.pixels.append((args[0].detach(), (args[1] if len(args) > 1 else kwargs["grid_thw"]).detach()))

    def _vision_end(self, module, args, output):
        if self.replaying:
            return
        _sync(self.device)
        self._add("vision_forward", time.perf_counter() - self._start)

    def step(self, optimizer) -> dict:
        """One timed step; returns seconds per part and each part's share of the step."""
        self.times, self.pixels = {}, []
        start = time.perf_counter()
        loss = self.model.loss(self.batch)
        _sync(self.device)
        forward = time.perf_counter() - start
        mark = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(self.device)
        backward = time.perf_counter() - mark
        mark = time.perf_counter()
        optimizer.step()
        _sync(self.device)
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
            _sync(self.device)
            mid = time.perf_counter()
            (out.pooler_output if hasattr(out, "pooler_output") else out).float().sum().backward()
            _sync(self.device)
            total += time.perf_counter() - mid
        self.replaying = False
        for p in visual.parameters():
            p.grad = None
        return total


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


def bench_gpu_qwen(batch_size: int, steps: int, image_pixels: int) -> dict:
    """Qwen2.5-VL-3B-sized model, random bf16 weights, LoRA + non-reentrant checkpointing, on CUDA."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    tokenizer = byte_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                                                            "<|image_pad|>", "<|video_pad|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, **QWEN25_VL_3B_TEXT, pad_token_id=ids["<|endoftext|>"]),
        vision_config=QWEN25_VL_3B_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.device(device):     # built directly on the GPU in bf16: random weights, nothing downloaded
        base = Qwen2_5_VLModel._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    params = sum(p.numel() for p in base.parameters())
    base = apply_lora(base, LoraSettings())
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data, split, catalog = _synthetic(224)
    cfg = BackboneConfig(name="qwen2.5-vl", image_pixels=image_pixels)
    embedder = VLMEmbedder(base, tokenizer, image_processor_for(image_pixels), catalog, cfg.prompts,
                           "qwen2.5-vl-3b-sized(random)", cfg.max_title_tokens, False)
    model = VLM2Rec(cfg, catalog, device, LossConfig(), WPCLConfig(), CRTRConfig(), embedder=embedder)
    batch = {"history": torch.as_tensor(split["train"]["history"][:batch_size], device=device),
             "target": torch.as_tensor(split["train"]["target"][:batch_size], device=device)}
    items = torch.arange(1, min(65, data["num_items"] + 1), device=device)
    out = time_model(model, batch, items, steps, device)
    # Tokens per training pair over the four passes: image tokens + text bytes (byte tokenizer: 1 token/byte).
    image_tokens = image_pixels // (28 * 28)
    hist_len = float((batch["history"] > 0).sum(dim=1).float().mean())
    tokens_per_pair = image_tokens * (hist_len + 1) + 40 * hist_len + 120     # rough text share; printed below
    peak = next((v for k, v in BF16_PEAK.items() if k in torch.cuda.get_device_name(device)), None)
    # Useful training FLOPs with a frozen base: forward 2NT + activation backward 2NT (recompute not counted).
    flops = 4 * params * tokens_per_pair * out["train_pairs_per_s"]
    out.update({"params": params, "tokens_per_pair_est": tokens_per_pair, "achieved_tflops": flops / 1e12,
                "mfu": flops / peak if peak else None, "device": torch.cuda.get_device_name(device)})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="accepted for the Makefile; the benchmark uses synthetic inputs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backbones", nargs="*", default=["tiny", "two-tower"], choices=["tiny", "two-tower"])
    parser.add_argument("--visual-cache", action="store_true",
                        help="also: tiny Qwen2-VL / 2.5-VL at 224^2 on the real ML-100K posters, visual cache off/on")
    parser.add_argument("--step-shares", action="store_true",
                        help="also: where a step's time goes (prep, vision tower, language model, optimiser), "
                             "tiny Qwen2-VL / 2.5-VL at 224^2 on the real posters, cached / frozen / trained tower")
    parser.add_argument("--workers", nargs="*", type=int, default=[],
                        help="also: a trained-tower step (lora.include_vision) with each of these train.num_workers "
                             "(e.g. 0 2), tiny Qwen2-VL / 2.5-VL at 224^2 on the real posters")
    parser.add_argument("--tuned", action="store_true",
                        help="also: the two-tower stand-in with tuned towers (configs/ml100k_tune.yaml) vs frozen ones, "
                             "batch 64 of real ML-100K pairs")
    parser.add_argument("--root", default=None, help="data root for --visual-cache, --step-shares, --workers and --tuned "
                                                     "(default: $REPRO_DATA)")
    args, _ = parser.parse_known_args(argv)
    torch.manual_seed(0)
    results = {}
    for kind in args.backbones:
        results[kind] = bench_cpu(kind, args.batch_size, args.steps)
        print(f"{kind:8s} cpu  " + "  ".join(f"{k}={v:.4g}" for k, v in results[kind].items()))
    if args.visual_cache:
        for variant in ("qwen2-vl", "qwen2.5-vl"):
            for cached in (False, True):
                row = bench_visual_cache(variant, cached, args.root, steps=args.steps)
                results[f"tiny-{variant}-224-cache-{'on' if cached else 'off'}"] = row
                print(f"tiny {variant:10s} 224^2 posters visual cache {'on ' if cached else 'off'}  " + "  ".join(
                    f"{k}={row[k]:.4g}" for k in ("train_pairs_per_s", "encode_items_per_s", "cache_fill_s")))
    if args.step_shares:
        for variant in ("qwen2-vl", "qwen2.5-vl"):
            for mode in ("cache", "frozen", "train-tower"):
                row = bench_step_shares(variant, mode, args.root, steps=args.steps)
                results[f"tiny-{variant}-224-shares-{mode}"] = row
                print(f"tiny {variant:10s} 224^2 posters {mode:11s} step {row['step_s']:.3f} s: outside the LM "
                      f"{100 * row['outside_lm_share']:.1f} % (prep {100 * row['prep_share']:.1f} %, vision "
                      f"{100 * row['vision_share']:.1f} %)  " + "  ".join(
                          f"{k}={row[k]:.4f}" for k in row if k.endswith("_s") and k != "step_s"))
    for variant in ("qwen2-vl", "qwen2.5-vl") if args.workers else ():
        for workers in args.workers:
            row = bench_workers(variant, workers, args.root, steps=args.steps)
            results[f"tiny-{variant}-224-train-tower-workers-{workers}"] = row
            print(f"tiny {variant:10s} 224^2 posters train-tower num_workers={workers}  " + "  ".join(
                f"{k}={row[k]:.4g}" for k in ("step_s", "steady_step_s", "first_step_s", "train_pairs_per_s")))
    for tuned in (False, True) if args.tuned else ():
        row = bench_tuned(tuned, args.root, steps=args.steps)
        results[f"two-tower-{'tuned' if tuned else 'frozen'}-ml100k"] = row
        print(f"two-tower {'tuned ' if tuned else 'frozen'} ml100k batch 64  " + "  ".join(
            f"{k}={v:.4g}" for k, v in row.items()))
    if torch.cuda.is_available():
        results["qwen2.5-vl-3b-sized"] = bench_gpu_qwen(args.batch_size, args.steps, 50176)
        print("qwen2.5-vl-3b-sized gpu  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in results["qwen2.5-vl-3b-sized"].items()))
    else:
        print("qwen2.5-vl-3b-sized: skipped (no CUDA device)")
    return results


if __name__ == "__main__":
    main()
