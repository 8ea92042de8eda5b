"""VLM2Rec practicality (vlm2rec/docs/method.md §5.1, §5.4, §5.5): images keep their aspect ratio within the
pixel budget, the chat-template prompt form and its pooled token, and the peft export of the adapters."""
import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm2rec.backbones import build_tiny_embedder
from vlm2rec.catalog import Catalog, equal_area, load_image
from vlm2rec.config import BackboneConfig, LoraSettings, PromptConfig


def embedder(catalog, variant="qwen2-vl", **backbone):
    torch.manual_seed(0)
    cfg = BackboneConfig(name="tiny", lora=LoraSettings(r=4, alpha=8), **backbone)
    return build_tiny_embedder(cfg, catalog, torch.device("cpu"), variant)


def poster(path: Path, size=(92, 138)) -> Path:
    """An ML-100K-shaped 2:3 poster (92 x 138 px), striped so a distortion would not go unseen."""
    img = Image.new("RGB", size, (200, 30, 30))
    for y in range(0, size[1], 10):
        img.paste((30, 30, 200), (0, y, size[0], y + 3))
    img.save(path)
    return path


def test_equal_area_keeps_the_ratio_and_maps_a_square_to_itself():
    assert equal_area(224, 224, 224) == (224, 224)
    w, h = equal_area(92, 138, 224)
    assert abs(h / w - 1.5) < 0.01 and abs(w * h / 224 ** 2 - 1) < 0.01


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_a_2_3_poster_keeps_a_2_3_patch_grid(tmp_path, variant):
    path = poster(tmp_path / "p.jpg")
    kept = Catalog(["", "a"], [None, path], 224, keep_aspect=True)
    square = Catalog(["", "a"], [None, path], 224)
    assert kept.image(1).size == equal_area(92, 138, 224) and square.image(1).size == (224, 224)
    model = embedder(kept, variant, image_pixels=224 * 224, visual_cache=False)
    grids = {}
    for name, catalog in (("kept", kept), ("square", square)):
        out = model.image_processor(images=[catalog.image(1)], return_tensors="pt")
        _, h, w = out["image_grid_thw"][0].tolist()
        grids[name] = (h, w)
        # within the budget: the processor rounds each side to whole 28-px merged patches, down when the
        # rounded area would exceed max_pixels (18 x 12 patches = 84 % of the budget for this poster)
        assert 0.8 <= h * w * 14 * 14 / (224 * 224) <= 1.0, (name, h, w)
    h, w = grids["kept"]
    assert abs(h / w - 1.5) < 0.1, grids          # ~2:3 (rounded to whole 28-px merged patches)
    assert grids["square"] == (16, 16)           # what the square resize gave: a 1.5x distortion
    # the embedding runs on the non-square grid (its own token count) and the keys tell the two apart
    assert model.branch("item_image", torch.tensor([1])).shape == (1, model.hidden_size)
    assert kept.image_key(1) != square.image_key(1)


def test_the_visual_cache_keys_the_aspect_setting(tmp_path):
    path = poster(tmp_path / "p.jpg")
    kept, square = (Catalog(["", "a"], [None, path], 224, keep_aspect=k) for k in (True, False))
    model = embedder(kept, image_pixels=224 * 224)
    _, grid = model.visual_cache.get(model, [1])
    model.set_catalog(square)                          # the same file, squared: another entry, not a stale one
    _, grid_sq = model.visual_cache.get(model, [1])
    assert kept.image_key(1) in model.visual_cache.entries and square.image_key(1) in model.visual_cache.entries
    assert grid.tolist() == [[1, 18, 12]] and grid_sq.tolist() == [[1, 16, 16]]


def test_raw_and_chat_prompt_token_ids_and_the_pooled_token():
    from vlm2rec.encoder import byte_tokenizer
    catalog = Catalog(["", "red lamp", "blue kite"], [None, None, None], 56)
    raw = embedder(catalog)
    chat = embedder(catalog, prompts=dataclasses.replace(PromptConfig(), chat_template=True, system="S"))
    assert len(raw.tokenizer) == 261 and len(chat.tokenizer) == 263     # the default tiny vocabulary is unchanged
    tok = chat.tokenizer
    im_start, im_end, end = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert (im_start, im_end, end) == (261, 262, 256)
    byte = lambda text: byte_tokenizer()(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    prompt = "red lamp\nRepresent this item:"
    raw_ids = raw.preparer.tokens([raw.preparer.wrap(prompt)], {})["input_ids"][0].tolist()
    assert raw_ids == byte(prompt) and len(raw_ids) == len(prompt.encode())
    chat_ids = chat.preparer.tokens([chat.preparer.wrap(prompt)], {})["input_ids"][0].tolist()
    assert chat_ids == ([im_start] + byte("system\nS") + [im_end] + byte("\n") + [im_start] + byte("user\n" + prompt)
                        + [im_end] + byte("\n") + [im_start] + byte("assistant\n") + [end])
    # The pooled token is the last real one: ':' of the instruction (raw), the appended end token (chat),
    # with left padding in a batch of two lengths; the pooled vector is that position's hidden state.
    for model, last in ((raw, byte(":")[0]), (chat, end)):
        ids = torch.tensor([1, 2])
        batch = model.prepare("item_text", ids)
        assert batch["attention_mask"][0, 0] == 0 and batch["input_ids"][:, -1].tolist() == [last, last]
        hidden = model.model(use_cache=False, **batch).last_hidden_state
        torch.testing.assert_close(model.branch("item_text", ids), hidden[:, -1].float())
    assert not torch.allclose(raw.branch("item_text", torch.tensor([1])), chat.branch("item_text", torch.tensor([1])))


def test_chat_template_refuses_a_tokenizer_without_chat_tokens():
    from vlm2rec.encoder import VLMEmbedder, byte_tokenizer, image_processor_for, tiny_vlm
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="chat_template=true needs the chat tokens <\\|im_start\\|>"):
        VLMEmbedder(tiny_vlm(tok), tok, image_processor_for(3136), Catalog(["", "a"], [None, None], 56),
                    PromptConfig(chat_template=True), "tiny", 16, False)


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_the_peft_export_round_trips(tmp_path, variant):
    from peft import PeftModel

    from vlm2rec.encoder import VLMEmbedder, tiny_vlm
    path = poster(tmp_path / "p.jpg")
    catalog = Catalog(["", "red lamp", "blue kite"], [None, path, None], 56, keep_aspect=True)
    trained = embedder(catalog, variant, image_pixels=3136, visual_cache=False)
    with torch.no_grad():                          # trained adapters: lora_B is no longer its zero init
        for name, param in trained.model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    assert trained.save_adapter(tmp_path / "adapter", "tiny")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    torch.manual_seed(0)                           # the same random base the embedder was built on
    base = tiny_vlm(trained.tokenizer, variant)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    again = VLMEmbedder(loaded, trained.tokenizer, trained.image_processor, catalog, trained.prompts, "tiny", 64, False)
    trained.eval(), again.eval()
    for what, ids in (("item_text", [1, 2]), ("item_image", [1, 2]), ("hist_joint", [[0, 1, 2], [2, 1, 2]])):
        torch.testing.assert_close(again.branch(what, torch.tensor(ids)), trained.branch(what, torch.tensor(ids)),
                                   atol=1e-5, rtol=1e-5, msg=what)
    # the same base without the adapters differs: the adapters are what was loaded
    torch.manual_seed(0)
    plain = VLMEmbedder(tiny_vlm(trained.tokenizer, variant), trained.tokenizer, trained.image_processor, catalog,
                        trained.prompts, "tiny", 64, False)
    assert not torch.allclose(plain.branch("item_text", torch.tensor([1])), trained.branch("item_text", torch.tensor([1])))
