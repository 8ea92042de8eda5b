"""Raw data -> cached canonical artefact: locate or download the raw file, verify it, build, assert stats.

    python -m common.prepare ml-100k [--root DIR] [--force]      (or: make data DATA=ml-100k)

Raw files are looked up under the data root (--root > $REPRO_DATA > <repo>/data/raw, one folder per
dataset as the registry names it) and then <repo>/data/raw; when absent they are downloaded into <repo>/data/raw. The
artefact goes to cache_root()/<name>/<key>/ (interactions.tsv and/or sequences.txt, stats.json), keyed by
dataset + recipe + format version + the raw file's sha256, so a changed raw file or data root never gets an
old build back; it is written atomically, and the data root is never written to. One process builds an
artefact (or downloads a raw file) at a time: a second one waits for the first (an fcntl.flock on
`<artefact>.lock` beside it, released even by kill -9) and then uses what it built.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from common.data import COLUMNS, Interactions, apply_recipe, check_stats, compute_stats, to_sequences, write_sequences
from common.cli import run_cli
from common.download import fetch, file_md5, file_sha256, unpack
from common.io import atomic_dir, cache_root, check_writable, data_root, exclusive, project_root
from common.registry import DATASETS, dataset_entry, expected_stats, full_recipe

FORMAT_VERSION = 1  # bump when the artefact layout or a transform's semantics change: invalidates caches


def artefact_key(name: str, recipe: dict, raw_sha256: str) -> str:
    """Cache key: the dataset, the full recipe, the artefact format version and the raw file's content."""
    blob = json.dumps({"name": name, "recipe": recipe, "format": FORMAT_VERSION, "raw": raw_sha256},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def raw_digest(name: str, raw: Path) -> str:
    """sha256 of the raw file, verified against the registry when the registry knows it."""
    entry = dataset_entry(name)
    digest = file_sha256(raw, crlf_as_lf=entry.get("sha256_crlf_as_lf", False))
    if entry["sha256"] and digest != entry["sha256"]:
        raise ValueError(f"{name}: sha256 mismatch for {raw}: expected {entry['sha256']}, got {digest}")
    return digest


def find_raw(name: str, root: str | os.PathLike | None = None) -> Path:
    """<data root>/<dir>/<file>, else <repo>/data/raw/<dir>/<file>; missing -> FileNotFoundError with a fix."""
    entry = dataset_entry(name)
    candidates = list(dict.fromkeys(base / entry["dir"] / entry["file"]
                                    for base in (data_root(root), project_root() / "data" / "raw")))
    for path in candidates:
        if path.is_file():
            return path
    source = entry["url"] + (f" (member {entry['member']})" if entry["member"] else "")
    raise FileNotFoundError(f"{name}: raw file {entry['file']} not found at {candidates[0]}; run "
                            f"`python -m common.prepare {name}` to download {source}, or put the file there")


def _check_consistency(name: str, inter: Interactions, recipe: dict) -> None:
    """Checks that hold for any data set, known counts or not (one-line errors)."""
    if inter["user"].size == 0:
        raise ValueError(f"{name}: no interactions left after the recipe {recipe}")
    for key, k in (("user", recipe["user_k"]), ("item", recipe["item_k"])):
        counts = np.unique(inter[key], return_counts=True)[1]
        if counts.min() < k:
            raise ValueError(f"{name}: a {key} has {counts.min()} interactions after a {k}-core filter")
        if recipe["ids"] != "raw" and (inter[key].min() != 1 or inter[key].max() != counts.size):
            raise ValueError(f"{name}: remapped {key} ids are not contiguous 1..{counts.size}")
    if not np.isfinite(inter["rating"]).all():
        raise ValueError(f"{name}: non-finite rating values")


def build_dataset(name: str, root: str | os.PathLike | None = None, recipe: dict | None = None,
                  force: bool = False) -> Path:
    """Build (or reuse) cache_root()/<name>/<recipe hash>/ and return it; statistics asserted on build."""
    entry, recipe = dataset_entry(name), full_recipe(name, recipe)
    raw = find_raw(name, root)
    digest = raw_digest(name, raw)
    out = cache_root() / name / artefact_key(name, recipe, digest)
    if (out / "stats.json").is_file() and not force:
        return out
    check_writable(out.parent, "data cache", "$REPRO_CACHE")
    with exclusive(out, f"[prepare] {out} is being built by another process: waiting for it", remove=True):
        if (out / "stats.json").is_file() and not force:  # built by the process we waited for
            return out
        _build(name, entry, recipe, raw, digest, out)
    return out


def _build(name: str, entry: dict, recipe: dict, raw: Path, digest: str, out: Path) -> None:
    """Read `raw`, apply the recipe, check the statistics and write the artefact folder `out`."""
    files = {}
    if entry["kind"] == "sequences":
        seqs = entry["reader"](raw)
        stats = compute_stats(seqs)
        files["sequences.txt"] = seqs
    else:
        inter = apply_recipe(entry["reader"](raw), recipe)
        _check_consistency(name, inter, recipe)
        stats = compute_stats(inter)
        files["interactions.tsv"] = inter
        if recipe["order"] == "user_time" and recipe["ids"] != "raw":
            files["sequences.txt"] = to_sequences(inter)
    expected = expected_stats(name, recipe)
    if expected is not None:
        check_stats(name, stats, expected)
    meta = {"name": name, "recipe": recipe, "format": FORMAT_VERSION, "stats": stats,
            "expected": expected, "raw": str(raw), "raw_sha256": digest,
            "tie_rule": "stable sorts: equal timestamps keep the raw file's row order"}
    _write_artefact(out, files, meta)


def _write_artefact(out: Path, files: dict, meta: dict) -> None:
    """Write every file of the artefact into a fresh folder that replaces `out` in one rename."""
    with atomic_dir(out) as tmp:
        for fname, data in files.items():
            if fname == "sequences.txt":
                write_sequences(tmp / fname, data)
            else:
                rows = map("{}\t{}\t{}\t{}\n".format, *(data[c].tolist() for c in COLUMNS))
                (tmp / fname).write_text("user_id\titem_id\ttimestamp\trating\n" + "".join(rows))
        (tmp / "stats.json").write_text(json.dumps(meta, indent=2) + "\n")


def download_raw(name: str, download_dir: str | os.PathLike | None = None, timeout: float = 10.0,
                 root: str | os.PathLike | None = None) -> Path:
    """Fetch the raw file into <download_dir>/<dir>/<file> (default <repo>/data/raw), checksums verified.

    A failure message also says where the file could be put by hand: under the data root `root`.
    """
    entry = dataset_entry(name)
    base = Path(download_dir) if download_dir else project_root() / "data" / "raw"
    dest = base / entry["dir"] / entry["file"]
    check_writable(dest.parent, "download folder", "the download folder: <repo>/data/raw unless given")
    with exclusive(dest, f"[prepare] {dest} is being downloaded by another process: waiting for it", remove=True):
        if entry["sha256"] and dest.is_file() and \
                file_sha256(dest, crlf_as_lf=entry.get("sha256_crlf_as_lf", False)) == entry["sha256"]:
            return dest  # the process we waited for fetched it (verified)
        return _download(name, entry, dest, timeout, root)


def _download(name: str, entry: dict, dest: Path, timeout: float, root: str | os.PathLike | None) -> Path:
    where = (f"fetch it by hand and put {entry['file']} (member {entry['member']} of "
             f"{entry['url'].rsplit('/', 1)[-1]})" if entry["member"] else f"fetch it by hand and put {entry['file']}")
    hint = f"{where} at {data_root(root) / entry['dir'] / entry['file']} (data root: --root or $REPRO_DATA)"
    if entry["member"] is None:
        return fetch(entry["url"], dest, sha256=entry["sha256"], timeout=timeout, hint=hint)
    archive = dest.parent / entry["url"].rsplit("/", 1)[-1]
    md5 = entry.get("archive_md5")
    if archive.is_file() and md5 and file_md5(archive) != md5:
        archive.unlink()  # a corrupt or foreign archive left by an earlier attempt: fetch it again
    if not archive.is_file():
        fetch(entry["url"], archive, md5=md5, timeout=timeout, hint=hint)
    try:
        unpack(archive, entry["member"], dest)
    except (ValueError, FileNotFoundError):
        archive.unlink()  # never trusted again: the next attempt downloads it afresh
        raise
    digest = file_sha256(dest, crlf_as_lf=entry.get("sha256_crlf_as_lf", False))
    if entry["sha256"] and digest != entry["sha256"]:
        dest.unlink()
        archive.unlink()
        raise ValueError(f"{name}: sha256 mismatch for {entry['member']} of {archive}: expected "
                         f"{entry['sha256']}, got {digest} (archive and extracted file deleted)")
    return dest


def prepare(name: str, root: str | os.PathLike | None = None, force: bool = False,
            download_dir: str | os.PathLike | None = None, timeout: float = 10.0) -> dict:
    """Find or download the raw file, build the artefact (or reuse it) and return its stats.json."""
    dataset_entry(name)
    try:
        find_raw(name, root)
    except FileNotFoundError:
        download_raw(name, download_dir, timeout, root)
        root = download_dir or project_root() / "data" / "raw"
    out = build_dataset(name, root, force=force)
    meta = json.loads((out / "stats.json").read_text())
    meta["artefact"] = str(out)
    return meta


def main(argv: list[str] | None = None) -> dict:
    """CLI: prepare one dataset and print its statistics, raw sha256, artefact path and time taken."""
    parser = argparse.ArgumentParser(prog="python -m common.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("name", help=f"dataset name, one of: {', '.join(DATASETS)}")
    parser.add_argument("--root", help="data root holding the raw files (default $REPRO_DATA or data/raw)")
    parser.add_argument("--force", action="store_true", help="rebuild the cached artefact")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    meta = prepare(args.name, args.root, args.force)
    stats = meta["stats"]
    print(f"{args.name}: {stats['users']:,} users / {stats['items']:,} items / "
          f"{stats['interactions']:,} interactions (avg len {stats['avg_len']}, min {stats['min_len']}, "
          f"max {stats['max_len']}, density {stats['density']:.4%})")
    print(f"  expected: {meta['expected'] or 'unknown (consistency checks only)'}; recipe: {meta['recipe']}")
    print(f"  raw: {meta['raw']} sha256 {meta['raw_sha256']}")
    print(f"  artefact: {meta['artefact']}  ({time.perf_counter() - start:.2f} s)")
    return meta


if __name__ == "__main__":
    run_cli(main)
