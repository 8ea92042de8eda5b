"""The batched table program (flame/stack.py, flame/table.py; docs/method.md §10.2): run k of a K-stack equals the
same run alone, the K = 1 program equals the plain trainer, seeds x methods in one program write run folders
with a plain run's contract, and --resume finishes every unfinished run as if never stopped."""
import json
from pathlib import Path

import pytest
import torch

from common.runs import read_metrics
from flame import compare, table
from flame.config import BackboneConfig, FlameConfig
from flame.ensemble import FLAME
from flame.main import main as plain_main
from flame.model import SASRec
from flame.stack import StackedFLAME, StackedSASRec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "flame" / "configs" / "smoke.yaml")
L, ITEMS = 8, 30


def nets(seed, dropout, kernels="fast"):
    torch.manual_seed(seed)
    cfg = BackboneConfig(d=16, heads=2, blocks=2, dropout=dropout, kernels=kernels)
    return SASRec(cfg, ITEMS, L), SASRec(cfg, ITEMS, L)


def train_stack(stack, seeds, steps=3):
    """A few Adam steps; run k draws its batches and dropout from its own generator (seed k)."""
    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]
    data = [torch.Generator().manual_seed(s) for s in seeds]
    opt = torch.optim.Adam([p for p in stack.parameters() if p.requires_grad], lr=1e-2)
    stack.train()
    for _ in range(steps):
        seq = torch.stack([torch.randint(0, ITEMS + 1, (12, L), generator=g) for g in data])
        target = torch.stack([torch.randint(1, ITEMS + 1, (12,), generator=g) for g in data])
        lam = torch.tensor([0.9 - 0.1 * s for s in seeds])
        opt.zero_grad(set_to_none=True)
        terms = stack.loss_terms({"seq": seq, "target": target, "lam": lam}, gens)
        terms["loss"].sum().backward()
        opt.step()
    return terms


@pytest.mark.parametrize("method", ["sasrec", "flame"])
def test_run_k_of_a_stack_equals_the_run_alone_bit_for_bit(method):
    """Dropout 0.5 (fast masks from each run's generator), Adam: the stacked runs and each run alone give
    identical parameters and loss terms (torch.equal), so nothing leaks between the runs of a stack."""
    seeds = [1, 2, 3]

    def build(run_seeds):
        if method == "sasrec":
            return StackedSASRec.from_nets([nets(s, 0.5)[0] for s in run_seeds])
        return StackedFLAME.from_models([FLAME(*nets(s, 0.5), FlameConfig()) for s in run_seeds])

    stacked = build(seeds)
    terms = train_stack(stacked, seeds)
    for k, seed in enumerate(seeds):
        alone = build([seed])
        alone_terms = train_stack(alone, [seed])
        for key in terms:
            assert torch.equal(terms[key][k], alone_terms[key][0]), key
        a, b = stacked.run_state(k), alone.run_state(0)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    moved = stacked.run_state(0)["item_emb.weight" if method == "sasrec" else "learnable.item_emb.weight"]
    first = build(seeds).run_state(0)["item_emb.weight" if method == "sasrec" else "learnable.item_emb.weight"]
    assert not torch.equal(moved[1:], first[1:]) and torch.equal(moved[0], first[0])  # padding row untouched


def test_stack_without_a_run_keeps_the_others_exactly():
    """select(): dropping a stopped run leaves the other runs' parameters as they were."""
    stacked = StackedSASRec.from_nets([nets(s, 0.0)[0] for s in (1, 2, 3)])
    kept = stacked.select([0, 2])
    for new, old in ((0, 0), (1, 2)):
        for name, value in kept.run_state(new).items():
            assert torch.equal(value, stacked.run_state(old)[name])


def records(run_dir):
    return read_metrics(run_dir)


def close(a, b, tol):
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("dropout", ["0.0", "0.2"])
def test_k1_program_equals_the_plain_trainer(tmp_path, dropout):
    """SASRec then FLAME (freezing that SASRec), one seed: the batched program's metrics.jsonl equals plain
    flame.main runs of the same configs to 1e-5 (the data order and the dropout keys follow the same
    stream; only the float rounding of batched matmuls and the LayerNorm affine differ)."""
    over = ["train.max_epochs=2", "data.synthetic_users=80", f"backbone.dropout={dropout}"]
    out = tmp_path / "table"
    table.main(["--configs", SMOKE, "--seeds", "5", "--out", str(out), "--no-pairs", *over])
    sasrec_dir = out / "synthetic" / "sasrec_seed5"
    plain_main(["--config", SMOKE, *over, "method.name=sasrec", "train.seed=5", "--run-dir", str(tmp_path / "s")])
    plain_main(["--config", SMOKE, *over, "method.name=flame", "train.seed=5", f"flame.frozen={sasrec_dir / 'frozen.pt'}",
                f"train.sasrec_run={sasrec_dir}", "--run-dir", str(tmp_path / "f")])
    for batched, plain in ((sasrec_dir, tmp_path / "s"), (out / "synthetic" / "flame_seed5", tmp_path / "f")):
        got, want = records(batched), records(plain)
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            assert set(w) <= set(g)
            for key, value in w.items():
                if "seconds" not in key:
                    assert close(g[key], value, 1e-5), (batched.name, key, g[key], value)
        rb, rp = (json.loads((d / "results.json").read_text()) for d in (batched, plain))
        for mask in ("reference", "neg_inf"):
            for metric, value in rp["test"][mask].items():
                assert close(rb["test"][mask][metric], value, 1e-5)
        assert set(rb) == set(rp) and rb["config"] == rp["config"]  # the same results.json contract


def test_seeds_and_methods_in_one_program_resume_and_tables(tmp_path, monkeypatch):
    """Two seeds x {SASRec, FLAME} + B2: every run folder has a plain run's files; the tables are written and
    flame.compare --runs reads the folders; a program stopped after a few epochs and resumed gives the
    uninterrupted program's records (each run's own generator is restored from its last.pt)."""
    over = ["train.max_epochs=3", "data.synthetic_users=80"]
    whole = tmp_path / "whole"
    results = table.main(["--configs", SMOKE, "--seeds", "1", "2", "--out", str(whole), *over])
    folder = whole / "synthetic"
    for method in ("sasrec", "flame"):
        for seed in (1, 2):
            run = folder / f"{method}_seed{seed}"
            names = {p.name for p in run.iterdir()}
            assert {"config.yaml", "metrics.jsonl", "results.json", "best.pt", "last.pt", "log.txt"} <= names
            assert ("frozen.pt" in names) == (method == "sasrec")
            assert len(records(run)) == 3 and records(run)[0]["train/stacked_runs"] == 2
    assert [r["seed"] for r in results["synthetic"]["ensemble"]] == [1]  # one pair from two seeds
    text = (whole / "table.md").read_text()
    assert "| synthetic | FLAME |" in text and "| synthetic | B2, 2 SASRecs |" in text
    assert "rel. test NDCG@20 gain" in text and (folder / "curves.png").is_file()
    grouped = compare.from_runs([folder / f"{m}_seed{s}" for m in ("sasrec", "flame") for s in (1, 2)])
    assert [r["seed"] for r in grouped["flame"]] == [1, 2] and "speedup_epochs" in str(grouped["flame"][0]) or \
        grouped["flame"][0]["convergence"]["epochs_to_sasrec_best"] in ("not reached", 1, 2, 3)

    calls = {"n": 0}
    real_epoch = table.Stack.epoch

    def stop_after_four(self):
        calls["n"] += 1
        if calls["n"] > 4:  # SASRec's 3 epochs, then FLAME's first
            raise KeyboardInterrupt
        real_epoch(self)

    cut = tmp_path / "cut"
    monkeypatch.setattr(table.Stack, "epoch", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        table.main(["--configs", SMOKE, "--seeds", "1", "2", "--out", str(cut), *over])
    monkeypatch.setattr(table.Stack, "epoch", real_epoch)
    assert not (cut / "synthetic" / "flame_seed1" / "results.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        table.main(["--configs", SMOKE, "--seeds", "1", "2", "--out", str(cut), *over])
    table.main(["--configs", SMOKE, "--seeds", "1", "2", "--out", str(cut), "--resume", *over])
    for method in ("sasrec", "flame"):
        for seed in (1, 2):
            got, want = (records(base / "synthetic" / f"{method}_seed{seed}") for base in (cut, whole))
            strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
            assert strip(got) == strip(want)


def test_static_buffer_step_trains_a_stack_like_the_eager_stacked_loop():
    """fast.GraphStep(runs=K), the step the table captures as one CUDA graph on a GPU, run eagerly on the CPU
    through its static (K, B) index and per-run λ buffers: the same parameters as the plain stacked loop."""
    from types import SimpleNamespace

    from flame.fast import GraphStep

    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(train_seq=torch.randint(0, ITEMS + 1, (40, L), generator=g),
                           train_target=torch.randint(1, ITEMS + 1, (40,), generator=g))
    index = torch.stack([torch.randperm(40, generator=g) for _ in range(3)])
    lam = torch.tensor([0.9, 0.5, 0.2])
    out = []
    for use_step in (True, False):
        stack = StackedFLAME.from_models([FLAME(*nets(s, 0.0), FlameConfig()) for s in (1, 2, 3)]).train()
        opt = torch.optim.Adam([p for p in stack.parameters() if p.requires_grad], lr=1e-2)
        step = GraphStep(stack, data, opt, 16, torch.device("cpu"), capture=False, runs=3)
        for first in range(0, 40, 16):  # two full batches and a partial one
            part = index[:, first: first + 16]
            if use_step:
                step(part, lam)
                continue
            opt.zero_grad(set_to_none=True)
            terms = stack.loss_terms({"seq": data.train_seq[part], "target": data.train_target[part], "lam": lam})
            terms["loss"].sum().backward()
            opt.step()
        out.append(stack)
        if use_step:
            stats = step.accumulated()
            assert [n for _, _, n in stats] == [2, 1] and stats[0][1].shape == (len(stats[0][0]), 3)
    for k in range(3):
        a, b = out[0].run_state(k), out[1].run_state(k)
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_make_flame_table_smoke(tmp_path):
    """`make flame-table SMOKE=1` runs the smoke-sized table end to end on the CPU (what CI runs)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "t"
    done = subprocess.run(["make", "-s", "flame-table", "SMOKE=1", f"OUT={out}", "SEEDS=1 2", f"PY={sys.executable}",
                           "STAMP=", "ARGS=train.max_epochs=2 data.synthetic_users=60"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| synthetic | FLAME |" in (out / "table.md").read_text()
    assert json.loads((out / "synthetic" / "flame_seed2" / "results.json").read_text())["method"] == "flame"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_table_under_the_cuda_graph_on_gpu(tmp_path):
    """The smoke table with the stacked step captured as one CUDA graph (runs leave the stack and the graph is
    recaptured), and the captured stacked step trains like the eager stacked loop at dropout 0."""
    from types import SimpleNamespace

    from flame.fast import GraphStep

    out = tmp_path / "t"
    table.main(["--configs", SMOKE, "--seeds", "1", "2", "--out", str(out), "train.cuda_graph=true",
                "train.device=cuda", "train.max_epochs=4", "train.patience=1"])
    for method in ("sasrec", "flame"):
        for seed in (1, 2):
            assert (out / "synthetic" / f"{method}_seed{seed}" / "results.json").is_file()
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(train_seq=torch.randint(0, ITEMS + 1, (300, L), generator=g).to(device),
                           train_target=torch.randint(1, ITEMS + 1, (300,), generator=g).to(device))
    lam = torch.tensor([0.9, 0.5], device=device)
    index = torch.stack([torch.randperm(300, generator=g) for _ in range(2)]).to(device)  # the same batches for both
    nets_out = []
    for graph_on in (False, True):
        stack = StackedFLAME.from_models([FLAME(*nets(s, 0.0), FlameConfig()) for s in (1, 2)]).to(device).train()
        opt = torch.optim.Adam([p for p in stack.parameters() if p.requires_grad], lr=1e-3, capturable=True)
        step = GraphStep(stack, data, opt, 32, device, capture=graph_on, runs=2)
        for first in range(0, 300, 32):
            step(index[:, first: first + 32], lam)
        nets_out.append(stack)
    for k in range(2):
        a, b = nets_out[0].run_state(k), nets_out[1].run_state(k)
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
