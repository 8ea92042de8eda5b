"""VLM2Rec visual cache and padding (vlm2rec/docs/method.md §16): with a frozen vision tower, the cached tower
outputs give the same embeddings as running the tower (fp32, tiny Qwen2-VL and Qwen2.5-VL, to 1e-5) in
every branch that holds images; a replaced image, another processor setting or a damaged cache file is
recomputed; a trained tower is never cached; text rows do not depend on their batch's padding."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm2rec.backbones import build_tiny_embedder
from vlm2rec.catalog import Catalog
from vlm2rec.config import BackboneConfig, LoraSettings

VARIANTS = ["qwen2-vl", "qwen2.5-vl"]
BRANCHES = [("item_image", [1, 2, 3]), ("hist_image", [[0, 1, 2], [3, 1, 2]]),
            ("item_joint", [2, 3]), ("hist_joint", [[0, 0, 3], [1, 2, 3]])]


def posters(folder: Path, colours) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [None]
    for i, colour in enumerate(colours, 1):
        Image.new("RGB", (40, 60), colour).save(folder / f"{i}.jpg")   # 2:3 like a poster
        paths.append(folder / f"{i}.jpg")
    return paths


def embedder(catalog, variant, visual_cache=True, include_vision=False, pixels=3136):
    torch.manual_seed(0)
    cfg = BackboneConfig(name="tiny", image_pixels=pixels, visual_cache=visual_cache,
                         lora=LoraSettings(r=4, alpha=8, include_vision=include_vision))
    return build_tiny_embedder(cfg, catalog, torch.device("cpu"), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_tower_outputs_give_the_uncached_embeddings(tmp_path, variant):
    catalog = Catalog(["", "red lamp", "blue kite", "green drum"],
                      posters(tmp_path / variant, [(200, 20, 20), (20, 20, 200), (20, 200, 20)]), 56)
    cached, plain = embedder(catalog, variant), embedder(catalog, variant, visual_cache=False)
    assert cached.visual_cache is not None and plain.visual_cache is None
    cached.precompute([])
    assert {catalog.image_key(i) for i in (1, 2, 3)} <= cached.visual_cache.entries.keys()
    assert cached.visual_cache.path.exists()
    for what, ids in BRANCHES:
        a, b = cached.branch(what, torch.tensor(ids)), plain.branch(what, torch.tensor(ids))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=what)
    # Gradients reach the LoRA weights the same way (the cache only replaces the frozen tower's output).
    for model in (cached, plain):
        model.eval()                                   # LoRA dropout off: both see the same adapter input
        model.branch("hist_image", torch.tensor(BRANCHES[1][1])).sum().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (cached, plain)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_a_replaced_image_or_another_processor_is_recomputed(tmp_path):
    paths = posters(tmp_path / "p", [(200, 20, 20), (20, 20, 200)])
    catalog = lambda: Catalog(["", "a", "b"], paths, 56)                # noqa: E731  (digests read afresh)
    first = embedder(catalog(), "qwen2-vl")
    before = first.branch("item_image", torch.tensor([1, 2]))
    Image.new("RGB", (40, 60), (250, 250, 250)).save(paths[1])          # item 1's poster is replaced
    second = embedder(catalog(), "qwen2-vl")
    assert second.visual_cache.path == first.visual_cache.path           # same tower and processor: one file
    after = second.branch("item_image", torch.tensor([1, 2]))
    assert not torch.allclose(before[0], after[0], atol=1e-4)            # fresh features for the new bytes
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=0)   # the untouched item is reused
    torch.testing.assert_close(after, embedder(catalog(), "qwen2-vl", visual_cache=False).branch(
        "item_image", torch.tensor([1, 2])), atol=1e-5, rtol=1e-5)
    assert embedder(catalog(), "qwen2-vl", pixels=6272).visual_cache.path != first.visual_cache.path


def test_a_damaged_visual_cache_is_recomputed_and_a_trained_tower_is_never_cached(tmp_path):
    paths = posters(tmp_path / "d", [(90, 20, 20)])
    catalog = Catalog(["", "a"], paths, 56)
    model = embedder(catalog, "qwen2.5-vl")
    good = model.branch("item_image", torch.tensor([1]))
    model.visual_cache.path.write_bytes(model.visual_cache.path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="visual cache .* failed its check"):
        again = embedder(catalog, "qwen2.5-vl")
    assert again.visual_cache.entries == {}
    torch.testing.assert_close(again.branch("item_image", torch.tensor([1])), good, atol=1e-6, rtol=0)
    assert embedder(catalog, "qwen2.5-vl", include_vision=True).visual_cache is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_rows_do_not_depend_on_their_batch_padding(variant):
    titles = ["", "red lamp", "a much longer title with many more words than the first one", "kite"]
    model = embedder(Catalog(titles, [None] * 4, 56), variant)
    model.eval()
    with torch.no_grad():
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):   # bf16: rounding of other shapes only
            model.model.to(dtype)
            for what, alone, batch in (("item_text", [1], [1, 2]), ("hist_text", [[0, 0, 1]], [[0, 0, 1], [2, 3, 2]])):
                one = model.branch(what, torch.tensor(alone))[0]
                padded = model.branch(what, torch.tensor(batch))[0]            # row 0 is now left-padded
                assert ((one - padded).norm() / one.norm()).item() < tol, (what, dtype)
