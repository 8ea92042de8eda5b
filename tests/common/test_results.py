"""`make results` (common/results.py): every run under the run root in results.csv and one markdown table per
paper, read-only on the run folders; and each paper's compare writes summary.csv + summary.md into
<run root>/<paper>/compare/<config stem>/."""
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.results import main as results_main

ROOT = Path(__file__).resolve().parents[2]
F3CREC_SMOKE = str(ROOT / "f3crec" / "configs" / "smoke.yaml")
FAST = ["federation.rounds=2", "federation.patience=2"]


def fake_run(root: Path, paper: str, name: str, seed: int, ndcg: float, method: str = "flame", **extra) -> Path:
    folder = root / paper / "toy" / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "schema": 1, "paper": paper, "dataset": "toy", "method": method, "variant": None, "seed": seed,
        "metrics": {"test/ndcg@20": ndcg, "test/hr@20": 2 * ndcg, "valid/ndcg@20": ndcg - 0.01}, "threads": 1,
        "device": "cpu", "versions": {"python": "3.11"}, "commit": "abc1234", "config_digest": "0" * 16,
        "started": "2026-12-06T10:00:00+0000", "finished": "2026-12-06T10:01:00+0000", **extra}))
    return folder


def snapshot(root: Path) -> dict:
    """Every file under root with its content hash: what a read-only gatherer must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_make_results_gathers_fake_and_real_runs_without_writing_into_them(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "flame", "20261206-100000_flame_seed1", 1, 0.07)
    fake_run(runs, "flame", "20261206-100100_flame_seed2", 2, 0.09)
    fake_run(runs, "flame", "20261206-100200_sasrec_seed1", 1, 0.05, method="sasrec")
    aside = fake_run(runs, "flame", "20261206-100300_flame_seed3", 3, 0.5)
    (aside / "previous-20261206-100400").mkdir()
    (aside / "results.json").rename(aside / "previous-20261206-100400" / "results.json")   # set aside: no run
    damaged = runs / "vlm2rec" / "toy" / "broken"
    damaged.mkdir(parents=True)
    (damaged / "results.json").write_text('{"schema": 1, "paper": ')
    legacy = runs / "f3crec" / "old" / "20261101-000000"
    legacy.mkdir(parents=True)
    (legacy / "results.json").write_text(json.dumps({"seed": 5, "method": "ft", "git_sha": "0ldc0de"}))
    real_dir = runs / "f3crec" / "synthetic" / "real"   # a real smoke run, in its own process as a user's
    subprocess.run([sys.executable, "-m", "f3crec.main", "--config", F3CREC_SMOKE, "--run-dir", str(real_dir), *FAST],
                   check=True, capture_output=True, cwd=ROOT)
    real = json.loads((real_dir / "results.json").read_text())
    before = snapshot(runs)

    written = results_main(["--root", str(runs), "--out", str(tmp_path / "out")])
    assert snapshot(runs) == before                                   # nothing written inside the run root
    assert sorted(p.name for p in written) == ["f3crec.csv", "f3crec.md", "flame.csv", "flame.md", "results.csv"]
    out = capsys.readouterr().out
    assert f"{damaged / 'results.json'}: not readable" in out and "5 run(s)" in out

    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert len(rows) == 5 and {r["paper"] for r in rows} == {"flame", "f3crec"}
    by_dir = {Path(r["run_dir"]).name: r for r in rows}
    assert float(by_dir["real"]["test/ndcg@20"]) == pytest.approx(real["metrics"]["test/ndcg@20"], abs=1e-6)
    assert by_dir["real"]["method"] == "f3crec" and by_dir["real"]["variant"] == "fedmf"
    assert by_dir["20261101-000000"]["commit"] == "0ldc0de" and by_dir["20261101-000000"]["test/ndcg@20"] == ""

    flame = (tmp_path / "out" / "flame.md").read_text()
    assert "| toy | flame |  | 1, 2 | 0.0800 ± 0.0141 (2) | 0.1600 ± 0.0283 (2) |" in flame   # mean ± std
    assert "| toy | sasrec |  | 1 | 0.0500 ± 0.0000 (1) |" in flame
    assert "0.5" not in flame                                          # the set-aside run is left out
    f3 = (tmp_path / "out" / "f3crec.md").read_text()
    assert "| synthetic | f3crec | fedmf | 1 |" in f3 and "test/la/ndcg@20" in f3
    assert list(csv.DictReader((tmp_path / "out" / "flame.csv").open()))[0]["paper"] == "flame"


def test_make_results_default_out_is_beside_the_runs_and_a_missing_root_is_one_line(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    fake_run(runs, "flame", "a", 1, 0.1)
    monkeypatch.setenv("REPRO_RUNS", str(runs))
    results_main([])
    assert (runs / "results" / "flame.md").is_file() and (runs / "results" / "results.csv").is_file()
    again = results_main([])   # its own output folder holds no results.json: still one run
    assert len(list(csv.DictReader(again[0].open()))) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results_main(["--root", str(tmp_path / "nowhere")])


def test_compare_writes_summary_csv_and_md_under_the_run_root(tmp_path):
    from f3crec.compare import main as compare
    text = compare(["--config", F3CREC_SMOKE, f"run_root={tmp_path}", *FAST, "--seeds", "1", "--methods", "ft",
                    "f3crec"])
    folder = tmp_path / "f3crec" / "compare" / "smoke"
    assert (folder / "summary.md").read_text() == text + "\n"
    rows = list(csv.DictReader((folder / "summary.csv").open()))
    assert [(r["method"], r["seed"], Path(r["run_dir"]).name) for r in rows] == [
        ("ft", "1", "ft_seed1"), ("f3crec", "1", "f3crec_seed1")]
    for row in rows:   # the CSV's numbers are the runs' own
        saved = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert float(row["test/ndcg@20"]) == pytest.approx(saved["metrics"]["test/ndcg@20"], abs=1e-6)
