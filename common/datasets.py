"""The cached loading API: a registered dataset, its recipe applied, statistics asserted, as arrays.

    seqs = load_sequences("amazon-beauty")                      # seqs[u-1] = items of user u
    inter = load_interactions("ml-100k", recipe={"user_k": 10, "item_k": 10})

The first call builds the artefact (common/prepare.py); later calls read it back and re-assert its
statistics against today's registry.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from common.data import COLUMNS, Interactions, read_table, check_stats, read_sequences
from common.prepare import build_dataset
from common.registry import dataset_entry, expected_stats


def _cached(name: str, root, recipe: dict | None, fname: str) -> tuple[Path, dict]:
    """Build or reuse the artefact, re-assert its statistics, and return (path of fname, stats.json)."""
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
    inter = read_table(path, b"\t", COLUMNS, header=True)
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
