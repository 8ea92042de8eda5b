"""VLM2Rec bad-input corpus (vlm2rec/docs/method.md §16): every case goes through the CLI contract (exit status 2,
one stderr line, no traceback), the line names the cause, and nothing is left that a later run would
trust: no run folder for a fresh run, the resumed folder untouched, no negatives cache for a bad draw."""
import gzip
from pathlib import Path

import pytest

from common.io import cache_root
from vlm2rec import model as vmodel
from vlm2rec.encoder import byte_tokenizer
from vlm2rec.main import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "vlm2rec/configs/smoke.yaml")


def _reviews(root: Path, payload: bytes, raw: bool = False) -> list[str]:
    path = root / "amazon" / "Beauty" / "reviews_Beauty_5.json.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(payload if raw else gzip.compress(payload))
    return [f"data.root={root}", "data.name=amazon", "data.category=Beauty"]


def _ml100k(root: Path, overrides: list[str], tmdb: str | None = None) -> list[str]:
    (root / "ml-100k").mkdir(parents=True)
    (root / "ml-100k" / "u.data").write_text("".join(f"{u}\t{i}\t5\t{100 * u + i}\n" for u in range(1, 7)
                                                     for i in range(1, 7)))
    (root / "ml-100k-posters" / "posters").mkdir(parents=True)       # the folder exists but holds no image
    if tmdb is not None:
        (root / "ml-100k-posters" / "items_tmdb.csv").write_text(tmdb)
    return [f"data.root={root}", *overrides]


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def _partial_snapshot(root: Path) -> Path:
    folder = root / "Qwen2-VL-partial"
    byte_tokenizer().save_pretrained(folder)                          # tokenizer only: no config, no weights
    return folder


def _run_folder(root: Path, config: str | None, last: bytes | None = None) -> Path:
    folder = root / "old-run"
    folder.mkdir()
    if config is not None:
        (folder / "config.yaml").write_text(config)
    if last is not None:
        (folder / "last.pt").write_bytes(last)
    return folder


# (id, overrides or a builder of them from tmp_path, what the line must name)
CASES = [
    ("unknown key", ["train.nope=1"], "train.nope"),
    ("wrong type", ["train.batch_size=many"], "train.batch_size"),
    ("batch of one", ["train.batch_size=1"], "train.batch_size: 1 is outside the allowed range [2, inf)"),
    ("zero lr", ["train.lr=0"], "train.lr"),
    ("dropout of one", ["backbone.lora.dropout=1.0"], "backbone.lora.dropout"),
    ("fraction above one", ["eval.scenario_fraction=2"], "eval.scenario_fraction"),
    ("zero cut-off", ["eval.ks=[0, 10]"], "eval.ks[0]"),
    ("tiny images", ["data.image_size=8"], "data.image_size"),
    ("unknown backbone", ["backbone.name=llava"], "backbone.name"),
    ("tuned MiniLM with joined history titles", ["backbone.name=two-tower", "backbone.two_tower.tune_text_layers=1"],
     "needs backbone.two_tower.hist_text=attention"),
    ("more tuned MiniLM layers than it has", ["backbone.name=two-tower", "backbone.two_tower.tune_text_layers=7"],
     "backbone.two_tower.tune_text_layers"),
    ("select_on protocol not computed", ["eval.protocols=[sampled]"], "eval.select_on uses protocol 'full'"),
    ("select_on mode not computed", ["eval.modality_modes=[text]"], "eval.select_on uses mode 'both'"),
    ("select_on K not in ks", ["eval.select_on=full/both/NDCG@5"], "eval.ks=[10, 20]"),
    ("seqrec heads", ["seqrec.hidden_size=15"], "seqrec.num_heads"),
    ("more negatives than unseen items", ["eval.num_negatives=29"], "eval.num_negatives"),
    ("run root is a file", lambda t: [f"run_root={_file(t / 'f')}"], "a file is in the way"),
    ("hub model not local", ["backbone.name=qwen2-vl", "backbone.source=no-such-org/no-such-model-3B",
                             "train.device=cpu"], "backbone.local_files_only=true forbids downloading"),
    ("local model folder absent", lambda t: ["backbone.name=qwen2-vl", f"backbone.source={t / 'nowhere'}",
                                             "train.device=cpu"], "nowhere (no such folder"),
    ("partial local snapshot", lambda t: ["backbone.name=qwen2-vl", f"backbone.source={_partial_snapshot(t)}",
                                          "train.device=cpu"], "weights (model.safetensors"),
    ("empty posters folder", lambda t: _ml100k(t, ["data.name=ml100k-posters"]), "no item has an image"),
    ("TMDB table without its columns", lambda t: _ml100k(t, ["data.name=ml100k-posters", "data.missing_image=placeholder"],
                                                         tmdb="id,name\n1,x\n"), "items_tmdb.csv: not a TMDB"),
    ("malformed reviews line", lambda t: _reviews(t, b'{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\n{"revie'),
     "reviews_Beauty_5.json.gz:2: bad review line"),
    ("reviews file not gzip", lambda t: _reviews(t, b"{}\n", raw=True),
     "reviews_Beauty_5.json.gz: not a readable gzip text file"),
]


@pytest.mark.parametrize("overrides, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_or_data_is_one_line_and_leaves_no_run(overrides, names, tmp_path, user_error):
    overrides = overrides(tmp_path) if callable(overrides) else overrides
    runs = tmp_path / "runs"
    before = set(cache_root().rglob("negatives_*")) if cache_root().exists() else set()
    line = user_error(main, ["--config", SMOKE, f"run_root={runs}", *overrides])
    assert names in line, line
    assert not runs.exists() or not any(runs.rglob("config.yaml")), "a run folder was left behind"
    after = set(cache_root().rglob("negatives_*")) if cache_root().exists() else set()
    assert all("_n29_" not in p.name for p in after - before)          # a failed draw saves nothing


FLAME_CONFIG = "data:\n  name: amazon-toys\nflame:\n  alpha: 0.5\ntrain:\n  seed: 42\n"
RESUME_CASES = [
    ("no such folder", lambda t: t / "nowhere", "no such run folder"),
    ("not a run folder", lambda t: _run_folder(t, None), "not a run folder (no config.yaml)"),
    ("a FLAME run", lambda t: _run_folder(t, FLAME_CONFIG), "is a FLAME run"),
    ("config not a mapping", lambda t: _run_folder(t, "- 1\n- 2\n"), "not a config mapping"),
    ("stopped before epoch 0 ended", lambda t: _run_folder(t, "train:\n  seed: 0\n"), "has no last.pt"),
    ("truncated last.pt", lambda t: _run_folder(t, "train:\n  seed: 0\n", b"PK\x03\x04\x00"), "last.pt is damaged"),
]


@pytest.mark.parametrize("folder, names", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resume_of_a_foreign_or_broken_folder_is_one_line_and_touches_nothing(folder, names, tmp_path, user_error):
    folder = folder(tmp_path)
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}
    line = user_error(main, ["--resume", str(folder)])
    assert names in line, line
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}
    assert after == files                                             # config.yaml not rewritten, nothing added


def test_non_finite_loss_stops_in_one_line_without_a_checkpoint(tmp_path, user_error, monkeypatch):
    forward = vmodel.VLM2Rec.forward

    def nan_forward(self, batch):
        loss, stats, raw = forward(self, batch)
        return loss * float("nan"), stats, raw
    monkeypatch.setattr(vmodel.VLM2Rec, "forward", nan_forward)
    line = user_error(main, ["--config", SMOKE, "--run-dir", str(tmp_path / "r"), "zero_shot=false"])
    assert "non-finite loss (nan) at epoch 0 step 0" in line
    assert not (tmp_path / "r" / "last.pt").exists() and not (tmp_path / "r" / "results.json").exists()
