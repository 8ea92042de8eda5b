"""Strict configuration: dataclass schema < YAML deltas < dotted CLI overrides.

    cfg = load_config(Config, "flame/configs/amazon-toys.yaml", ["train.lr=3e-4", "eval.seen_mask=neg_inf"])

Unknown keys, duplicate keys, values of the wrong type and values out of their declared range are errors
(`ConfigError`, one line naming the key), never silent new attributes or defaults. Each override value is
parsed with `yaml.safe_load` and then coerced to the field's annotated type, so `1e-3` (a *string* to
PyYAML 1.1) becomes a float. Ranges are declared in the schema with `Annotated`:

    batch_size: PosInt = 256                       # an int >= 1
    dropout: Annotated[float, Range(0, 1, max_open=True)] = 0.5
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line and names the key."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric config value; None = unbounded on that side."""
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # True: min itself is excluded
    max_open: bool = False

    def check(self, value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        low = self.min is None or (value > self.min if self.min_open else value >= self.min)
        high = self.max is None or (value < self.max if self.max_open else value <= self.max)
        if not (low and high and value == value):  # value == value: NaN is never in range
            raise ConfigError(f"{key}: {value!r} is outside the allowed range {self}")

    def __str__(self) -> str:
        lo = "(-inf" if self.min is None else ("(" if self.min_open else "[") + f"{self.min:g}"
        hi = "inf)" if self.max is None else f"{self.max:g}" + (")" if self.max_open else "]")
        return f"{lo}, {hi}"


PosInt = Annotated[int, Range(1)]                    # sizes, counts, epochs, rounds, lengths, k
NonNegInt = Annotated[int, Range(0)]                 # counts where 0 means "none" or "off"
PosFloat = Annotated[float, Range(0, min_open=True)]  # rates, temperatures, scales
NonNegFloat = Annotated[float, Range(0)]             # weights and penalties (0 = off)
Fraction = Annotated[float, Range(0, 1)]             # probabilities and shares, both ends allowed


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` to `annotation` or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Annotated:
        value = _coerce(value, args[0], key)
        for extra in annotation.__metadata__:
            if isinstance(extra, Range):
                extra.check(value, key)
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
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _build(cls: type[T], values: dict, prefix: str = "") -> T:
    """Instantiate `cls` from a (possibly partial) nested mapping: its defaults with `values` applied."""
    return _merge(cls(), values, prefix)


def _is_section(annotation: Any) -> bool:
    return dataclasses.is_dataclass(typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated
                                    else annotation)


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
        if _is_section(annotation) and current is not None:
            if not isinstance(value, dict):  # `train: 5` or `train:` (None) where a section is expected
                raise ConfigError(f"{key}: expected a mapping of keys ({', '.join(sorted(_fields(type(current))))}), "
                                  f"got {value!r}")
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


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                  f"(first at line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(cls: type[T], yaml_path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Dataclass defaults < YAML file < dotted overrides, strictly type-checked."""
    cfg = cls()
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        try:
            cfg = _merge(cfg, values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
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


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a.b": leaf} of a nested config dict (an empty section stays as one leaf)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict, now: dict, free: Sequence[str] = (), run_dir: Any = "") -> dict:
    """The keys in which config `now` differs from the `saved` config of the run it resumes, as
    {key: (saved, now)}; a changed key outside `free` (the config class's RESUME_FREE) is a one-line
    ConfigError: a resume runs exactly the saved config. `run_root` is always free; a key the saved
    config lacks (an older version's run) counts as unchanged."""
    free = {"run_root", *free}  # where new run folders go: a resume runs in its own folder
    old, new = flatten(saved), flatten(now)
    changed = {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
               if key in old and key in new and old[key] != new[key]}
    refused = [key for key in changed if key not in free]
    if refused:
        key = refused[0]
        allowed = f"only {', '.join(sorted(free))} may change" if free else "no key may change"
        more = f" (and {len(refused) - 1} more key(s): {', '.join(refused[1:4])})" if len(refused) > 1 else ""
        raise ConfigError(f"--resume {run_dir}: its run has {key}={old[key]!r}, this command asks for "
                          f"{new[key]!r}{more}; a resume runs the saved config ({allowed}): start a new run "
                          "(another --run-dir) for another setting")
    return changed


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        ranges = [str(m) for m in annotation.__metadata__ if isinstance(m, Range)]
        return _type_name(args[0]) + (f" in {ranges[0]}" if ranges else "")
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """{field: its meaning} for a config dataclass, read from the comment written after each field in the
    class's own source (a trailing `# ...` and the comment-only lines that continue it), joined into one line.
    The source is the single place the meaning is written; a field without a comment (or a class whose
    source is unavailable) has none here."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line number -> comment text
    code_lines: set[int] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                  tokenize.ENDMARKER):
                code_lines.update(range(tok.start[0], tok.end[0] + 1))
        tree = ast.parse(source)
    except (SyntaxError, tokenize.TokenError):
        return {}
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = node.end_lineno or node.lineno
        parts = [comments[line]] if line in comments else []
        line += 1
        while parts and line in comments and line not in code_lines:  # a comment-only continuation line
            parts.append(comments[line])
            line += 1
        text = " ".join(" ".join(parts).split())
        if text:
            out[node.target.id] = text
    return out


def describe(cls: type, defaults: Any = None, prefix: str = "") -> list[str]:
    """One line per config key: `section.key  type  (default: value)  meaning`, sections in schema order;
    the meaning is the comment next to the field in the schema's source (field_comments)."""
    defaults = cls() if defaults is None else defaults
    meanings = field_comments(cls)
    lines = []
    for name, (_, annotation) in _fields(cls).items():
        key, value = f"{prefix}{name}", getattr(defaults, name)
        if _is_section(annotation) and dataclasses.is_dataclass(value):
            lines += describe(type(value), value, f"{key}.")
        else:
            meaning = f"  {meanings[name]}" if name in meanings else ""
            lines.append(f"  {key:<34} {_type_name(annotation):<28} (default: {value!r}){meaning}")
    return lines


def is_override(token: str) -> bool:
    """A bare `key=value` token (not an option, not an option's `--opt=value`)."""
    return "=" in token and not token.startswith("-")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parser.parse_args, with every bare `key=value` token taken as a config override wherever it stands:
    `--seeds 0 1 2 crtr.stopgrad=none` and `--methods ft arm train.lr=0.1` no longer swallow the override.
    The parser's positional `overrides` receives them (in their order), after any other positional token."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args([t for t in tokens if not is_override(t)])
    args.overrides = [*getattr(args, "overrides", []), *[t for t in tokens if is_override(t)]]
    return args


def changed_from_defaults(cfg: Any, cls: type | None = None) -> dict:
    """{"a.b": value} of the keys in which `cfg` differs from its class's defaults (the paper's main setting),
    in the schema's order: what the console shows of a run's config (config.yaml keeps all of it)."""
    default = flatten(config_to_dict((cls or type(cfg))()))
    return {key: value for key, value in flatten(config_to_dict(cfg)).items() if default.get(key, object()) != value}


def dry_run_plan(cls: type, cfg: Any, config_path: Path | None, what: str) -> None:
    """`--dry-run`: check the resolved config (the schema module's check_config), print what the command
    would do and the keys that differ from the defaults, and exit 0; no data is read, nothing is run."""
    check = getattr(sys.modules.get(cls.__module__), "check_config", None)
    if check is not None:
        check(cfg)
    changed = changed_from_defaults(cfg, cls)
    print(f"dry run: {what}; config {config_path or 'defaults'}; "
          f"{len(changed)} key(s) differ from the defaults; nothing read or run")
    for key, value in changed.items():
        print(f"  {key} = {value!r}")
    raise SystemExit(0)


class _HelpParser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog is a function, called only when the help is shown: the key list reads
    every config class's source for its comments (≈ 50 ms), which a run that does not ask for --help skips."""

    def __init__(self, *args, epilog, **kwargs):
        super().__init__(*args, **kwargs)
        self._epilog = epilog

    def format_help(self) -> str:
        if self.epilog is None:
            self.epilog = self._epilog()
        return super().format_help()


def parse_cli(argv: Sequence[str] | None, cls: type[T],
              default_config: str | Path | None = None) -> tuple[T, argparse.Namespace]:
    """Parse `--config PATH [--resume RUN_DIR] [--run-dir DIR] [--overwrite] key=value ...` into (cfg, options).

    With `--resume` the resumed run's config.yaml is the config: an override or `--config` that changes a
    key is refused in one line, except the keys the config class lists in RESUME_FREE (a ClassVar).
    `--help` lists every key with its type, range and default, generated from the schema.
    """
    default = f"the config file {default_config}" if default_config else "the defaults below (the paper's main setting)"
    parser = _HelpParser(
        description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=lambda: f"Without --config the run uses {default}; every key can be overridden as key=value.\n"
                       "Config keys:\n" + "\n".join(describe(cls)))
    parser.add_argument("--config", type=Path, default=None, help="YAML file with the values that differ")
    parser.add_argument("--resume", type=Path, default=None, help="run directory whose last.pt to resume")
    parser.add_argument("--run-dir", type=Path, default=None, help="write the run here instead of runs/...")
    parser.add_argument("--overwrite", action="store_true",
                        help="let a fresh run use a --run-dir that holds files: they move into previous-<time>/")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve and check the config, print the plan and exit 0 (reads no data)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    options = parse_with_overrides(parser, argv)
    config_path = options.config
    if options.resume is not None and options.run_dir is not None and options.run_dir != options.resume:
        raise ConfigError(f"--resume {options.resume} and --run-dir {options.run_dir}: a resume continues in "
                          "its own folder; give one of them")
    if options.resume is not None and options.overwrite:
        raise ConfigError(f"--resume {options.resume} with --overwrite: a resume keeps the folder's records; "
                          "give one of them")
    if options.resume is not None:
        if not options.resume.is_dir():
            raise ConfigError(f"--resume {options.resume}: no such run folder")
        if not (options.resume / "config.yaml").is_file():
            raise ConfigError(f"--resume {options.resume}: not a run folder (no config.yaml); "
                              "--resume takes a folder that a run wrote")
    if config_path is None and options.resume is not None:
        config_path = options.resume / "config.yaml"
    if config_path is None:
        config_path = default_config
    options.config = Path(config_path) if config_path is not None else None
    cfg = load_config(cls, options.config, options.overrides)
    if options.resume is not None:  # one line now, before any data is read
        saved = load_config(cls, options.resume / "config.yaml")
        resume_changes(config_to_dict(saved), config_to_dict(cfg), getattr(cls, "RESUME_FREE", ()), options.resume)
    if options.dry_run:
        dry_run_plan(cls, cfg, options.config, f"one {cls.__module__.split('.')[0]} run"
                     + (f", resuming {options.resume}" if options.resume is not None else ""))
    return cfg, options
