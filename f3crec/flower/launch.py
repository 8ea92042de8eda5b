"""Wiring (§14): which grid a FlowerSimulator talks to. Inside a ServerApp (`server_app.py`, the simulation
runtime or a deployment) that is Flower's grid, set with `using_grid`; otherwise `federation.nodes` nodes
of `client_app.app` in this process (grid.py) — `federation.simulator=flower` in any command."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from ..server import Server
from .simulator import FlowerSimulator

_GRID: ContextVar = ContextVar("f3crec_flower_grid", default=None)


@contextmanager
def using_grid(grid):
    """Run train.fit against `grid` (a Flower Grid) instead of an in-process one."""
    token = _GRID.set(grid)
    try:
        yield grid
    finally:
        _GRID.reset(token)


def _grid(cfg):
    grid = _GRID.get()
    if grid is None:
        from . import client_app, wire
        from .grid import local_grid
        grid = local_grid(client_app.app, wire.config_to_json(cfg), cfg.federation.nodes,
                          cfg.federation.node_state_dir)
    return grid


def _simulator(cfg, flags: dict, items, run_key: str | None = None) -> FlowerSimulator:
    fed = cfg.federation
    return FlowerSimulator(Server(items, cfg.method.beta, itm=flags["itm"]), _grid(cfg), fed.min_reply_fraction,
                           fed.reply_timeout, run_key)


def make_flower_simulator(cfg, flags: dict, items, private) -> FlowerSimulator:
    """Block 0: the server with table `items`; each node creates its users with their rows of `private`."""
    sim = _simulator(cfg, flags, items)
    sim.grow(private)
    return sim


def load_flower_simulator(cfg, flags: dict, state: dict) -> FlowerSimulator:
    """--resume: the server's table from `state`, every node's users from the node's own checkpoint."""
    sim = _simulator(cfg, flags, state["server"]["items"], state["run_key"])
    sim.load_state_dict(state)
    return sim
