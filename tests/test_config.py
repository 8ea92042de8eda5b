"""common/config.py: precedence, dotted overrides, strict keys and types (CONVENTIONS.md §4)."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from common.config import ConfigError, config_to_dict, load_config, parse_cli


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
