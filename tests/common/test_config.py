"""common/config.py: precedence, dotted overrides, strict keys, types, ranges, duplicate keys, --help."""
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

import pytest

from common.config import (ConfigError, Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, Range, config_to_dict,
                           load_config, parse_cli)


@dataclass
class Train:
    lr: float = 1e-3
    epochs: int = 10
    ks: tuple[int, ...] = (10, 20)
    amp: bool = False


@dataclass
class Eval:
    seen_mask: Literal["reference", "zero", "neg_inf"] = "reference"
    root: Optional[str] = None


@dataclass
class Config:
    name: str = "toy"
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-2  # YAML 1.1 reads this as a string\n  epochs: 5\n")
    cfg = load_config(Config, path, ["train.epochs=7"])
    assert cfg.train.lr == 1e-2 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7           # CLI beats YAML
    assert cfg.train.amp is False          # untouched default
    assert cfg.eval.seen_mask == "reference"


def test_override_types(tmp_path):
    cfg = load_config(Config, None, ["train.lr=3e-4", "train.ks=[1,5]", "train.amp=true",
                                     "eval.root=/data", "eval.seen_mask=neg_inf", "name=abc"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.ks == (1, 5)
    assert cfg.train.amp is True and cfg.eval.root == "/data" and cfg.eval.seen_mask == "neg_inf"
    assert load_config(Config, None, ["eval.root=null"]).eval.root is None


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("nope.x=1", "unknown config key 'nope'"),
    ("train.epochs=abc", "train.epochs: expected an integer"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.amp=maybe", "train.amp: expected true/false"),
    ("eval.seen_mask=minus", "eval.seen_mask: 'minus' is not one of"),
    ("train.lr", "not of the form key=value"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(Config, None, [override])
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(Config, write(tmp_path, "train:\n  lrr: 1\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Config, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Config, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Config, write(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(Config, write(tmp_path, "train: 3\n"))


def test_parse_cli_and_resume_uses_run_config(tmp_path):
    path = write(tmp_path, "name: from_yaml\n")
    cfg, options = parse_cli(["--config", str(path), "train.epochs=3"], Config)
    assert (cfg.name, cfg.train.epochs, options.resume) == ("from_yaml", 3, None)
    run = tmp_path / "run"
    run.mkdir()
    import yaml
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    resumed, options = parse_cli(["--resume", str(run)], Config)
    assert resumed == cfg and options.resume == run
    default, _ = parse_cli([], Config, default_config=path)
    assert default.name == "from_yaml"


def test_config_to_dict_roundtrip():
    cfg = load_config(Config, None, ["train.ks=[3]"])
    assert load_config(Config, None, []) != cfg
    d = config_to_dict(cfg)
    assert d["train"]["ks"] == [3]
    import yaml
    path_text = yaml.safe_dump(d)
    assert "ks" in path_text


@dataclass
class Ranged:
    batch_size: PosInt = 8
    dropout: Annotated[float, Range(0, 1, max_open=True)] = 0.5
    share: Fraction = 1.0
    temperature: PosFloat = 1.0
    weight: NonNegFloat = 0.0
    patience: NonNegInt = 3
    train: Train = field(default_factory=Train)


@pytest.mark.parametrize("override,message", [
    ("batch_size=0", "batch_size: 0 is outside the allowed range [1, inf)"),
    ("batch_size=-3", "batch_size: -3 is outside the allowed range [1, inf)"),
    ("dropout=1.0", "dropout: 1.0 is outside the allowed range [0, 1)"),
    ("share=1.5", "share: 1.5 is outside the allowed range [0, 1]"),
    ("temperature=0", "temperature: 0.0 is outside the allowed range (0, inf)"),
    ("weight=-0.1", "weight: -0.1 is outside the allowed range [0, inf)"),
    ("weight=.nan", "weight: nan is outside the allowed range [0, inf)"),
    ("patience=-1", "patience: -1 is outside the allowed range [0, inf)"),
    ("train=5", "train: expected a mapping of keys (amp, epochs, ks, lr), got 5"),
])
def test_ranges_and_section_shapes_are_checked_at_load(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(Ranged, None, [override])
    assert str(err.value) == message


def test_values_inside_their_range_pass():
    cfg = load_config(Ranged, None, ["batch_size=1", "dropout=0", "share=0", "temperature=1e-3", "patience=0"])
    assert (cfg.batch_size, cfg.dropout, cfg.share, cfg.temperature, cfg.patience) == (1, 0.0, 0.0, 1e-3, 0)


def test_duplicate_yaml_keys_at_any_level_are_errors(tmp_path):
    top = write(tmp_path, "train:\n  lr: 0.1\nname: a\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Config, top)
    assert str(err.value) == f"{top}: duplicate key 'train' at line 4 (first at line 1)"
    nested = write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr' at line 3"):
        load_config(Config, nested)
    empty_section = write(tmp_path, "train:\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train: expected a mapping of keys"):
        load_config(Config, empty_section)


def test_help_lists_every_key_with_type_range_and_default(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(["--help"], Ranged)
    out = capsys.readouterr().out
    assert info.value.code == 0 and "Without --config the run uses the defaults below" in out
    lines = [line.split() for line in out.splitlines() if line.startswith("  ") and "(default:" in line]
    keys = [parts[0] for parts in lines]
    assert keys == ["batch_size", "dropout", "share", "temperature", "weight", "patience",
                    "train.lr", "train.epochs", "train.ks", "train.amp"]
    assert "int in [1, inf)" in out and "float in [0, 1)" in out and "(default: 0.5)" in out
