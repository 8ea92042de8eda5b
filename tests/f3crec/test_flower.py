"""F3CRec on Flower (method.md §14), in-process grid: the Flower simulator equals a local run of its nodes'
simulator after every round (bit for bit with one node, to rounding with several) and the reference simulator's
run record for record in float64, federated evaluation equals the centralised oracle, the server side reaches no
client data, the fault rule, and resume at block boundaries."""
import ast
import gc
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from common.checkpoints import from_bytes, to_bytes  # noqa: E402
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
from f3crec.client_state import ClientStates  # noqa: E402
from f3crec.sim_reference import Client  # noqa: E402
from f3crec.arrays import numpy  # noqa: E402
from f3crec.train import end_block, grow, make_simulator, round_context, simulator_kind  # noqa: E402
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


def _factory(cfg, flags, name, nodes=3, blocks=None, node_simulator="auto"):
    fed = replace(cfg.federation, simulator=name, nodes=nodes, node_simulator=node_simulator)
    return lambda items, private: make_simulator(replace(cfg, federation=fed), flags, items, private, blocks)


def node_states(sim: FlowerSimulator) -> dict[str, np.ndarray]:
    """Test oracle only: every user's Φ, ŷ, Tᵘ and has_topn read from the nodes' Context.state, by user id; each
    user is hosted by exactly one node."""
    rows: dict[str, dict[int, np.ndarray]] = {}
    hosted = []
    for context in sim.grid.contexts.values():
        if "f3crec.state" in context.state:
            state = from_bytes(context.state["f3crec.state"]["bytes"])
            clients = state["clients"]
            parts = {**{f"private.{k}": v for k, v in clients["private"].items()},
                     **{k: clients[k] for k in ("topn", "yhat", "has_topn")}}
            hosted += state["hosted"].tolist()
            for name, value in parts.items():   # a node saves its own users' rows only, in `hosted` order
                rows.setdefault(name, {}).update({u: value[j] for j, u in enumerate(state["hosted"].tolist())})
    assert sorted(hosted) == list(range(len(hosted)))
    return {name: np.stack([by_user[u] for u in sorted(by_user)]) for name, by_user in rows.items()}


def _same(a, b, exact: bool) -> bool:
    a, b = numpy(a), numpy(b)
    if exact:
        return a.shape == b.shape and np.array_equal(a, b)
    return a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-12 * (1 + np.abs(b).max(initial=0)))


@pytest.mark.parametrize("overrides,late,nodes,node_simulator", [
    ([], True, 3, "auto"),                                        # FedMF F3CRec (ARM + ITM), users join later
    ([], True, 1, "auto"),                                        # one node: the compiled simulator bit for bit
    (["backbone.name=pfedrec", "backbone.lr=0.02"], False, 3, "auto"),   # two sub-steps, round-0 reset
    (["method.name=ewc"], False, 3, "auto"),                      # Fisher at the block end
    (["method.name=ewc"], False, 2, "vectorised"),                # nodes on the vectorised simulator
    (["backbone.name=fedncf", "backbone.lr=0.02", "method.name=emb_reg"], False, 3, "auto"),
    (["method.name=topn_kd", "federation.ldp_scale=0.01", "quirks.target_scores=matched"], True, 3, "auto"),
    (["method.name=topn_kd", "federation.ldp_scale=0.01", "quirks.target_scores=matched"], True, 1, "vectorised"),
])
@pytest.mark.heavy
def test_flower_equals_its_node_simulator_after_every_round(overrides, late, nodes, node_simulator, tmp_path):
    """Every round and block end of the Flower path equals a local run of the simulator its nodes run (compiled
    for auto): bit for bit with one node; with several, the server adds the nodes' partial sums in another order
    than one process, so tables and states agree to 1e-12 in float64 and every metric, ranking and D_u exactly."""
    cfg, flags, blocks = _setup(overrides, tmp_path, late)
    kind = simulator_kind(cfg, flags, node_simulator)
    assert kind == ("compiled" if node_simulator == "auto" else node_simulator)
    exact = nodes == 1
    factory = {"local": _factory(cfg, flags, kind, blocks=blocks), "flower": _factory(cfg, flags, "flower", nodes, None,
                                                                                       node_simulator)}
    sims = dict.fromkeys(factory)
    saw_memory = False
    for t in range(3):
        for name in sims:
            sims[name] = grow(sims[name], factory[name], cfg, blocks, t, cfg.train.seed)
        local, fl = sims["local"], sims["flower"]
        for r in range(3):
            ctx = round_context(cfg, flags, blocks, t, r)
            stats_local, stats_fl = local.train_round(None, ctx), fl.train_round(None, ctx)
            if exact:
                assert stats_fl == stats_local                            # D_u, m_u (step-major), ITM weight
            else:                                                         # node by node: the same D_u, m_u
                assert sorted(zip(stats_fl["D"], stats_fl["m"])) == sorted(zip(stats_local["D"], stats_local["m"]))
            saw_memory |= any(0 < m < 30 for m in stats_local["m"])
            assert _same(fl.server.items, local.server.items, exact)
            states = node_states(fl)
            for k, v in local.private_matrix().items():
                assert _same(states[f"private.{k}"], v, exact)
            assert fl.validate(ctx, None) == local.validate(ctx, None)   # federated = centralised
            for sim in sims.values():
                sim.save_slot("best")
        for sim in sims.values():
            sim.save_slot("last")
            sim.load_slot("best")
        assert fl.test_row(t, flags["old_block_mask"], None) == local.test_row(t, flags["old_block_mask"], None)
        for sim in sims.values():
            end_block(sim, cfg, blocks, t, flags)
        a, states = local.states(), node_states(fl)
        assert _same(fl.server.items, local.server.items, exact) and _same(fl.server.previous, local.server.previous, exact)
        assert np.array_equal(states["has_topn"], numpy(a.has_topn))
        assert np.array_equal(states["topn"], numpy(a.topn)) and _same(states["yhat"], a.yhat, exact)
    if flags["arm"] == "adaptive":
        assert saw_memory                                                 # 0 < m_u < N occurred


@pytest.mark.heavy
def test_flower_run_equals_reference_run(tmp_path):
    """main on the smoke stream, three nodes on the compiled simulator against the per-client reference
    simulator in float64: a-matrix, LA/RA/H, every round record (seconds aside) are the same (ITM's mean weight, a
    mean of floats, to 1e-12)."""
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
    itm = {name: [r.pop("itm_w", 0.0) for r in rs] for name, rs in records.items()}   # a mean of floats: to rounding
    assert records["flower"] == records["reference"]
    assert np.allclose(itm["flower"], itm["reference"], rtol=0, atol=1e-12) and any(itm["reference"])


def test_a_node_state_loads_only_into_the_same_node_simulator(tmp_path):
    """A node's saved state (numpy checkpoint bytes, its own users' rows only) restores them exactly on a node of the
    same simulator; a node running the other simulator refuses it in one line naming federation.node_simulator."""
    cfg = load_config(Config, SMOKE, ["federation.simulator=flower", "federation.nodes=2"])
    node = Node(cfg, 1, 2)
    users = np.array([1, 3, 5])
    node.grow(users, {"p": np.arange(3 * cfg.backbone.dim, dtype=np.float32).reshape(3, -1)})
    saved = to_bytes(node.state())
    assert from_bytes(saved)["clients"]["private"]["p"].shape[0] == 3     # sized by its users, not by user ids
    again = Node(cfg, 1, 2)
    again.load_state(from_bytes(saved))
    assert again.kind == "compiled" and again.sim.hosted.tolist() == [1, 3, 5]
    assert np.array_equal(again.sim.state.private["p"], node.sim.state.private["p"])
    assert not again.sim.state.private["p"][[0, 2, 4]].any()          # rows of the other node's users: zero
    with pytest.raises(ValueError, match="another node's users|not new users"):
        again.grow(np.array([2]), {"p": np.zeros((1, cfg.backbone.dim), np.float32)})
    other = Node(load_config(Config, SMOKE, ["federation.simulator=flower", "federation.nodes=2",
                                             "federation.node_simulator=vectorised"]), 1, 2)
    with pytest.raises(ValueError, match="federation.node_simulator"):
        other.load_state(from_bytes(saved))


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
    through: no client, node, client state, Context, and no array but the server's own tables (so no
    interaction, private parameter, score or upload kept); replies carry a node's summed upload, exact sums,
    D/m and counts only; simulator.py imports nothing from the client side."""
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
    server = sim.server       # the server's own tables (numpy: its nodes run the compiled simulator) may be reached
    tables = {id(x) for x in (server.items, server.previous, *server.slots.values()) if x is not None}
    grid = sim.grid
    seen, frontier = set(), [sim]
    while frontier:
        obj = frontier.pop()
        if id(obj) in seen or obj is grid or isinstance(obj, type) or type(obj).__name__ in ("module", "function", "method"):
            continue
        seen.add(id(obj))
        assert id(obj) not in client_tensors
        assert not isinstance(obj, (Client, Node, ClientStates, flwr.app.Context)), type(obj).__name__
        assert not isinstance(obj, (np.ndarray, torch.Tensor)) or id(obj) in tables, (type(obj).__name__, obj.shape)
        frontier.extend(gc.get_referents(obj))
    assert len(received) >= 4 * len(sim.nodes)                             # every message's reply was seen
    for reply in received:
        tensors, config = wire.unpack(reply.content)
        assert set(tensors) <= {"rows", "values"}, sorted(tensors)         # a node's summed upload only
        if tensors:
            assert tensors["values"].shape == (tensors["rows"].size, cfg.backbone.dim)
        assert set(config) <= {"users", "clients", "D", "m", "sums", "row", "partition", "num_partitions", "n_users",
                               "n_items", "participants", "blocks_id"}, sorted(config)
    tree = ast.parse((FLOWER / "simulator.py").read_text())
    imported = {(node.level, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m for _, m in imported} <= {"__future__", "uuid", "flwr.app", "arrays", "evaluate", None}, imported


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
