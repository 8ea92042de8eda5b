"""Raw files -> canonical, cached interaction data (CONVENTIONS.md §9).

Pipeline: read raw -> optional rating threshold -> k-core to a fixed point -> stable chronological sort
-> ids remapped to 1..N (0 = padding) -> cached artefact (interactions.tsv or sequences.txt + stats.json)
with the registry's expected statistics asserted. Everything is plain numpy; `Interactions` is a dict of
equal-length arrays with keys "user", "item", "timestamp" (int64) and "rating" (float64).

    from common.data import load_sequences, leave_one_out
    train, valid_targets, test_targets = leave_one_out(load_sequences("amazon-beauty"))

Raw files are looked up under data_root() (override > $REPRO_DATA > <repo>/data/raw) with the layout of
../shared/data, then under <repo>/data/raw (where `python -m common.prepare NAME` downloads them).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FORMAT_VERSION = 1  # bump when the artefact layout or a transform's semantics change: invalidates caches
Interactions = dict  # {"user", "item", "timestamp", "rating"} -> np.ndarray, all the same length
COLUMNS = ("user", "item", "timestamp", "rating")  # also the column order of interactions.tsv
ML_COLUMNS = ("user", "item", "rating", "timestamp")  # column order of the MovieLens rating files


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Where raw files live: explicit override (a paper's `data.root`) > $REPRO_DATA > <repo>/data/raw."""
    return Path(override or os.environ.get("REPRO_DATA") or REPO / "data" / "raw").expanduser()


def cache_root() -> Path:
    """Where processed artefacts go: $REPRO_CACHE > <repo>/data/processed (never the data root)."""
    return Path(os.environ.get("REPRO_CACHE") or REPO / "data" / "processed").expanduser()


# ----------------------------------------------------------------------------------------------- readers
def _read_table(path, sep: bytes, cols: tuple, header: bool) -> dict:
    """Columns of a delimited numeric file by name ("rating" float64, the rest int64); LF or CRLF.

    Fast path: numpy's C parser (ML-1M's 1M rows in under a second). On any problem the file is
    re-scanned line by line so that the ValueError names the file and the first bad line.
    """
    raw = Path(path).read_bytes()
    body = raw.partition(b"\n")[2] if header else raw
    if not body.strip():
        raise ValueError(f"{path}: empty file (no data rows)")
    body = body.rstrip()  # the final newline and trailing blank lines are not rows
    dtype = np.dtype([(c, np.float64 if c == "rating" else np.int64) for c in cols])
    text = body if sep == b"\t" else body.replace(sep, b"\t")
    if b"\n\n" not in text and b"\n\r\n" not in text:  # loadtxt would skip blank lines silently
        try:
            table = np.loadtxt(io.BytesIO(text), delimiter="\t", dtype=dtype, comments=None, ndmin=1)
            return {c: np.ascontiguousarray(table[c]) for c in cols}
        except ValueError:
            pass  # fall through to the line-by-line scan for a precise message
    _raise_first_bad_line(path, body.splitlines(), sep, dtype, first=2 if header else 1)


def _raise_first_bad_line(path, lines: list[bytes], sep: bytes, dtype: np.dtype, first: int) -> None:
    for number, line in enumerate(lines, start=first):
        fields = line.split(sep)
        if len(fields) != len(dtype.names):
            raise ValueError(f"{path}:{number}: expected {len(dtype.names)} fields, got {len(fields)}: "
                             f"{line[:80]!r}")
        for col, (name, value) in enumerate(zip(dtype.names, fields), start=1):
            kind = dtype[name]
            try:
                (float if kind == np.float64 else int)(value)
            except ValueError:
                raise ValueError(f"{path}:{number}: column {col} is not {kind.name} ({name}): "
                                 f"{value[:40]!r}") from None
    raise ValueError(f"{path}: cannot be parsed as {len(dtype.names)} numeric columns")


def read_ml1m(path) -> Interactions:
    """MovieLens-1M ratings.dat: `UserID::MovieID::Rating::Timestamp` (seconds), file order kept."""
    return _read_table(path, b"::", ML_COLUMNS, header=False)


def read_ml100k(path) -> Interactions:
    """MovieLens-100K u.data: `user item rating timestamp`, tab-separated, file order kept."""
    return _read_table(path, b"\t", ML_COLUMNS, header=False)


def read_movielens_csv(path) -> Interactions:
    """MovieLens-latest ratings.csv: header `userId,movieId,rating,timestamp`, CRLF allowed."""
    return _read_table(path, b",", ML_COLUMNS, header=True)


def read_hetrec_movielens(path) -> Interactions:
    """HetRec 2011 MovieLens-2k user_ratedmovies-timestamps.dat: header, tab-separated, timestamp in ms."""
    return _read_table(path, b"\t", ML_COLUMNS, header=True)


def read_hetrec_lastfm(path) -> Interactions:
    """HetRec 2011 Last.fm-2k user_taggedartists.dat (`userID artistID tagID day month year`, header).

    One interaction per (user, artist) at its earliest tag date, as UTC-midnight epoch seconds (the ms
    timestamps file is not available, see ../shared/data/hetrec2011-lastfm-2k/SOURCE.txt). The row kept
    is the first file row with that earliest date, and rows keep file order; rating is 1 (implicit).
    """
    table = _read_table(path, b"\t", ("user", "item", "tag", "day", "month", "year"), header=True)
    user, item, day, month, year = (table[c] for c in ("user", "item", "day", "month", "year"))
    months = ((year - 1970) * 12 + (month - 1)).astype("datetime64[M]")
    days = months.astype("datetime64[D]") + (day - 1)
    bad = np.flatnonzero((month < 1) | (month > 12) | (day < 1) | (days.astype("datetime64[M]") != months))
    if bad.size:
        raise ValueError(f"{path}:{int(bad[0]) + 2}: invalid date {day[bad[0]]}/{month[bad[0]]}/{year[bad[0]]}")
    stamp = days.astype(np.int64) * 86400
    rows = np.arange(user.size)
    order = np.lexsort((rows, stamp, item, user))  # per pair: earliest date, then first file row
    pair_start = np.ones(order.size, dtype=bool)
    pair_start[1:] = (user[order][1:] != user[order][:-1]) | (item[order][1:] != item[order][:-1])
    keep = np.sort(order[pair_start])  # back to file order
    return {"user": user[keep], "item": item[keep], "timestamp": stamp[keep],
            "rating": np.ones(keep.size, dtype=np.float64)}


def read_sequences(path) -> list[np.ndarray]:
    """`user item item ...` per line (FLAME format); users must be 1..U in file order. seqs[u-1] = user u."""
    table = Path(path).read_bytes().splitlines()
    while table and not table[-1].strip():
        table.pop()
    if not table:
        raise ValueError(f"{path}: empty file (no sequences)")
    parts = [line.split() for line in table]
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    short = np.flatnonzero(lengths < 2)
    if short.size:
        raise ValueError(f"{path}:{short[0] + 1}: expected 'user item [item ...]', got {table[short[0]][:80]!r}")
    flat = np.array([tok for p in parts for tok in p], dtype=bytes)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    try:
        values = flat.astype(np.int64)
    except ValueError:
        bad = next(i for i, p in enumerate(parts) if not all(t.lstrip(b"-").isdigit() for t in p))
        raise ValueError(f"{path}:{bad + 1}: non-integer id in {table[bad][:80]!r}") from None
    users = values[offsets[:-1]]
    wrong = np.flatnonzero(users != np.arange(1, users.size + 1))
    if wrong.size:
        raise ValueError(f"{path}:{wrong[0] + 1}: user id {users[wrong[0]]}, expected {wrong[0] + 1} "
                         "(users must be 1..U in file order)")
    seqs = [values[offsets[u] + 1:offsets[u + 1]] for u in range(users.size)]
    bad = next((u for u, s in enumerate(seqs) if s.min() < 1), None)
    if bad is not None:
        raise ValueError(f"{path}:{bad + 1}: item ids must be >= 1 (0 is padding)")
    return seqs


def write_sequences(path, seqs: list[np.ndarray]) -> None:
    """Inverse of read_sequences: line u = `u item item ...`, written atomically."""
    text = "".join(f"{u} {' '.join(map(str, s.tolist()))}\n" for u, s in enumerate(seqs, start=1))
    _atomic_write_text(Path(path), text)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -------------------------------------------------------------------------------------------- transforms
def _select(inter: Interactions, index) -> Interactions:
    return {key: value[index] for key, value in inter.items()}


def filter_rating(inter: Interactions, min_rating: float) -> Interactions:
    """Implicit feedback: keep the rows with rating >= min_rating (file order kept)."""
    return _select(inter, inter["rating"] >= min_rating)


def kcore(inter: Interactions, user_k: int, item_k: int) -> Interactions:
    """Drop users with < user_k rows and items with < item_k rows, repeated until nothing changes.

    Counts are rows (interactions), not distinct partners. The fixed point is the unique maximal
    sub-dataset meeting both bounds, so the removal order inside a pass does not matter. Order kept.
    """
    _, u_idx = np.unique(inter["user"], return_inverse=True)
    _, i_idx = np.unique(inter["item"], return_inverse=True)
    keep = np.ones(u_idx.size, dtype=bool)
    while True:
        u_cnt = np.bincount(u_idx[keep], minlength=u_idx.max(initial=0) + 1)
        i_cnt = np.bincount(i_idx[keep], minlength=i_idx.max(initial=0) + 1)
        new_keep = keep & (u_cnt[u_idx] >= user_k) & (i_cnt[i_idx] >= item_k)
        if np.array_equal(new_keep, keep):
            return _select(inter, keep)
        keep = new_keep


def sort_chronological(inter: Interactions, by_user: bool = True) -> Interactions:
    """Stable sort by (user, timestamp), or by timestamp alone with by_user=False (a global stream).

    Tie rule: rows with equal keys keep their input (file) order; np.lexsort is a stable sort.
    """
    keys = (inter["timestamp"], inter["user"]) if by_user else (inter["timestamp"],)
    return _select(inter, np.lexsort(keys))


def _first_appearance_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new ids 1..N in order of first appearance, raw id of each new id) for one id column."""
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # uniq[order] = raw ids by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse] + 1, uniq[order]


def remap_ids(inter: Interactions, order: str = "first") -> tuple[Interactions, np.ndarray, np.ndarray]:
    """Map users and items to 1..N (0 is padding). Returns (inter, user_map, item_map).

    order="first": ids follow first appearance in the current row order. After sort_chronological this is
    the FLAME convention (flame spec §3.6): users by sorted id, items as first met scanning each user's
    chronological sequence; after a global time sort it is first appearance in the stream.
    order="sorted": ids follow ascending raw id. user_map[new] = raw id, with user_map[0] = -1 (padding).
    """
    if order not in ("first", "sorted"):
        raise ValueError(f"remap_ids: order must be 'first' or 'sorted', got {order!r}")
    out, maps = dict(inter), []
    for key in ("user", "item"):
        if order == "first":
            new, raw = _first_appearance_ids(inter[key])
        else:
            raw, new = np.unique(inter[key], return_inverse=True)
            new = new + 1
        out[key] = new.astype(np.int64)
        maps.append(np.concatenate([[-1], raw]).astype(np.int64))
    return out, maps[0], maps[1]


def to_sequences(inter: Interactions) -> list[np.ndarray]:
    """Group remapped interactions by user, keeping row order (sort first): seqs[u-1] = items of user u."""
    users = inter["user"]
    n_users = int(users.max(initial=0))
    if users.size == 0 or users.min() < 1 or np.unique(users).size != n_users:
        raise ValueError("to_sequences needs user ids 1..U with no gap (call remap_ids first)")
    order = np.argsort(users, kind="stable")
    bounds = np.cumsum(np.bincount(users, minlength=n_users + 1))[:-1]
    return np.split(inter["item"][order], bounds[1:])


def leave_one_out(seqs: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per user: train = all but the last two items, valid target = s[-2], test target = s[-1]."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    short = np.flatnonzero(lengths < 3)
    if short.size:
        raise ValueError(f"leave_one_out: user {short[0] + 1} has {lengths[short[0]]} items (< 3)")
    train = [s[:-2] for s in seqs]
    return train, np.array([s[-2] for s in seqs], np.int64), np.array([s[-1] for s in seqs], np.int64)


def compute_stats(data: Interactions | list[np.ndarray]) -> dict:
    """users / items / interactions (distinct counts, rows) plus length and density figures."""
    if isinstance(data, dict):
        users, items = data["user"], data["item"]
        lengths = np.unique(users, return_counts=True)[1]
    else:
        items = np.concatenate(data) if data else np.zeros(0, np.int64)
        lengths, users = np.fromiter(map(len, data), np.int64, len(data)), np.arange(len(data))
    n_users, n_items, n_rows = int(np.unique(users).size), int(np.unique(items).size), int(items.size)
    return {"users": n_users, "items": n_items, "interactions": n_rows,
            "max_item_id": int(items.max(initial=0)),
            "min_len": int(lengths.min()) if lengths.size else 0, "max_len": int(lengths.max(initial=0)),
            "avg_len": round(n_rows / max(n_users, 1), 3),
            "density": round(n_rows / max(n_users * n_items, 1), 6)}


def check_stats(name: str, stats: dict, expected: dict) -> None:
    """Raise a one-line ValueError when any expected statistic drifted (only keys in `expected`)."""
    drift = [f"{k} {stats.get(k)} != expected {v}" for k, v in expected.items() if stats.get(k) != v]
    if drift:
        raise ValueError(f"{name}: statistics drift after preprocessing: {'; '.join(drift)}")


# ------------------------------------------------------------------------------------------- synthetic
def make_synthetic(num_users: int, num_items: int, seed: int, min_len: int = 5, max_len: int = 20,
                   noise: float = 0.2) -> Interactions:
    """Deterministic toy log with sequential structure: each user mostly walks item i -> i+1 (mod N).

    A user starts at a random item; each next item is the successor with prob. 1 - noise, else random,
    so a sequential model can learn "next = current + 1". Ids are 1..N; timestamps increase per user.
    """
    rng = np.random.default_rng([seed, num_users, num_items])
    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    user = np.repeat(np.arange(1, num_users + 1), lengths)
    item = np.empty(user.size, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for u in range(num_users):
        current = int(rng.integers(num_items))
        for t in range(lengths[u]):
            item[starts[u] + t] = current + 1
            current = (current + 1) % num_items if rng.random() >= noise else int(rng.integers(num_items))
    timestamp = 1_000_000_000 + np.arange(user.size, dtype=np.int64) * 60
    rating = rng.integers(1, 6, size=user.size).astype(np.float64)
    return {"user": user, "item": item, "timestamp": timestamp, "rating": rating}


def synthetic_sequences(num_users: int, num_items: int, seed: int, **kwargs) -> list[np.ndarray]:
    """make_synthetic(...) as sequences: seqs[u-1] = user u's items (ids 1..num_items)."""
    inter = make_synthetic(num_users, num_items, seed, **kwargs)
    return np.split(inter["item"], np.cumsum(np.bincount(inter["user"]))[1:-1])


# ------------------------------------------------------------------------------------- registry, cache
GROUPLENS = "https://files.grouplens.org/datasets"
# The FLAME authors' repository at the commit ../shared/data/flame/SOURCE.txt names; files are in datasets/.
FLAME_RAW = ("https://raw.githubusercontent.com/woo-joo/FLAME_SIGIR26/"
             "9e874bb0f7f462251755a57cc34596db2cadcd05/datasets/")
RECIPE_DEFAULTS = {"min_rating": None, "user_k": 0, "item_k": 0, "order": "file", "ids": "raw"}
FILTER_KEYS = ("min_rating", "user_k", "item_k")  # the only recipe keys that change the counts


def _flame(name: str, users: int, items: int, interactions: int, sha256: str) -> dict:
    """A FLAME sequence file: already processed (flame spec §3.1), so its recipe is empty."""
    return {"kind": "sequences", "dir": "flame", "file": f"{name}.txt", "url": FLAME_RAW + f"{name}.txt",
            "member": None, "sha256": sha256, "reader": read_sequences, "recipe": {},
            "expected": {"users": users, "items": items, "interactions": interactions}}


# name -> where the raw file is, how to read it, the recipe, and what the result must look like.
# kind: raw file holds "interactions" or ready "sequences"; dir/file: <data root>/<dir>/<file>;
# url (+ member inside the zip, None = the url is the file); sha256 of the raw file (None = unknown);
# expected: statistics asserted after the recipe (None = unknown: consistency checks only);
# variants: other recipes whose counts are known (matched on FILTER_KEYS). GroupLens publishes no
# sha256; archive_md5 is the archive md5 that several public loaders record for ml-1m.zip / ml-100k.zip.
DATASETS: dict[str, dict] = {
    # flame spec §3.6: all ratings implicit, 5-core fixed point, stable (user, time) sort, first-appearance ids.
    "ml-1m": {"kind": "interactions", "dir": "ml-1m", "file": "ratings.dat", "reader": read_ml1m,
              "url": f"{GROUPLENS}/movielens/ml-1m.zip", "member": "ml-1m/ratings.dat",
              "archive_md5": "c4d9eecfca2ab87c1945afe126590906", "sha256": None,
              "recipe": {"user_k": 5, "item_k": 5, "order": "user_time", "ids": "first"},
              "expected": {"users": 6040, "items": 3416, "interactions": 999611}},
    "ml-100k": {"kind": "interactions", "dir": "ml-100k", "file": "u.data", "reader": read_ml100k,
                "url": f"{GROUPLENS}/movielens/ml-100k.zip", "member": "ml-100k/u.data",
                "archive_md5": "0e33842e24a9c977be4e0107933c0723",
                "sha256": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
                "recipe": {}, "expected": {"users": 943, "items": 1682, "interactions": 100000},
                "variants": [  # vlm2rec spec §14.2 (5-core, rating >= 4) and f3crec spec §1.2 (10-core)
                    ({"user_k": 5, "item_k": 5}, {"users": 943, "items": 1349, "interactions": 99287}),
                    ({"user_k": 10, "item_k": 10}, {"users": 943, "items": 1152, "interactions": 97953}),
                    ({"min_rating": 4}, {"interactions": 55375})]},
    "ml-latest-small": {
        "kind": "interactions", "dir": "ml-latest-small", "file": "ratings.csv", "reader": read_movielens_csv,
        "url": f"{GROUPLENS}/movielens/ml-latest-small.zip", "member": "ml-latest-small/ratings.csv",
        "sha256": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
        "recipe": {}, "expected": {"users": 610, "items": 9724, "interactions": 100836},
        "variants": [({"user_k": 10, "item_k": 10}, {"users": 609, "items": 2269, "interactions": 81109})]},
    # (user, artist) at the earliest tag date; counts verified on ../shared/data (SOURCE.txt there).
    "hetrec2011-lastfm-2k": {
        "kind": "interactions", "dir": "hetrec2011-lastfm-2k", "file": "user_taggedartists.dat",
        "reader": read_hetrec_lastfm, "url": f"{GROUPLENS}/hetrec2011/hetrec2011-lastfm-2k.zip",
        "member": "user_taggedartists.dat",
        # Digest of the LF text: GroupLens ships CRLF, the shared copy is LF, the content is the same.
        "sha256": "c4a9ffae9ab47a9f9b2f0678ab1f7e5c1db4ca818837d8cddd1f5699c5bbf048", "sha256_crlf_as_lf": True,
        "recipe": {}, "expected": {"users": 1892, "items": 12523, "interactions": 71064},
        "variants": [({"user_k": 10, "item_k": 10}, {"users": 701, "items": 1594, "interactions": 36626})]},
    # No local copy exists: counts unknown, so only the consistency checks run (f3crec spec §12).
    "hetrec2011-movielens-2k": {
        "kind": "interactions", "dir": "hetrec2011-movielens-2k", "file": "user_ratedmovies-timestamps.dat",
        "reader": read_hetrec_movielens, "url": f"{GROUPLENS}/hetrec2011/hetrec2011-movielens-2k-v2.zip",
        "member": "user_ratedmovies-timestamps.dat", "sha256": None, "recipe": {}, "expected": None},
    # flame spec §3.2 statistics; digests of ../shared/data/flame/*.txt.
    "amazon-beauty": _flame("amazon-beauty", 22363, 12101, 198502,
                            "59ed0b9bd561c3adf98da6d29b5c4cdd8dad233426418bf5facc17bb9a684ed7"),
    "amazon-games": _flame("amazon-games", 24303, 10672, 231780,
                           "7e1af03e3e27b31ff548a5fe0d06847b07fdb0d2ff3f1179cda909755ddf9d75"),
    "amazon-sports": _flame("amazon-sports", 35598, 18357, 296337,
                            "3d59d5998586e1b49f817812c1625627c0f09a5186f62ba70df610ed3e9d2e5d"),
    "amazon-toys": _flame("amazon-toys", 19412, 11924, 167597,
                          "45608e642b0d04e3e02a6009e93c5723164a1fb227147579558ae619d774c9a5"),
    "yelp": _flame("yelp", 29915, 21572, 345186,
                   "20c961eea837e0a401bbfde2b6549d875ebbe6294e5e7ee2ca07a6f52cf3d2d2"),
}


def dataset_entry(name: str) -> dict:
    """The registry entry; an unknown name -> one-line ValueError listing the known names."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def apply_recipe(inter: Interactions, recipe: dict) -> Interactions:
    """Rating threshold -> k-core fixed point -> stable (user, time) sort -> id remap, as the recipe says."""
    if recipe["min_rating"] is not None:
        inter = filter_rating(inter, recipe["min_rating"])
    if recipe["user_k"] > 1 or recipe["item_k"] > 1:
        inter = kcore(inter, recipe["user_k"], recipe["item_k"])
    if recipe["order"] == "user_time":
        inter = sort_chronological(inter)
    if recipe["ids"] != "raw":
        inter = remap_ids(inter, order=recipe["ids"])[0]
    return inter


def _cached(name: str, root, recipe: dict | None, fname: str) -> tuple[Path, dict]:
    """Build or reuse the artefact, re-assert its statistics, and return (path of fname, stats.json)."""
    from common.prepare import build_dataset, expected_stats  # prepare imports this module
    out = build_dataset(name, root, recipe)
    meta = json.loads((out / "stats.json").read_text())
    expected = expected_stats(name, meta["recipe"])
    if expected is not None:  # cheap re-assertion on every load, against today's registry
        check_stats(name, meta["stats"], expected)
    if not (out / fname).is_file():
        raise ValueError(f"{name}: recipe {meta['recipe']} gives no {fname} (sequences need "
                         "order=user_time and remapped ids)")
    return out / fname, meta


def load_interactions(name: str, root: str | os.PathLike | None = None, recipe: dict | None = None
                      ) -> Interactions:
    """Registered recipe (with optional overrides) applied, cached, statistics asserted; file order kept."""
    if dataset_entry(name)["kind"] == "sequences":
        raise ValueError(f"{name} is a sequence file; use load_sequences")
    path, meta = _cached(name, root, recipe, "interactions.tsv")
    inter = _read_table(path, b"\t", COLUMNS, header=True)
    if inter["user"].size != meta["stats"]["interactions"]:
        raise ValueError(f"{name}: cached {path} has {inter['user'].size} rows, stats.json says "
                         f"{meta['stats']['interactions']}; rebuild with --force")
    return inter


def load_sequences(name: str, root: str | os.PathLike | None = None, recipe: dict | None = None
                   ) -> list[np.ndarray]:
    """FLAME files as shipped, or an interaction dataset whose recipe remaps ids: seqs[u-1] = user u."""
    path, meta = _cached(name, root, recipe, "sequences.txt")
    seqs = read_sequences(path)
    if len(seqs) != meta["stats"]["users"]:
        raise ValueError(f"{name}: cached {path} has {len(seqs)} users, stats.json says "
                         f"{meta['stats']['users']}; rebuild with --force")
    return seqs
