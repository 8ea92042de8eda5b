"""Which simulator a run uses and how a local one is built (§13): `simulator_kind` resolves
federation.simulator (or federation.node_simulator for a Flower node), `holds_tensors` says whether its arrays
are torch tensors, `local_simulator` builds a compiled, vectorised or reference simulator around a server. Used by
the block loop (train.py) and the Flower nodes (flower/node.py); imports neither, nor torch.
"""
from __future__ import annotations

from common.config import ConfigError
from common.utils import get_device

from .arrays import convert
from .client_state import ClientStates


def local_simulator(kind: str, cfg, flags: dict, server, items, private: dict, blocks: list | None = None):
    """A `kind` simulator (compiled, vectorised, reference) in this process around `server` (a Server, or what a
    Flower node holds of it), its table set to `items` and one client per row of `private`, all made the kind's
    arrays (numpy for the compiled one, else tensors on the run's device; the reference always on the CPU)."""
    if kind == "compiled":
        from .sim_compiled import CompiledSimulator as sim_class   # numba's import: only the runs that use it
    elif kind == "vectorised":
        from .sim_vectorised import VectorisedSimulator as sim_class
    else:
        from .sim_reference import ReferenceSimulator as sim_class
    server.items = as_kind(kind, cfg, items)
    sim = sim_class(server, ClientStates(as_kind(kind, cfg, private), cfg.method.topn))
    return sim.attach(cfg, flags, blocks) if blocks is not None else sim


def as_kind(kind: str, cfg, value):
    """Arrays (nested in dicts / lists) as a `kind` simulator holds them: numpy for the compiled one, else
    tensors on the run's device (the per-client reference, the readable ground truth, always on the CPU)."""
    if kind == "compiled":
        return convert(value, False)
    return convert(value, True, get_device(cfg.train.device) if kind == "vectorised" else "cpu")


def holds_tensors(cfg, flags: dict) -> bool:
    """Whether the run's simulator keeps torch tensors (every one but the compiled simulator's numpy arrays; the
    Flower server, its nodes' kind)."""
    kind = simulator_kind(cfg, flags)
    return (simulator_kind(cfg, flags, cfg.federation.node_simulator) if kind == "flower" else kind) != "compiled"


def simulator_kind(cfg, flags: dict, name: str | None = None) -> str:
    """The simulator that runs: `name` (default federation.simulator), with `auto` resolved (compiled where it
    covers the configuration, vectorised elsewhere) and `compiled` refused in one line where it does not cover it."""
    name = name or cfg.federation.simulator
    if name not in ("compiled", "auto"):
        return name
    try:
        from .sim_compiled import check, unsupported
    except ImportError as err:   # numba is a dependency; an environment without it still runs the rest
        if name == "compiled":
            raise ConfigError(f"federation.simulator=compiled needs numba and threadpoolctl ({err}); pip install "
                              "numba threadpoolctl, or use federation.simulator=vectorised") from None
        return "vectorised"
    if name == "compiled":
        check(cfg, flags)
        return "compiled"
    return "vectorised" if unsupported(cfg, flags) else "compiled"
