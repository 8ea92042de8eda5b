"""F3CRec's bad-input corpus: every case through the CLI contract (exit 2, one stderr line, no traceback),
checking what the line names and that nothing is left that a later run would trust (no run folder, no
base-block cache entry, no half-written block folder); a refused resume changes no file of its folder. Also: a diverging
run stops in one line on every simulator, before anything of the diverged block is saved."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from common.io import cache_root
from f3crec.data import build_blocks, load_blocks, synthetic_stream, write_blocks
from f3crec.main import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "f3crec" / "configs" / "smoke.yaml")
FAST = ["federation.rounds=2", "federation.patience=2"]


@pytest.fixture(scope="module")
def good_blocks(tmp_path_factory) -> Path:
    """Valid block files in the released layout (the smoke stream); cases copy and damage them."""
    folder = tmp_path_factory.mktemp("blocks") / "good"
    write_blocks(folder, build_blocks(synthetic_stream(60, 50, 2400, 1), 1, core=3), {"dataset": "synthetic"})
    return folder


def _blocks(tmp: Path, good: Path, damage) -> list[str]:
    """A copy of the good blocks with block_1.json changed by damage(payload) (or its text when a str)."""
    folder = tmp / "blocks"
    shutil.copytree(good, folder)
    path = folder / "block_1.json"
    if isinstance(damage, str):
        path.write_text(damage)
    else:
        payload = json.loads(path.read_text())
        damage(payload)
        path.write_text(json.dumps(payload))
    return [f"data.blocks={folder}"]


def _unknown_user(p):   # a user with test items but none to train on
    p["test_dict"]["9999"] = p["test_dict"].pop(next(iter(p["test_dict"])))


def _gap_in_ids(p):     # a user id far past the last one: ids are no longer 0..n-1
    p["train_dict"]["5000"] = p["train_dict"].pop(max(p["train_dict"], key=int))


def _yaml(tmp: Path, text: str) -> list[str]:
    (tmp / "c.yaml").write_text(text)
    return ["--config", str(tmp / "c.yaml")]


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


# (case id, overrides or builder (tmp_path, good blocks) -> argv tail, what the line must name)
CASES = [
    ("unknown key", ["federation.nope=1"], "unknown config key 'federation.nope'"),
    ("wrong type", ["federation.rounds=many"], "federation.rounds: expected an integer"),
    ("zero rounds", ["federation.rounds=0"], "federation.rounds: 0 is outside the allowed range [1, inf)"),
    ("zero batch", ["federation.batch_size=0"], "federation.batch_size: 0 is outside the allowed range [1, inf)"),
    ("zero patience", ["federation.patience=0"], "federation.patience: 0 is outside"),
    ("negative lr", ["backbone.lr=-0.1"], "backbone.lr: -0.1 is outside the allowed range (0, inf)"),
    ("zero dim", ["backbone.dim=0"], "backbone.dim"),
    ("beta above one", ["method.beta=1.5"], "method.beta: 1.5 is outside the allowed range [0, 1]"),
    ("negative eps", ["method.eps=-0.01"], "method.eps"),
    ("negative lambda", ["method.kd_weight=-1"], "method.kd_weight"),
    ("zero topn", ["method.topn=0"], "method.topn"),
    ("no replies needed", ["federation.min_reply_fraction=0"], "federation.min_reply_fraction: 0.0 is outside the allowed range (0, 1]"),
    ("negative LDP scale", ["federation.ldp_scale=-1"], "federation.ldp_scale"),
    ("block 4 does not exist", ["train.stop_after_block=4"], "train.stop_after_block: 4 is outside the allowed range [0, 3]"),
    ("decimals below -1", ["quirks.metric_decimals=-2"], "quirks.metric_decimals"),
    ("negative seed", ["train.seed=-1"], "train.seed"),
    ("NaN lr", ["backbone.lr=.nan"], "backbone.lr: nan is outside"),
    ("unknown dataset", ["data.name=netflix"], "data.name: 'netflix' is not one of"),
    ("unknown method", ["method.name=nope"], "method.name: 'nope' is not one of"),
    ("unknown backbone", ["backbone.name=bert"], "backbone.name: 'bert' is not one of"),
    ("unknown simulator", ["federation.simulator=ray"], "federation.simulator"),
    ("a method twice", ["methods=[ft,ft]"], "methods: ft is listed twice"),
    ("more interactions than pairs", ["data.synthetic_users=5", "data.synthetic_items=5"],
     "data.synthetic_interactions=2400: more than the data.synthetic_users x data.synthetic_items = 25"),
    ("k-core leaves nothing", ["data.core=100"], "after the 100-core filter (data.core=100): too few for 4 blocks"),
    ("topn above the catalogue", ["method.topn=1000"], "method.topn=1000: larger than block 0's catalogue of 50"),
    ("duplicate YAML key", lambda t, g: _yaml(t, "federation:\n  rounds: 2\ntrain:\n  seed: 1\nfederation:\n  patience: 2\n"),
     "duplicate key 'federation' at line 5"),
    ("section not a mapping", lambda t, g: _yaml(t, "data:\n  name: synthetic\nfederation: 5\n"),
     "federation: expected a mapping of keys"),
    ("blocks folder absent", lambda t, g: [f"data.blocks={t / 'nowhere'}"], "nowhere: no block_0.json there"),
    ("truncated block JSON", lambda t, g: _blocks(t, g, '{"train_dict": {"0": [1, 2'),
     "block_1.json: not valid JSON"),
    ("block without its splits", lambda t, g: _blocks(t, g, lambda p: p.pop("valid_dict")),
     "block_1.json: missing key(s) ['valid_dict']"),
    ("block with an unknown user", lambda t, g: _blocks(t, g, _unknown_user),
     "block_1.json: user 9999 has valid/test items but no train items"),
    ("block with a gap in user ids", lambda t, g: _blocks(t, g, _gap_in_ids), "block_1.json: ids are not contiguous"),
    ("inconsistent item_list", lambda t, g: _blocks(t, g, lambda p: p["item_list"].pop()),
     "block_1.json: item_list has"),
    ("negative item id", lambda t, g: _blocks(t, g, lambda p: p["train_dict"]["0"].append(-3)),
     "block_1.json: id -3 is not a non-negative integer"),
    ("split not a mapping", lambda t, g: _blocks(t, g, lambda p: p.update(test_dict=[1, 2])),
     "block_1.json: test_dict is not a mapping"),
    ("run root is a file", lambda t, g: [f"run_root={_file(t / 'f')}", "data.synthetic_users=62"], "cannot be created: "),
    ("base cache under a file", lambda t, g: [f"train.base_cache={_file(t / 'g')}/base"], "base-block cache"),
]


@pytest.mark.parametrize("tail, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing_a_later_run_trusts(tail, names, tmp_path, good_blocks, user_error):
    tail = tail(tmp_path, good_blocks) if callable(tail) else tail
    config, overrides = (tail[:2], tail[2:]) if tail[:1] == ["--config"] else (["--config", SMOKE], tail)
    runs, base = tmp_path / "runs", tmp_path / "base"
    before = set(cache_root().rglob("block_*.json")) if cache_root().exists() else set()
    # the case's own overrides come last: they win over these defaults
    line = user_error(main, [*config, *FAST, f"run_root={runs}", f"train.base_cache={base}", "train.share_base=true",
                             *overrides])
    assert names in line, line
    assert not runs.exists() or not any(runs.rglob("config.yaml")), "a run folder was left behind"
    assert not base.exists() or not any(base.glob("*.pt")), "a base-block cache entry was left behind"
    after = set(cache_root().rglob("block_*.json")) if cache_root().exists() else set()
    for folder in {path.parent for path in after - before}:   # only complete, valid blocks of the right key
        load_blocks(folder)


def test_unwritable_run_root_is_found_before_any_work(tmp_path, user_error):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        line = user_error(main, ["--config", SMOKE, f"run_root={root}", "data.synthetic_users=61"])
    finally:
        root.chmod(0o700)
    assert f"run folder {root}/f3crec/synthetic is not writable" in line, line
    assert not list(cache_root().rglob("synthetic-61-*")), "the data was prepared before the run root was checked"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line_before_any_work(tmp_path, user_error):
    line = user_error(main, ["--config", SMOKE, f"run_root={tmp_path}", "train.device=cuda"])
    assert "CUDA is not available" in line and not any(tmp_path.rglob("config.yaml"))


# ------------------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A smoke FedMF F3CRec run stopped after block 0 (last.pt at block 0); tests copy it."""
    folder = tmp_path_factory.mktemp("stopped") / "run"
    main(["--config", SMOKE, "--run-dir", str(folder), *FAST, "train.stop_after_block=0"])
    return folder


def _copy(stopped: Path, tmp: Path) -> Path:
    shutil.copytree(stopped, tmp / "run")
    return tmp / "run"


def _foreign(tmp: Path, paper: str, sections: dict, log: bool = True) -> Path:
    folder = tmp / f"{paper}-run"
    folder.mkdir()
    if log:
        (folder / "log.txt").write_text(f"[{paper}] run dir {folder} | git abc\n")
    (folder / "config.yaml").write_text(yaml.safe_dump(sections))
    torch.save({"epoch": 1}, folder / "last.pt")
    return folder


def _rewrite(run: Path, name: str, text: str) -> Path:
    (run / name).write_text(text)
    return run


def _truncated(stopped: Path, tmp: Path) -> Path:
    run = _copy(stopped, tmp)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    return run


def _foreign_last(stopped: Path, tmp: Path) -> Path:
    run = _copy(stopped, tmp)
    torch.save({"weights": torch.zeros(3)}, run / "last.pt")
    return run


def _no_last(stopped: Path, tmp: Path) -> Path:
    run = _copy(stopped, tmp)
    (run / "last.pt").unlink()
    return run


def _old_keys(stopped: Path, tmp: Path) -> Path:
    run = _copy(stopped, tmp)
    text = (run / "config.yaml").read_text().replace("backbone:\n  dim", "model:\n  dim")
    (run / "config.yaml").write_text(text)
    return run


# (case id, builder (stopped run, tmp_path) -> folder, extra argv, what the line must name)
RESUME_CASES = [
    ("no such folder", lambda s, t: t / "nowhere", [], "nothing to resume: "),
    ("a file, not a folder", lambda s, t: _file(t / "afile"), [], "a file, not a run folder"),
    ("not a run folder", lambda s, t: (t / "empty").mkdir() or t / "empty", [], "not a run folder (no config.yaml)"),
    ("a flame run", lambda s, t: _foreign(t, "flame", {"flame": {"alpha": 0.5}, "train": {"seed": 1}}), [],
     "this folder is a flame run, not an F3CRec run"),
    ("a vlm2rec run without its log", lambda s, t: _foreign(t, "vlm2rec", {"wpcl": {}, "seqrec": {}}, log=False), [],
     "this folder is a vlm2rec run, not an F3CRec run"),
    ("config not a mapping", lambda s, t: _rewrite(_copy(s, t), "config.yaml", "- 1\n"), [],
     "config.yaml: not a config mapping"),
    ("keys of an older version", _old_keys, [], "model.* (and method.target_scores)"),
    ("stopped before block 0 ended", _no_last, [], "no last.pt, the run stopped before block 0 ended"),
    ("truncated last.pt", _truncated, [], "last.pt: not a readable checkpoint"),
    ("foreign last.pt", _foreign_last, [], "last.pt: not an F3CRec checkpoint (no sim, rows, info, block, config)"),
    ("another method", _copy, ["method.name=ft"], "its run has method.name='f3crec', this command asks for 'ft'"),
    ("another learning rate", _copy, ["backbone.lr=0.1"], "its run has backbone.lr=0.5"),
    ("several methods", _copy, ["methods=[ft,arm]"], "--resume takes one method's run folder"),
    ("a Flower checkpoint", _copy, ["federation.simulator=flower"], "federation.simulator"),
]


@pytest.mark.parametrize("build, extra, names", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_refused_resume_is_one_line_and_changes_nothing(build, extra, names, stopped_run, tmp_path, user_error):
    folder = build(stopped_run, tmp_path)
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}
    line = user_error(main, ["--resume", str(folder), *extra])
    assert names in line, line
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}
    assert after == files, "the refused resume changed its folder"


def test_a_resume_may_change_where_it_stops(stopped_run, tmp_path):
    """The keys that do not change a run's numbers (RESUME_FREE) are accepted."""
    run = _copy(stopped_run, tmp_path)
    out = main(["--resume", str(run), "train.stop_after_block=1", f"train.base_cache={tmp_path / 'b'}"])
    assert len(out["summary"]["ndcg"]["a"]) == 2


# ---------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("simulator", ["vectorised", "reference", pytest.param("flower", marks=pytest.mark.heavy)])
def test_a_diverging_run_stops_in_one_line_on_every_simulator(simulator, tmp_path, user_error):
    base = tmp_path / "base"
    extra = ["federation.nodes=2"] if simulator == "flower" else []
    line = user_error(main, ["--config", SMOKE, "--run-dir", str(tmp_path / "r"), *FAST, "backbone.lr=1e30",
                             f"federation.simulator={simulator}", *extra,
                             f"train.base_cache={base}", "train.share_base=true"])
    assert line.startswith("error: non-finite item table (") and "at block 0 round " in line, line
    assert "backbone.lr=1e+30" in line, line
    assert not (tmp_path / "r" / "last.pt").exists() and not (tmp_path / "r" / "results.json").exists()
    assert not base.exists() or not any(base.glob("*.pt")), "a diverged base block was cached"
