"""VLM2Rec caches are keyed by content and never trusted after a failed check (vlm2rec/docs/method.md §16):
image features and embeddings follow an image file's bytes, not its path; a damaged feature store,
embedding file, negatives file or metadata cache is rebuilt, and the rebuild equals a fresh one."""
import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.io import cache_root
from vlm2rec import evaluate as veval
from vlm2rec.catalog import Catalog
from vlm2rec.config import DataConfig, TwoTowerConfig
from vlm2rec.data import load_dataset
from vlm2rec.two_tower import IMAGE_DIM, TEXT_DIM, FeatureStore, TwoTower


def write_png(path: Path, colour) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def fake_effnet(self, images):
    """Mean colour of each image, tiled to the tower's width: cheap, and different for different pixels."""
    means = torch.tensor(np.array([np.asarray(img, dtype=np.float32).mean(axis=(0, 1)) for img in images]))
    return means.repeat(1, IMAGE_DIM // 3 + 1)[:, :IMAGE_DIM] / 255


def fake_minilm(self, texts):
    return torch.tensor([[float(len(t))] * TEXT_DIM for t in texts])


def test_image_key_follows_the_bytes_not_the_path(tmp_path):
    a = write_png(tmp_path / "a" / "1.jpg", (200, 10, 10))
    b = write_png(tmp_path / "b" / "1.jpg", (200, 10, 10))       # same pixels, another folder
    keys = Catalog(["", "t"], [None, a], 32).image_key(1), Catalog(["", "t"], [None, b], 32).image_key(1)
    assert keys[0] == keys[1] and str(a) not in keys[0]
    write_png(a, (10, 200, 10))                                    # the image at the same path is replaced
    assert Catalog(["", "t"], [None, a], 32).image_key(1) != keys[0]
    assert Catalog(["", "t"], [None, a], 32).fingerprint() != Catalog(["", "t"], [None, b], 32).fingerprint()
    missing = Catalog(["", "t"], [None, tmp_path / "gone.jpg"], 32)
    assert missing.image_key(1).startswith("missing|")


def test_a_replaced_image_gets_fresh_two_tower_features(tmp_path, monkeypatch):
    monkeypatch.setattr(TwoTower, "_effnet", fake_effnet)
    monkeypatch.setattr(TwoTower, "_minilm", fake_minilm)
    poster = write_png(tmp_path / "posters" / "1.jpg", (250, 0, 0))
    other = write_png(tmp_path / "posters" / "2.jpg", (0, 0, 250))
    catalog = lambda: Catalog(["", "one", "two"], [None, poster, other], 32)   # noqa: E731
    first = TwoTower(TwoTowerConfig(), catalog(), torch.device("cpu")).item_image.clone()
    write_png(poster, (0, 250, 0))                                 # repaired poster, same file name
    second = TwoTower(TwoTowerConfig(), catalog(), torch.device("cpu")).item_image
    assert not torch.allclose(first[1], second[1])                 # item 1 recomputed from the new bytes
    assert torch.equal(first[2], second[2])                        # item 2 read back from the store
    assert torch.allclose(second[1], fake_effnet(None, [catalog().image(1)])[0])


def test_a_damaged_feature_store_is_rebuilt_not_trusted(tmp_path):
    calls = []

    def compute(texts):
        calls.append(len(texts))
        return torch.tensor([[float(len(t)), 1.0] for t in texts])
    store = FeatureStore("unit-test", f"damaged-{tmp_path.name}", 2, compute, batch=8)
    fresh = store.get(["ab", "abc"], lambda i: ["ab", "abc"][i])
    assert store.path.exists() and calls == [2]
    assert torch.equal(FeatureStore("unit-test", f"damaged-{tmp_path.name}", 2, compute, 8).get(
        ["abc"], lambda i: "abc"), fresh[1:]) and calls == [2]     # read back, not recomputed
    other = FeatureStore("unit-test", f"other-settings-{tmp_path.name}", 2, compute, 8)
    assert other.path != store.path                                 # settings are part of the key
    store.path.write_bytes(store.path.read_bytes()[:40])            # truncated by a crash elsewhere
    with pytest.warns(UserWarning, match="failed its check"):
        again = FeatureStore("unit-test", f"damaged-{tmp_path.name}", 2, compute, 8)
    assert torch.equal(again.get(["ab", "abc"], lambda i: ["ab", "abc"][i]), fresh) and calls == [2, 2]
    torch.save({"keys": ["x"], "features": torch.full((1, 2), float("nan"))}, store.path)   # non-finite rows
    with pytest.warns(UserWarning, match="failed its check"):
        assert FeatureStore("unit-test", f"damaged-{tmp_path.name}", 2, compute, 8).index == {}


def test_negatives_are_redrawn_after_a_failed_check():
    sequences = [np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8, 9])]
    first, sha = veval.negatives(sequences, 30, 5, 0, "valid", "unit-negatives")
    path = next((cache_root() / "vlm2rec" / "unit-negatives").glob("negatives_valid_n5_s0_*.npy"))
    for damage in (lambda: path.write_bytes(path.read_bytes()[:30]),                       # truncated
                   lambda: np.save(path, np.where(first == first[0, 0], 1, first)),         # a seen item
                   lambda: np.save(path, first[:1])):                                       # wrong shape
        damage()
        with pytest.warns(UserWarning, match="drawing them again"):
            again, again_sha = veval.negatives(sequences, 30, 5, 0, "valid", "unit-negatives")
        assert np.array_equal(again, first) and again_sha == sha
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(veval.negatives(sequences, 30, 5, 0, "valid", "unit-negatives")[0], first)
    other, _ = veval.negatives(sequences, 31, 5, 0, "valid", "unit-negatives")   # the catalogue size is keyed
    assert len(list(path.parent.glob("negatives_valid_n5_s0_*.npy"))) == 2 and other.max() <= 31


def test_a_damaged_embedding_cache_is_recomputed(tmp_path):
    path = tmp_path / "embeddings.pt"
    users, items = {"both": torch.ones(3, 4)}, {"both": torch.ones(6, 4)}
    torch.save({"users": users, "items": items}, path)
    assert veval._saved_embeddings(path, 3, 5, ("both",))[0]["both"].shape == (3, 4)
    for bad in ({"users": users, "items": {"both": torch.ones(5, 4)}},            # another catalogue size
                {"users": users, "items": items, "extra": 1} | {"users": {"text": torch.ones(3, 4)}}):
        torch.save(bad, path)
        with pytest.warns(UserWarning, match="recomputing"):
            assert veval._saved_embeddings(path, 3, 5, ("both",)) is None
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="recomputing"):
        assert veval._saved_embeddings(path, 3, 5, ("both",)) is None


def _write_gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def test_amazon_metadata_cache_follows_the_metadata_file(tmp_path):
    folder = tmp_path / "amazon" / "Unit"
    reviews = [json.dumps({"reviewerID": f"U{u}", "asin": f"A{i}", "unixReviewTime": i, "overall": 5.0})
               for u in range(5) for i in range(5)]
    _write_gz(folder / "reviews_Unit_5.json.gz", reviews)
    _write_gz(folder / "meta_Unit.json.gz", [repr({"asin": f"A{i}", "title": f"old {i}"}) for i in range(5)])
    cfg = DataConfig(name="amazon", root=str(tmp_path), category="Unit", missing_image="placeholder")
    assert load_dataset(cfg)["titles"][1] == "old 0"
    _write_gz(folder / "meta_Unit.json.gz", [repr({"asin": f"A{i}", "title": f"new {i}"}) for i in range(5)])
    assert load_dataset(cfg)["titles"][1] == "new 0"                # not the cached old titles
    (folder / "items.json").write_text('{"meta_sha1": "')           # truncated cache
    with pytest.warns(UserWarning, match="items.json is damaged"):
        assert load_dataset(cfg)["titles"][1] == "new 0"
    assert json.loads((folder / "items.json").read_text())["items"]["A0"]["title"] == "new 0"


def test_synthetic_images_are_written_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    data = load_dataset(DataConfig(name="synthetic", num_users=4, num_items=6, image_size=28))
    folder = Path(data["images"][1]).parent
    assert {p.name for p in folder.iterdir()} == {f"{i}.png" for i in range(1, 7)}   # no temp files left
    assert all(Image.open(path).size == (28, 28) for path in data["images"][1:])
