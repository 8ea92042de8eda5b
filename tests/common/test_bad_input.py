"""Bad input to common/ as a user meets it through a command line: one line, exit 2, nothing left to trust.

Each case runs a real entry point through `run_cli` (the `user_error` fixture checks the exit status, the
single stderr line and the absence of a traceback) and then checks what the line names. Cases that build an
artefact also check that nothing was left behind that a later run would trust, and that fixing the input
gives a fresh, correct artefact. The papers' own corpora are in tests/<paper>/test_bad_input.py.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import torch

from common import io
from common.checkpoints import load_checkpoint, save_checkpoint
from common.config import PosFloat, PosInt, Range, parse_cli
from common.prepare import main as prepare_main
from common.registry import DATASETS
from common.runs import start_run


@dataclass
class ToyTrain:
    lr: PosFloat = 1e-3
    batch_size: PosInt = 8
    dropout: Annotated[float, Range(0, 1, max_open=True)] = 0.5
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class ToyConfig:
    """A toy paper's config, shaped like the real ones."""
    train: ToyTrain = field(default_factory=ToyTrain)
    run_root: Optional[str] = None


def toy_main(argv):
    """What every paper's main does before training: parse, claim the run folder, load a resumed checkpoint."""
    cfg, options = parse_cli(argv, ToyConfig)
    if options.resume is not None:
        load_checkpoint(Path(options.resume) / "last.pt")
    start_run(cfg, "toy", "toy", run_dir=options.run_dir, root=cfg.run_root)


CONFIG_CASES = [  # (id, YAML text or None, overrides, what the line must name)
    ("unknown-key", None, ["train.lrr=0.1"], "unknown config key 'train.lrr'"),
    ("unknown-section", None, ["optim.lr=0.1"], "unknown config key 'optim'"),
    ("wrong-type", None, ["train.batch_size=eight"], "train.batch_size"),
    ("float-for-int", None, ["train.batch_size=2.5"], "train.batch_size"),
    ("zero-batch", None, ["train.batch_size=0"], "train.batch_size: 0 is outside the allowed range [1, inf)"),
    ("negative-lr", None, ["train.lr=-1e-3"], "train.lr: -0.001 is outside the allowed range (0, inf)"),
    ("nan-lr", None, ["train.lr=.nan"], "train.lr: nan is outside"),
    ("dropout-one", None, ["train.dropout=1"], "train.dropout: 1.0 is outside the allowed range [0, 1)"),
    ("literal-typo", None, ["train.schedule=cosin"], "train.schedule: 'cosin' is not one of ['cosine', 'constant']"),
    ("override-without-value", None, ["train.lr"], "override 'train.lr' is not of the form key=value"),
    ("empty-key", None, ["train..lr=1"], "has an empty key"),
    ("section-as-value", None, ["train=3"], "train: expected a mapping of keys"),
    ("duplicate-top-key", "train:\n  lr: 0.1\ntrain:\n  batch_size: 4\n", [], "duplicate key 'train' at line 3"),
    ("duplicate-nested-key", "train:\n  lr: 0.1\n  lr: 0.2\n", [], "duplicate key 'lr' at line 3"),
    ("empty-section", "train:\n", [], "train: expected a mapping of keys"),
    ("list-at-top", "- 1\n- 2\n", [], "the top level must be a mapping"),
    ("broken-yaml", "train: [1,\n", [], "invalid YAML"),
    ("yaml-out-of-range", "train:\n  batch_size: -4\n", [], "c.yaml: train.batch_size: -4 is outside"),
]


@pytest.mark.parametrize("text,overrides,names", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(user_error, tmp_path, text, overrides, names):
    argv = list(overrides) + [f"run_root={tmp_path / 'runs'}"]
    if text is not None:
        (tmp_path / "c.yaml").write_text(text)
        argv = ["--config", str(tmp_path / "c.yaml")] + argv
    line = user_error(toy_main, argv)
    assert names in line
    assert not (tmp_path / "runs").exists()  # checked before any folder is made


def test_missing_config_file(user_error, tmp_path):
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in user_error(
        toy_main, ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04truncated zip"],
                         ids=["empty", "pickle-garbage", "truncated-zip"])
def test_resume_of_an_unreadable_checkpoint(user_error, tmp_path, content):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  lr: 0.1\n")
    (run / "last.pt").write_bytes(content)
    line = user_error(toy_main, ["--resume", str(run), f"run_root={tmp_path / 'runs'}"])
    assert f"{run / 'last.pt'}: not a readable checkpoint" in line


def test_resume_of_a_checkpoint_that_is_not_a_dict(user_error, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("train:\n  lr: 0.1\n")
    save_checkpoint(tmp_path / "old" / "last.pt", [1, 2])  # type: ignore[arg-type]
    assert "not a checkpoint of this project" in user_error(toy_main, ["--resume", str(tmp_path / "old")])


def test_resume_of_a_folder_without_checkpoint(user_error, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("train:\n  lr: 0.1\n")
    assert f"checkpoint not found: {tmp_path / 'old' / 'last.pt'}" in user_error(
        toy_main, ["--resume", str(tmp_path / "old")])


def test_resume_of_something_that_is_not_a_run_folder(user_error, tmp_path):
    (tmp_path / "plain").mkdir()
    assert f"--resume {tmp_path / 'plain'}: not a run folder (no config.yaml)" in user_error(
        toy_main, ["--resume", str(tmp_path / "plain")])
    assert f"--resume {tmp_path / 'gone'}: no such run folder" in user_error(
        toy_main, ["--resume", str(tmp_path / "gone")])


def test_run_root_that_is_a_file(user_error, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "a file is in the way" in user_error(toy_main, [f"run_root={tmp_path / 'file'}"])
    assert "a file is in the way" in user_error(toy_main, ["--run-dir", str(tmp_path / "file")])


def test_malformed_json_names_its_file(tmp_path):
    (tmp_path / "results.json").write_text('{"test": {"NDCG@20": 0.1')
    with pytest.raises(ValueError) as err:
        io.load_json(tmp_path / "results.json")
    assert str(err.value).startswith(f"{tmp_path / 'results.json'}: not valid JSON")


# -------------------------------------------------------------------------------- data files (prepare CLI)
GOOD = "1::10::5::100\n1::20::4::200\n2::10::3::150\n2::20::5::250\n"


@pytest.fixture
def toy_data(tmp_path, monkeypatch):
    """A registry entry 'toy' reading <root>/toy/ratings.dat in the ML-1M format, 2-core, remapped."""
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cache"))  # this test's builds only
    root = tmp_path / "raw"
    (root / "toy").mkdir(parents=True)
    entry = {**DATASETS["ml-1m"], "dir": "toy", "url": "http://127.0.0.1:9/toy.zip", "member": "ratings.dat",
             "archive_md5": None, "recipe": {"user_k": 2, "item_k": 2, "order": "user_time", "ids": "first"},
             "expected": {"users": 2, "items": 2, "interactions": 4}}
    monkeypatch.setitem(DATASETS, "toy", entry)
    return root / "toy" / "ratings.dat"


DATA_CASES = [  # (id, raw file content, what the line must name)
    ("tabs-not-colons", GOOD.replace("::", "\t"), "ratings.dat:1: found a tab; fields must be separated by '::'"),
    ("negative-item", GOOD.replace("1::20::4", "1::-20::4"), "ratings.dat:2: negative item id -20"),
    ("negative-user", GOOD.replace("2::10::3", "-2::10::3"), "ratings.dat:3: negative user id -2"),
    ("missing-field", GOOD.replace("2::20::5::250", "2::20::5"), "ratings.dat:4: expected 4 fields, got 3"),
    ("text-rating", GOOD.replace("1::20::4", "1::20::four"), "ratings.dat:2: column 3 is not float64 (rating)"),
    ("blank-line", GOOD.replace("\n2::10", "\n\n2::10"), "ratings.dat:3: expected 4 fields, got 1"),
    ("empty-file", "", "ratings.dat: empty file (no data rows)"),
    ("stats-drift", GOOD + "3::10::5::300\n3::20::5::310\n", "toy: statistics drift after preprocessing"),
    ("all-filtered", "1::10::5::100\n2::20::4::200\n", "toy: no interactions left after the recipe"),
]


@pytest.mark.parametrize("content,names", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_files_leave_no_artefact_and_a_fix_rebuilds(user_error, toy_data, content, names):
    toy_data.write_text(content)
    root = str(toy_data.parent.parent)
    assert names in user_error(prepare_main, ["toy", "--root", root])
    built = io.cache_root() / "toy"
    assert not built.exists() or not any(built.glob("*/stats.json"))  # nothing a later run would trust
    toy_data.write_text(GOOD)  # the user fixes the file: the next run builds from it, fresh
    assert prepare_main(["toy", "--root", root])["stats"]["interactions"] == 4


def test_unknown_dataset_and_missing_raw_file(user_error, toy_data, tmp_path):
    assert "unknown dataset 'nope'; known:" in user_error(prepare_main, ["nope"])
    line = user_error(prepare_main, ["toy", "--root", str(tmp_path / "elsewhere")])  # offline: no raw, no mirror
    assert "http://127.0.0.1:9/toy.zip" in line and str(tmp_path / "elsewhere" / "toy" / "ratings.dat") in line


def test_checksum_mismatch_of_a_local_raw_file(user_error, toy_data, monkeypatch):
    toy_data.write_text(GOOD)
    monkeypatch.setitem(DATASETS["toy"], "sha256", "ab" * 32)
    assert f"sha256 mismatch for {toy_data}" in user_error(prepare_main, ["toy", "--root", str(toy_data.parent.parent)])


def test_checkpoint_round_trip_still_loads(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"w": torch.ones(2)})
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["w"], torch.ones(2))
