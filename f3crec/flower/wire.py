"""How tensors, exact sums and configs travel in Flower records (§14). Lossless: arrays go as raw bytes of
their own dtype (received as numpy arrays), Fractions as 'numerator/denominator' strings, so what arrives equals
what was sent. No torch here: a node running the compiled simulator never imports it."""
from __future__ import annotations

import json
import shlex
from fractions import Fraction
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.config import ConfigError, config_to_dict, load_config
from common.io import REPO


def owner(user: int, num_partitions: int) -> int:
    """The partition (node) that hosts `user`: a public rule, so the server can address a user's node."""
    return user % num_partitions


def arrays(values: dict) -> ArrayRecord:
    """Torch tensors or numpy arrays (this module imports no torch: a node may run without it)."""
    out = {}
    for name, value in values.items():
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        out[name] = Array(np.ascontiguousarray(value))
    return ArrayRecord(array_dict=out)


def content(tensor_values: dict | None = None, **config) -> RecordDict:
    """A message body: tensors under 'arrays', JSON-able settings under 'config' (one JSON string)."""
    return RecordDict({"arrays": arrays(tensor_values or {}), "config": ConfigRecord({"json": json.dumps(config)})})


def unpack(body: RecordDict) -> tuple[dict, dict]:
    """(numpy arrays: each side makes them its own kind, config) of a message body."""
    return {k: np.array(a.numpy(), copy=True) for k, a in body["arrays"].items()}, json.loads(body["config"]["json"])


def sums_to_json(sums: dict[str, tuple[Fraction, int]]) -> dict:
    return {name: [f"{total.numerator}/{total.denominator}", count] for name, (total, count) in sums.items()}


def sums_from_json(values: dict) -> dict[str, tuple[Fraction, int]]:
    return {name: (Fraction(total), int(count)) for name, (total, count) in values.items()}


def config_to_json(cfg) -> str:
    """The run's config for the nodes' run config (a Flower UserConfig value is a scalar)."""
    return json.dumps(config_to_dict(cfg))


def config_from_run_config(run_config):
    """The run's config from a Flower run config (the same on the ServerApp and every node): `f3crec-config`
    (a whole config as JSON: the in-process grid), else on `resume` the run folder's own config.yaml (a resume
    runs exactly the saved config: `overrides` are refused), else `config` (a YAML path, relative to the
    bundle's root, or absolute) with `overrides` (space-separated key=value); the simulator is Flower's."""
    from ..config import Config   # f3crec.config imports torch: not at this module's import
    text = str(run_config.get("f3crec-config", "") or "")
    if text:   # config_to_json's sections as overrides: rebuilt through the schema (types, ranges checked)
        return load_config(Config, None, [f"{key}={json.dumps(value)}" for key, value in json.loads(text).items()])
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    if run_config.get("resume", False):
        run_dir = Path(str(run_config.get("run-dir", "") or ""))
        if overrides or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"resume=true runs the saved config of run-dir={run_dir}: it needs that folder's "
                              f"config.yaml and no overrides (got {len(overrides)})")
        return load_config(Config, run_dir / "config.yaml", ["federation.simulator=flower"])
    path = Path(str(run_config.get("config", "") or "f3crec/configs/smoke.yaml"))
    return load_config(Config, path if path.is_absolute() else REPO / path, [*overrides, "federation.simulator=flower"])
