"""The only VLM2Rec code that downloads (§14.1): Amazon 2014 5-core reviews, metadata and images.

Run by hand, never from main or tests:
  python -m vlm2rec.prepare amazon --category Toys_and_Games [--root DIR] [--workers 16]
  python -m vlm2rec.prepare ml100k-posters [--root DIR]    # offline: checks the files, prints statistics
Files land in <root>/amazon/<category>/ (root defaults to $REPRO_DATA): reviews_<cat>_5.json.gz,
meta_<cat>.json.gz, items.json (the 5-core items' title and image URL), images/<asin>.jpg (resized JPEGs)
and images_manifest.json (counts and the reason for every image that could not be had).
Image download is concurrent, retried with exponential backoff, and resumable: a file already present
and decodable is skipped, so an interrupted run continues where it stopped.

Trust: an item id from the metadata names its image file only through common.io.safe_filename (no separator,
no '..', at most 100 characters; any other id becomes id-<sha256>), so no id writes outside images/. SNAP
publishes no checksum or size for the 2014 files: a download is checked against the server's Content-Length
and by decompressing it whole (gzip's CRC-32 and length trailer), and its sha256 and size are recorded in
downloads.json beside it on first download; a later run refuses a file that no longer matches that record.
An image is at most MAX_IMAGE_BYTES and must decode within PIL's decompression-bomb limit.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import io
import json
import time
import zlib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common.cli import run_cli
from common.download import fetch, file_sha256
from common.io import atomic_write, data_root, load_json, safe_filename, save_json

from .catalog import is_valid_image
from .config import DataConfig
from .data import amazon_dir, amazon_items, load_dataset

CATEGORIES = ("Toys_and_Games", "Beauty", "Sports_and_Outdoors", "Clothing_Shoes_and_Jewelry")
BASE_URL = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
MAX_IMAGE_BYTES = 20 << 20  # an Amazon product image is ~10-100 KB; a larger body is not one
USER_AGENT = "repro-recsys-vlm2rec/0.1 (research reproduction)"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # transient; any other HTTP error is final (e.g. 404)
# §14.1 offline cross-check: ICLRec sequence files + P5 datamaps (ids -> ASIN / reviewerID) under
# <root>/amazon-seq/ cover these two categories with the same ids.
SEQ_FILES = {"Beauty": ("Beauty.txt", "datamaps/beauty_datamaps.json"),
             "Sports_and_Outdoors": ("Sports_and_Outdoors.txt", "datamaps/sports_datamaps.json")}


def amazon_urls(category: str) -> dict[str, str]:
    """File name -> URL of McAuley's 2014 release for one category."""
    names = (f"reviews_{category}_5.json.gz", f"meta_{category}.json.gz")
    return {name: f"{BASE_URL}/{name}" for name in names}


def _get(url: str, timeout: float, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read(max_bytes + 1)
    if len(payload) > max_bytes:
        raise ValueError(f"more than {max_bytes:,} bytes")
    return payload


def check_gzip(path: Path) -> None:
    """Decompress `path` whole (streamed) so gzip's CRC-32 and length trailer check it: a truncated or
    damaged download is a one-line ValueError naming it."""
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a complete gzip file ({' '.join(str(err).split())[:100]}); delete it "
                         "and download again") from None


def verified_download(url: str, dest: Path, hint: str) -> Path:
    """Fetch `url` to `dest` once and record its sha256 and size in downloads.json beside it (SNAP publishes
    neither); a file already there must match its record (or, with no record, pass check_gzip and get one)."""
    record_path = dest.parent / "downloads.json"
    records = load_json(record_path) if record_path.is_file() else {}
    if not dest.exists():
        fetch(url, dest, timeout=60.0, hint=hint)
        if dest.suffix == ".gz":
            try:
                check_gzip(dest)
            except ValueError:
                dest.unlink()  # never trusted: the next attempt downloads it again
                raise
    elif dest.name in records:
        want, size = records[dest.name]["sha256"], records[dest.name]["bytes"]
        if dest.stat().st_size != size or file_sha256(dest) != want:
            raise ValueError(f"{dest} no longer matches its record in {record_path} (sha256 {want}, {size:,} "
                             "bytes): it was changed or damaged; delete it and download again")
        return dest
    elif dest.suffix == ".gz":
        check_gzip(dest)
    records[dest.name] = {"url": url, "sha256": file_sha256(dest), "bytes": dest.stat().st_size,
                          "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json(record_path, records)
    return dest


def download_image(url: str, dest: Path, retries: int = 3, backoff: float = 1.0, timeout: float = 20.0,
                   max_side: int = 256) -> str:
    """Fetch one image to dest as an RGB JPEG no larger than max_side. Returns "skipped" (a valid file is
    already there), "downloaded", or "failed: <reason>"; a failed item leaves no file behind."""
    if dest.exists():
        if is_valid_image(dest):
            return "skipped"
        dest.unlink()  # a corrupt leftover is replaced, not trusted
    if not url:
        return "failed: no image URL"
    reason = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))  # exponential backoff between tries
        try:
            payload = _get(url, timeout)
        except urllib.error.HTTPError as err:
            reason = f"HTTP {err.code}"
            if err.code not in RETRY_STATUS:
                return f"failed: {reason}"
            continue
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = f"{type(err).__name__}: {err}"  # network-level: worth another try
            continue
        except ValueError as err:  # larger than any product image: not one
            return f"failed: {err}"
        try:
            with Image.open(io.BytesIO(payload)) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            return f"failed: not a decodable image ({type(err).__name__})"
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)  # keeps the aspect ratio
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(dest, "wb") as handle:
            img.save(handle, format="JPEG", quality=90)
        return "downloaded"
    return f"failed: {reason} after {retries + 1} tries"


def download_images(urls: dict[str, str], out_dir: Path, workers: int = 16, retries: int = 3,
                    backoff: float = 1.0, timeout: float = 20.0, max_side: int = 256,
                    progress: bool = True) -> dict:
    """Download {key: url} to out_dir/<key>.jpg concurrently. Returns counts plus {key: reason} of failures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted(urls)

    def one(key: str) -> str:  # the id comes from downloaded data: never a path of its own
        return download_image(urls[key], out_dir / f"{safe_filename(key)}.jpg", retries, backoff, timeout, max_side)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(one, keys), total=len(keys), desc="images", disable=not progress))
    report = {"requested": len(keys), "downloaded": results.count("downloaded"),
              "skipped": results.count("skipped"), "failed": {}}
    for key, result in zip(keys, results):
        if result.startswith("failed"):
            report["failed"][key] = result.removeprefix("failed: ")
    return report


def cross_check_sequences(dataset: dict, seq_path: Path, datamaps_path: Path) -> dict:
    """Compare a 5-core `load_dataset` result with a reference sequence file whose ids a datamaps file maps
    to reviewerIDs and ASINs. Counts users whose sequence is identical, and identical as a multiset
    (so a different timestamp tie-break shows as `same_items` without `same_order`)."""
    maps = json.loads(datamaps_path.read_text())
    ours = {user: [dataset["item_ids"][i] for i in seq] for user, seq in zip(dataset["user_ids"], dataset["sequences"])}
    counts = {"reference_users": 0, "missing_users": 0, "same_order": 0, "same_items": 0}
    for line in seq_path.read_text().splitlines():
        user_id, *item_ids = line.split()
        reference = [maps["id2item"][i] for i in item_ids]
        mine = ours.get(maps["id2user"][user_id])
        counts["reference_users"] += 1
        counts["missing_users"] += mine is None
        counts["same_order"] += mine == reference
        counts["same_items"] += mine is not None and sorted(mine) == sorted(reference)
    return counts


def prepare_amazon(category: str, root: Path, workers: int = 16, retries: int = 3, max_side: int = 256,
                   skip_images: bool = False) -> dict:
    """Download one category, build and check its 5-core sequences, fetch its images, write the manifest."""
    folder = amazon_dir(root, category)
    for name, url in amazon_urls(category).items():  # resumable: the big files are fetched once, then checked
        verified_download(url, folder / name, hint=f"or place {name} in {folder} by hand")
    # Placeholder mode = the plain 5-core view; it asserts the statistics before the long image download.
    dataset = load_dataset(DataConfig(name="amazon", root=str(root), category=category, missing_image="placeholder"))
    items = amazon_items(root, category, dataset["item_ids"][1:])  # cached by load_dataset: a json read
    manifest = {"category": category, "sequences": {k: dataset["stats"][k] for k in ("users", "items", "interactions")},
                "items_without_title": sum(not m["title"] for m in items.values()),
                "items_without_image_url": sum(not m["imUrl"] for m in items.values())}
    seq_files = [root / "amazon-seq" / name for name in SEQ_FILES.get(category, ())]
    if seq_files and all(path.exists() for path in seq_files):
        manifest["cross_check_amazon_seq"] = cross_check_sequences(dataset, *seq_files)
    if not skip_images:
        report = download_images({a: m["imUrl"] for a, m in items.items()}, folder / "images",
                                 workers=workers, retries=retries, max_side=max_side)
        manifest["images"] = report
        manifest["items_with_image"] = len(items) - len(report["failed"])
        manifest["items_without_image"] = len(report["failed"])
    with atomic_write(folder / "images_manifest.json") as handle:
        handle.write(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Download / check VLM2Rec data (§14).")
    sub = parser.add_subparsers(dest="dataset", required=True)
    amazon = sub.add_parser("amazon", help="Amazon 2014 5-core reviews + metadata + images (internet)")
    amazon.add_argument("--category", required=True, choices=CATEGORIES)
    amazon.add_argument("--root", default=None, help="data root (default: $REPRO_DATA)")
    amazon.add_argument("--workers", type=int, default=16, help="concurrent image downloads")
    amazon.add_argument("--retries", type=int, default=3, help="extra tries per image on transient errors")
    amazon.add_argument("--max-side", type=int, default=256, help="images are shrunk to fit this square")
    amazon.add_argument("--skip-images", action="store_true", help="reviews and metadata only")
    posters = sub.add_parser("ml100k-posters", help="offline: check the MovieLens-100K poster files")
    posters.add_argument("--root", default=None, help="data root (default: $REPRO_DATA)")
    args = parser.parse_args(argv)
    root = data_root(args.root)
    if args.dataset == "amazon":
        result = prepare_amazon(args.category, root, args.workers, args.retries, args.max_side, args.skip_images)
    else:
        result = {mode: load_dataset(DataConfig(name="ml100k-posters", root=str(root), missing_image=mode))["stats"]
                  for mode in ("drop", "placeholder")}
    print(json.dumps(result, indent=1, sort_keys=True, default=str))
    return result


if __name__ == "__main__":
    run_cli(main)
