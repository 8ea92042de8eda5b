"""The dataset registry: where each raw file is, how it is read, its recipe and the statistics it must have.

    entry = dataset_entry("ml-100k")           # one-line ValueError for an unknown name
    expected_stats("ml-100k", full_recipe("ml-100k", {"user_k": 10, "item_k": 10}))

Every expected-statistics table of the project lives here: the registered recipes and their variants
(`DATASETS`), and the statistics of artefacts a paper derives from a registered dataset (`DERIVED`:
F3CRec's blocks, VLM2Rec's poster join and review files). Adding a dataset is one entry here plus a
paper config. Statistics come in two kinds, said per entry: published or computed from the source
files (they catch a wrong pipeline), and measured by this pipeline and frozen (they catch drift only).
"""
from __future__ import annotations

from common.data import (FILTER_KEYS, RECIPE_DEFAULTS, read_hetrec_lastfm, read_hetrec_movielens, read_ml100k,
                         read_ml1m, read_movielens_csv, read_sequences)

GROUPLENS = "https://files.grouplens.org/datasets"
# The FLAME authors' repository at the commit their data were taken from; files are in datasets/.
FLAME_RAW = ("https://raw.githubusercontent.com/woo-joo/FLAME_SIGIR26/"
             "9e874bb0f7f462251755a57cc34596db2cadcd05/datasets/")


def _flame(name: str, users: int, items: int, interactions: int, sha256: str) -> dict:
    """A FLAME sequence file: already processed by the authors, so its recipe is empty."""
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
    # FLAME's ML-1M (flame/docs/method.md): all ratings implicit, 5-core fixed point, stable (user, time)
    # sort, first-appearance ids.
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
                "variants": [  # vlm2rec's 5-core and rating >= 4 recipes, f3crec's 10-core
                    ({"user_k": 5, "item_k": 5}, {"users": 943, "items": 1349, "interactions": 99287}),
                    ({"user_k": 10, "item_k": 10}, {"users": 943, "items": 1152, "interactions": 97953}),
                    ({"min_rating": 4}, {"interactions": 55375})]},
    "ml-latest-small": {
        "kind": "interactions", "dir": "ml-latest-small", "file": "ratings.csv", "reader": read_movielens_csv,
        "url": f"{GROUPLENS}/movielens/ml-latest-small.zip", "member": "ml-latest-small/ratings.csv",
        "sha256": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
        "recipe": {}, "expected": {"users": 610, "items": 9724, "interactions": 100836},
        "variants": [({"user_k": 10, "item_k": 10}, {"users": 609, "items": 2269, "interactions": 81109})]},
    # (user, artist) at the earliest tag date; counts measured on the GroupLens release.
    "hetrec2011-lastfm-2k": {
        "kind": "interactions", "dir": "hetrec2011-lastfm-2k", "file": "user_taggedartists.dat",
        "reader": read_hetrec_lastfm, "url": f"{GROUPLENS}/hetrec2011/hetrec2011-lastfm-2k.zip",
        "member": "user_taggedartists.dat",
        # Digest of the LF text: GroupLens ships CRLF, some mirrors ship LF, the content is the same.
        "sha256": "c4a9ffae9ab47a9f9b2f0678ab1f7e5c1db4ca818837d8cddd1f5699c5bbf048", "sha256_crlf_as_lf": True,
        "recipe": {}, "expected": {"users": 1892, "items": 12523, "interactions": 71064},
        "variants": [({"user_k": 10, "item_k": 10}, {"users": 701, "items": 1594, "interactions": 36626})]},
    # Never seen by this project: counts unknown, so only the consistency checks run.
    "hetrec2011-movielens-2k": {
        "kind": "interactions", "dir": "hetrec2011-movielens-2k", "file": "user_ratedmovies-timestamps.dat",
        "reader": read_hetrec_movielens, "url": f"{GROUPLENS}/hetrec2011/hetrec2011-movielens-2k-v2.zip",
        "member": "user_ratedmovies-timestamps.dat", "sha256": None, "recipe": {}, "expected": None},
    # Statistics computed from the authors' files; sha256 digests of those files.
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


def full_recipe(name: str, recipe: dict | None = None) -> dict:
    """The registered recipe with `recipe` overrides on top, every key filled in."""
    entry = dataset_entry(name)
    if entry["kind"] == "sequences":
        if recipe:
            raise ValueError(f"{name}: a sequence file is used as shipped; recipe overrides are not supported")
        return {}
    unknown = set(recipe or {}) - set(RECIPE_DEFAULTS)
    if unknown:
        raise ValueError(f"{name}: unknown recipe keys {sorted(unknown)}; known: {sorted(RECIPE_DEFAULTS)}")
    full = {**RECIPE_DEFAULTS, **entry["recipe"], **(recipe or {})}
    if full["order"] not in ("file", "user_time") or full["ids"] not in ("raw", "first", "sorted"):
        raise ValueError(f"{name}: recipe order must be file|user_time and ids raw|first|sorted, got {full}")
    return full


def expected_stats(name: str, recipe: dict) -> dict | None:
    """Known statistics for this recipe's filters (registered recipe or a variant); None if unknown."""
    entry = dataset_entry(name)
    if entry["kind"] == "sequences":
        return entry["expected"]
    filters = {k: recipe[k] for k in FILTER_KEYS}
    for delta, stats in [(entry["recipe"], entry["expected"])] + entry.get("variants", []):
        if {k: {**RECIPE_DEFAULTS, **delta}[k] for k in FILTER_KEYS} == filters:
            return stats
    return None


# Statistics of artefacts a paper derives from a dataset, asserted after building them. Keys are
# "<paper>/<artefact>"; "from" names the registry entry (or the raw release) they are built from.
DERIVED: dict[str, dict] = {
    # F3CRec blocks (10-core, global time split into 60 % + 3 × 13.3 %): one row per block with
    # (interactions, users, cum. users, cum. items, train, valid, test).
    # ML-100K: counted from the blocks the F3CRec authors released (our pipeline rebuilds them exactly).
    "f3crec/ml-100k": {"from": "ml-100k", "kind": "published", "blocks": [
        (58771, 587, 587, 1136, 46552, 6078, 6141), (13060, 217, 697, 1146, 10298, 1371, 1391),
        (13060, 238, 827, 1148, 10274, 1382, 1404), (13062, 207, 943, 1152, 10284, 1384, 1394)]},
    # No published counts: measured by this pipeline and frozen (they catch drift, not a wrong pipeline).
    "f3crec/ml-latest-small": {"from": "ml-latest-small", "kind": "frozen", "blocks": [
        (48665, 374, 374, 1982, 38629, 5000, 5036), (10814, 118, 466, 2189, 8557, 1122, 1135),
        (10814, 89, 543, 2250, 8584, 1110, 1120), (10816, 95, 609, 2269, 8568, 1120, 1128)]},
    "f3crec/lastfm-2k": {"from": "hetrec2011-lastfm-2k", "kind": "frozen", "blocks": [
        (21975, 497, 497, 1577, 17203, 2367, 2405), (4883, 286, 574, 1589, 3759, 553, 571),
        (4883, 302, 653, 1593, 3742, 563, 578), (4885, 308, 701, 1594, 3748, 559, 578)]},
    # VLM2Rec's ML-100K joined with posters, 5-core; "drop" removes items without a poster and re-filters,
    # "placeholder" keeps them (then the counts are the registry's 5-core variant of ml-100k). Frozen.
    "vlm2rec/ml100k-posters/drop": {"from": "ml-100k", "kind": "frozen",
                                    "stats": {"users": 943, "items": 1342, "interactions": 99126}},
    "vlm2rec/ml100k-posters/placeholder": {"from": "ml-100k", "kind": "frozen",
                                           "stats": {"users": 943, "items": 1349, "interactions": 99287}},
    # Amazon 2014 5-core review files (the raw release VLM2Rec reads): literature counts. Beauty, Sports
    # and Toys are the same user/item/interaction counts as FLAME's sequence files of the same categories.
    "vlm2rec/amazon-Beauty": {"from": "amazon-beauty", "kind": "published", "stats": "same-as-from"},
    "vlm2rec/amazon-Sports_and_Outdoors": {"from": "amazon-sports", "kind": "published",
                                           "stats": "same-as-from"},
    "vlm2rec/amazon-Toys_and_Games": {"from": "amazon-toys", "kind": "published", "stats": "same-as-from"},
    "vlm2rec/amazon-Clothing_Shoes_and_Jewelry": {  # published only approximately: 1 % tolerance
        "from": None, "kind": "published", "tolerance": 0.01,
        "stats": {"users": 39387, "items": 23033, "interactions": 278677}},
    "vlm2rec/amazon-Musical_Instruments": {"from": None, "kind": "published",
                                           "stats": {"users": 1429, "items": 900, "interactions": 10261}},
}


def derived_stats(key: str) -> dict | list | None:
    """Expected statistics of a derived artefact (a dict of counts, or F3CRec's list of block rows)."""
    entry = DERIVED.get(key)
    if entry is None:
        return None
    if "blocks" in entry:
        return entry["blocks"]
    return dataset_entry(entry["from"])["expected"] if entry["stats"] == "same-as-from" else entry["stats"]


def check_derived(key: str, stats: dict) -> None:
    """One-line ValueError when a derived artefact's counts drift from the registry (within its tolerance)."""
    expected, tolerance = derived_stats(key), DERIVED.get(key, {}).get("tolerance", 0.0)
    if expected is None:
        return
    drift = [f"{k} {stats.get(k)} != expected {v}" for k, v in expected.items()
             if stats.get(k) is None or abs(stats[k] - v) > tolerance * v]
    if drift:
        raise ValueError(f"{key}: statistics drift after preprocessing: {'; '.join(drift)}")
