"""Speed of the VLM2Rec embedder: items/s when encoding, training pairs/s, peak memory.

    python -m vlm2rec.bench                 # tiny + two-tower on the CPU; a Qwen2.5-VL-3B-sized model on a GPU
    make bench-vlm2rec ARGS="--steps 20"

`tiny` is the random-init test VLM; `two-tower` the MiniLM + EfficientNet-Lite0 stand-in (tower throughput
uncached, then the cached training path); `qwen2.5-vl-3b-sized` builds Qwen2.5-VL-3B's architecture from
hard-coded config values with random bf16 weights (no download) and reports MFU against the GPU's dense
bf16 peak. The GPU part is skipped on a CPU-only machine. The optimisation studies on the real posters
(`--visual-cache`, `--step-shares`, `--workers`, `--tuned`) are in bench_studies.py; the timers both use
are in timing.py.
"""
from __future__ import annotations

import argparse
import time

import torch

from .bench_studies import bench_step_shares, bench_tuned, bench_visual_cache, bench_workers
from .catalog import Catalog
from .config import BackboneConfig, CRTRConfig, DataConfig, LoraSettings, LossConfig, WPCLConfig
from .data import load_dataset
from .encoder import VLMEmbedder, apply_lora, byte_tokenizer, image_processor_for
from .evaluate import split_sequences
from .model import VLM2Rec
from .timing import time_model

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device-name substring.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
# Qwen2.5-VL-3B-Instruct's config.json values, hard-coded so nothing is downloaded.
QWEN25_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, max_position_embeddings=128000, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=2048, num_heads=16,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)


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
