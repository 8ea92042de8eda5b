"""The compiled simulator's run without torch (issue 24, start-up): a FedMF run whose simulator is `compiled`
never imports torch, its numbers are those of the torch-backed compiled simulator (commit 52db22f), its
checkpoints are numpy checkpoints (no pickle, no torch), and the numpy pieces that replaced torch ones (the
m_u table, the NDCG discounts, the end-of-block top-N) give the torch pieces' values.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoints import load_checkpoint, save_checkpoint
from common.config import ConfigError

pytest.importorskip("numba")
from f3crec.sim_compiled import CompiledSimulator, discounts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "f3crec" / "configs" / "smoke.yaml"

# What the torch-backed compiled simulator gave at commit 52db22f (before this change), recorded 2026-12-06:
# the smoke run (FedMF F3CRec, float32, seed 1) ...
SMOKE_A = {"ndcg": [[0.15854], [0.12662, 0.06263], [0.12218, 0.06175, 0.1171], [0.11073, 0.07791, 0.12095, 0.14709]],
           "recall": [[0.49057], [0.41509, 0.25], [0.37736, 0.25, 0.31818], [0.34906, 0.3125, 0.27273, 0.47368]]}
SMOKE_BEST = [(1, 4), (0, 3), (0, 3), (3, 4)]
# ... each round's record (val N@20, val R@20, D_mean, m_mean) ...
SMOKE_RECORDS = [
    [0.16703, 0.46226, None, None], [0.18732, 0.5283, None, None], [0.177, 0.49057, None, None],
    [0.18102, 0.49057, None, None], [0.11808, 0.375, 119.31914893617021, 14.574468085106384],
    [0.11784, 0.375, 92.2127659574468, 17.25531914893617], [0.10392, 0.3125, 105.0, 15.936170212765957],
    [0.07771, 0.27273, 62.87234042553192, 20.23404255319149], [0.06337, 0.18182, 76.36170212765957, 18.70212765957447],
    [0.07724, 0.22727, 91.06382978723404, 17.21276595744681], [0.0, 0.0, 63.608695652173914, 20.217391304347824],
    [0.0, 0.0, 77.73913043478261, 18.543478260869566], [0.01198, 0.05263, 88.17391304347827, 17.52173913043478],
    [0.02416, 0.10526, 102.23913043478261, 16.108695652173914]]
# ... and the released ML-100K blocks, float64, 20 rounds per block, seed 42.
ML100K_A64 = {"ndcg": [[0.16811], [0.06047, 0.05332], [0.05369, 0.04886, 0.05143], [0.05277, 0.04474, 0.04171, 0.07779]],
              "recall": [[0.19038], [0.10446, 0.075], [0.09813, 0.09398, 0.08561], [0.09634, 0.08199, 0.08682, 0.12056]]}
ML100K_BEST64 = [(14, 20), (15, 20), (15, 20), (19, 20)]

# Runs f3crec.main.main on each argv of argv[1] (JSON) in a fresh interpreter; writes the summaries, the best
# rounds and the torch modules loaded at the end to argv[2].
PROGRAM = """
import json, sys
from f3crec.main import main
out = []
for argv in json.loads(sys.argv[1]):
    res = main(argv)
    out.append({"a": {m: res["summary"][m]["a"] for m in ("ndcg", "recall")},
                "best": [[b["best_round"], b["rounds_run"]] for b in res["blocks"]], "simulator": res["simulator"]})
json.dump({"runs": out, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}, open(sys.argv[2], "w"))
"""


def _fresh_process(runs: list[list[str]], tmp_path: Path) -> dict:
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-c", PROGRAM, json.dumps(runs), str(report)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(report.read_text())


def _records(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.heavy
def test_compiled_smoke_run_and_its_resume_never_import_torch_and_give_the_torch_backed_numbers(tmp_path):
    base = ["--config", str(SMOKE), "federation.simulator=compiled"]
    shared = [*base, "train.share_base=true", f"train.base_cache={tmp_path / 'base'}"]
    out = _fresh_process([[*base, "--run-dir", str(tmp_path / "whole")],
                          [*base, "--run-dir", str(tmp_path / "cut"), "train.stop_after_block=1"],
                          ["--resume", str(tmp_path / "cut"), "train.stop_after_block=null"],
                          [*shared, "--run-dir", str(tmp_path / "writes_base")],
                          [*shared, "--run-dir", str(tmp_path / "reads_base")]], tmp_path)
    assert out["torch"] == []                                          # not one torch module loaded
    whole, _, resumed, writes, reads = out["runs"]
    assert whole["simulator"] == "compiled" and whole["a"] == SMOKE_A and [tuple(b) for b in whole["best"]] == SMOKE_BEST
    assert resumed == whole                                            # --resume reproduces the uninterrupted run
    assert writes == reads == whole                                    # the base cache, written and read back
    assert any(r.get("reused") for r in _records(tmp_path / "reads_base"))
    records = _records(tmp_path / "whole")
    assert [[r["val_ndcg"], r["val_recall"], r.get("D_mean"), r.get("m_mean")] for r in records] == SMOKE_RECORDS
    assert records == _records(tmp_path / "cut")                       # the resumed folder's records, every key
    # ITM's mean weight is a float32 mean: numpy's sum order is not ATen's, so its last bit may differ (README)
    assert all(r["itm_w"] == pytest.approx(w, rel=1e-6) for r, w in zip(records[4:], [
        0.8999555706977844, 0.8999846577644348, 0.899983286857605, 0.8999879360198975, 0.8999879360198975,
        0.8999859690666199, 0.8999881148338318, 0.8999879956245422, 0.8999873399734497, 0.8999874591827393]))
    head = (tmp_path / "whole" / "last.pt").read_bytes()[:64]
    assert head.startswith(b"PK") and b"__state__" in head             # a numpy checkpoint, not torch's pickle


@pytest.mark.heavy
def test_compiled_ewc_smoke_run_and_its_resume_never_import_torch_and_give_the_vectorised_numbers(tmp_path):
    """EWC on the compiled simulator (its Fisher in closed form, its penalty inside the round): no torch module
    loaded by a whole run, a run stopped after block 1 and its resume; the numbers are the vectorised run's."""
    from f3crec.main import main
    ewc = ["--config", str(SMOKE), "backbone.dtype=float64", "method.name=ewc", "method.ewc_gamma=100"]
    base = [*ewc, "federation.simulator=compiled"]
    out = _fresh_process([[*base, "--run-dir", str(tmp_path / "whole")],
                          [*base, "--run-dir", str(tmp_path / "cut"), "train.stop_after_block=1"],
                          ["--resume", str(tmp_path / "cut"), "train.stop_after_block=null"]], tmp_path)
    assert out["torch"] == []
    whole, _, resumed = out["runs"]
    assert whole["simulator"] == "compiled" and resumed == whole
    vec = main([*ewc, "federation.simulator=vectorised", "--run-dir", str(tmp_path / "vectorised")])
    assert whole["a"] == {m: vec["summary"][m]["a"] for m in ("ndcg", "recall")}
    assert [tuple(b) for b in whole["best"]] == [(b["best_round"], b["rounds_run"]) for b in vec["blocks"]]
    assert _records(tmp_path / "cut") == _records(tmp_path / "whole")
    state = load_checkpoint(tmp_path / "whole" / "last.pt")["sim"]["clients"]
    assert isinstance(state["fisher_rows"]["F"], np.ndarray) and state["fisher_rows"]["F"].shape[0] > 0


@pytest.mark.heavy
def test_a_flower_run_on_compiled_nodes_and_its_resume_never_import_torch(tmp_path):
    """federation.simulator=flower in-process, two nodes on the compiled simulator (EWC: the Fisher at the block
    end): the server, the nodes, their Context.state and checkpoints, and a resume load no torch module, and
    the numbers are the compiled run's."""
    pytest.importorskip("flwr")
    ewc = ["--config", str(SMOKE), "backbone.dtype=float64", "method.name=ewc", "quirks.metric_decimals=-1"]
    flower = [*ewc, "federation.simulator=flower", "federation.nodes=2", f"federation.node_state_dir={tmp_path / 'nodes'}"]
    out = _fresh_process([[*flower, "--run-dir", str(tmp_path / "whole")],
                          [*flower, "--run-dir", str(tmp_path / "cut"), "train.stop_after_block=1"],
                          ["--resume", str(tmp_path / "cut"), "train.stop_after_block=null"],
                          [*ewc, "federation.simulator=compiled", "--run-dir", str(tmp_path / "compiled")]], tmp_path)
    assert out["torch"] == []
    whole, _, resumed, compiled = out["runs"]
    assert whole["simulator"] == "flower" and resumed == whole
    assert whole["a"] == compiled["a"] and whole["best"] == compiled["best"]
    assert any((tmp_path / "nodes").rglob("node-1-of-2.pt"))            # the nodes' own checkpoints


@pytest.mark.slow
def test_compiled_float64_ml100k_run_never_imports_torch_and_gives_the_torch_backed_numbers(shared_data, tmp_path):
    blocks = shared_data / "f3crec-ml-100k-blocks"
    if not blocks.is_dir():
        pytest.skip("the released F3CRec ML-100K blocks are not in the shared data")
    out = _fresh_process([[f"data.blocks={blocks}", "federation.simulator=compiled", "backbone.dtype=float64",
                           "train.threads=1", "train.share_base=false", "federation.rounds=20", "federation.patience=21",
                           "train.seed=42", "--run-dir", str(tmp_path / "run")]], tmp_path)
    assert out["torch"] == []
    run = out["runs"][0]
    assert run["a"] == ML100K_A64 and [tuple(b) for b in run["best"]] == ML100K_BEST64


def _compiled_run(tmp_path: Path, name: str, *extra: str) -> dict:
    from f3crec.main import main
    return main(["--config", str(SMOKE), "--run-dir", str(tmp_path / name), "federation.simulator=compiled", *extra])


def test_a_damaged_numpy_checkpoint_gives_the_one_line_error_and_another_simulator_is_refused(tmp_path):
    from f3crec.main import main
    _compiled_run(tmp_path, "run", "train.stop_after_block=0")
    last = tmp_path / "run" / "last.pt"
    state = load_checkpoint(last)
    assert isinstance(state["sim"]["server"]["items"], np.ndarray) and state["block"] == 0
    with pytest.raises(ConfigError) as err:                      # a compiled run resumed by the vectorised one
        main(["--resume", str(tmp_path / "run"), "federation.simulator=vectorised"])
    assert "federation.simulator" in str(err.value) and "\n" not in str(err.value)
    last.write_bytes(last.read_bytes()[:-300])                   # truncated
    for call in (lambda: load_checkpoint(last), lambda: main(["--resume", str(tmp_path / "run")])):
        with pytest.raises(ValueError) as err:
            call()
        assert "not a readable checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_numpy_checkpoint_round_trip_is_exact_and_holds_no_pickle(tmp_path):
    state = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "f": np.array([0.1, np.nan, -0.0], np.float32),
             "nested": {"b": np.array([True, False]), "none": None, "rows": [[{"ndcg": 0.12345678901234567}]]},
             "n": 3, "x": float("inf"), "s": "text", "empty": np.zeros((0, 4))}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back.keys() == state.keys() and back["nested"]["rows"] == state["nested"]["rows"]
    for key in ("a", "f", "empty"):
        assert back[key].dtype == state[key].dtype and back[key].shape == state[key].shape
        assert back[key].tobytes() == state[key].tobytes()        # bit for bit (NaN and −0 included)
    assert back["nested"]["b"].tolist() == [True, False] and back["x"] == float("inf") and back["n"] == 3
    with np.load(tmp_path / "c.pt", allow_pickle=False) as archive:   # nothing in it needs pickle to load
        assert archive.files[0] == "__state__" and all(archive[name] is not None for name in archive.files)
    save_checkpoint(tmp_path / "t.pt", {"w": torch.ones(2), "n": 1})   # a tensor in it: torch's format, as before
    assert b"__state__" not in (tmp_path / "t.pt").read_bytes()[:64]
    assert torch.equal(load_checkpoint(tmp_path / "t.pt")["w"], torch.ones(2))


def test_numpy_pieces_equal_the_torch_pieces():
    from common.metrics import _discounts
    from f3crec.method import memory_size
    from f3crec.round import RoundContext, top_n
    for k in range(1, 41):
        assert np.array_equal(discounts(k), _discounts(k, torch.device("cpu")).numpy())
    sim = CompiledSimulator(None, None)
    for eps, topn, n_items in ((0.006, 30, 1682), (0.02, 30, 300), (0.05, 10, 500), (0.001, 50, 200)):
        ctx = RoundContext(block=1, round=0, n_items=n_items, n_prev_users=0, n_prev_items=0, lrs={}, flags={},
                           net=None, seed=0, eps=eps, topn=topn)
        table = sim._m_of_d(ctx, n_items, topn)                     # every possible D_u
        ranks = 1 + torch.arange(table.size)[:, None]                # a one-item ranking whose D_u is d, d = 0, 1, ...
        assert np.array_equal(table, memory_size(ranks, eps, topn)[2].numpy())
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        scores = rng.integers(0, 40, size=(50, 300)).astype(dtype) / 8   # many ties: lower id first
        assert np.array_equal(top_n(scores, 30), top_n(torch.from_numpy(scores), 30).numpy())
