"""VLM2Rec first use (vlm2rec/docs/method.md §16): a Qwen-VL backbone loads from a local folder laid out like a hub
snapshot (model, tokenizer and image processor), `backbone.local_files_only` reaches all three loaders,
and a partial snapshot is refused by the preflight, before anything is loaded."""
import shutil
from pathlib import Path

import pytest
import torch

import vlm2rec.backbones as vb
from vlm2rec.catalog import Catalog
from vlm2rec.config import BackboneConfig, LoraSettings
from vlm2rec.encoder import byte_tokenizer, image_processor_for, tiny_vlm


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL written as a hub snapshot is (save_pretrained of model, tokenizer, processor)."""
    folder = tmp_path_factory.mktemp("snapshot") / "tiny-qwen2-vl"
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    tiny_vlm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor_for(3136).save_pretrained(folder)
    return folder


def _cfg(source: Path, local_files_only: bool = True) -> BackboneConfig:
    return BackboneConfig(name="qwen2-vl", source=str(source), local_files_only=local_files_only, image_pixels=3136,
                          lora=LoraSettings(r=4, alpha=8))


@pytest.mark.parametrize("local_files_only", [True, False])
def test_a_local_snapshot_loads_and_every_loader_gets_local_files_only(snapshot, local_files_only, monkeypatch):
    from transformers import AutoModel, AutoTokenizer
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    seen = {}
    for name, cls in (("model", AutoModel), ("tokenizer", AutoTokenizer), ("processor", Qwen2VLImageProcessorPil)):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=name, _original=original, **kwargs):
            seen[_name] = kwargs.get("local_files_only")
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    assert vb.missing_requirements(_cfg(snapshot, local_files_only), "cpu") == []
    catalog = Catalog(["", "red lamp", "blue kite"], [None, None, None], 56)
    embedder = vb.load_hf_embedder(_cfg(snapshot, local_files_only), catalog, torch.device("cpu"))
    assert seen == {"model": local_files_only, "tokenizer": local_files_only, "processor": local_files_only}
    assert type(embedder.model).__name__ == "Qwen2VLModel" and embedder.image_processor.size["longest_edge"] == 3136
    out = embedder.branch("item_image", torch.tensor([1, 2]))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("remove, named", [("model.safetensors", "weights"), ("preprocessor_config.json", "image processor"),
                                           ("tokenizer.json", "tokenizer"), ("config.json", "config")])
def test_a_partial_snapshot_is_refused_in_preflight(snapshot, tmp_path, remove, named, monkeypatch):
    partial = tmp_path / "partial"
    shutil.copytree(snapshot, partial)
    (partial / remove).unlink()
    monkeypatch.setattr(vb, "load_hf_embedder", lambda *a: pytest.fail("loaded despite a partial snapshot"))
    missing = vb.missing_requirements(_cfg(partial), "cpu")
    assert len(missing) == 1 and f"part of the local model {partial}: {named} (" in missing[0]


def test_sharded_weights_with_a_missing_shard_are_refused(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (folder / name).write_text("{}")
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert vb.snapshot_gaps(folder) == ["1 of 2 weight shards (model-00002-of-00002.safetensors, ...)"]


def test_an_old_transformers_is_named(monkeypatch):
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.49.0")
    assert "transformers >= 5.18 (installed 4.49.0" in vb.transformers_too_old()
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    assert "transformers >= 5.18 (installed 5.17.0" in vb.transformers_too_old()
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    assert vb.transformers_too_old() is None
