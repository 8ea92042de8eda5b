"""VLM2Rec datasets: chronological item sequences with one title and one image per item (§14).

Three sources give the same dict (`load_dataset`):
  synthetic       clustered items, coloured PNGs and cluster-word titles written to a cache (§14.3)
  ml100k-posters  MovieLens-100K interactions + TMDB titles and posters under the data root (§14.2)
  amazon          Amazon 2014 5-core reviews + metadata + images fetched by `python -m vlm2rec.prepare` (§14.1)
Real datasets assert their expected statistics (regression values: they catch drift of the recipe). Nothing in
this file downloads. Print a dataset's statistics: `python -m vlm2rec.data --name ml100k-posters [--root DIR]`.
"""
from __future__ import annotations

import argparse
import ast
import csv
import gzip
import hashlib
import html
import json
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from common.data import (
    compute_stats,
    filter_rating,
    kcore,
    read_ml100k,
    remap_ids,
    sort_chronological,
    to_sequences,
)
from common.io import atomic_write, cache_root, data_root, safe_filename
from common.registry import check_derived

from .config import DATASETS, DataConfig

TIE_RULE = "stable sort by (user, timestamp); equal timestamps keep the raw file order"  # §14.2


def check_stats(key: str, stats: dict) -> None:
    """Assert the registry's statistics for `key` (common.registry.DERIVED["vlm2rec/..."]): the ML-100K
    poster join was measured by this pipeline and frozen (§14.2), so it guards against drift only; the Amazon
    rows are the literature counts of the raw 2014 5-core files (§14.1), asserted before any drop."""
    check_derived(f"vlm2rec/{key}", stats)


# ---------------------------------------------------------------- synthetic (§14.3)

CLUSTER_WORDS = ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "grey")
CLUSTER_COLOURS = ((220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40),
                   (150, 50, 180), (40, 200, 210), (240, 140, 30), (110, 110, 110))
NOUNS = ("lamp", "kite", "drum", "ball", "book", "cup", "robot", "train", "puzzle", "car", "doll", "boat")


def synthetic_clusters(num_items: int, seed: int) -> np.ndarray:
    """Latent cluster of each item, [num_items + 1] (index 0 = padding = -1); balanced, shuffled by seed."""
    num_clusters = max(2, min(len(CLUSTER_WORDS), num_items // 5))
    rng = np.random.default_rng([seed, 0])  # scoped: item side (a generator per purpose: the item side never shifts the user side)
    clusters = rng.permutation(np.arange(num_items) % num_clusters)
    return np.concatenate([[-1], clusters])


def _synthetic_image(cluster: int, item: int, size: int) -> Image.Image:
    """Cluster colour + cluster stripe direction; a small per-item brightness shift keeps items distinct."""
    base = np.array(CLUSTER_COLOURS[cluster], dtype=np.float32) * (0.85 + 0.03 * (item % 6))
    pixels = np.tile(np.clip(base, 0, 255), (size, size, 1))
    stripes = (np.arange(size) // max(1, size // 8)) % 2 == 0
    if cluster % 2 == 0:
        pixels[stripes, :, :] *= 0.6  # horizontal stripes
    else:
        pixels[:, stripes, :] *= 0.6  # vertical stripes
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def make_synthetic(num_users: int, num_items: int, seed: int, image_size: int, out_dir: str | Path) -> dict:
    """Clustered synthetic dataset: a cluster fixes an item's colour, stripes and title word; each user
    stays in one home cluster for ~85 % of steps. Titles and PNGs are written under out_dir (a cache)."""
    if num_items < 4 or num_users < 1:
        raise ValueError(f"synthetic data needs num_items >= 4 and num_users >= 1, got {num_items}, {num_users}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    clusters = synthetic_clusters(num_items, seed)
    num_clusters = int(clusters.max()) + 1
    titles, images = [""], [None]
    for item in range(1, num_items + 1):
        cluster = int(clusters[item])
        titles.append(f"{CLUSTER_WORDS[cluster]} {NOUNS[item % len(NOUNS)]} {item}")
        path = out_dir / "images" / f"{item}.png"
        with atomic_write(path, "wb") as handle:   # always rewritten, whole: another run may be reading it
            _synthetic_image(cluster, item, image_size).save(handle, format="PNG")
        images.append(path)
    with atomic_write(out_dir / "titles.txt") as handle:
        handle.write("\n".join(titles[1:]) + "\n")
    members = [np.flatnonzero(clusters == c) for c in range(num_clusters)]
    rng = np.random.default_rng([seed, 1])  # scoped: user side
    sequences = []
    for _ in range(num_users):
        home = rng.integers(num_clusters)
        length = rng.integers(5, 13)  # >= 5: a history, a validation and a test target (§13)
        in_home = rng.random(length) < 0.85
        seq = np.where(in_home, rng.choice(members[home], length), rng.integers(1, num_items + 1, length))
        sequences.append(seq.astype(np.int64))
    ids = [str(i) for i in range(num_items + 1)]
    users = [str(u) for u in range(1, num_users + 1)]
    return _package(f"synthetic-u{num_users}-i{num_items}-s{seed}", sequences, titles, images, ids, users)


# ---------------------------------------------------------------- MovieLens-100K + posters (§14.2)

def ml100k_item_text(root: Path, item_text: str) -> dict[int, str]:
    """movie_id -> text from items_tmdb.csv (deduplicated by id; titles equal u.item's), else u.item."""
    if item_text not in ("title", "title_overview"):
        raise ValueError(f"data.item_text must be 'title' or 'title_overview', got {item_text!r}")
    tmdb = root / "ml-100k-posters" / "items_tmdb.csv"
    texts: dict[int, str] = {}
    if tmdb.exists():
        need = {"movie_id", "title"} | ({"overview"} if item_text == "title_overview" else set())
        with open(tmdb, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not need <= set(reader.fieldnames or ()):
                raise ValueError(f"{tmdb}: not a TMDB item table (header needs columns {sorted(need)}, "
                                 f"has {reader.fieldnames})")
            for line_no, row in enumerate(reader, 2):  # 64 exact duplicate rows: the first occurrence wins
                text = row["title"]
                if item_text == "title_overview" and (row["overview"] or "").strip():
                    text = f"{text}. {row['overview'].strip()}"
                try:
                    texts.setdefault(int(row["movie_id"]), text)
                except (TypeError, ValueError):
                    raise ValueError(f"{tmdb}:{line_no}: movie_id {row['movie_id']!r} is not an integer") from None
        return texts
    if item_text == "title_overview":
        raise FileNotFoundError(f"{tmdb} is needed for data.item_text=title_overview")
    with open(root / "ml-100k" / "u.item", encoding="latin-1") as f:  # §14.2: u.item is latin-1
        for line in f:
            fields = line.split("|")
            texts[int(fields[0])] = fields[1]
    return texts


def load_ml100k_posters(cfg: DataConfig, root: Path) -> dict:
    """§14.2 recipe: u.data -> rating filter -> drop poster-less items (default) -> 5-core -> stable
    chronological sort -> ids 1..N in ascending raw-id order. Statistics asserted."""
    udata, posters = root / "ml-100k" / "u.data", root / "ml-100k-posters" / "posters"
    for needed in (udata, posters):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} not found (data root {root}; set REPRO_DATA or data.root)")
    inter = read_ml100k(udata)
    raw_items = np.unique(inter["item"])
    has_poster = np.array([(posters / f"{i}.jpg").exists() for i in raw_items])
    if not has_poster.any() and cfg.missing_image == "drop":
        raise ValueError(f"{posters}: no item has an image (expected <movie id>.jpg files, e.g. "
                         f"{raw_items[0]}.jpg); restore the posters or set data.missing_image=placeholder")
    inter = filter_rating(inter, cfg.min_rating) if cfg.min_rating > 0 else inter
    if cfg.missing_image == "drop":
        keep = np.isin(inter["item"], raw_items[has_poster])
        inter = {key: value[keep] for key, value in inter.items()}
    inter = sort_chronological(kcore(inter, 5, 5))
    inter, user_map, item_map = remap_ids(inter, order="sorted")
    texts = ml100k_item_text(root, cfg.item_text)
    titles, images = [""], [None]
    for raw in item_map[1:]:  # item_map[new id] = raw movie id
        titles.append(texts[int(raw)])
        path = posters / f"{raw}.jpg"
        images.append(path if path.exists() else None)
    data = _package("ml100k-posters", to_sequences(inter), titles, images,
                    ["", *map(str, item_map[1:])], [str(u) for u in user_map[1:]])
    data["stats"].update(raw_items=len(raw_items), raw_items_with_image=int(has_poster.sum()),
                         raw_items_without_image=int((~has_poster).sum()), tie_rule=TIE_RULE,
                         missing_image=cfg.missing_image, min_rating=cfg.min_rating)
    if cfg.min_rating == 0:  # counts are registered for the whole rating range only
        check_stats(f"ml100k-posters/{cfg.missing_image}", data["stats"])
    return data


# ---------------------------------------------------------------- Amazon 2014 (§14.1)

def amazon_dir(root: Path, category: str) -> Path:
    """<root>/amazon/<category>/: reviews, metadata, items.json and images/ (written by vlm2rec.prepare)."""
    return root / "amazon" / category


def _gzip_lines(path: Path):
    """(1-based line number, line) of a gzipped UTF-8 text file, blank lines skipped; a file that is not
    gzip, is cut short or is not UTF-8 is a ValueError naming it."""
    line_no = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield line_no, line
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable gzip text file after line {line_no} "
                         f"({type(err).__name__}: {err})") from None


def read_amazon_reviews(path: Path) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """JSON-lines 5-core reviews -> (interactions with integer codes, user names, asins); every review
    is one interaction (§14.1), codes follow first appearance in the file."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    rows = []
    for line_no, line in _gzip_lines(path):
        try:
            review = json.loads(line)
            user = users.setdefault(review["reviewerID"], len(users))
            item = items.setdefault(review["asin"], len(items))
            rows.append((user, item, int(review["unixReviewTime"]), float(review.get("overall", 0.0))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{line_no}: bad review line ({err})") from err
    if not rows:
        raise ValueError(f"{path}: no reviews")
    user_col, item_col, time_col, rating_col = zip(*rows)
    inter = {"user": np.array(user_col, dtype=np.int64), "item": np.array(item_col, dtype=np.int64),
             "timestamp": np.array(time_col, dtype=np.int64), "rating": np.array(rating_col, dtype=np.float32)}
    return inter, list(users), list(items)


def read_amazon_meta(path: Path, asins: set[str] | None = None) -> dict[str, dict]:
    """asin -> {"title", "imUrl"} from a 2014 metadata file. Lines are Python dict literals, so they
    are parsed with ast.literal_eval (never eval). Titles are HTML-unescaped; absent fields -> ""."""
    meta = {}
    for line_no, line in _gzip_lines(path):
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            raise ValueError(f"{path}:{line_no}: not a Python dict literal ({err})") from err
        asin = record.get("asin") if isinstance(record, dict) else None
        if asin is None:
            raise ValueError(f"{path}:{line_no}: record without an asin")
        if asins is None or asin in asins:
            meta[asin] = {"title": html.unescape(str(record.get("title", ""))).strip(),
                          "imUrl": str(record.get("imUrl", "")).strip()}
    return meta


def _cached_items(path: Path, meta_sha1: str, asins: list[str]) -> dict[str, dict] | None:
    """items.json's items when it was built from this metadata file (same SHA-1) for a superset of
    `asins`; None (rebuild) for anything else, a damaged or older-format file included."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        warnings.warn(f"{path} is damaged ({err}); rebuilding it", stacklevel=3)
        return None
    if (isinstance(saved, dict) and saved.get("meta_sha1") == meta_sha1 and isinstance(saved.get("items"), dict)
            and saved["items"].keys() >= set(asins)):
        return saved["items"]
    return None


def amazon_items(root: Path, category: str, asins: list[str]) -> dict[str, dict]:
    """Metadata of the 5-core items, cached as items.json (the full meta file is slow to parse) and keyed
    by the metadata file's SHA-1, so a replaced metadata file is parsed again."""
    folder = amazon_dir(root, category)
    meta_path = folder / f"meta_{category}.json.gz"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: run `python -m vlm2rec.prepare amazon "
                                f"--category {category} --root {root}`")
    with open(meta_path, "rb") as handle:
        meta_sha1 = hashlib.file_digest(handle, "sha1").hexdigest()
    cached = folder / "items.json"
    items = _cached_items(cached, meta_sha1, asins)
    if items is not None:
        return items
    meta = read_amazon_meta(meta_path, set(asins))
    items = {asin: meta.get(asin, {"title": "", "imUrl": ""}) for asin in asins}
    with atomic_write(cached) as handle:  # a crash never leaves half a cache
        handle.write(json.dumps({"meta_sha1": meta_sha1, "items": items}))
    return items


def load_amazon(cfg: DataConfig, root: Path) -> dict:
    """§14.1: 5-core reviews (asserted) -> optional drop of items without image or title + 5-core again
    -> stable chronological sort -> ids 1..N in ascending-asin order."""
    if cfg.min_rating > 0:
        raise ValueError("data.min_rating applies to ml100k-posters only: every Amazon review is one interaction (§14.1)")
    folder = amazon_dir(root, cfg.category)
    reviews = folder / f"reviews_{cfg.category}_5.json.gz"
    if not reviews.exists():
        raise FileNotFoundError(f"{reviews} not found: run `python -m vlm2rec.prepare amazon "
                                f"--category {cfg.category} --root {root}`")
    inter, reviewers, asins = read_amazon_reviews(reviews)
    rank = np.empty(len(asins), dtype=np.int64)
    rank[np.argsort(np.array(asins))] = np.arange(len(asins))
    inter["item"], asins = rank[inter["item"]], sorted(asins)  # codes = ascending-asin order
    inter = kcore(inter, 5, 5)  # a no-op on the 5-core files; kept so the recipe holds for any input
    name = f"amazon-{cfg.category}"
    check_stats(name, compute_stats(inter))
    meta = amazon_items(root, cfg.category, asins)
    image_of = {a: folder / "images" / f"{safe_filename(a)}.jpg" for a in asins}  # as vlm2rec.prepare names them
    usable = np.array([bool(meta[a]["title"]) and image_of[a].exists() for a in asins])
    if cfg.missing_image == "drop":
        inter = kcore({k: v[usable[inter["item"]]] for k, v in inter.items()}, 5, 5)
        if inter["item"].size == 0:
            raise ValueError(f"{name}: no interactions left after dropping items without a title or an image "
                             f"in {folder / 'images'}; run the prepare step's image download or set "
                             "data.missing_image=placeholder")
    inter = sort_chronological(inter)
    inter, user_map, item_map = remap_ids(inter, order="sorted")
    titles, images = [""], [None]
    for code in item_map[1:]:  # item_map[new id] = asin code
        asin = asins[int(code)]
        titles.append(meta[asin]["title"] or "unknown title")  # §14.1 placeholder wording
        images.append(image_of[asin] if image_of[asin].exists() else None)
    data = _package(name, to_sequences(inter), titles, images, ["", *(asins[c] for c in item_map[1:])],
                    [reviewers[c] for c in user_map[1:]])
    data["stats"].update(tie_rule=TIE_RULE, missing_image=cfg.missing_image,
                         items_5core=len(asins), items_5core_usable=int(usable.sum()))
    return data


# ---------------------------------------------------------------- entry point

def _package(name: str, sequences: list[np.ndarray], titles: list[str], images: list[Path | None],
             item_ids: list[str], user_ids: list[str]) -> dict:
    """The load_dataset dict, with the statistics every loader reports. item_ids / user_ids are the raw
    ids (movie id, asin, reviewerID) of each new id: item_ids[0] = "" (padding), user_ids[u - 1] = user u."""
    with_image = sum(path is not None for path in images[1:])
    stats = {"users": len(sequences), "items": len(titles) - 1,
             "interactions": int(sum(len(s) for s in sequences)),
             "items_with_image": with_image, "items_without_image": len(titles) - 1 - with_image}
    return {"name": name, "sequences": sequences, "titles": titles, "images": images,
            "num_items": len(titles) - 1, "stats": stats, "item_ids": item_ids, "user_ids": user_ids}


def load_dataset(cfg: DataConfig) -> dict:
    """Sequences (1-based item ids, chronological), titles and image paths of cfg.name (§14)."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name must be one of {DATASETS}, got {cfg.name!r}")
    if cfg.missing_image not in ("drop", "placeholder"):
        raise ValueError(f"data.missing_image must be 'drop' or 'placeholder', got {cfg.missing_image!r}")
    if cfg.name == "synthetic":
        out = cache_root() / "vlm2rec" / f"synthetic-u{cfg.num_users}-i{cfg.num_items}-s{cfg.seed}-px{cfg.image_size}"
        return make_synthetic(cfg.num_users, cfg.num_items, cfg.seed, cfg.image_size, out)
    root = data_root(cfg.root)
    if cfg.name == "ml100k-posters":
        return load_ml100k_posters(cfg, root)
    return load_amazon(cfg, root)


def main(argv: list[str] | None = None) -> dict:
    """Print a dataset's statistics (a quick check that the files and the recipe agree)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="ml100k-posters", choices=DATASETS)
    parser.add_argument("--root", default=None)
    parser.add_argument("--category", default=DataConfig.category)
    parser.add_argument("--missing-image", default="drop", choices=("drop", "placeholder"))
    args = parser.parse_args(argv)
    data = load_dataset(DataConfig(name=args.name, root=args.root, category=args.category,
                                   missing_image=args.missing_image))
    print(json.dumps({"name": data["name"], **data["stats"]}, indent=1, default=str))
    return data["stats"]


if __name__ == "__main__":
    main()
