"""VLM2Rec data half (vlm2rec/docs/method.md §14, §16): synthetic signal, parsers, Amazon recipe, image downloader
against a local HTTP server (never the internet), and the real ML-100K posters statistics (@slow)."""
import gzip
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm2rec import data as vdata
from vlm2rec.catalog import PLACEHOLDER_GREY, is_valid_image, load_image
from vlm2rec.config import DataConfig
from vlm2rec.data import load_dataset, make_synthetic, read_amazon_meta, read_amazon_reviews
from vlm2rec.prepare import cross_check_sequences, download_image, download_images, prepare_amazon
from vlm2rec.prepare import main as prepare_main


def png_bytes(colour=(200, 30, 30), size=(40, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- load_image

def is_grey(img: Image.Image) -> bool:
    return bool((np.asarray(img) == np.array(PLACEHOLDER_GREY, np.uint8)).all())


def test_load_image_placeholder_and_resize(tmp_path):
    grey = load_image(None, 16)
    assert grey.mode == "RGB" and grey.size == (16, 16)
    assert is_grey(grey)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="unreadable image"):
        assert is_grey(load_image(broken, 8))
    real = tmp_path / "real.png"
    real.write_bytes(png_bytes((10, 200, 10)))
    img = load_image(real, 12)
    assert img.size == (12, 12) and img.getpixel((5, 5)) == (10, 200, 10)


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic(tmp_path):
    first = make_synthetic(20, 30, seed=3, image_size=16, out_dir=tmp_path / "a")
    second = make_synthetic(20, 30, seed=3, image_size=16, out_dir=tmp_path / "b")
    other = make_synthetic(20, 30, seed=4, image_size=16, out_dir=tmp_path / "c")
    assert all(np.array_equal(x, y) for x, y in zip(first["sequences"], second["sequences"]))
    assert first["titles"] == second["titles"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first["images"][1:], second["images"][1:]))
    assert not all(np.array_equal(x, y) for x, y in zip(first["sequences"], other["sequences"]))
    reused = make_synthetic(20, 30, seed=4, image_size=16, out_dir=tmp_path / "a")  # stale seed-3 files replaced
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(reused["images"][1:], other["images"][1:]))


def test_synthetic_carries_a_learnable_cluster_signal(tmp_path):
    num_items = 40
    ds = make_synthetic(64, num_items, seed=0, image_size=16, out_dir=tmp_path)
    clusters = vdata.synthetic_clusters(num_items, 0)
    assert ds["num_items"] == num_items and len(ds["titles"]) == len(ds["images"]) == num_items + 1
    assert ds["titles"][0] == "" and ds["images"][0] is None
    assert ds["stats"] == {"users": 64, "items": num_items, "interactions": sum(map(len, ds["sequences"])),
                           "items_with_image": num_items, "items_without_image": 0}
    # Titles: the first word names the cluster.
    for item in range(1, num_items + 1):
        assert ds["titles"][item].split()[0] == vdata.CLUSTER_WORDS[clusters[item]]
    # Images: the mean colour separates clusters (every item is nearer its own cluster's centroid).
    colours = np.stack([np.asarray(load_image(p, 16), np.float32).mean((0, 1)) for p in ds["images"][1:]])
    centroids = {c: colours[clusters[1:] == c].mean(0) for c in np.unique(clusters[1:])}
    nearest = [min(centroids, key=lambda c: np.linalg.norm(colours[i] - centroids[c])) for i in range(num_items)]
    assert np.array_equal(nearest, clusters[1:])
    # Sequences: consecutive items share a cluster far above the 1/K chance level.
    same = [clusters[a] == clusters[b] for s in ds["sequences"] for a, b in zip(s[:-1], s[1:])]
    assert np.mean(same) > 0.6 > 2 / (clusters.max() + 1)
    assert all(len(s) >= 5 and s.min() >= 1 and s.max() <= num_items for s in ds["sequences"])


def test_load_dataset_synthetic_uses_the_cache_and_rejects_bad_config(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path))
    ds = load_dataset(DataConfig(name="synthetic", num_users=8, num_items=12, image_size=8))
    assert ds["name"] == "synthetic-u8-i12-s0" and len(ds["sequences"]) == 8
    assert all(Path(p).parent.is_relative_to(tmp_path) for p in ds["images"][1:])
    with pytest.raises(ValueError, match="data.name"):
        load_dataset(DataConfig(name="movielens"))
    with pytest.raises(ValueError, match="missing_image"):
        load_dataset(DataConfig(missing_image="skip"))


# ---------------------------------------------------------------- Amazon parsers and recipe

def write_gz(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def review(user: str, asin: str, t: int, rating: float = 5.0) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "overall": rating, "unixReviewTime": t, "summary": "x"})


def test_read_amazon_reviews(tmp_path):
    path = write_gz(tmp_path / "r.json.gz", [review("U2", "B", 30), review("U1", "A", 10, 3.0),
                                             review("U2", "A", 20)])
    inter, users, asins = read_amazon_reviews(path)
    assert users == ["U2", "U1"] and asins == ["B", "A"]  # codes by first appearance
    assert inter["user"].tolist() == [0, 1, 0] and inter["item"].tolist() == [0, 1, 1]
    assert inter["timestamp"].tolist() == [30, 10, 20] and inter["rating"].tolist() == [5.0, 3.0, 5.0]
    bad = write_gz(tmp_path / "bad.json.gz", [review("U1", "A", 1), '{"asin": "A"}'])
    with pytest.raises(ValueError, match=r"bad.json.gz:2"):
        read_amazon_reviews(bad)


def test_read_amazon_meta_is_python_literal_and_never_evaluated(tmp_path):
    lines = ["{'asin': 'A1', 'title': 'Tom &amp; Jerry &quot;Box&quot;', 'imUrl': 'http://x/a.jpg', 'price': 3.5}",
             "{'asin': 'A2', 'related': {'also_bought': ['A1']}}",
             "{'asin': 'A3', 'title': 'ignored'}"]
    meta = read_amazon_meta(write_gz(tmp_path / "m.json.gz", lines), asins={"A1", "A2"})
    assert meta == {"A1": {"title": 'Tom & Jerry "Box"', "imUrl": "http://x/a.jpg"},
                    "A2": {"title": "", "imUrl": ""}}
    marker = tmp_path / "pwned"
    evil = write_gz(tmp_path / "evil.json.gz", [f"__import__('pathlib').Path('{marker}').touch()"])
    with pytest.raises(ValueError, match="not a Python dict literal"):
        read_amazon_meta(evil)
    assert not marker.exists()


# ---------------------------------------------------------------- local HTTP server

class ImageServer:
    """127.0.0.1 server on port 0: path -> list of (status, body) replies, the last one repeated."""

    def __init__(self, routes: dict[str, list[tuple[int, bytes]]]):
        self.routes, self.hits = routes, {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                n = server.hits.get(self.path, 0)
                server.hits[self.path] = n + 1
                replies = server.routes.get(self.path, [(404, b"")])
                status, body = replies[min(n, len(replies) - 1)]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def routes() -> dict:
    return {"/ok.png": [(200, png_bytes(size=(600, 300)))], "/missing.png": [(404, b"")],
            "/flaky.png": [(500, b"oops"), (200, png_bytes((0, 0, 250)))],
            "/corrupt.png": [(200, b"\x89PNG\r\n\x1a\n garbage")]}


def test_download_images_success_404_retry_corrupt_and_resume(tmp_path):
    with ImageServer(routes()) as server:
        urls = {name: server.url(f"/{name}.png") for name in ("ok", "missing", "flaky", "corrupt")}
        urls["nourl"] = ""
        out = tmp_path / "images"
        report = download_images(urls, out, workers=4, retries=2, backoff=0.01, max_side=64, progress=False)
        assert report["requested"] == 5 and report["downloaded"] == 2 and report["skipped"] == 0
        assert report["failed"]["missing"] == "HTTP 404"
        assert report["failed"]["corrupt"].startswith("not a decodable image")
        assert report["failed"]["nourl"] == "no image URL" and len(report["failed"]) == 3
        assert server.hits["/flaky.png"] == 2 and server.hits["/missing.png"] == 1  # 404 is not retried
        assert sorted(p.name for p in out.iterdir()) == ["flaky.jpg", "ok.jpg"]  # nothing half-written kept
        with Image.open(out / "ok.jpg") as img:
            assert img.format == "JPEG" and img.size == (64, 32)  # shrunk, aspect kept
        hits_before = dict(server.hits)
        again = download_images(urls, out, workers=4, retries=2, backoff=0.01, max_side=64, progress=False)
        assert again["downloaded"] == 0 and again["skipped"] == 2
        assert server.hits["/ok.png"] == hits_before["/ok.png"] and server.hits["/flaky.png"] == 2


def test_download_image_gives_up_after_retries_and_replaces_a_corrupt_leftover(tmp_path):
    with ImageServer({"/down.png": [(503, b"")], "/ok.png": [(200, png_bytes())]}) as server:
        result = download_image(server.url("/down.png"), tmp_path / "d.jpg", retries=2, backoff=0.01)
        assert result == "failed: HTTP 503 after 3 tries" and server.hits["/down.png"] == 3
        leftover = tmp_path / "ok.jpg"
        leftover.write_bytes(b"truncated")
        assert download_image(server.url("/ok.png"), leftover, backoff=0.01) == "downloaded"
        assert is_valid_image(leftover)


def test_prepare_amazon_offline_end_to_end(tmp_path):
    """7 users x 7 items (all pairs); item G's image 404s, item F has no title. Files are pre-placed, so
    prepare downloads only images, from the local server."""
    category, asins = "Tiny_Cat", list("GFEDCBA")  # file order differs from asin order on purpose
    folder = tmp_path / "amazon" / category
    lines = [review(f"U{u}", a, 100 * u + (6 - k) // 2) for u in range(7) for k, a in enumerate(asins)]
    write_gz(folder / f"reviews_{category}_5.json.gz", lines)
    with ImageServer({f"/{a}.png": [(200, png_bytes())] for a in "ABCDEF"}) as server:
        meta = [repr({"asin": a, "title": f"Item {a}", "imUrl": server.url(f"/{a}.png")})
                for a in asins if a != "F"] + [repr({"asin": "F", "imUrl": server.url("/F.png")})]
        write_gz(folder / f"meta_{category}.json.gz", meta)
        manifest = prepare_amazon(category, tmp_path, workers=2, retries=1)
    assert manifest["sequences"] == {"users": 7, "items": 7, "interactions": 49}
    assert manifest["items_without_title"] == 1
    assert manifest["items_without_image"] == 1 and manifest["images"]["failed"] == {"G": "HTTP 404"}
    assert json.loads((folder / "images_manifest.json").read_text())["items_with_image"] == 6
    kept = load_dataset(DataConfig(name="amazon", root=str(tmp_path), category=category,
                                   missing_image="placeholder"))
    assert kept["titles"] == ["", "Item A", "Item B", "Item C", "Item D", "Item E", "unknown title", "Item G"]
    assert kept["images"][7] is None and kept["stats"]["items_without_image"] == 1
    # Per user, file order G..A has times 3,2,2,1,1,0,0: sorted by time, ties kept in file order (B before A).
    assert kept["sequences"][0].tolist() == [2, 1, 4, 3, 6, 5, 7]
    assert kept["item_ids"] == ["", *"ABCDEFG"] and kept["user_ids"] == [f"U{u}" for u in range(7)]
    # Cross-check against a reference sequence file with its own ids (method.md §14.1, amazon-seq datamaps).
    maps = {"id2user": {"1": "U0", "2": "U1", "3": "nobody"}, "id2item": {str(k): a for k, a in enumerate("GABCDEF")}}
    (tmp_path / "maps.json").write_text(json.dumps(maps))
    (tmp_path / "seq.txt").write_text("1 2 1 4 3 6 5 0\n2 1 2 4 3 6 5 0\n3 1\n")  # user 2: A, B swapped
    counts = cross_check_sequences(kept, tmp_path / "seq.txt", tmp_path / "maps.json")
    assert counts == {"reference_users": 3, "missing_users": 1, "same_order": 1, "same_items": 2}
    dropped = load_dataset(DataConfig(name="amazon", root=str(tmp_path), category=category))
    assert dropped["titles"][1:] == ["Item A", "Item B", "Item C", "Item D", "Item E"]
    assert dropped["stats"]["interactions"] == 35 and dropped["stats"]["items_without_image"] == 0


def test_amazon_without_files_or_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlm2rec.prepare amazon"):
        load_dataset(DataConfig(name="amazon", root=str(tmp_path), category="Beauty"))
    folder = tmp_path / "amazon" / "No_Images"
    write_gz(folder / "reviews_No_Images_5.json.gz", [review(f"U{u}", f"A{i}", i) for u in range(5) for i in range(5)])
    write_gz(folder / "meta_No_Images.json.gz", [repr({"asin": f"A{i}", "title": f"T{i}"}) for i in range(5)])
    with pytest.raises(ValueError, match="data.missing_image=placeholder"):
        load_dataset(DataConfig(name="amazon", root=str(tmp_path), category="No_Images"))
    kept = load_dataset(DataConfig(name="amazon", root=str(tmp_path), category="No_Images",
                                   missing_image="placeholder"))
    assert kept["titles"] == ["", "T0", "T1", "T2", "T3", "T4"] and kept["stats"]["items_without_image"] == 5
    assert (folder / "items.json").exists()  # metadata cache written beside the raw files


# ---------------------------------------------------------------- real data (@slow)

MISSING_POSTERS = {330, 387, 563, 767, 868, 907, 1026, 1331, 1340, 1346, 1359, 1420, 1431, 1498, 1516,
                   1536, 1568, 1586, 1667}  # method.md §14.2


@pytest.mark.slow
def test_ml100k_posters_statistics(shared_data):
    ds = load_dataset(DataConfig(name="ml100k-posters", root=str(shared_data)))
    stats = ds["stats"]
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1342, 99126)
    assert (stats["raw_items_with_image"], stats["raw_items_without_image"]) == (1663, 19)
    assert stats["items_without_image"] == 0 and ds["titles"][1] == "Toy Story (1995)"
    posters = {int(p.stem) for p in (shared_data / "ml-100k-posters" / "posters").glob("*.jpg")}
    assert set(range(1, 1683)) - posters == MISSING_POSTERS
    kept = load_dataset(DataConfig(name="ml100k-posters", root=str(shared_data), missing_image="placeholder"))
    assert (kept["stats"]["items"], kept["stats"]["interactions"]) == (1349, 99287)
    assert kept["stats"]["items_without_image"] == sum(p is None for p in kept["images"][1:]) > 0
    assert load_image(kept["images"][1], 32).size == (32, 32)


@pytest.mark.slow
def test_prepare_cli_checks_ml100k_posters_offline(shared_data, capsys):
    stats = prepare_main(["ml100k-posters", "--root", str(shared_data)])
    assert (stats["drop"]["items"], stats["placeholder"]["items"]) == (1342, 1349)
    assert '"raw_items_without_image": 19' in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="u.data not found"):
        prepare_main(["ml100k-posters", "--root", str(shared_data / "no-such-folder")])


@pytest.mark.slow
def test_ml100k_statistics_drift_is_loud(shared_data, monkeypatch):
    from common.registry import DERIVED
    entry = DERIVED["vlm2rec/ml100k-posters/drop"]
    monkeypatch.setitem(entry, "stats", {**entry["stats"], "items": 1343})
    with pytest.raises(ValueError, match="items 1342 != expected 1343"):
        load_dataset(DataConfig(name="ml100k-posters", root=str(shared_data)))


@pytest.mark.slow
def test_real_amazon_5core_reviews_format(shared_data):
    path = shared_data / "amazon-musical-instruments-5core" / "Musical_Instruments_5.json.gz"
    inter, users, asins = read_amazon_reviews(path)
    counts = ("users", "items", "interactions")
    stats = {k: v for k, v in vdata.compute_stats(vdata.kcore(inter, 5, 5)).items() if k in counts}
    assert stats == {"users": 1429, "items": 900, "interactions": 10261} == {
        k: v for k, v in vdata.compute_stats(inter).items() if k in counts}
    vdata.check_stats("amazon-Musical_Instruments", stats)
    assert len(users) == 1429 and len(asins) == 900
    assert inter["timestamp"].min() == 1095465600 and inter["timestamp"].max() == 1405987200
