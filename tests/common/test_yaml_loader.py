"""common.runs reads a run's config.yaml back (its digest) with libyaml's safe loader where PyYAML has it:
the same tree as yaml.safe_load for every config the project writes."""
from pathlib import Path

import pytest
import yaml

from common.config import config_to_dict, load_config
from common.runs import SAFE_LOADER, config_digest

ROOT = Path(__file__).resolve().parents[2]


def _configs():
    from f3crec.config import Config
    for path in sorted((ROOT / "f3crec" / "configs").glob("*.yaml")):
        yield path.name, Config, path


@pytest.mark.parametrize("name,cls,path", list(_configs()))
def test_safe_loader_reads_a_written_config_as_safe_load(name, cls, path):
    tree = config_to_dict(load_config(cls, path, []))
    text = yaml.safe_dump(tree, sort_keys=True)
    fast = yaml.load(text, Loader=SAFE_LOADER)
    assert fast == yaml.safe_load(text) == tree
    assert config_digest(fast) == config_digest(yaml.safe_load(text))


def test_safe_loader_keeps_safe_loads_scalars_and_refusals():
    text = "a: 1e-3\nb: .inf\nc: ~\nd: [1, 2.5, yes, 0x10, '07']\ne: 2026-12-07\nf: !!str 3\n"
    assert repr(yaml.load(text, Loader=SAFE_LOADER)) == repr(yaml.safe_load(text))
    with pytest.raises(yaml.YAMLError):
        yaml.load("a: !!python/object:os.system x", Loader=SAFE_LOADER)
