"""FLAME end to end: smoke runs (three ways), baselines, resume, checkpoints; slow tests on real weights."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flame.config import BackboneConfig, DataConfig
from flame.data import build_data, load_raw
from flame.evaluate import evaluate
from flame.main import main
from flame.model import AveragedLogits, SASRec, load_frozen, sasrec_state

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "flame" / "configs" / "smoke.yaml")
FAST = ["train.max_epochs=1", "data.synthetic_users=60"]


def clean_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def frozen_file(tmp_path):
    """A random SASRec for the smoke data in the 36-key layout (skips stage 1 in a test)."""
    data = build_data(load_raw(DataConfig(name="synthetic", synthetic_users=120, synthetic_items=40)),
                      DataConfig(max_len=10))
    torch.manual_seed(0)
    path = tmp_path / "frozen.pt"
    torch.save(sasrec_state(SASRec(BackboneConfig(d=16), data.num_items, max_len=10)), path)
    return path


@pytest.mark.heavy
def test_smoke_end_to_end_with_stage1(tmp_path, results_schema):
    results = main(["--config", SMOKE, f"run_root={tmp_path}"])
    run_dir = Path(results["run_dir"])
    saved = results_schema(run_dir / "results.json", "flame")   # the layout of all three papers
    assert run_dir.name.endswith("_flame_seed42") and (saved["method"], saved["seed"]) == ("flame", 42)
    assert saved["metrics"]["test/ndcg@20"] == pytest.approx(saved["test"]["reference"]["NDCG@20"] / 100)
    assert saved["metrics"]["test/neg_inf/hr@10"] == pytest.approx(saved["test"]["neg_inf"]["HR@10"] / 100)
    assert saved["metrics"]["valid/ndcg@20"] == pytest.approx(saved["valid"]["NDCG@20"] / 100)
    assert set(saved["test"]) == {"reference", "neg_inf"} and saved["best_epoch"] >= 1
    conv = saved["convergence"]
    assert conv["sasrec_seed"] == 42 and "test_ndcg20_gain_rel" in conv
    stage1 = Path(conv["sasrec_run"])
    assert (stage1 / "frozen.pt").exists() and stage1.parent.name == "stage1"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {"valid/NDCG@20", "train/cumulative_seconds", "train/wcl",
                                  "train/alpha/ll-fl", "lambda"} <= set(records[0])
    for name in ("best.pt", "last.pt"):  # plain dicts, loadable with weights_only=True
        assert isinstance(torch.load(run_dir / name, map_location="cpu", weights_only=True), dict)
    again = main(["--config", SMOKE, f"run_root={tmp_path}"])  # stage 1 reused: same frozen net
    assert again["test"] == results["test"]


@pytest.mark.heavy
def test_resume_reproduces_uninterrupted_run(tmp_path, frozen_file):
    common = ["--config", SMOKE, f"flame.frozen={frozen_file}", "train.max_epochs=3", "train.patience=5"]
    full = main(common + ["--run-dir", str(tmp_path / "full")])
    main(["--config", SMOKE, f"flame.frozen={frozen_file}", "train.max_epochs=2", "train.patience=5",
          "--run-dir", str(tmp_path / "part")])
    resumed = main(["--resume", str(tmp_path / "part"), "train.max_epochs=3"])
    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    curves = [[json.loads(line)["valid/NDCG@20"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("full", "part")]
    assert curves[0] == curves[1] and len(curves[0]) == 3


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="missing"):
        main(["--resume", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="frozen checkpoint not found"):
        main(["--config", SMOKE, f"flame.frozen={tmp_path / 'nope.pt'}", f"run_root={tmp_path}"])
    with pytest.raises(ValueError, match="data.name"):
        main(["--config", SMOKE, "data.name=movielens", f"run_root={tmp_path}"])


@pytest.mark.parametrize("extra", [["method.name=mutual"], ["method.name=mutual", "method.ml_loss=kl"],
                                   ["method.name=ensemble", "method.ensemble_n=2"],
                                   ["flame.split=per_block", "flame.path_mixing=independent", "flame.num_paths=4"]])
def test_baselines_and_options_run(tmp_path, extra):
    results = main(["--config", SMOKE, f"run_root={tmp_path}", *FAST, *extra])
    assert results["test"]["reference"]["NDCG@20"] > 0
    if "method.name=mutual" in extra:
        assert "test_mean_ab" in results


def test_ensemble_of_given_members(tmp_path, frozen_file):
    """B2 from given SASRecs: a run folder and a bare checkpoint; scores are the mean of the members'."""
    base = main(["--config", SMOKE, "method.name=sasrec", *FAST, "--run-dir", str(tmp_path / "b1")])
    members = f"[{tmp_path / 'b1'},{frozen_file}]"
    out = main(["--config", SMOKE, *FAST, "method.name=ensemble", f"method.ensemble_members={members}",
                "--run-dir", str(tmp_path / "b2")])
    assert out["members"] == [str(tmp_path / "b1" / "frozen.pt"), str(frozen_file)]
    assert out["train_seconds"] is None and out["best_epoch"] is None  # the bare checkpoint has no record
    data = build_data(load_raw(DataConfig(name="synthetic", synthetic_users=60, synthetic_items=40)),
                      DataConfig(max_len=10))
    nets = [load_frozen(SASRec(BackboneConfig(d=16), data.num_items, max_len=10), f) for f in out["members"]]
    expected = evaluate(AveragedLogits(nets), data.test_seq, data.test_target, data.test_hist, "reference")
    assert out["test"]["reference"] == pytest.approx(expected)
    assert expected != pytest.approx(base["test"]["reference"])  # the second member changed the ranking
    with pytest.raises(ValueError, match="at least 2 members"):
        main(["--config", SMOKE, *FAST, "method.name=ensemble", f"method.ensemble_members=[{frozen_file}]",
              f"run_root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="neither a run folder nor a checkpoint"):
        main(["--config", SMOKE, *FAST, "method.name=ensemble", f"method.ensemble_members=[{frozen_file},{tmp_path / 'x'}]",
              f"run_root={tmp_path}"])


def test_sasrec_run_as_convergence_baseline(tmp_path, frozen_file):
    base = main(["--config", SMOKE, "method.name=sasrec", *FAST, "--run-dir", str(tmp_path / "b1")])
    assert (tmp_path / "b1" / "frozen.pt").exists() and base["method"] == "sasrec"
    out = main(["--config", SMOKE, *FAST, f"flame.frozen={frozen_file}", f"train.sasrec_run={tmp_path / 'b1'}",
                "--run-dir", str(tmp_path / "fl")])
    assert out["convergence"]["sasrec_best_valid"] == base["best_valid"]


@pytest.mark.heavy
def test_compare_tabulates_finished_runs(tmp_path, frozen_file):
    """Runs made in parallel (no train.sasrec_run) get their convergence figures afterwards."""
    from common.io import load_json
    from common.runs import read_metrics
    from flame.compare import main as compare

    base = main(["--config", SMOKE, "method.name=sasrec", "train.max_epochs=3", "data.synthetic_users=60",
                 "--run-dir", str(tmp_path / "b1")])
    flame = main(["--config", SMOKE, "train.max_epochs=3", "data.synthetic_users=60",
                  f"flame.frozen={frozen_file}", "--run-dir", str(tmp_path / "fl")])
    assert "note" in flame["convergence"]  # nothing to compare against yet
    out = compare(["--runs", str(tmp_path / "b1"), str(tmp_path / "fl"), "--out", str(tmp_path / "cmp")])
    conv = out["flame"][0]["convergence"]
    target = base["best_valid"]
    reached = [r for r in read_metrics(tmp_path / "fl") if r["valid/NDCG@20"] >= target]
    assert conv["epochs_to_sasrec_best"] == (reached[0]["epoch"] if reached else "not reached")
    assert conv["test_ndcg20_gain_rel"] == pytest.approx(
        flame["test"]["reference"]["NDCG@20"] / base["test"]["reference"]["NDCG@20"] - 1)
    assert load_json(tmp_path / "fl" / "results.json")["convergence"] == conv  # written back
    assert "| flame |" in (tmp_path / "cmp" / "summary.md").read_text()
    with pytest.raises(FileNotFoundError, match="finished run folders"):
        compare(["--runs", str(tmp_path / "cmp")])


@pytest.mark.heavy
def test_compare_writes_table_and_plot(tmp_path):
    from flame.compare import main as compare

    out = compare(["--config", SMOKE, f"run_root={tmp_path}", *FAST, "--seeds", "1", "2"])
    assert [len(runs) for runs in out.values()] == [2, 2]
    folder = tmp_path / "flame" / "compare" / "smoke"  # <run root>/<paper>/compare/<config stem>, as every paper
    text = (folder / "summary.md").read_text()
    assert {row["method"] for row in csv.DictReader((folder / "summary.csv").open())} == {"sasrec", "flame"}
    assert "| sasrec |" in text and "| flame |" in text and "±" in text
    assert (folder / "curves.png").stat().st_size > 0
    # own frozen net: FLAME of seed s froze the SASRec run of seed s instead of a second stage 1
    assert out["flame"][0]["frozen"].endswith("sasrec_seed1/frozen.pt")


@pytest.mark.heavy
def test_bench_reports_every_model(capsys, monkeypatch):
    from flame import bench as bench_module
    from flame.bench import main as bench

    monkeypatch.setitem(bench_module.REFERENCE_EPOCH_S, "synthetic", 17.0)  # a yardstick exists, but for GPUs

    rows = bench(["data.max_len=10", "backbone.d=16", "train.device=cpu", "--steps", "2", "--eval-users", "50",
                  "--models", "sasrec", "flame", "mutual", "--variants", "eager", "bf16", "cuda-graph"])
    assert [r["model"] for r in rows] == ["sasrec", "flame", "mutual"] * 2
    assert [r["variant"] for r in rows] == ["eager"] * 3 + ["bf16"] * 3
    assert all(r["samples_per_s"] > 0 and r["epoch_s"] > 0 and r["peak_mib"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "variant cuda-graph: skipped, CUDA graphs need a CUDA device" in printed
    assert "reference FLAME" not in printed  # the GPU yardstick is not set against a CPU epoch


@pytest.mark.heavy
def test_script_form_from_paper_folder(tmp_path):
    cmd = [sys.executable, "main.py", "--config", "configs/smoke.yaml", f"run_root={tmp_path}", *FAST]
    done = subprocess.run(cmd, cwd=ROOT / "flame", env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.glob("flame/synthetic/*flame*/results.json"))


@pytest.mark.heavy
def test_copied_out_folder_runs(tmp_path):
    for name in ("flame", "common"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    cmd = [sys.executable, "-c", "import sys, flame.main as m; print(m.__file__); m.main(sys.argv[1:])",
           "--config", "flame/configs/smoke.yaml", "run_root=out", *FAST]
    done = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith(str(tmp_path))  # the copy ran, not the checkout
    assert list(tmp_path.glob("out/flame/synthetic/*flame*/results.json"))


SHIPPED = {"amazon-beauty": 12101, "amazon-games": 10672, "amazon-toys": 11924, "ml-1m": 3416}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoints_load_strictly(shared_data, name):
    path = shared_data / "flame" / "frozen_weights" / f"{name}.pt"
    model = load_frozen(SASRec(BackboneConfig(), SHIPPED[name]), path)
    assert model.item_emb.weight.shape == (SHIPPED[name] + 1, 64)
    with pytest.raises(ValueError):
        load_frozen(SASRec(BackboneConfig(), SHIPPED[name] + 1), path)


STATS = {"amazon-beauty": (22363, 12101, 128031), "amazon-games": (24303, 10672, 149717),
         "amazon-sports": (35598, 18357, 187944), "amazon-toys": (19412, 11924, 106592),
         "yelp": (29915, 21572, 240483)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STATS))
def test_real_sample_counts(shared_data, monkeypatch, name):
    monkeypatch.setenv("REPRO_DATA", str(shared_data))
    data = build_data(load_raw(DataConfig(name=name)), DataConfig())
    assert (data.num_users, data.num_items, len(data.train_target)) == STATS[name]
    assert len(data.valid_target) == len(data.test_target) == data.num_users
    if name == "yelp":  # method.md §9: seen targets, and those seen twice that `reference` leaves unmasked
        for target, hist, seen, twice in ((data.valid_target, data.valid_hist, 1451, 215),
                                          (data.test_target, data.test_hist, 1787, 280)):
            count = (hist == target[:, None]).sum(1)
            assert (int((count >= 1).sum()), int((count >= 2).sum())) == (seen, twice)


@pytest.mark.slow
def test_shipped_toys_scores_far_above_random(shared_data, monkeypatch):
    monkeypatch.setenv("REPRO_DATA", str(shared_data))
    data = build_data(load_raw(DataConfig(name="amazon-toys")), DataConfig())
    assert (data.num_items, len(data.train_target), len(data.valid_target)) == (11924, 106592, 19412)
    model = load_frozen(SASRec(BackboneConfig(), data.num_items), shared_data / "flame/frozen_weights/amazon-toys.pt")
    users = slice(0, 4000)  # a fixed slice keeps this well under a minute on 2 cores
    metrics = evaluate(model, data.valid_seq[users], data.valid_target[users], data.valid_hist[users],
                       "reference", "strict", batch_size=1000)
    assert metrics["HR@20"] > 20 * (100 * 20 / data.num_items)  # random HR@20 is about 20/I
    with torch.no_grad():  # a layout mistake (reversed positions, method.md §14, item 4) must score much worse
        model.pos_emb.weight.copy_(model.pos_emb.weight.flip(0))
    broken = evaluate(model, data.valid_seq[users], data.valid_target[users], data.valid_hist[users],
                      "reference", "strict", batch_size=1000)
    assert broken["NDCG@20"] < 0.5 * metrics["NDCG@20"]


@pytest.mark.heavy
def test_compiled_training_runs_and_learns(tmp_path, frozen_file, monkeypatch):
    """train.compile=true: Dynamo traces FLAME's loss once per batch shape, not once per epoch (λ(e)
    is a new float every epoch), and the compiled loss trains. Inductor's code generation is swapped
    for aot_eager here (minutes on 2 CPU cores); tracing and autograd are the same."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: real_compile(fn, backend=counter))
    torch._dynamo.reset()
    out = main(["--config", SMOKE, "train.max_epochs=4", "data.synthetic_users=300", "train.compile=true",
                f"flame.frozen={frozen_file}", "--run-dir", str(tmp_path / "c")])
    records = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["train/wcl"] > 0 for r in records)
    assert len({r["lambda"] for r in records}) == 4
    assert records[-1]["train/rec"] < records[0]["train/rec"]
    assert 1 <= counter.frame_count <= 3  # full batch, last partial batch, one dynamic-shape graph at most
    assert out["config"]["train"]["compile"] is True and out["test"]["reference"]["NDCG@20"] > 0


def test_defaults_are_the_paper_setting_and_missing_data_is_one_line(tmp_path, monkeypatch):
    """`python main.py` without --config is the paper's main setting (method.md §2); without the data it
    fails before any run folder, in one line that names the offline smoke config."""
    from flame.config import Config

    cfg = Config()
    assert (cfg.data.name, cfg.method.name, cfg.backbone.d, cfg.data.max_len, cfg.train.max_epochs,
            cfg.train.batch_size, cfg.flame.frozen_source) == ("amazon-toys", "flame", 64, 50, 200, 256, "shipped")
    monkeypatch.setenv("REPRO_DATA", str(tmp_path / "no-data"))
    with pytest.raises(FileNotFoundError, match="amazon-toys") as err:
        main([f"run_root={tmp_path / 'runs'}"])
    assert "\n" not in str(err.value) and "configs/smoke.yaml" in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_run_leaves_the_callers_config_alone_and_max_len_has_one_key(tmp_path, frozen_file):
    from common.config import ConfigError, load_config
    from flame.config import Config
    from flame.main import run

    cfg = load_config(Config, SMOKE, [*FAST, f"flame.frozen={frozen_file}", f"run_root={tmp_path}"])
    before = repr(cfg)
    out = run(cfg)
    assert repr(cfg) == before
    assert SASRec(BackboneConfig(d=16), out["num_items"], max_len=10).pos_emb.weight.shape[0] == 10
    with pytest.raises(ConfigError, match="backbone.max_len"):  # the input window is data.max_len only
        load_config(Config, SMOKE, ["backbone.max_len=10"])


def test_stage1_folder_changes_with_every_setting_that_changes_the_net(tmp_path):
    """A stale stage-1 net is never reused: its folder key covers data, backbone, train and eval, not
    the device and not the FLAME options."""
    from common.config import load_config
    from flame.config import Config
    from flame.stage1 import stage1_run

    def folder(*overrides):
        return stage1_run(load_config(Config, SMOKE, [f"run_root={tmp_path}", *overrides]), 42)[1]

    base = folder()
    assert base.parent == tmp_path / "flame" / "synthetic" / "stage1" and base.name.startswith("seed42_")
    for changed in ("backbone.d=8", "data.max_len=8", "train.lr=0.01", "eval.seen_mask=neg_inf",
                    "data.synthetic_seed=1"):
        assert folder(changed) != base, changed
    for same in ("train.device=cuda", "flame.tau=0.5", "method.name=mutual", "train.sasrec_run=x"):
        assert folder(same) == base, same
    sub, _ = stage1_run(load_config(Config, SMOKE, ["flame.frozen=x.pt"]), 43)
    assert (sub.method.name, sub.train.seed, sub.flame.frozen) == ("sasrec", 43, None)


def test_old_run_folder_refuses_to_resume_in_one_line(tmp_path, frozen_file):
    """A run folder written with the earlier key names (model, baselines, data.dataset, backbone.max_len)
    fails with one line naming the renames, not with an unknown-key error."""
    import yaml

    main(["--config", SMOKE, *FAST, f"flame.frozen={frozen_file}", "--run-dir", str(tmp_path / "new")])
    saved = yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())
    saved["data"]["dataset"] = saved["data"].pop("name")
    saved["model"] = saved.pop("method")["name"]
    (tmp_path / "new" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match="data.dataset is now data.name") as err:
        main(["--resume", str(tmp_path / "new")])
    assert "\n" not in str(err.value) and "model is now method.name" in str(err.value)


def test_stage1_folder_follows_the_raw_files_content(tmp_path, monkeypatch):
    """A replaced raw file (same name, same config) must never get the old stage-1 net back."""
    from common.config import load_config
    from common.registry import DATASETS
    from flame.config import Config
    from flame.stage1 import stage1_run
    raw = tmp_path / "flame" / "amazon-toys.txt"
    raw.parent.mkdir(parents=True)
    raw.write_text("1 1 2 3\n2 2 3 4\n")
    monkeypatch.setitem(DATASETS["amazon-toys"], "sha256", None)  # a hand-made file, not the authors' one
    cfg = load_config(Config, None, ["data.name=amazon-toys", f"data.root={tmp_path}"])
    first = stage1_run(cfg, 42)[1]
    raw.write_text("1 1 2 3\n2 2 3 5\n")
    assert stage1_run(cfg, 42)[1] != first
    raw.write_text("1 1 2 3\n2 2 3 4\n")
    assert stage1_run(cfg, 42)[1] == first


@pytest.mark.heavy
def test_a_rerun_comparison_reuses_its_finished_runs_and_refuses_another_config(tmp_path):
    """Re-running a comparison into the same --out reuses each finished run of the same config (the
    table is the same, nothing is trained or appended); another config there is refused in one line."""
    from flame.compare import main as compare

    out = tmp_path / "cmp"
    first = compare(["--config", SMOKE, f"run_root={tmp_path}", *FAST, "--seeds", "1", "--out", str(out)])
    logged = {m: (out / f"{m}_seed1" / "metrics.jsonl").read_text() for m in first}
    again = compare(["--config", SMOKE, f"run_root={tmp_path}", *FAST, "--seeds", "1", "--out", str(out)])
    for method in first:
        assert again[method][0]["test"] == first[method][0]["test"]
        assert (out / f"{method}_seed1" / "metrics.jsonl").read_text() == logged[method]   # no second run appended
    with pytest.raises(FileExistsError, match="holds a run of another config"):
        compare(["--config", SMOKE, f"run_root={tmp_path}", *FAST, "train.lr=0.0123", "--seeds", "1", "--out", str(out)])
