"""common/runs.py, common/run_folder.py, common/io.py and common/utils.py: run directory files, checkpoints, RNG state, atomic writes."""
import json
import multiprocessing
import os
import random
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

from common.checkpoints import from_bytes, load_checkpoint, rng_state, save_checkpoint, set_rng_state, to_bytes
from common.io import REPO, atomic_dir, atomic_write, git_sha, load_json, save_json
from common.runs import check_finite, default_run_root, log_metrics, read_metrics, start_run, write_results
from common.utils import get_device, seed_everything


@dataclass
class Cfg:
    lr: float = 0.1
    seed: int = 3


def test_run_directory_files(tmp_path):
    run = start_run(Cfg(), "paper", "toy", tag="t", root=tmp_path)
    assert run.parent == tmp_path / "paper" / "toy" and run.name.endswith("_t")
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"lr": 0.1, "seed": 3}
    print("hello log")
    assert "hello log" in (run / "log.txt").read_text()
    log_metrics(run, {"epoch": 1, "ndcg": 0.5})
    log_metrics(run, {"epoch": 2, "ndcg": np.float32(0.25)})
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    results = write_results(run, {"test": {"NDCG@20": 0.1}, "seed": 3})
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == results and on_disk["seed"] == 3
    assert torch.__version__.startswith(on_disk["versions"]["torch"])
    assert {"commit", "versions", "device", "started", "config_digest"} <= on_disk.keys()
    second = start_run(Cfg(), "paper", "toy", tag="t", root=tmp_path)
    assert second != run  # same second, never the same folder


def test_checkpoint_is_weights_only_loadable(tmp_path):
    state = {"model": {"w": torch.randn(3)}, "config": {"lr": 0.1}, "epoch": 4, "rng": rng_state()}
    save_checkpoint(tmp_path / "last.pt", state)
    raw = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert raw["epoch"] == 4 and torch.equal(raw["model"]["w"], state["model"]["w"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_bytes_round_trip_both_formats_and_refuse_pickles():
    """to_bytes / from_bytes: numpy state (no tensor; no array at all too) as a numpy checkpoint bit for bit, a
    state with a tensor as torch.save's; a pickled object is refused, never run."""
    import pickle
    arrays = {"private": {"p": np.random.default_rng(0).standard_normal((5, 3))}, "has": np.array([True, False]),
              "none": None, "n": 3, "raw": np.frombuffer(b"\x00\xffab", np.uint8)}
    data = to_bytes(arrays)
    assert b"__state__" in data[:64]                                   # the numpy format: its JSON member first
    back = from_bytes(data)
    assert back["n"] == 3 and back["none"] is None and back["raw"].tobytes() == b"\x00\xffab"
    assert np.array_equal(back["private"]["p"], arrays["private"]["p"]) and back["has"].dtype == bool
    assert from_bytes(to_bytes({"version": 2})) == {"version": 2}
    tensor = from_bytes(to_bytes({"w": torch.arange(4.0)}))
    assert isinstance(tensor["w"], torch.Tensor) and torch.equal(tensor["w"], torch.arange(4.0))
    with pytest.raises(Exception):
        from_bytes(pickle.dumps({"w": object()}))


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    seed_everything(7)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_seed_everything_repeats_draws():
    seed_everything(11)
    a = torch.randn(4)
    seed_everything(11)
    assert torch.equal(a, torch.randn(4))
    seed_everything(11, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(11)
    assert not torch.are_deterministic_algorithms_enabled()


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    save_json(target, {"a": np.int64(1), "t": torch.tensor(2.5)})
    assert json.loads(target.read_text()) == {"a": 1, "t": 2.5}


def test_check_finite_and_device():
    check_finite(torch.tensor(1.0), "epoch 1")
    with pytest.raises(FloatingPointError, match="non-finite loss .* at epoch 2 step 5"):
        check_finite(torch.tensor(float("nan")), "epoch 2 step 5")
    assert get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_device("cuda")


def test_git_sha_names_the_checkout_commit(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    assert git_sha().split("+")[0] == head.stdout.strip()
    assert git_sha(tmp_path) == "unknown"  # outside any repository


def test_default_run_root_is_the_repo_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("REPRO_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_run_root() == REPO / "runs"
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "elsewhere"))
    run = start_run(Cfg(), "paper", "toy", tag="t")
    assert run.parent == tmp_path / "elsewhere" / "paper" / "toy"


def _claim_run_dir(args):
    root, barrier = args
    barrier.wait()  # both processes ask for a folder at the same instant (same second, same stamp)
    from common.run_folder import claim_run_dir
    return str(claim_run_dir(root, "20260101-000000_t"))


@pytest.mark.heavy
def test_two_processes_never_share_a_run_folder(tmp_path):
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(4)
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            claimed = pool.map(_claim_run_dir, [(tmp_path, barrier)] * 4)
    assert len(set(claimed)) == 4 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        os.path.basename(c) for c in claimed)


def test_atomic_files_are_readable_like_logs_and_json_errors_name_the_file(tmp_path):
    save_json(tmp_path / "r.json", {"a": 1})
    with open(tmp_path / "log.txt", "w") as handle:
        handle.write("x")
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == (tmp_path / "log.txt").stat().st_mode & 0o777
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ValueError) as err:
        load_json(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(err.value) and "\n" not in str(err.value)


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "artefact"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefact"]
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in out.iterdir()] == ["c.txt"] and len(list(tmp_path.iterdir())) == 1


def test_run_cli_turns_user_errors_into_one_line_exit(monkeypatch, capsys):
    from common.config import ConfigError
    from common.cli import run_cli

    def bad_main():
        raise ConfigError("unknown config key 'train.lrr'")
    monkeypatch.delenv("REPRO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        run_cli(bad_main)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: unknown config key 'train.lrr'\n"
    monkeypatch.setenv("REPRO_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_cli(bad_main)
    with pytest.raises(KeyError):  # programming errors keep their traceback
        run_cli(lambda: {}["x"])


def test_ctrl_c_is_one_line_naming_the_run_to_resume(tmp_path, monkeypatch, capsys):
    from common.cli import run_cli
    monkeypatch.delenv("REPRO_DEBUG", raising=False)
    run = start_run(Cfg(), "paper", "toy", root=tmp_path)

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:   # before the first checkpoint: no --resume hint (issue 19)
        run_cli(interrupted)
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--resume" not in err and err.count("\n") == 1
    save_checkpoint(run / "last.pt", {"epoch": 1})
    with pytest.raises(SystemExit) as info:
        run_cli(interrupted)
    assert info.value.code == 130
    assert capsys.readouterr().err == f"interrupted; its last checkpoint is kept: resume with --resume {run}\n"


def test_unusable_run_root_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="a file is in the way"):
        start_run(Cfg(), "paper", "toy", run_dir=tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="a file is in the way"):
        start_run(Cfg(), "paper", "toy", root=tmp_path / "file")


def test_metrics_records_survive_a_cut_short_line_and_truncate_to_a_checkpoint(tmp_path):
    from common.runs import truncate_metrics
    for epoch in (1, 2, 3):
        log_metrics(tmp_path, {"epoch": epoch, "ndcg": epoch / 10})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 4, "nd')  # a kill in the middle of a write
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["epoch"] for r in truncate_metrics(tmp_path, lambda r: r["epoch"] <= 2)] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "ndcg": 0.1}\n{"epoch": 2, "ndcg": 0.2}\n'
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record; the file is damaged"):
        read_metrics(tmp_path)


def test_a_run_folder_names_the_paper_that_wrote_it(tmp_path):
    from common.runs import paper_of
    run = start_run(Cfg(), "flame", "toy", root=tmp_path)
    print("something else")
    assert paper_of(run) == "flame"
    assert paper_of(tmp_path) is None  # no log: the paper's own config check decides


def _finished_run(folder, cfg, resume=False):
    run = start_run(cfg, "paper", "toy", run_dir=folder, resume=resume)
    log_metrics(run, {"epoch": 0, "ndcg": 0.5})
    save_checkpoint(run / "last.pt", {"epoch": 0})
    write_results(run, {"test": {"NDCG@20": 0.1}})
    return run


def test_a_fresh_run_in_a_used_folder_is_refused_or_moves_it_aside_and_a_resume_keeps_it(tmp_path):
    from common.run_folder import RUN_RECORDS
    run = _finished_run(tmp_path / "run", Cfg())
    (run / "best.pt").write_bytes(b"old")
    results = (run / "results.json").read_bytes()
    kept = start_run(Cfg(), "paper", "toy", run_dir=run, resume=True)          # a resume: nothing removed,
    assert all((kept / name).exists() for name in RUN_RECORDS if name != "results.json")
    assert len(read_metrics(kept)) == 1                                         # a finished run's results kept
    assert [p.read_bytes() for p in kept.glob("previous-*/results.json")] == [results]
    names = ("metrics.jsonl", "last.pt", "best.pt", "config.yaml", "log.txt")
    before = {name: (run / name).read_bytes() for name in names}
    with pytest.raises(FileExistsError, match="is not empty .*--overwrite"):
        start_run(Cfg(lr=0.2), "paper", "toy", run_dir=run)                     # a fresh start: refused
    assert {name: (run / name).read_bytes() for name in names} == before
    aside_before = set(run.glob("previous-*"))
    start_run(Cfg(lr=0.2), "paper", "toy", run_dir=run, overwrite=True)         # told to: the old run moves aside
    assert not any((run / name).exists() for name in RUN_RECORDS)              # no old metrics, results, checkpoints
    aside = set(run.glob("previous-*")) - aside_before
    assert len(aside) == 1
    moved = aside.pop()
    assert {name: (moved / name).read_bytes() for name in names if name != "log.txt"} == {
        name: data for name, data in before.items() if name != "log.txt"}   # the log gained the resume's lines
    log_metrics(run, {"epoch": 0, "ndcg": 0.7})
    assert [r["ndcg"] for r in read_metrics(run)] == [0.7]
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.2


def test_a_comparison_reuses_resumes_or_reruns_a_cell_and_refuses_another_configs(tmp_path):
    from common.runs import comparison_slot, run_or_reuse
    calls = []

    def run(cfg, run_dir, resume=False):
        calls.append(resume)
        return {"ran": True}
    assert comparison_slot(tmp_path / "absent", Cfg()) == "run"
    done = _finished_run(tmp_path / "done", Cfg())
    assert comparison_slot(done, Cfg()) == "reuse"
    reused = run_or_reuse(run, Cfg(), done)
    assert reused["test"] == {"NDCG@20": 0.1} and reused["run_dir"] == str(done) and calls == []
    stopped = start_run(Cfg(), "paper", "toy", run_dir=tmp_path / "stopped")
    log_metrics(stopped, {"epoch": 0})
    assert comparison_slot(stopped, Cfg()) == "run"                             # killed before its first checkpoint
    save_checkpoint(stopped / "last.pt", {"epoch": 0})
    assert comparison_slot(stopped, Cfg()) == "resume"
    assert run_or_reuse(run, Cfg(), stopped) == {"ran": True} and calls == [True]
    with pytest.raises(FileExistsError, match="holds a run of another config"):
        comparison_slot(done, Cfg(lr=0.3))                                      # never another config's numbers


def test_results_json_starts_with_the_common_keys_and_keeps_only_fractions_in_metrics(tmp_path, capsys):
    from common.results import RESULT_KEYS
    run = start_run(Cfg(), "paper", "toy", tag="t", root=tmp_path)
    written = write_results(run, {"method": "m", "seed": 3, "test": {"NDCG@20": 7.1},
                                  "metrics": {"test/ndcg@20": 0.071, "test/hr@20": 14.2}})
    assert tuple(written)[: len(RESULT_KEYS)] == RESULT_KEYS and written["test"] == {"NDCG@20": 7.1}
    assert (written["paper"], written["dataset"], written["method"], written["seed"]) == ("paper", "toy", "m", 3)
    assert written["metrics"] == {"test/ndcg@20": 0.071}            # a percent stays in the paper's detail only
    assert "test/hr@20 left out of `metrics`" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text()) == written


def test_package_versions_read_the_metadata_headers_as_importlib_does(monkeypatch):
    """results.json's versions: the header scan gives importlib.metadata.version's value (torch and numpy
    always, the others when imported), without the email parser."""
    import importlib.metadata
    from common import utils
    versions = utils.package_versions()
    assert {"torch", "numpy"} <= set(versions)
    assert versions == {name: importlib.metadata.version(name) for name in versions}

    class Dist:   # no METADATA file: PKG-INFO; a header without Version: the distribution's own answer
        version = "9.9"

        def __init__(self, files):
            self.files = files

        def read_text(self, name):
            return self.files.get(name)
    cases = {"a": ({"PKG-INFO": "Name: a\nVersion: 1.2.post3\n\nVersion: 0\n"}, "1.2.post3"),
             "b": ({"METADATA": "Name: b\n\nVersion: 0\n"}, "9.9")}
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist(cases[name][0]))
    assert {name: utils._version(name) for name in cases} == {name: want for name, (_, want) in cases.items()}


@pytest.mark.parametrize("enabled", [True, False])
def test_paused_gc_collects_nothing_inside_then_freezes_what_was_made_and_restores_the_setting(enabled):
    """common.cli.paused_gc: the start-up imports' objects are not traversed by any collection (none runs
    inside; they are frozen after), later objects are collected as usual, the caller's setting comes back."""
    import gc
    from common.cli import paused_gc
    before = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        gc.unfreeze()
        with paused_gc():
            assert not gc.isenabled()
            made = [[i] for i in range(5000)]                  # tracked objects made inside
        assert gc.isenabled() == enabled
        assert gc.get_freeze_count() >= len(made)             # ... left out of later collections
        gc.unfreeze()
        cycle = []
        cycle.append(cycle)                                    # garbage made after: still collected
        del cycle
        assert gc.collect() >= 1
        with pytest.raises(RuntimeError):                      # an error inside: the setting still restored
            with paused_gc():
                raise RuntimeError("boom")
        assert gc.isenabled() == enabled
    finally:
        gc.unfreeze()
        (gc.enable if before else gc.disable)()
