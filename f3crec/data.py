"""FCRec blocks (§1, §2): raw stream → 10-core → global time order → 60 % + 3 incremental blocks.

    blocks = load_blocks("$REPRO_DATA/f3crec-ml-100k-blocks")   # released reference blocks (§2)
    blocks = load_blocks(prepare_blocks("ml-100k", seed=1))      # our pipeline, cached, stats asserted
    blocks, sha = get_blocks(cfg.data, seed)                     # whichever the config names (binary cache)

Ids are 0-based (as in the reference blocks): users and items are numbered by first appearance in the
time-sorted stream, so block t's newcomers hold [n_{t−1}, n_t). Generated blocks are written in the released
JSON layout (+ a `meta` object) and read back through the same validating loader.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data import kcore
from common.datasets import load_interactions
from common.io import atomic_write, cache_root, load_json
from common.prepare import find_raw, prepare
from common.registry import derived_stats

SPLITS = ("train", "valid", "test")
# Our dataset keys (§12) -> common registry names (download, sha256 and k-core statistics there). The
# block statistics each dataset must give (§1.2, §12) are the registry's DERIVED["f3crec/<key>"] rows.
REGISTRY = {"ml-100k": "ml-100k", "ml-latest-small": "ml-latest-small",
            "hetrec2011": "hetrec2011-movielens-2k", "lastfm-2k": "hetrec2011-lastfm-2k"}
COLUMNS = "(interactions, users, cum. users, cum. items, train, valid, test)"



@dataclass
class Block:
    train: dict[int, np.ndarray]     # user -> items (0-based ids)
    valid: dict[int, np.ndarray]
    test: dict[int, np.ndarray]
    n_users: int                     # cumulative |U^t| (1 + largest user id in blocks ≤ t)
    n_items: int                     # cumulative |I^t|
    item_list: np.ndarray            # every interaction's item (checks only)

    def split(self, name: str) -> dict[int, np.ndarray]:
        return getattr(self, name)

    def stats(self) -> tuple[int, ...]:
        """(interactions, users, cum. users, cum. items, train, valid, test), the §1.2 columns."""
        sizes = [sum(len(v) for v in self.split(s).values()) for s in SPLITS]
        return (sum(sizes), len(self.train), self.n_users, self.n_items, *sizes)


# ------------------------------------------------------------------------------------------- pipeline
def split_sizes(n: int) -> tuple[int, int, int]:
    """(train, valid, test) sizes for n interactions (§1.1 step 7): sklearn's float test_size rule twice."""
    if n < 3:
        return n, 0, 0
    n_test = math.ceil(0.1 * n)
    n_valid = math.ceil((1 / 9) * (n - n_test))
    return n - n_test - n_valid, n_valid, n_test


def build_blocks(inter: dict, seed: int, core: int = 10, base_fraction: float = 0.6, n_incremental: int = 3
                 ) -> list[Block]:
    """The §1.1 pipeline on raw interactions (keys user, item, timestamp; rows in file order)."""
    users, items, stamps = inter["user"], inter["item"], inter["timestamp"]
    order = np.lexsort((np.arange(users.size), stamps, items, users))        # earliest row of each pair
    first = np.ones(order.size, dtype=bool)
    first[1:] = (users[order][1:] != users[order][:-1]) | (items[order][1:] != items[order][:-1])
    keep = np.sort(order[first])                                               # [D] dedup, file order kept
    data = kcore({k: v[keep] for k, v in inter.items()}, core, core)           # fixed point (common.data)
    stream = np.argsort(data["timestamp"], kind="stable")                      # [D] stable global sort
    user = _first_appearance(data["user"][stream])
    item = _first_appearance(data["item"][stream])
    total = user.size
    sizes = [int(base_fraction * total)] + [int((1 - base_fraction) / n_incremental * total)] * (n_incremental - 1)
    if min(sizes + [total - sum(sizes)]) == 0:   # every block needs an interaction (and D⁰ a user)
        raise ValueError(f"{total} interactions are left after the {core}-core filter (data.core={core}): too "
                         f"few for {n_incremental + 1} blocks; lower data.core or use more data")
    bounds = np.cumsum([0] + sizes + [total - sum(sizes)])
    blocks = []
    for t in range(n_incremental + 1):
        u, i = user[bounds[t]:bounds[t + 1]], item[bounds[t]:bounds[t + 1]]
        parts = {s: {} for s in SPLITS}
        for uid in np.unique(u):
            mine = i[u == uid]                                                 # stream (time) order
            n_train, n_valid, _ = split_sizes(mine.size)
            if t == 0:  # D⁰ random split; [D] a per-user stream seeded by (seed, user)
                mine = mine[np.random.default_rng([seed, int(uid)]).permutation(mine.size)]
            for name, part in zip(SPLITS, np.split(mine, [n_train, n_train + n_valid])):
                if part.size:
                    parts[name][int(uid)] = part
        blocks.append(Block(**parts, n_users=int(user[:bounds[t + 1]].max()) + 1,
                            n_items=int(item[:bounds[t + 1]].max()) + 1, item_list=i.copy()))
    return blocks


def _first_appearance(values: np.ndarray) -> np.ndarray:
    """0-based ids in order of first appearance."""
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


def expected_blocks(name: str) -> list[tuple] | None:
    """The registry's block rows for dataset `name` (§1.2), or None where no counts are known."""
    return derived_stats(f"f3crec/{name}")


def check_expected(name: str, blocks: list[Block]) -> None:
    """Assert the registry's §1.2 block statistics of a dataset (one-line error naming the block)."""
    for t, (got, want) in enumerate(zip((b.stats() for b in blocks), expected_blocks(name) or [])):
        if tuple(got) != tuple(want):
            raise ValueError(f"{name} block {t}: statistics {got} != expected {want} {COLUMNS}")


# ---------------------------------------------------------------------------------------------- JSON I/O
def write_blocks(directory: Path, blocks: list[Block], meta: dict) -> None:
    """The released layout: block_t.json with train_dict/valid_dict/test_dict/item_list (+ meta)."""
    directory.mkdir(parents=True, exist_ok=True)
    for t, block in enumerate(blocks):
        payload = {f"{s}_dict": {str(u): v.tolist() for u, v in block.split(s).items()} for s in SPLITS}
        payload["item_list"] = block.item_list.tolist()
        payload["meta"] = meta
        with atomic_write(directory / f"block_{t}.json") as handle:
            handle.write(json.dumps(payload))


def load_blocks(directory: str | Path, count: int = 4) -> list[Block]:
    """Read and validate block_0..block_{count-1}.json (§2 loader rules)."""
    directory = Path(directory)
    blocks, n_users, n_items, seen_users, seen_items = [], 0, 0, set(), set()
    for t in range(count):
        path = directory / f"block_{t}.json"
        if not path.is_file():
            raise FileNotFoundError(f"block file not found: {path}")
        raw = load_json(path)            # a truncated or malformed file: one line naming it
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a block object (train_dict, valid_dict, test_dict, item_list)")
        missing = [k for k in ("train_dict", "valid_dict", "test_dict", "item_list") if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}")
        for key in (f"{s}_dict" for s in SPLITS):
            if not isinstance(raw[key], dict) or not all(isinstance(v, list) for v in raw[key].values()):
                raise ValueError(f"{path}: {key} is not a mapping of user id to a list of item ids")
        if not isinstance(raw["item_list"], list):
            raise ValueError(f"{path}: item_list is not a list of item ids")
        parts = {s: {_as_id(k, path): np.array([_as_id(x, path) for x in v], dtype=np.int64)
                     for k, v in raw[f"{s}_dict"].items() if len(v)} for s in SPLITS}
        for user in set(parts["valid"]) | set(parts["test"]):
            if user not in parts["train"]:
                raise ValueError(f"{path}: user {user} has valid/test items but no train items")
        for user, train in parts["train"].items():
            lists = [train, parts["valid"].get(user, []), parts["test"].get(user, [])]
            if len(np.unique(np.concatenate(lists))) != sum(map(len, lists)):
                raise ValueError(f"{path}: user {user}'s train/valid/test lists overlap or repeat an item")
        total = sum(len(v) for s in SPLITS for v in parts[s].values())
        if len(raw["item_list"]) != total:
            raise ValueError(f"{path}: item_list has {len(raw['item_list'])} entries, the splits {total}")
        seen_users |= set(parts["train"])
        seen_items |= {int(x) for s in SPLITS for v in parts[s].values() for x in v}
        n_users, n_items = max(seen_users) + 1, max(seen_items) + 1
        if n_users != len(seen_users) or n_items != len(seen_items):
            raise ValueError(f"{path}: ids are not contiguous ({len(seen_users)} users up to id {n_users - 1}, "
                             f"{len(seen_items)} items up to id {n_items - 1})")
        blocks.append(Block(**parts, n_users=n_users, n_items=n_items,
                            item_list=np.asarray(raw["item_list"], dtype=np.int64)))
    return blocks


def _as_id(value, path: Path) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0 or isinstance(value, bool) or str(number) != str(value).strip():
        raise ValueError(f"{path}: id {value!r} is not a non-negative integer")
    return number


def pipeline_digest() -> str:
    """sha256 of the code that turns a stream into blocks (this file and common/data.py's k-core): part of
    every generated block folder's name, so blocks cached by older code are never read back."""
    sources = [Path(__file__), Path(kcore.__code__.co_filename)]
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:10]


def fingerprint(directory: str | Path, count: int = 4) -> str:
    """sha256 over the block files: recorded in results and keys the shared base-block cache."""
    digest = hashlib.sha256()
    for t in range(count):
        digest.update((Path(directory) / f"block_{t}.json").read_bytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------- binary cache
BINARY_FORMAT = 1   # bump when the layout below changes


def binary_path(fp: str, count: int = 4) -> Path:
    """Where the binary copy of the blocks with fingerprint `fp` lives: keyed by the block files' content
    (and the loader's code, so blocks validated by older rules are never read back)."""
    return cache_root() / "f3crec" / "blocks" / f"{fp}-{count}-v{BINARY_FORMAT}-{_loader_digest()}.npz"


@functools.cache
def _loader_digest() -> str:
    """sha256 of the JSON loader's source (load_blocks, _as_id), once per process."""
    return hashlib.sha256(inspect.getsource(load_blocks).encode() + inspect.getsource(_as_id).encode()).hexdigest()[:8]


def write_binary(path: Path, blocks: list[Block]) -> None:
    """The blocks as flat int64 arrays in one .npz (no pickle): per block and split the users in their
    file order, offsets and the concatenated items; written beside `path` and renamed (atomic)."""
    arrays = {}
    for t, block in enumerate(blocks):
        for name in SPLITS:
            part = block.split(name)
            arrays[f"b{t}_{name}_users"] = np.array(list(part), dtype=np.int64)
            arrays[f"b{t}_{name}_offsets"] = np.cumsum([0] + [len(v) for v in part.values()], dtype=np.int64)
            arrays[f"b{t}_{name}_items"] = np.concatenate([np.asarray(v, np.int64) for v in part.values()]
                                                           + [np.zeros(0, np.int64)])
        arrays[f"b{t}_sizes"] = np.array([block.n_users, block.n_items], dtype=np.int64)
        arrays[f"b{t}_item_list"] = np.asarray(block.item_list, dtype=np.int64)
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


def read_binary(path: Path, count: int = 4) -> list[Block]:
    """The blocks `write_binary` wrote (ValueError / KeyError / OSError when the file is damaged)."""
    with np.load(path, allow_pickle=False) as data:
        blocks = []
        for t in range(count):
            parts = {}
            for name in SPLITS:
                users, offsets, items = (data[f"b{t}_{name}_{k}"] for k in ("users", "offsets", "items"))
                if offsets.size != users.size + 1 or offsets[-1] != items.size:
                    raise ValueError(f"{path}: block {t} {name} arrays disagree")
                bounds = offsets.tolist()       # each user's items: a view of `items` (np.split's pieces)
                parts[name] = {u: items[lo:hi] for u, lo, hi in zip(users.tolist(), bounds[:-1], bounds[1:])}
            n_users, n_items = data[f"b{t}_sizes"].tolist()
            blocks.append(Block(**parts, n_users=n_users, n_items=n_items, item_list=data[f"b{t}_item_list"]))
    return blocks


def cached_blocks(directory: str | Path, count: int = 4) -> tuple[list[Block], str]:
    """(blocks, fingerprint) of a block folder: read from the binary cache when the files' content was seen
    before, else parsed and validated from the JSON (load_blocks) and cached. A damaged cache file is not
    trusted: the JSON is parsed again and the file rewritten."""
    if not all((Path(directory) / f"block_{t}.json").is_file() for t in range(count)):
        load_blocks(directory, count)          # the one-line error naming the missing file
    fp = fingerprint(directory, count)
    path = binary_path(fp, count)
    if path.is_file():
        try:
            return read_binary(path, count), fp
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            print(f"[f3crec] block cache {path} not used ({type(err).__name__}: {err}); parsing the block files")
    blocks = load_blocks(directory, count)
    write_binary(path, blocks)
    return blocks, fp


# ----------------------------------------------------------------------------------------- entry points
def synthetic_stream(num_users: int, num_items: int, num_interactions: int, seed: int, dim: int = 4,
                     chunk: int = 4096) -> dict:
    """A random-time stream with low-rank taste (learnable) and users recurring across blocks.

    Each candidate interaction draws its item from the softmax of its user's taste over all items, by
    inverse CDF against one uniform; candidates are handled `chunk` at a time, so memory is
    O(interactions + chunk · items) rather than O(interactions · items) (time stays O(interactions · items)).
    The draws do not depend on `chunk` (tested)."""
    rng = np.random.default_rng([seed, 17])
    taste, traits = rng.normal(size=(num_users, dim)), rng.normal(size=(num_items, dim))
    user = rng.integers(0, num_users, size=num_interactions * 3)
    uniform = rng.random(user.size)
    item = np.empty(user.size, dtype=np.int64)
    for lo in range(0, user.size, chunk):
        hi = min(lo + chunk, user.size)
        logits = (taste[user[lo:hi], None, :] * traits[None]).sum(-1) * 1.5           # (chunk, I)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        cumulative = np.cumsum(probs / probs.sum(1, keepdims=True), axis=1)
        item[lo:hi] = (cumulative < uniform[lo:hi, None]).sum(1).clip(max=num_items - 1)
    pairs = np.unique(user * num_items + item, return_index=True)[1]
    pick = np.sort(pairs)[:num_interactions]
    return {"user": user[pick] + 1, "item": item[pick] + 1, "rating": np.ones(pick.size),
            "timestamp": rng.permutation(pick.size).astype(np.int64)}


def prepare_blocks(name: str, seed: int, root: str | None = None, core: int = 10) -> Path:
    """Build (or reuse) the cached blocks of a raw dataset; returns their folder. Stats asserted.

    The raw file is found, downloaded and checksummed by common.prepare, and its k-core (in file order,
    raw ids) comes from common.datasets.load_interactions, which asserts the registry's k-core counts.
    """
    return _prepared(name, seed, root, core)[0]


def _prepared(name: str, seed: int, root: str | None, core: int) -> tuple[Path, tuple[list[Block], str]]:
    """prepare_blocks' folder and the blocks read from it with their fingerprint (cached_blocks), read once."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(REGISTRY)} or set data.blocks=PATH")
    try:
        raw = find_raw(REGISTRY[name], root)
    except FileNotFoundError:
        try:
            raw = Path(prepare(REGISTRY[name], root)["raw"])       # download + checksum (make data DATA=...)
        except (OSError, ConnectionError) as err:
            raise FileNotFoundError(f"{name}: raw data not found and not downloadable ({' '.join(str(err).split())}); "
                                    "set REPRO_DATA or data.root, or data.blocks=PATH, or run the smoke config "
                                    "--config f3crec/configs/smoke.yaml") from None
        root = str(raw.parents[1])
    raw_sha = hashlib.sha256(raw.read_bytes()).hexdigest()
    out = cache_root() / "f3crec" / f"{name}-core{core}-seed{seed}-{raw_sha[:12]}-{pipeline_digest()}"
    if not (out / "block_3.json").is_file():
        inter = load_interactions(REGISTRY[name], root, {"user_k": core, "item_k": core})
        blocks = build_blocks(inter, seed, core=core)
        check_expected(name, blocks)
        write_blocks(out, blocks, {"dataset": name, "seed": seed, "core": core, "raw_sha256": raw_sha,
                                   "pipeline": "implicit, dedup, k-core fixed point, stable time sort"})
    loaded = cached_blocks(out)
    check_expected(name, loaded[0])
    return out, loaded


def get_blocks(cfg, seed: int) -> tuple[list[Block], str]:
    """The four blocks a DataConfig names and their fingerprint: released files (`blocks`), our pipeline on
    a raw dataset (`name`), or the synthetic stream."""
    if cfg.blocks:
        path = Path(cfg.blocks)
        if not (path / "block_0.json").is_file():
            raise FileNotFoundError(f"data.blocks={cfg.blocks}: no block_0.json there; the released blocks are "
                                    "not redistributable (see method.md §2), or run --config f3crec/configs/smoke.yaml")
    elif cfg.name == "synthetic":
        path = cache_root() / "f3crec" / f"synthetic-{cfg.synthetic_users}-{cfg.synthetic_items}-" \
            f"{cfg.synthetic_interactions}-core{cfg.core}-seed{seed}-{pipeline_digest()}"
        if not (path / "block_3.json").is_file():
            stream = synthetic_stream(cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_interactions, seed)
            write_blocks(path, build_blocks(stream, seed, core=cfg.core), {"dataset": "synthetic"})
    else:
        return _prepared(cfg.name, seed, cfg.root, cfg.core)[1]
    return cached_blocks(path)
