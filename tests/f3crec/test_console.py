"""F3CRec's console and caches: one compact line per round (metrics.jsonl keeps the records), a results
table and the run folder at the end; the base-block cache is keyed by the blocks' content and a damaged
entry is trained again, never loaded."""
import json
import shutil
from pathlib import Path

import pytest

from f3crec.data import build_blocks, synthetic_stream, write_blocks
from f3crec.main import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "f3crec" / "configs" / "smoke.yaml")
FAST = ["federation.rounds=2", "federation.patience=2"]


def test_console_is_a_line_per_round_then_one_table_and_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    main(["--config", SMOKE, "--run-dir", str(run), *FAST])
    out = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [line for line in out if line.startswith("[f3crec] block ") and " round " in line]
    assert not any(line.lstrip().startswith("{") for line in out)             # no raw JSON records
    assert len(rounds) == len(records) and all(len(line) < 100 for line in rounds)
    first = records[0]
    assert rounds[0].startswith(f"[f3crec] block 0 round   0  val N@20 {first['val_ndcg']:.4f} ")
    assert out[-1] == f"run folder: {run}"
    table = out[-7:-1]
    assert table[0] == "f3crec (fedmf, seed 1) after each block:" and table[1].startswith("block |  N@20 LA")
    summary = json.loads((run / "results.json").read_text())["summary"]
    for t, line in enumerate(table[2:]):
        cells = [float(x) for x in line.replace("|", " ").replace("/", " ").split()]
        ndcg, recall = summary["ndcg"]["per_block"][t], summary["recall"]["per_block"][t]
        assert cells[0] == t and cells[1:7] == [round(row[k], 4) for row in (ndcg, recall) for k in ("LA", "RA", "H")]


def _blocks(folder: Path, stream_seed: int = 1) -> Path:
    """Blocks of a synthetic stream in the released layout (another stream_seed: other content)."""
    write_blocks(folder, build_blocks(synthetic_stream(60, 50, 2400, stream_seed), 1, core=3), {"dataset": "synthetic"})
    return folder


@pytest.mark.heavy
def test_base_cache_is_keyed_by_the_blocks_content_and_a_damaged_entry_is_retrained(tmp_path, capsys):
    base = tmp_path / "base"
    common = ["--config", SMOKE, *FAST, "train.share_base=true", f"train.base_cache={base}", "train.stop_after_block=0"]
    folder = _blocks(tmp_path / "blocks")
    first = main([*common, f"data.blocks={folder}", "--run-dir", str(tmp_path / "a")])
    (entry,) = base.glob("*.pt")
    assert "base block loaded" not in capsys.readouterr().out

    shutil.rmtree(folder)
    _blocks(folder, stream_seed=2)                                # same folder name, other content
    main([*common, f"data.blocks={folder}", "--run-dir", str(tmp_path / "b")])
    assert "base block loaded" not in capsys.readouterr().out and len(list(base.glob("*.pt"))) == 2

    entry.write_bytes(entry.read_bytes()[:100])              # damaged: never trusted, trained again
    shutil.rmtree(folder)
    _blocks(folder)
    again = main([*common, f"data.blocks={folder}", "--run-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "base block cache not used, training it again" in out and "base block loaded" not in out
    assert again["summary"] == first["summary"]
    main([*common, f"data.blocks={folder}", "--run-dir", str(tmp_path / "d")])
    assert "base block loaded" in capsys.readouterr().out      # the rewritten entry is whole again
