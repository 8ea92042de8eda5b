"""The stacked initial client states and the cached round-0 start-up values equal the per-user draws of
model.init_private bit for bit (the random streams unchanged)."""
import numpy as np
import pytest

from common.config import load_config
from f3crec.block_inputs import round_context, shared_start
from f3crec.config import Config, resolve
from f3crec.model import init_private, init_private_rows


@pytest.mark.parametrize("backbone", ["fedmf", "fedncf", "pfedrec"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("emb_init", ["small", "reference"])
def test_init_private_rows_equals_per_user_draws(backbone, dtype, emb_init):
    cfg = load_config(Config, None, [f"backbone.name={backbone}", f"backbone.dtype={dtype}", "backbone.dim=8"])
    users = range(5, 12)
    rows = init_private_rows(cfg.backbone, emb_init, 3, users, tensor=False)
    one = [init_private(cfg.backbone, emb_init, 3, u, tensor=False) for u in users]
    assert set(rows) == set(one[0])
    for name, stacked in rows.items():
        assert stacked.dtype == one[0][name].dtype and stacked.shape == (len(users), *one[0][name].shape)
        np.testing.assert_array_equal(stacked, np.stack([p[name] for p in one]))
    torch = pytest.importorskip("torch")
    tensors = init_private_rows(cfg.backbone, emb_init, 3, users)
    assert all(isinstance(v, torch.Tensor) and np.array_equal(v.numpy(), rows[k]) for k, v in tensors.items())
    assert init_private_rows(cfg.backbone, emb_init, 3, range(4, 4), tensor=False) is None


def test_shared_start_is_the_user_minus_one_draw_and_a_fresh_copy():
    cfg = load_config(Config, None, ["backbone.name=pfedrec", "backbone.dim=8"])
    want = init_private(cfg.backbone, "reference", 7, -1, tensor=False)
    first = shared_start(cfg.backbone, "reference", 7)
    for name in want:
        np.testing.assert_array_equal(first[name], want[name])
        first[name] += 1.0                       # a simulator trains it in place: the next round is unaffected
    again = shared_start(cfg.backbone, "reference", 7)
    assert all(np.array_equal(again[k], want[k]) for k in want)
    other = shared_start(cfg.backbone, "reference", 8)   # keyed by seed
    assert not np.array_equal(other["w"], want["w"])


def test_round_context_hands_out_the_start_up_values():
    cfg = load_config(Config, None, ["backbone.name=fedncf", "backbone.dim=8", "data.name=synthetic"])
    cfg, flags = resolve(cfg)
    from f3crec.data import Block
    blocks = [Block({}, {}, {}, 3, 5, np.zeros(0, np.int64))]
    ctx = round_context(cfg, flags, blocks, 0, 0)
    want = init_private(cfg.backbone, cfg.quirks.emb_init, cfg.train.seed, -1, tensor=False)
    assert all(np.array_equal(ctx.shared_private[k], want[k]) for k in want)


@pytest.mark.parametrize("backbone", ["fedmf", "fedncf", "pfedrec"])
def test_block_end_scores_equal_score_matrix(backbone):
    """previous_scores' numpy product (c added in place, skipped where it is all zero) gives score_matrix's
    values, and the block-end top-N and ŷ read from them are the same."""
    from f3crec.model import BACKBONES, score_matrix
    from f3crec.round import _scores, previous_scores
    cfg = load_config(Config, None, [f"backbone.name={backbone}", "backbone.dim=8"])
    private = init_private_rows(cfg.backbone, "reference", 0, range(6), tensor=False)
    items = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
    net = BACKBONES[backbone]
    want = score_matrix(net, private, items)
    got = _scores(net, private, items)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    tops, yhat = previous_scores(net, private, items, 5)
    order = np.argsort(-want, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(tops, order)
    np.testing.assert_array_equal(yhat, np.take_along_axis(want, order, 1))


def test_round_record_summarises_arm_stats():
    from f3crec.train import _arm_summary
    record = _arm_summary({"D": [3, 60, 600], "m": [1, 7, 40], "itm_w": 0.5})
    assert record == {"itm_w": 0.5, "D_mean": 221.0, "m_mean": 16.0, "m_hist": [1, 1, 0, 0, 0, 0, 1],
                      "D_hist": [1, 1, 0, 0, 0, 1]}
