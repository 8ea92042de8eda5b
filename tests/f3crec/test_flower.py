"""F3CRec on Flower (method.md §14), in-process grid: the Flower simulator equals the reference simulator
exactly after every round (and the vectorised one to 1e-10), federated evaluation equals the centralised
oracle, the server side reaches no client data, the fault rule, and resume at block boundaries."""
import ast
import gc
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from common.config import load_config  # noqa: E402
from f3crec.config import Config, resolve  # noqa: E402
from f3crec.data import get_blocks  # noqa: E402
import f3crec.evaluate as ev  # noqa: E402
from f3crec.evaluate import (eval_masks, evaluate, finish, merge_sums, metric_sums, oracle_scores,  # noqa: E402
                             user_scores)
from f3crec.flower import client_app, wire  # noqa: E402
from f3crec.flower.launch import local_grid, using_grid  # noqa: E402
from f3crec.flower.node import Node  # noqa: E402
from f3crec.flower.simulator import FlowerSimulator  # noqa: E402
from f3crec.model import BACKBONES  # noqa: E402
from f3crec.round import PlanMaker, plan_inputs  # noqa: E402
from f3crec.sim_reference import Client  # noqa: E402
from f3crec.train import end_block, grow, make_simulator, round_context  # noqa: E402
from conftest import late_joiner_blocks  # noqa: E402

FLOWER = Path(__file__).resolve().parents[2] / "f3crec" / "flower"
SMOKE = FLOWER.parent / "configs" / "smoke.yaml"


def _setup(overrides, tmp_path, late=False):
    data = [f"data.blocks={late_joiner_blocks(tmp_path / 'late')}"] if late else []
    cfg = load_config(Config, SMOKE, ["backbone.dtype=float64", "federation.batch_size=16", "method.kd_weight=1.0",
                                      "method.eps=0.02", "quirks.metric_decimals=-1", *data, *overrides])
    cfg, flags = resolve(cfg)
    blocks, _ = get_blocks(cfg.data, cfg.train.seed)
    return cfg, flags, blocks


def _factory(cfg, flags, name, nodes=3):
    fed = replace(cfg.federation, simulator=name, nodes=nodes)
    return lambda items, private: make_simulator(replace(cfg, federation=fed), flags, items, private)


def node_states(sim: FlowerSimulator) -> dict[str, torch.Tensor]:
    """Test oracle only: every user's Φ, ŷ and Tᵘ read from the nodes' Context.state, stacked by user."""
    clients = {}
    for context in sim.grid.contexts.values():
        if "f3crec.state" in context.state:
            clients.update(wire.load(context.state["f3crec.state"]["torch"])["clients"])
    users = sorted(clients)
    assert users == list(range(len(users)))
    out = {f"private.{k}": torch.stack([clients[u]["private"][k] for u in users]) for k in clients[0]["private"]}
    out["has_topn"] = torch.tensor([clients[u]["topn"] is not None for u in users])
    width = max([clients[u]["topn"].numel() for u in users if clients[u]["topn"] is not None], default=0)
    out["topn"] = torch.stack([clients[u]["topn"] if clients[u]["topn"] is not None
                               else torch.zeros(width, dtype=torch.int64) for u in users])
    yhat = [clients[u]["yhat"] for u in users]
    width = max([y.shape[0] for y in yhat if y is not None], default=0)
    dtype = out[next(iter(out))].dtype
    out["yhat"] = torch.stack([torch.nn.functional.pad(y, (0, width - y.shape[0])) if y is not None
                               else torch.zeros(width, dtype=dtype) for y in yhat])
    return out


@pytest.mark.parametrize("overrides,late", [
    ([], True),                                                   # FedMF F3CRec (ARM + ITM), users join later
    (["backbone.name=pfedrec", "backbone.lr=0.02"], False),      # two sub-steps, round-0 reset
    (["method.name=ewc"], False),                                 # Fisher at the block end
    (["backbone.name=fedncf", "backbone.lr=0.02", "method.name=emb_reg"], False),
    (["method.name=topn_kd", "federation.ldp_scale=0.01", "quirks.target_scores=matched"], True),
])
@pytest.mark.heavy
def test_flower_equals_reference_exactly_after_every_round(overrides, late, tmp_path):
    cfg, flags, blocks = _setup(overrides, tmp_path, late)
    net = BACKBONES[cfg.backbone.name]
    names = ("reference", "vectorised", "flower")
    factory = {name: _factory(cfg, flags, name) for name in names}
    sims = dict.fromkeys(names)
    saw_memory = False
    for t in range(3):
        for name in names:
            sims[name] = grow(sims[name], factory[name], cfg, blocks, t, cfg.train.seed)
        ref, vec, fl = sims["reference"], sims["vectorised"], sims["flower"]
        valid = sorted(blocks[t].valid)
        masks = eval_masks(valid, blocks[t].valid, [blocks[t].train], blocks[t].n_items)
        maker = None
        for r in range(3):
            ctx = round_context(cfg, flags, blocks, t, r)
            if maker is None:   # as train.run_block builds it for every user
                positives, excluded = plan_inputs(dict(blocks[t].train), ref.topn_lists() if flags["replay"] else {}, ctx)
                maker = PlanMaker(positives, excluded, blocks[t].n_items, cfg.federation.num_neg,
                                  cfg.federation.batch_size, cfg.method.topn, len(net.substeps))
            plan = maker.draw(cfg.train.seed, t, r)
            stats_ref, stats_vec, stats_fl = ref.train_round(plan, ctx), vec.train_round(plan, ctx), fl.train_round(None, ctx)
            assert stats_fl == stats_ref                                 # D_u, m_u (in user order), ITM weight
            saw_memory |= any(0 < m < 30 for m in stats_ref["m"])
            assert torch.equal(fl.server.items, ref.server.items)
            assert torch.allclose(fl.server.items, vec.server.items, rtol=0, atol=1e-10 * (1 + ref.server.items.abs().max()))
            states = node_states(fl)
            for k, v in ref.private_matrix().items():
                assert torch.equal(states[f"private.{k}"], v)
                assert torch.allclose(states[f"private.{k}"], vec.private_matrix()[k], rtol=0, atol=1e-10 * (1 + v.abs().max()))
            central = evaluate(oracle_scores(ref, torch.tensor(valid), net), valid, blocks[t].valid, [blocks[t].train],
                               None, masks)
            assert fl.validate(ctx, None) == central                      # federated = centralised, exactly
            for sim in sims.values():
                sim.save_slot("best")
        for sim in sims.values():
            sim.save_slot("last")
            sim.load_slot("best")
        assert ev.test_row(fl, blocks, t, net, flags["old_block_mask"], None) == \
            ev.test_row(ref, blocks, t, net, flags["old_block_mask"], None)  # a_{t,i}
        for sim in sims.values():
            end_block(sim, cfg, blocks, t, flags)
        a, states = ref.states(), node_states(fl)
        assert torch.equal(fl.server.items, ref.server.items) and torch.equal(fl.server.previous, ref.server.previous)
        assert torch.equal(states["has_topn"], a.has_topn) and torch.equal(states["topn"][a.has_topn], a.topn[a.has_topn])
        assert torch.equal(states["yhat"][: a.yhat.shape[0], : a.yhat.shape[1]], a.yhat)
    if flags["arm"] == "adaptive":
        assert saw_memory                                                 # 0 < m_u < N occurred


@pytest.mark.heavy
def test_flower_run_equals_reference_run(tmp_path):
    """main on the smoke stream: a-matrix, LA/RA/H, every round record (seconds aside) are the same."""
    from f3crec.main import main
    out = {}
    for name in ("reference", "flower"):
        out[name] = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / name), f"federation.simulator={name}",
                          "backbone.dtype=float64", "federation.rounds=3", "method.kd_weight=1.0",
                          "quirks.metric_decimals=-1", "federation.nodes=3"])
    assert out["flower"]["summary"] == out["reference"]["summary"]
    assert [{k: v for k, v in b.items() if k != "seconds"} for b in out["flower"]["blocks"]] == \
        [{k: v for k, v in b.items() if k != "seconds"} for b in out["reference"]["blocks"]]
    records = {name: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                      for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in out}
    assert records["flower"] == records["reference"]


def test_federated_sums_equal_centralised_evaluation():
    """Any split of the users into nodes gives the centralised metrics bit for bit; a user's score row does
    not depend on who else is scored with it."""
    gen = torch.Generator().manual_seed(0)
    n_users, n_items = 150, 90
    private = {"p": torch.randn(n_users, 8, dtype=torch.float64, generator=gen)}
    items = torch.randn(n_items, 8, dtype=torch.float64, generator=gen)
    rng = np.random.default_rng(0)
    positives = {u: rng.choice(n_items, 1 + u % 4, replace=False) for u in range(n_users)}
    exclude = [{u: rng.choice(n_items, 5, replace=False) for u in range(n_users)}]
    exclude[0] = {u: np.setdiff1d(v, positives[u]) for u, v in exclude[0].items()}
    users = list(range(n_users))
    scores = user_scores(BACKBONES["fedmf"], private, items)
    central = evaluate(scores, users, positives, exclude, None)
    for parts in (2, 3, 7):
        shards = [users[p::parts] for p in range(parts)]
        sums = []
        for shard in shards:
            own = user_scores(BACKBONES["fedmf"], {"p": private["p"][shard]}, items)
            assert torch.equal(own, scores[shard])
            sums.append(metric_sums(own, shard, positives, exclude))
        assert finish(merge_sums(sums[::-1]), None) == central
    assert finish(merge_sums([metric_sums(scores, users, positives, exclude)]), 5) == evaluate(scores, users, positives,
                                                                                             exclude, 5)


@pytest.mark.heavy
def test_server_side_reaches_no_client_data(tmp_path):
    """Walk everything reachable from the FlowerSimulator, with the grid as the network it must not look
    through: no client, node, Context, interaction array, private tensor or score; replies carry uploads,
    exact sums, D/m and counts only; simulator.py imports nothing from the client side."""
    cfg, flags, blocks = _setup([], tmp_path)
    sim = grow(None, _factory(cfg, flags, "flower"), cfg, blocks, 0, cfg.train.seed)
    received = []
    pull = sim.grid.pull_messages
    sim.grid.pull_messages = lambda ids: received.extend(pull(ids)) or received[-len(ids):]
    ctx = round_context(cfg, flags, blocks, 0, 0)
    sim.train_round(None, ctx)
    sim.validate(ctx, None)
    sim.save_slot("best")
    sim.end_block(ctx)
    client_tensors = {id(v) for context in sim.grid.contexts.values() for v in context.state.values()}
    grid = sim.grid
    seen, frontier = set(), [sim]
    while frontier:
        obj = frontier.pop()
        if id(obj) in seen or obj is grid or isinstance(obj, type) or type(obj).__name__ in ("module", "function", "method"):
            continue
        seen.add(id(obj))
        assert id(obj) not in client_tensors
        assert not isinstance(obj, (Client, Node, flwr.app.Context, np.ndarray)), type(obj).__name__
        frontier.extend(gc.get_referents(obj))
    assert not any(isinstance(o, torch.Tensor) and o.dim() == 2 and o.shape[1] == cfg.backbone.dim and o.shape[0] != blocks[0].n_items
                   for o in (x for x in gc.get_referents(sim.__dict__)))   # no stacked per-user matrix is kept
    assert len(received) >= 4 * len(sim.nodes)                             # every message's reply was seen
    for reply in received:
        tensors, config = wire.unpack(reply.content)
        assert all(k.endswith((".rows", ".values")) for k in tensors), sorted(tensors)
        assert set(config) <= {"users", "stats", "sums", "row", "partition", "num_partitions", "n_users", "n_items",
                               "participants", "blocks_id"}, sorted(config)
        for user, values in config.get("stats", {}).items():
            assert set(values) == {"D", "m"}
    tree = ast.parse((FLOWER / "simulator.py").read_text())
    imported = {(node.level, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m for _, m in imported} <= {"__future__", "uuid", "flwr.app", "evaluate", None}, imported


def _faulty(fail_at: str, how: str):
    """A node that raises, or answers too late, on the train message of group `fail_at` ('block.round')."""
    import time

    def app(message, context):
        if message.metadata.message_type == "train" and message.metadata.group_id == fail_at:
            if how == "raise":
                raise RuntimeError("device lost power")
            time.sleep(6.0)   # far beyond reply_timeout, which a loaded machine's normal reply stays under
        return client_app.app(message, context)
    return app


ARGS = ["federation.simulator=flower", "backbone.dtype=float64", "federation.rounds=3", "quirks.metric_decimals=-1", "federation.nodes=3",
        "train.share_base=false"]


@pytest.mark.parametrize("how", ["raise", "timeout"])
def test_fault_rule_continues_above_the_fraction(how, tmp_path):
    from f3crec.main import main
    cfg = load_config(Config, SMOKE, ARGS + ["federation.min_reply_fraction=0.5", "federation.reply_timeout=3"])
    grid = local_grid(client_app.app, wire.config_to_json(cfg), 3, str(tmp_path / "nodes"), apps={1: _faulty("1.1", how)})
    with using_grid(grid):
        res = main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), *ARGS,
                    "federation.min_reply_fraction=0.5", "federation.reply_timeout=3"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lost = [r.get("lost_users", 0) for r in records]
    before = [r for r in records if (r["block"], r["round"]) < (1, 1)]
    assert all(r.get("lost_users") is None for r in before)
    assert all(v > 0 for v in lost[len(before):]) and len(res["summary"]["ndcg"]["a"]) == 4


@pytest.mark.heavy
def test_fault_rule_stops_below_the_fraction_and_resume_continues(tmp_path, user_error):
    """A node lost in block 1: one line, exit 2, the block-0 checkpoint intact; --resume with every node
    back gives the uninterrupted run's results."""
    from f3crec.main import main
    argv = ["--config", str(SMOKE), *ARGS, f"federation.node_state_dir={tmp_path / 'nodes'}"]
    cfg = load_config(Config, SMOKE, argv[2:])
    grid = local_grid(client_app.app, wire.config_to_json(cfg), 3, None, apps={2: _faulty("1.1", "raise")})
    with using_grid(grid):
        line = user_error(main, argv + ["--run-dir", str(tmp_path / "cut")])
    assert "min_reply_fraction" in line and "device lost power" in line and "--resume" in line, line
    assert not (tmp_path / "cut" / "results.json").exists() and (tmp_path / "cut" / "last.pt").is_file()
    resumed = main(["--resume", str(tmp_path / "cut")])
    full = main(argv + ["--run-dir", str(tmp_path / "full")])
    assert resumed["summary"] == full["summary"]


def test_a_config_error_inside_the_server_app_is_one_line(tmp_path, caplog):
    """A bad run config reaches the ServerApp (Flower hands it over unchecked): one logged line, the same line
    in the report for the launcher, exit status 2, no traceback."""
    from flwr.app import Context, RecordDict
    from f3crec.flower import server_app
    report = tmp_path / "report.json"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"overrides": "federation.rounds=x", "report": str(report), "run-dir": "", "resume": False})
    with caplog.at_level("ERROR", logger="f3crec.flower"), pytest.raises(SystemExit) as exit_:
        server_app.app(local_grid(client_app.app, "{}", 0), context)
    assert exit_.value.code == 2
    outcome = json.loads(report.read_text())
    assert not outcome["ok"] and "federation.rounds" in outcome["message"] and "\n" not in outcome["message"]
    assert [r.getMessage() for r in caplog.records] == [f"f3crec: {outcome['message']}"]
    assert not any(r.exc_info for r in caplog.records)


def test_a_resume_runs_the_saved_config_on_server_and_nodes(tmp_path):
    """resume=true: the ServerApp and every node read the run folder's config.yaml (not the default config);
    an override is refused in one line."""
    import yaml
    from common.config import ConfigError, config_to_dict
    saved = load_config(Config, SMOKE, ["federation.rounds=2", "train.seed=7"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(saved)))
    cfg = wire.config_from_run_config({"resume": True, "run-dir": str(tmp_path), "config": str(SMOKE)})
    assert (cfg.federation.rounds, cfg.train.seed, cfg.federation.simulator) == (2, 7, "flower")
    with pytest.raises(ConfigError, match="no overrides"):
        wire.config_from_run_config({"resume": True, "run-dir": str(tmp_path), "overrides": "train.seed=8"})


@pytest.mark.heavy
def test_a_stale_context_is_caught_up_from_the_node_local_journal(tmp_path):
    """Flower 1.40-1.42 push a ClientApp's context back at its process's exit, after its reply, so the next
    message may be handed the context from before the previous one. Here every message gets a fresh process (no
    live node) and exactly that stale context; the node catches up from its journal in `state-dir` and the run
    equals the in-process grid's, record for record."""
    from f3crec.main import run
    overrides = ["federation.simulator=flower", "federation.nodes=2", "federation.rounds=2", "train.stop_after_block=1"]
    cfg = load_config(Config, SMOKE, [*overrides, f"federation.node_state_dir={tmp_path / 'nodes-0'}"])
    previous, stale = {}, []

    def behind(message, context):
        client_app._LIVE.clear()
        now = dict(context.state.items())
        if context.node_id in previous:
            stale.append(dict(context.state.items()) != previous[context.node_id])
            for key in list(context.state.keys()):
                del context.state[key]
            for key, value in previous[context.node_id].items():
                context.state[key] = value
        previous[context.node_id] = now
        return client_app.app(message, context)

    with using_grid(local_grid(behind, wire.config_to_json(cfg), 2, str(tmp_path / "nodes-1"))):
        lagged = run(cfg, tmp_path / "lagged")
    assert any(stale)                                                   # contexts really were handed over stale
    assert lagged["summary"] == run(cfg, tmp_path / "grid")["summary"]
    records = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("lagged", "grid")]
    assert records[0] == records[1]
