"""common/data.py, registry.py, prepare.py and datasets.py on hand-made fixtures: readers, transforms, cache.

Every fixture is written by the test in the real file layout; nothing here reads real data or the network.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from common import data, io
from common.data import (compute_stats, kcore, read_hetrec_lastfm, read_hetrec_movielens, read_ml100k, read_ml1m,
                         read_movielens_csv, read_sequences, remap_ids, sort_chronological, to_sequences,
                         write_sequences)
from common.datasets import load_interactions, load_sequences
from common.prepare import FORMAT_VERSION, build_dataset, main as prepare_main
from common.registry import DATASETS

# ML-1M layout: unsorted users, equal timestamps inside a user, a rare item (99) and a user (3) that only
# falls below the 2-core after the rare item 40 is gone (so one pass is not the fixed point).
ML1M_FIXTURE = "\n".join(["2::20::5::300", "1::20::3::200", "1::30::4::100", "2::10::2::300", "1::10::5::100",
                          "2::30::1::250", "1::99::5::50", "3::40::4::5", "3::10::4::10"]) + "\n"
TOY_RECIPE = {"user_k": 2, "item_k": 2, "order": "user_time", "ids": "first"}


def _random_log(num_users, num_items, seed, length=(5, 20)):
    """A random interaction log: users 1..U with 5-20 rows each, items 1..N, increasing timestamps."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(1, num_users + 1), rng.integers(*length, size=num_users))
    return _inter(user, rng.integers(1, num_items + 1, size=user.size), np.arange(user.size) * 60,
                  rng.integers(1, 6, size=user.size))


def _inter(user, item, timestamp, rating=None):
    n = len(user)
    return {"user": np.array(user, np.int64), "item": np.array(item, np.int64),
            "timestamp": np.array(timestamp, np.int64),
            "rating": np.ones(n) if rating is None else np.array(rating, np.float64)}


def _brute_kcore(rows, user_k, item_k):
    """Remove one offending row group at a time until none is left: the textbook definition."""
    rows = list(rows)
    while True:
        users = {u: sum(r[0] == u for r in rows) for u, _ in rows}
        items = {i: sum(r[1] == i for r in rows) for _, i in rows}
        bad_u = [u for u, c in users.items() if c < user_k]
        bad_i = [i for i, c in items.items() if c < item_k]
        if not bad_u and not bad_i:
            return rows
        if bad_u:
            rows = [r for r in rows if r[0] != bad_u[0]]
        else:
            rows = [r for r in rows if r[1] != bad_i[0]]


@pytest.mark.parametrize("seed", range(5))
def test_kcore_is_the_fixed_point(seed):
    rng = np.random.default_rng(seed)
    inter = _inter(rng.integers(1, 30, 300), rng.zipf(1.6, 300) % 40, rng.integers(0, 99, 300))
    out = kcore(inter, 4, 3)
    rows = list(zip(inter["user"].tolist(), inter["item"].tolist()))
    assert list(zip(out["user"].tolist(), out["item"].tolist())) == _brute_kcore(rows, 4, 3)
    again = kcore(out, 4, 3)
    assert all(np.array_equal(again[k], out[k]) for k in out)
    if out["user"].size:
        assert np.unique(out["user"], return_counts=True)[1].min() >= 4
        assert np.unique(out["item"], return_counts=True)[1].min() >= 3


def test_ids_contiguous_with_zero_unused():
    inter = _random_log(40, 25, seed=3)
    inter["item"] = inter["item"] * 7 + 1000  # sparse raw ids
    for order in ("first", "sorted"):
        out, user_map, item_map = remap_ids(inter, order=order)
        for key, mapping in (("user", user_map), ("item", item_map)):
            ids = np.unique(out[key])
            assert ids[0] == 1 and np.array_equal(ids, np.arange(1, ids.size + 1))
            assert mapping[0] == -1 and np.array_equal(mapping[out[key]], inter[key])


def test_first_appearance_order_hand_made():
    # Scan order: user 5: items 30, 10; user 7: items 20, 10, 40 -> items 30->1, 10->2, 20->3, 40->4.
    inter = _inter([5, 5, 7, 7, 7], [30, 10, 20, 10, 40], [1, 2, 1, 2, 3])
    out, user_map, item_map = remap_ids(inter, order="first")
    assert out["item"].tolist() == [1, 2, 3, 2, 4] and item_map.tolist() == [-1, 30, 10, 20, 40]
    assert out["user"].tolist() == [1, 1, 2, 2, 2] and user_map.tolist() == [-1, 5, 7]
    assert remap_ids(inter, order="sorted")[0]["item"].tolist() == [3, 1, 2, 1, 4]
    with pytest.raises(ValueError, match="order"):
        remap_ids(inter, order="random")


def test_stable_sort_keeps_input_order_on_ties():
    inter = _inter([2, 1, 2, 1, 1, 2], [10, 11, 12, 13, 14, 15], [5, 3, 5, 3, 1, 2])
    assert sort_chronological(inter)["item"].tolist() == [14, 11, 13, 15, 10, 12]
    stream = sort_chronological(inter, by_user=False)  # global stream: ties keep file order across users
    assert stream["item"].tolist() == [14, 15, 11, 13, 10, 12]


def test_ml1m_fixture_gives_expected_ids_and_order(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text(ML1M_FIXTURE)
    raw = read_ml1m(path)
    assert raw["user"].tolist() == [2, 1, 1, 2, 1, 2, 1, 3, 3] and raw["rating"][0] == 5.0
    inter = data.apply_recipe(raw, {**data.RECIPE_DEFAULTS, **TOY_RECIPE})
    # user 1: items 30 and 10 tie at t=100 (file order), then 20; user 2: 30, then 20 and 10 tie at t=300.
    assert [s.tolist() for s in to_sequences(inter)] == [[1, 2, 3], [1, 3, 2]]
    assert compute_stats(inter)["interactions"] == 6
    sorted_ids = data.apply_recipe(raw, {**data.RECIPE_DEFAULTS, **TOY_RECIPE, "ids": "sorted"})
    assert [s.tolist() for s in to_sequences(sorted_ids)] == [[3, 1, 2], [3, 2, 1]]


def test_other_readers_in_real_layouts(tmp_path):
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert read_ml100k(tmp_path / "u.data")["item"].tolist() == [242, 302]
    (tmp_path / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n"
                                           b"1,3,3.5,964981247\r\n")
    csv = read_movielens_csv(tmp_path / "ratings.csv")
    assert csv["rating"].tolist() == [4.0, 3.5] and csv["timestamp"].tolist() == [964982703, 964981247]
    (tmp_path / "hetrec.dat").write_text("userID\tmovieID\trating\ttimestamp\n75\t3\t1.0\t1162160236000\n")
    assert read_hetrec_movielens(tmp_path / "hetrec.dat")["timestamp"].tolist() == [1162160236000]
    # Last.fm tags: (2, 52) tagged twice, earliest 1/3/2009 on the second row; (2, 7) once in 1956.
    (tmp_path / "tags.dat").write_text("userID\tartistID\ttagID\tday\tmonth\tyear\n2\t52\t13\t1\t4\t2009\n"
                                       "2\t7\t1\t1\t1\t1956\n2\t52\t15\t1\t3\t2009\n2\t52\t16\t1\t3\t2009\n")
    tags = read_hetrec_lastfm(tmp_path / "tags.dat")
    assert tags["item"].tolist() == [7, 52] and tags["rating"].tolist() == [1.0, 1.0]
    assert tags["timestamp"].tolist() == [-5114 * 86400, 14304 * 86400]  # 1956-01-01, 2009-03-01 (UTC days)


def test_sequences_round_trip(tmp_path):
    seqs = to_sequences(remap_ids(sort_chronological(_random_log(6, 9, seed=1)), order="first")[0])
    write_sequences(tmp_path / "s.txt", seqs)
    assert [s.tolist() for s in read_sequences(tmp_path / "s.txt")] == [s.tolist() for s in seqs]


@pytest.mark.parametrize("reader,text,message", [
    (read_ml1m, "1::2::3::4\n1::2::3\n", r"bad\.dat:2: expected 4 fields, got 3"),
    (read_ml1m, "1::2::3::4\n1::x::3::4\n", r"bad\.dat:2: column 2 is not int64 \(item\)"),
    (read_ml100k, "1\t2\t3\t4\n\n1\t2\t3\t4\n", r"bad\.dat:2: expected 4 fields, got 1"),
    (read_movielens_csv, "userId,movieId,rating,timestamp\n1,2,4.0,5\n1,2,four,5\n", r"bad\.dat:3: column 3"),
    (read_hetrec_lastfm, "h\th\th\th\th\th\n1\t2\t3\t31\t2\t2009\n", r"bad\.dat:2: invalid date 31/2/2009"),
    (read_sequences, "1 5 6\n3 7 8\n", r"bad\.dat:2: user id 3, expected 2"),
    (read_sequences, "1 5 6\n2\n", r"bad\.dat:2: expected 'user item"),
    (read_sequences, "1 5 x\n", r"bad\.dat:1: non-integer"),
    (read_sequences, "1 5 0\n", r"bad\.dat:1: item ids must be >= 1"),
])
def test_malformed_line_names_file_and_line(tmp_path, reader, text, message):
    (tmp_path / "bad.dat").write_text(text)
    with pytest.raises(ValueError, match=message):
        reader(tmp_path / "bad.dat")


@pytest.mark.parametrize("reader", [read_ml1m, read_ml100k, read_movielens_csv, read_sequences])
def test_empty_file_is_an_error(tmp_path, reader):
    (tmp_path / "empty.dat").write_text("userId,movieId,rating,timestamp\n" if reader is read_movielens_csv else "")
    with pytest.raises(ValueError, match="empty file"):
        reader(tmp_path / "empty.dat")


@pytest.mark.heavy
def test_unknown_dataset_name_lists_known_names(capsys):
    with pytest.raises(ValueError, match=r"unknown dataset 'ml-2m'; known: .*amazon-beauty.*ml-1m"):
        load_sequences("ml-2m")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        prepare_main(["nope"])
    result = subprocess.run([sys.executable, "-m", "common.prepare", "nope"], cwd=io.REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown dataset 'nope'")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A registry entry 'toy' reading the ML-1M fixture under tmp_path/raw/toy/ratings.dat."""
    (tmp_path / "raw" / "toy").mkdir(parents=True)
    (tmp_path / "raw" / "toy" / "ratings.dat").write_text(ML1M_FIXTURE)
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(DATASETS, "toy", {
        "kind": "interactions", "dir": "toy", "file": "ratings.dat", "reader": read_ml1m, "url": "http://x/toy.zip",
        "member": "toy/ratings.dat", "sha256": None, "recipe": TOY_RECIPE,
        "expected": {"users": 2, "items": 3, "interactions": 6},
        "variants": [({"user_k": 0, "item_k": 0}, {"users": 3, "items": 5, "interactions": 9})]})
    return tmp_path / "raw"


def test_registry_build_asserts_stats_and_caches(toy, monkeypatch):
    seqs = load_sequences("toy", root=toy)
    assert [s.tolist() for s in seqs] == [[1, 2, 3], [1, 3, 2]]
    inter = load_interactions("toy", root=toy)
    assert inter["user"].tolist() == [1, 1, 1, 2, 2, 2] and inter["timestamp"].tolist()[:3] == [100, 100, 200]
    calls = []
    monkeypatch.setitem(DATASETS["toy"], "reader", lambda p: calls.append(p) or read_ml1m(p))
    load_sequences("toy", root=toy)
    assert calls == []  # same recipe: the cached artefact is reused, the raw file is not read
    raw = load_interactions("toy", root=toy, recipe={"user_k": 0, "item_k": 0})
    assert len(calls) == 1 and raw["user"].size == 9  # new recipe -> new hash dir, rebuilt (variant stats)
    dirs = sorted(p.name for p in (io.cache_root() / "toy").iterdir())
    assert len(dirs) == 2 and not any(d.startswith(".") for d in dirs)
    meta = json.loads((io.cache_root() / "toy" / dirs[0] / "stats.json").read_text())
    assert meta["tie_rule"].startswith("stable") and meta["format"] == FORMAT_VERSION
    with pytest.raises(ValueError, match="gives no sequences.txt"):
        load_sequences("toy", root=toy, recipe={"ids": "raw"})
    assert [str(p.relative_to(toy)) for p in toy.rglob("*")] == ["toy", "toy/ratings.dat"]  # root untouched


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("REPRO_DATA", raising=False)
    assert io.data_root() == io.REPO / "data" / "raw"
    monkeypatch.setenv("REPRO_DATA", str(tmp_path / "env"))
    assert io.data_root() == tmp_path / "env"
    assert io.data_root(str(tmp_path / "cfg")) == tmp_path / "cfg"  # a paper's data.root wins
    assert io.cache_root() != io.data_root()


def test_stats_assertion_fires_on_drift(toy, monkeypatch):
    monkeypatch.setitem(DATASETS["toy"], "expected", {"users": 2, "items": 3, "interactions": 7})
    with pytest.raises(ValueError) as err:
        build_dataset("toy", root=toy)
    assert str(err.value) == "toy: statistics drift after preprocessing: interactions 6 != expected 7"
    assert not (io.cache_root() / "toy").exists() or not any((io.cache_root() / "toy").iterdir())
    monkeypatch.setitem(DATASETS["toy"], "sha256", "0" * 64)
    with pytest.raises(ValueError, match="sha256 mismatch .* expected 0000"):
        build_dataset("toy", root=toy)


def test_missing_raw_file_says_where_to_put_it(toy, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_sequences("toy", root=tmp_path / "elsewhere")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "elsewhere" / "toy" / "ratings.dat") in message
    assert "python -m common.prepare toy" in message and "http://x/toy.zip" in message


def test_cache_is_keyed_by_the_raw_files_content(toy, tmp_path):
    first = load_interactions("toy", root=toy)
    raw = toy / "toy" / "ratings.dat"
    raw.write_text(raw.read_text().replace("2::20::5::300", "2::20::5::301"))  # same name, new content
    second = load_interactions("toy", root=toy)
    assert first["timestamp"].max() == 300 and second["timestamp"].max() == 301
    other_root = tmp_path / "other"
    (other_root / "toy").mkdir(parents=True)
    (other_root / "toy" / "ratings.dat").write_text(ML1M_FIXTURE.replace("1::30::4::100", "1::30::4::111"))
    assert 111 in load_interactions("toy", root=other_root)["timestamp"].tolist()  # another data root
    assert load_interactions("toy", root=toy)["timestamp"].max() == 301  # and back, without a rebuild mix-up


def test_derived_statistics_live_in_the_registry():
    from common.registry import DERIVED, check_derived, derived_stats
    assert derived_stats("vlm2rec/amazon-Toys_and_Games") == DATASETS["amazon-toys"]["expected"]
    assert [row[1] for row in derived_stats("f3crec/ml-100k")] == [587, 217, 238, 207]  # users per block
    assert derived_stats("f3crec/ml-100k")[-1][2] == DATASETS["ml-100k"]["expected"]["users"]  # cumulative
    assert all(entry["from"] is None or entry["from"] in DATASETS for entry in DERIVED.values())
    check_derived("vlm2rec/amazon-Clothing_Shoes_and_Jewelry", {"users": 39700, "items": 23033,
                                                                "interactions": 278677})  # within 1 %
    with pytest.raises(ValueError, match="users 40000 != expected 39387"):
        check_derived("vlm2rec/amazon-Clothing_Shoes_and_Jewelry", {"users": 40000, "items": 23033,
                                                                    "interactions": 278677})
    with pytest.raises(ValueError, match=r"^vlm2rec/ml100k-posters/drop: statistics drift .*items 1349"):
        check_derived("vlm2rec/ml100k-posters/drop", {"users": 943, "items": 1349, "interactions": 99126})
