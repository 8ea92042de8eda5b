"""train.cuda_graph: the static-buffer training step behind the captured CUDA graph.

On CPU the step runs eagerly through the same static buffers (GraphStep(capture=False)); it must
train exactly like the ordinary loop. The capture itself is checked by the @gpu test.
"""
from types import SimpleNamespace

from pathlib import Path

import pytest
import torch

from flame.config import BackboneConfig, DataConfig, FlameConfig
from flame.data import build_data, load_raw
from flame.ensemble import FLAME
from flame.fast import GraphStep, check_graph_options
from flame.main import main
from flame.model import SASRec
from flame.train import EagerStep, make_optimizer, train_one_epoch

SMOKE = str(Path(__file__).resolve().parents[2] / "flame" / "configs" / "smoke.yaml")


def small_data(users=150, max_len=10):
    cfg = DataConfig(name="synthetic", synthetic_users=users, synthetic_items=40, max_len=max_len)
    return build_data(load_raw(cfg), cfg)


def small_flame(num_items, dropout=0.5, seed=0, max_len=10, mutual=False):
    torch.manual_seed(seed)
    backbone = BackboneConfig(d=16, dropout=dropout)
    return FLAME(SASRec(backbone, num_items, max_len), SASRec(backbone, num_items, max_len), FlameConfig(),
                 mutual=mutual)


def train_epochs(use_graph_step, data, epochs=2, batch=64, mutual=False):
    model = small_flame(data.num_items, mutual=mutual)
    optimizer = make_optimizer(model, SimpleNamespace(lr=1e-2, cuda_graph=False))
    cpu = torch.device("cpu")
    step = GraphStep(model, data, optimizer, batch, cpu, capture=False) if use_graph_step else \
        EagerStep(model, data, optimizer, cpu)
    torch.manual_seed(1)  # the same shuffles and dropout draws for both loops
    stats = [train_one_epoch(model, data, step, batch, lam, cpu) for lam in (0.9, 0.5)[:epochs]]
    return model, stats


@pytest.mark.parametrize("mutual", [False, True])
@pytest.mark.heavy
def test_static_buffer_step_trains_exactly_like_the_eager_loop(mutual):
    data = small_data()
    assert len(data.train_target) % 64 != 0  # a last partial batch goes through the eager path
    plain, plain_stats = train_epochs(False, data, mutual=mutual)
    static, static_stats = train_epochs(True, data, mutual=mutual)
    for (name, a), b in zip(plain.state_dict().items(), static.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    for a, b in zip(plain_stats, static_stats):
        assert a.keys() == b.keys() and a["steps"] == b["steps"] and a["samples"] == b["samples"]
        for key in a:
            if key != "train_seconds":
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert "alpha/ll-fl" in static_stats[0] and static_stats[1]["wcl"] > 0


def test_tensor_lambda_gives_the_float_lambda_loss():
    data = small_data()
    model = small_flame(data.num_items, dropout=0.0)
    batch = {"seq": data.train_seq[:32], "target": data.train_target[:32]}
    as_float = model.loss_terms({**batch, "lam": 0.37})
    as_tensor = model.loss_terms({**batch, "lam": torch.tensor(0.37)})
    assert as_float.keys() == as_tensor.keys()
    for key in as_float:
        assert torch.allclose(as_float[key], as_tensor[key], rtol=1e-6), key
    assert as_float["loss"] > as_float["rec"]  # λ·L_wcl was added


def test_graph_options_are_refused_where_a_capture_cannot_work():
    tc = SimpleNamespace(cuda_graph=True, compile=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_graph_options(tc, FlameConfig(), torch.device("cpu"))
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="exclude each other"):
        check_graph_options(SimpleNamespace(cuda_graph=True, compile=True), None, cuda)
    with pytest.raises(ValueError, match="num_paths=0"):
        check_graph_options(tc, FlameConfig(split="per_block", num_paths=3), cuda)
    check_graph_options(tc, FlameConfig(), cuda)  # the reference setting passes
    check_graph_options(SimpleNamespace(cuda_graph=False, compile=True), FlameConfig(num_paths=3), torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one eager warm-up"):
        GraphStep(torch.nn.Linear(1, 1), None, None, 4, torch.device("cpu"), capture=True, warmup=0)


def test_cuda_graph_on_cpu_is_a_one_line_error_before_any_run_folder(tmp_path):
    with pytest.raises(ValueError, match="train.cuda_graph=true needs a CUDA device") as err:
        main(["--config", SMOKE, "train.cuda_graph=true", "train.device=cpu", f"run_root={tmp_path}",
              "flame.frozen_source=own"])
    assert "\n" not in str(err.value)
    assert not any(tmp_path.rglob("config.yaml"))  # refused before stage 1 or the run folder


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_step_matches_eager_on_gpu():
    """Without dropout the replayed graph must train like the eager loop (float tolerance), and the
    captured loss statistics must equal the eager ones."""
    device = torch.device("cuda")
    data = small_data(users=400)
    data.train_seq, data.train_target = data.train_seq.to(device), data.train_target.to(device)
    runs = []
    for graph_on in (False, True):
        model = small_flame(data.num_items, dropout=0.0).to(device)
        optimizer = make_optimizer(model, SimpleNamespace(lr=1e-3, cuda_graph=True))
        step = GraphStep(model, data, optimizer, 64, device) if graph_on else EagerStep(model, data, optimizer, device)
        torch.manual_seed(1)
        stats = [train_one_epoch(model, data, step, 64, lam, device) for lam in (0.9, 0.5, 0.2)]
        runs.append((model, stats))
    (eager, eager_stats), (graphed, graph_stats) = runs
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    for a, b in zip(eager_stats, graph_stats):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["steps"] == b["steps"]


@pytest.mark.parametrize("mutual", [False, True])
@pytest.mark.heavy
def test_loss_with_tensor_lambda_has_no_host_reads(mutual):
    """What a CUDA-graph capture forbids in the forward (.item(), float(tensor), `if tensor`) would be
    a graph break here: Dynamo with fullgraph=True must trace FLAME's loss in one piece."""
    data = small_data()
    model = small_flame(data.num_items, mutual=mutual).train()
    batch = {"seq": data.train_seq[:32], "target": data.train_target[:32], "lam": torch.tensor(0.5)}
    torch._dynamo.reset()
    traced = torch.compile(model.loss_terms, fullgraph=True, backend="eager")
    terms = traced(batch)
    assert torch.isfinite(terms["loss"]) and "wcl" in terms
    with pytest.raises(Exception, match="data-dependent"):  # teeth: float() of the tensor λ is a host read
        torch._dynamo.reset()
        torch.compile(lambda b: model.loss_terms({**b, "lam": float(b["lam"])}), fullgraph=True,
                      backend="eager")(batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_run_end_to_end_and_resume_on_gpu(tmp_path):
    """The smoke config with train.cuda_graph=true: stage 1 and FLAME train through captured steps,
    and a run resumed from last.pt (a fresh capture after the optimizer state is loaded) finishes."""
    common = ["--config", SMOKE, "train.cuda_graph=true", "train.device=cuda", f"run_root={tmp_path}"]
    out = main(common + ["train.max_epochs=3", "--run-dir", str(tmp_path / "g")])
    assert out["config"]["train"]["cuda_graph"] is True and out["test"]["reference"]["NDCG@20"] > 0
    main(common + ["train.max_epochs=2", "--run-dir", str(tmp_path / "part")])
    resumed = main(["--resume", str(tmp_path / "part"), "train.max_epochs=3"])
    assert resumed["test"]["reference"]["NDCG@20"] > 0


@pytest.mark.parametrize("lambda0, lam, wcl", [(1.0, 0.0, True), (0.0, 0.0, False), (0.0, 0.5, False)])
def test_graph_step_skips_the_paths_by_lambda0_not_by_its_tensor_lambda(lambda0, lam, wcl):
    """The captured step never reads its device λ: it passes skip_paths = (λ0 == 0) to loss_terms, so λ(e)
    reaching 0 under λ0 > 0 (lambdaR = 0) still runs the paths, and λ0 = 0 skips them whatever λ is."""
    data = small_data()
    torch.manual_seed(0)
    backbone = BackboneConfig(d=16, dropout=0.0)
    model = FLAME(SASRec(backbone, data.num_items, 10), SASRec(backbone, data.num_items, 10),
                  FlameConfig(lambda0=lambda0))
    optimizer = make_optimizer(model, SimpleNamespace(lr=1e-2, cuda_graph=False))
    step = GraphStep(model, data, optimizer, 32, torch.device("cpu"), capture=False)
    step(torch.arange(32), torch.tensor(lam))
    assert ("wcl" in step.keys) == wcl
    step(torch.arange(5), lam)  # an eager partial batch decides from its float λ, as model.loss_terms does
    assert any(("wcl" in keys) == (lam != 0.0) for keys in step.partial)


def test_loss_terms_skips_the_paths_as_its_caller_says():
    data = small_data()
    model = small_flame(data.num_items, dropout=0.0)
    batch = {"seq": data.train_seq[:32], "target": data.train_target[:32]}
    assert "wcl" not in model.loss_terms({**batch, "lam": 0.0})  # a float 0: nothing to add
    kept = model.loss_terms({**batch, "lam": torch.tensor(0.0)})  # a tensor λ is not read on the host
    assert "wcl" in kept and torch.equal(kept["loss"], kept["rec"])  # λ·L_wcl with λ = 0 adds exactly 0
    skipped = model.loss_terms({**batch, "lam": torch.tensor(0.5)}, skip_paths=True)
    assert "wcl" not in skipped and torch.equal(skipped["loss"], kept["rec"])
    forced = model.loss_terms({**batch, "lam": 0.0}, skip_paths=False)
    assert "wcl" in forced and torch.equal(forced["wcl"], kept["wcl"])
