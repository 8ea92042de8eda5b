"""Readers and transforms of interaction data: plain numpy, no files other than the one being read.

Pipeline pieces: read raw -> optional rating threshold -> k-core to a fixed point -> stable chronological
sort -> ids remapped to 1..N (0 = padding). `Interactions` is a dict of equal-length arrays with keys
"user", "item", "timestamp" (int64) and "rating" (float64).

    inter = apply_recipe(read_ml100k("u.data"), {**RECIPE_DEFAULTS, "user_k": 10, "item_k": 10})

Which file, which recipe and which statistics a dataset has is in common/registry.py; the cached loading
API (`load_interactions`, `load_sequences`) is in common/datasets.py.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from common.io import atomic_write

Interactions = dict  # {"user", "item", "timestamp", "rating"} -> np.ndarray, all the same length
COLUMNS = ("user", "item", "timestamp", "rating")  # also the column order of interactions.tsv
ML_COLUMNS = ("user", "item", "rating", "timestamp")  # column order of the MovieLens rating files


# ----------------------------------------------------------------------------------------------- readers
def read_table(path, sep: bytes, cols: tuple, header: bool) -> dict:
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
    first = 2 if header else 1
    if sep != b"\t" and b"\t" in body:  # the fast path maps sep to tabs: a tab in the file is a wrong format
        number = body[:body.index(b"\t")].count(b"\n") + first
        raise ValueError(f"{path}:{number}: found a tab; fields must be separated by {sep.decode()!r}")
    text = body if sep == b"\t" else body.replace(sep, b"\t")
    if b"\n\n" not in text and b"\n\r\n" not in text:  # loadtxt would skip blank lines silently
        try:
            table = np.loadtxt(io.BytesIO(text), delimiter="\t", dtype=dtype, comments=None, ndmin=1)
        except ValueError:
            pass  # fall through to the line-by-line scan for a precise message
        else:
            columns = {c: np.ascontiguousarray(table[c]) for c in cols}
            for c in ("user", "item"):
                bad = np.flatnonzero(columns[c] < 0) if c in columns else ()
                if len(bad):
                    raise ValueError(f"{path}:{int(bad[0]) + first}: negative {c} id {columns[c][bad[0]]}")
            return columns
    _raise_first_bad_line(path, body.splitlines(), sep, dtype, first=first)


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
    return read_table(path, b"::", ML_COLUMNS, header=False)


def read_ml100k(path) -> Interactions:
    """MovieLens-100K u.data: `user item rating timestamp`, tab-separated, file order kept."""
    return read_table(path, b"\t", ML_COLUMNS, header=False)


def read_movielens_csv(path) -> Interactions:
    """MovieLens-latest ratings.csv: header `userId,movieId,rating,timestamp`, CRLF allowed."""
    return read_table(path, b",", ML_COLUMNS, header=True)


def read_hetrec_movielens(path) -> Interactions:
    """HetRec 2011 MovieLens-2k user_ratedmovies-timestamps.dat: header, tab-separated, timestamp in ms."""
    return read_table(path, b"\t", ML_COLUMNS, header=True)


def read_hetrec_lastfm(path) -> Interactions:
    """HetRec 2011 Last.fm-2k user_taggedartists.dat (`userID artistID tagID day month year`, header).

    One interaction per (user, artist) at its earliest tag date, as UTC-midnight epoch seconds (the
    millisecond-timestamp file of this release is not distributed). The row kept
    is the first file row with that earliest date, and rows keep file order; rating is 1 (implicit).
    """
    table = read_table(path, b"\t", ("user", "item", "tag", "day", "month", "year"), header=True)
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
    with atomic_write(path) as handle:
        handle.write(text)


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
    the FLAME convention: users by sorted id, items as first met scanning each user's
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


# ---------------------------------------------------------------------------------------------- recipes
RECIPE_DEFAULTS = {"min_rating": None, "user_k": 0, "item_k": 0, "order": "file", "ids": "raw"}
FILTER_KEYS = ("min_rating", "user_k", "item_k")  # the only recipe keys that change the counts


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
