"""Real-data checks of the common/ data pipeline on ../shared/data (REPRO_DATA); @slow, skipped when the data is absent.

Statistics come from the specs (flame §3.2, vlm2rec §14.2, f3crec §1.2) and the SOURCE.txt files; the
builds also verify each raw file's sha256 against the registry.
"""
import numpy as np
import pytest

from common import data
from common.data import compute_stats, read_ml1m
from common.datasets import load_interactions, load_sequences
from common.registry import DATASETS

pytestmark = pytest.mark.slow

# flame spec §3.2: min/max length, training samples after truncation to 53 (n - 3 each), users > 53.
FLAME_TABLE = {
    "amazon-beauty": (5, 204, 8.876, 128031, 127),
    "amazon-games": (5, 773, 9.537, 149717, 224),
    "amazon-sports": (5, 296, 8.325, 187944, 73),
    "amazon-toys": (5, 550, 8.634, 106592, 102),
    "yelp": (5, 285, 11.539, 240483, 489),
}


@pytest.mark.parametrize("name", sorted(FLAME_TABLE))
def test_flame_files_match_spec(shared_data, name):
    seqs = load_sequences(name, root=shared_data)  # sha256 and users/items/interactions asserted inside
    stats = compute_stats(seqs)
    min_len, max_len, avg_len, samples, long_users = FLAME_TABLE[name]
    assert (stats["min_len"], stats["max_len"], stats["avg_len"]) == (min_len, max_len, avg_len)
    lengths = np.array([len(s) for s in seqs])
    assert (np.minimum(lengths, 53) - 3).sum() == samples and (lengths > 53).sum() == long_users
    assert stats["max_item_id"] == stats["items"]  # contiguous ids: vocabulary = I + 1 rows
    # Item ids were assigned by first appearance, scanning users in order (flame spec §3.1).
    flat = np.concatenate(seqs)
    _, first = np.unique(flat, return_index=True)
    assert np.array_equal(flat[np.sort(first)], np.arange(1, stats["items"] + 1))


def test_yelp_repeats(shared_data):
    seqs = load_sequences("yelp", root=shared_data)
    repeats = sum(len(s) - np.unique(s).size for s in seqs)
    consecutive = sum(int((s[1:] == s[:-1]).sum()) for s in seqs)
    assert (repeats, consecutive) == (13767, 3439)  # flame spec §3.2 footnote


@pytest.mark.parametrize("name,recipe,expected", [
    ("ml-100k", None, (943, 1682, 100000)),
    ("ml-100k", {"user_k": 5, "item_k": 5}, (943, 1349, 99287)),
    ("ml-100k", {"user_k": 10, "item_k": 10}, (943, 1152, 97953)),
    ("ml-latest-small", None, (610, 9724, 100836)),
    ("ml-latest-small", {"user_k": 10, "item_k": 10}, (609, 2269, 81109)),
    ("hetrec2011-lastfm-2k", None, (1892, 12523, 71064)),
    ("hetrec2011-lastfm-2k", {"user_k": 10, "item_k": 10}, (701, 1594, 36626)),
])
def test_interaction_datasets_match_sources(shared_data, name, recipe, expected):
    stats = compute_stats(load_interactions(name, root=shared_data, recipe=recipe))
    assert (stats["users"], stats["items"], stats["interactions"]) == expected


def test_ml100k_ties_keep_file_order(shared_data):
    raw = data.read_ml100k(shared_data / "ml-100k" / "u.data")
    inter = load_interactions("ml-100k", root=shared_data, recipe={"order": "user_time"})
    by_user = {}
    for u, i, t in zip(raw["user"].tolist(), raw["item"].tolist(), raw["timestamp"].tolist()):
        by_user.setdefault(u, []).append((t, i))
    oracle = [i for u in sorted(by_user) for _, i in sorted(by_user[u], key=lambda row: row[0])]  # stable
    assert inter["item"].tolist() == oracle
    # The rule matters: 415 of 943 users share their last timestamp (vlm2rec spec §14.2).
    assert sum(sum(t == max(rows)[0] for t, _ in rows) > 1 for rows in by_user.values()) == 415


def test_ml1m_reader_on_partial_files(shared_data, tmp_path, monkeypatch):
    partial = shared_data / "ml-1m-partial"
    with pytest.raises(ValueError, match=r"users\.dat:1: expected 4 fields, got 5"):
        read_ml1m(partial / "users.dat")  # the wrong ML-1M file is refused at its first line
    users = [int(line.split(b"::")[0]) for line in (partial / "users.dat").read_bytes().splitlines()]
    movies = [int(line.split(b"::")[0]) for line in (partial / "movies.dat").read_bytes().splitlines()]
    assert (len(users), len(movies)) == (6040, 3883)
    # A ratings.dat in the real id space (real users, real sparse movie ids), built through the ml-1m entry.
    rng = np.random.default_rng(0)
    rows = [(u, m, int(rng.integers(1, 6)), 978300000 + int(rng.integers(0, 50)))
            for u in users for m in rng.choice(movies[:400], 20, replace=False)]
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in rows))
    with pytest.raises(ValueError, match=r"^ml-1m: statistics drift after preprocessing: items \d+ != expected "
                                         r"3416; interactions 120800 != expected 999611$"):
        load_sequences("ml-1m", root=tmp_path)
    monkeypatch.setitem(DATASETS["ml-1m"], "expected", None)
    seqs = load_sequences("ml-1m", root=tmp_path)
    assert len(seqs) == 6040 and sum(map(len, seqs)) == 120800
    flat = np.concatenate(seqs)
    _, first = np.unique(flat, return_index=True)
    assert np.array_equal(flat[np.sort(first)], np.arange(1, flat.max() + 1))  # first-appearance ids
