"""The GPU campaign script (tests/gpu_campaign.py) on the CPU: its dry run prints the plan (FLAME's table first,
then the bench, compile variants last) and checks every command line with the modules' own parsers; a broken
command is reported; the data it needs is staged into an ignored folder of the checkout; the bundle a GPU
machine sends back is at most four files and unpacks into run folders that flame.table --report tabulates."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "flame" / "configs" / "smoke.yaml")


@pytest.fixture
def campaign(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_campaign", ROOT / "tests" / "gpu_campaign.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_campaign", module)  # dataclasses look their module up there
    monkeypatch.chdir(ROOT)  # main() changes into the repository: restored after the test
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_the_table_first_and_every_command_parses(campaign, tmp_path, capsys):
    assert campaign.main(["--dry-run", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "0 command line(s) do not parse" in out and "BAD" not in out
    order = [out.index(f"[{name}]") for name in ("flame-table", "flame-table-report", "flame-bench", "gpu-tests",
                                                  "f3crec-gpu", "vlm2rec-3b-bench", "flame-bench-compile")]
    assert order == sorted(order)
    for data in ("amazon-beauty", "amazon-games", "amazon-sports", "amazon-toys", "yelp"):
        assert f"--configs flame/configs/{data}.yaml --seeds 1 2 3" in out
    assert out.count("train.cuda_graph=true") == 5 and "--stack 1 4 16" in out
    compile_part = out[out.index("[flame-bench-compile]"):]
    assert "--variants compile" in compile_part and "--variants compile" not in out[:out.index("[flame-bench-compile]")]
    assert "--clients 100000" in out and "-m vlm2rec.bench" in out and "-m gpu" in out
    assert not (tmp_path / "c").exists()  # a dry run writes nothing


def test_a_command_that_does_not_parse_is_reported(campaign, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(campaign, "BENCH_VARIANTS", ("eager", "warp-speed"))
    monkeypatch.setattr(campaign, "TABLE_DATA", ("amazon-toys", "no-such-set"))
    assert campaign.main(["--dry-run", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "3 command line(s) do not parse" in out  # 2 benchmarks (unknown variant), 1 table (unknown config)


def test_stage_data_copies_what_the_table_needs_into_the_carried_folder(campaign, tmp_path, monkeypatch):
    source = tmp_path / "shared"
    (source / "flame" / "frozen_weights").mkdir(parents=True)
    for data in campaign.TABLE_DATA:
        (source / "flame" / f"{data}.txt").write_text("1 2 3\n")
    (source / "flame" / "SOURCE.txt").write_text("x")
    for data in campaign.SHIPPED:
        (source / "flame" / "frozen_weights" / f"{data}.pt").write_bytes(b"w")
    repo = tmp_path / "repo"
    monkeypatch.setattr(campaign, "REPO", repo)
    target = campaign.stage_data(source)
    assert target == repo / "data" / "raw" / "flame"
    assert sorted(p.name for p in target.glob("*.txt")) == sorted([f"{d}.txt" for d in campaign.TABLE_DATA] + ["SOURCE.txt"])
    assert len(list((target / "frozen_weights").glob("*.pt"))) == 3
    (source / "flame" / "yelp.txt").unlink()
    with pytest.raises(FileNotFoundError, match="yelp.txt"):
        campaign.stage_data(source)
    tracked = (ROOT / ".gitignore").read_text().split()
    assert "data/" in tracked  # the staged folder is never committed


def test_bundle_round_trip_through_the_report(campaign, tmp_path):
    """A smoke table under <out>/table: the bundle holds four files, and unbundled elsewhere, flame.table
    --report tabulates the same numbers."""
    from flame import table
    out = tmp_path / "c"
    table.main(["--configs", SMOKE, "--seeds", "1", "2", "--out", str(out / "table"), "train.max_epochs=1",
                "data.synthetic_users=60"])
    steps = campaign.plan(out)
    steps[0].status = "ok"
    campaign.write_summary(out, steps, "now", 540)
    bundle = tmp_path / "bundle"
    campaign.write_bundle(out, bundle, steps)
    assert sorted(p.name for p in bundle.iterdir()) == ["logs.txt", "runs.jsonl", "summary.md", "table.md"]
    lines = (bundle / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["metrics"] is not None for line in lines)  # 4 runs + B2
    assert "| synthetic/flame_seed1 | 1 |" in (bundle / "summary.md").read_text()
    back = tmp_path / "back"
    assert campaign.unbundle(bundle / "runs.jsonl", back) == 5
    found = table.main(["--out", str(back), "--report"])
    assert (back / "table.md").read_text() == (out / "table" / "table.md").read_text().replace(str(out / "table"), str(back))
    assert [r["seed"] for r in found["synthetic"]["flame"]] == [1, 2]
