"""The GPU campaign script (tests/gpu_campaign.py) on the CPU: its dry run prints the plan and checks every
command line with the modules' own parsers; a broken command is reported; step 5 resumes what a previous
campaign left; the summary tabulates what the steps wrote."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def campaign(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_campaign", ROOT / "tests" / "gpu_campaign.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_campaign", module)  # dataclasses look their module up there
    monkeypatch.chdir(ROOT)  # main() changes into the repository: restored after the test
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_every_step_and_every_command_parses(campaign, tmp_path, capsys):
    assert campaign.main(["--dry-run", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "0 command line(s) do not parse" in out and "BAD" not in out
    order = [out.index(f"[{name}]") for name in ("gpu-tests", "flame-bench", "flame-curves", "f3crec-gpu",
                                                  "vlm2rec-3b-bench", "flame-complete-runs")]
    assert order == sorted(order)
    for data in ("amazon-toys", "amazon-beauty"):
        assert f"--data {data} train.batch_size=256" in out
        for variant in ("eager", "cuda-graph", "cuda-graph-bf16", "compile"):
            assert f"curves/{data}_{variant}" in out
    for data in ("amazon-games", "amazon-sports", "yelp"):
        for seed in (43, 44):
            assert f"runs/{data}/flame_seed{seed}" in out
    assert "--clients 100000" in out and "-m vlm2rec.bench" in out and "-m gpu" in out
    assert not (tmp_path / "c").exists()  # a dry run writes nothing


def test_a_command_that_does_not_parse_is_reported(campaign, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(campaign, "BENCH_VARIANTS", ("eager", "warp-speed"))
    monkeypatch.setitem(campaign.VARIANT_OVERRIDES, "warp-speed", ["train.warp=true"])
    assert campaign.main(["--dry-run", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "4 command line(s) do not parse" in out  # 2 benchmarks (unknown variant), 2 runs (unknown key)
    assert "BAD: unknown config key 'train.warp'" in out


def test_complete_runs_resume_and_skip_what_is_done(campaign, tmp_path):
    games = tmp_path / "runs" / "amazon-games"
    (games / "flame_seed43").mkdir(parents=True)
    (games / "flame_seed43" / "last.pt").write_bytes(b"x")
    (games / "sasrec_seed43").mkdir()
    (games / "sasrec_seed43" / "results.json").write_text("{}")
    jobs = {job.name: job.argv for job in campaign.flame_run_jobs(tmp_path)}
    assert "sasrec-amazon-games-seed43" not in jobs and len(jobs) == 7
    assert jobs["flame-amazon-games-seed43"][3:5] == ["--resume", str(games / "flame_seed43")]
    assert "--run-dir" in jobs["flame-yelp-seed44"]


def test_summary_tabulates_the_steps(campaign, tmp_path):
    steps = campaign.plan(tmp_path)
    bench = steps[1]
    (tmp_path / "logs").mkdir()
    for job in bench.jobs:
        job.log = tmp_path / "logs" / f"{job.name}.log"
        job.log.write_text("noise\n| model | variant | ms/step |\n| flame | cuda-graph | 2.0 |\n")
    bench.status, bench.seconds = "ok", 12.0
    curve = tmp_path / "curves" / "amazon-toys_eager"
    curve.mkdir(parents=True)
    (curve / "metrics.jsonl").write_text("".join(json.dumps({"valid/NDCG@20": v, "train/train_seconds": 4.0}) + "\n"
                                                 for v in (1.5, 2.5)))
    campaign.write_summary(tmp_path, steps, "now", 540)
    text = (tmp_path / "summary.md").read_text()
    assert "| flame-bench | ok | 12 |" in text and "| flame | cuda-graph | 2.0 |" in text
    assert "| amazon-toys | eager | 1.50 | 2.50 | — | 4.00 |" in text
    assert "17.0 s per FLAME epoch on amazon-toys, 20.4 s on amazon-beauty" in text
    assert "| gpu-tests | pending | 0 |" in text
