"""F3CRec at scale: evaluation in chunks with sparse masks equals one dense evaluation bit for bit and
keeps no users × items mask; the synthetic generator's draws do not depend on its chunk size."""
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from f3crec.config import Config, resolve
from f3crec.data import get_blocks, synthetic_stream
from f3crec import evaluate as ev
from f3crec.model import BACKBONES
from f3crec.train import grow, make_simulator

SMOKE = Path(__file__).resolve().parents[2] / "f3crec" / "configs" / "smoke.yaml"


def test_synthetic_stream_does_not_depend_on_its_chunk():
    whole, chunked = synthetic_stream(60, 50, 2400, 3, chunk=10**6), synthetic_stream(60, 50, 2400, 3, chunk=7)
    assert all(np.array_equal(whole[k], chunked[k]) for k in whole) and 0 < whole["user"].size <= 2400


@pytest.mark.parametrize("backbone", ["fedmf", "fedncf"])
def test_chunked_sparse_evaluation_equals_one_dense_evaluation(backbone):
    cfg, flags = resolve(load_config(Config, SMOKE, [f"backbone.name={backbone}"]))
    blocks, _ = get_blocks(cfg.data, cfg.train.seed)
    sim = grow(None, lambda items, private: make_simulator(cfg, flags, items, private), cfg, blocks, 0, 1)
    sim.server.items = sim.server.items + 0.3 * torch.randn_like(sim.server.items)   # scores with some spread
    net, block = BACKBONES[backbone], blocks[0]
    for users, positives, exclude in [(sorted(block.valid), block.valid, [block.train]),
                                      (sorted(block.test), block.test, ev.test_exclude(blocks, 0, 0, "cumulative"))]:
        dense = ev.metric_sums(ev.oracle_scores(sim, torch.tensor(users), net), users, positives, exclude,
                            ev.eval_masks(users, positives, exclude, block.n_items))
        for chunk in (1, 5, 64, 10**6):
            masks = ev.sparse_masks(users, positives, exclude, chunk=chunk)
            assert len(masks) == -(-len(users) // chunk)
            # O(interactions): exactly one (row, item) pair per positive and per excluded interaction
            assert sum(m[2].shape[1] for m in masks) == sum(len(positives[u]) for u in users)
            assert sum(m[3].shape[1] for m in masks) == sum(len(part[u]) for u in users for part in exclude
                                                            if u in part)
            assert ev.oracle_sums(sim, net, users, masks, block.n_items) == dense     # exact Fractions, equal
        assert dense["ndcg"][1] == len(users) and 0 < dense["ndcg"][0] < len(users)


def test_ml100k_shaped_blocks_have_the_shape_and_disjoint_splits():
    from f3crec.bench import ml100k_shaped_blocks
    base, inc = ml100k_shaped_blocks(2000)
    assert base.n_items == inc.n_items == 2440 and base.n_users == 2000 and inc.n_users == 2340
    per_user = np.mean([sum(len(b.split(s).get(u, ())) for s in ("train", "valid", "test")) for b in [base]
                        for u in base.train])
    assert 85 < per_user < 95 and len(base.train) == 2000                   # ≈ 94 drawn, minus repeats
    returning = [u for u in inc.train if u < base.n_users]
    assert 0.4 < len(returning) / len(inc.train) < 0.7                      # about half of D¹ returns
    for block in (base, inc):
        for u, items in block.train.items():
            parts = [items, block.valid.get(u, np.zeros(0, np.int64)), block.test.get(u, np.zeros(0, np.int64))]
            joined = np.concatenate(parts)
            assert np.unique(joined).size == joined.size and joined.max() < block.n_items
            assert len(parts[0]) >= len(parts[1]) >= len(parts[2]) - 1


def test_bench_scale_reports_a_row_per_size(capsys):
    from f3crec.bench import main
    out = main(["--scale", "--sizes", "60", "120", "--rounds", "1"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 60 ") or
             line.startswith("| 120 ")]
    assert sorted(out) == [60, 120] and len(table) == 2
    for res in out.values():
        assert res["block0"]["cpu_s_per_round"] > 0 and res["block1"]["clients"] > 0 and res["peak_rss_mb"] > 50
