"""Strict configuration: dataclass schema < YAML deltas < dotted CLI overrides.

    cfg = load_config(Config, "flame/configs/amazon-toys.yaml", ["train.lr=3e-4", "eval.seen_mask=neg_inf"])

Unknown keys and values of the wrong type are errors (`ConfigError`, one line naming the key), never
silent new attributes. Each override value is parsed with `yaml.safe_load` and then coerced to the
field's annotated type, so `1e-3` (a *string* to PyYAML 1.1) becomes a float.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line and names the key."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` to `annotation` or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        item_type = args[0] if args else Any
        converted = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:  # YAML 1.1 reads 1e-3 as a string: accept any float literal explicitly
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, key)
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _build(cls: type[T], values: dict, prefix: str = "") -> T:
    """Instantiate `cls` from a (possibly partial) nested mapping: its defaults with `values` applied."""
    return _merge(cls(), values, prefix)


def _merge(obj: T, values: dict, prefix: str = "") -> T:
    """Return a copy of dataclass `obj` with `values` (nested mapping) applied."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    fields = _fields(type(obj))
    changes = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(fields))})")
        annotation = fields[name][1]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict) and current is not None:
            changes[name] = _merge(current, value, key)
        else:
            changes[name] = _coerce(value, annotation, key)
    return dataclasses.replace(obj, **changes)


def _override_to_mapping(override: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 3e-4 (parsed by YAML)}}."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value")
    dotted, raw = override.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override '{override}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the text, the type check decides
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def load_config(cls: type[T], yaml_path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Dataclass defaults < YAML file < dotted overrides, strictly type-checked."""
    cfg = cls()
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        cfg = _merge(cfg, values)
    for override in overrides:
        cfg = _merge(cfg, _override_to_mapping(override))
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


def parse_cli(argv: Sequence[str] | None, cls: type[T],
              default_config: str | Path | None = None) -> tuple[T, argparse.Namespace]:
    """Parse `--config PATH [--resume RUN_DIR] [--run-dir DIR] key=value ...` into (cfg, options).

    With `--resume` and no `--config`, the resumed run's config.yaml is the base; overrides still apply.
    """
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with the values that differ")
    parser.add_argument("--resume", type=Path, default=None, help="run directory whose last.pt to resume")
    parser.add_argument("--run-dir", type=Path, default=None, help="write the run here instead of runs/...")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    options = parser.parse_args(list(argv) if argv is not None else None)
    config_path = options.config
    if config_path is None and options.resume is not None:
        config_path = options.resume / "config.yaml"
    if config_path is None:
        config_path = default_config
    options.config = Path(config_path) if config_path is not None else None
    return load_config(cls, options.config, options.overrides), options
