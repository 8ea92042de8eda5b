"""`--help` of each paper's main shows every config key with the comment written next to its field in the
schema (common.config.field_comments reads it from the source: no second, hand-copied list)."""
import importlib
import re

import pytest

from common.config import field_comments, parse_cli

# (paper, dotted key, the class that declares it, its field) - one key per paper
CASES = [("flame", "data.max_len", "DataConfig", "max_len"),
         ("vlm2rec", "backbone.lora.r", "LoraSettings", "r"),
         ("f3crec", "method.ewc_gamma", "MethodConfig", "ewc_gamma")]


@pytest.mark.parametrize("paper,key,cls_name,field", CASES)
def test_help_line_carries_the_schema_comment(paper, key, cls_name, field, capsys):
    module = importlib.import_module(f"{paper}.config")
    meaning = field_comments(getattr(module, cls_name))[field]
    assert len(meaning) > 3 and "#" not in meaning
    with pytest.raises(SystemExit) as stop:
        parse_cli(["--help"], module.Config)
    assert stop.value.code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(rf"\s+{re.escape(key)}\s", line)]
    assert len(lines) == 1, lines
    assert meaning in lines[0] and "(default: " in lines[0]


def test_comment_reader_joins_continuations_and_skips_code():
    meanings = field_comments(importlib.import_module("f3crec.config").MethodConfig)
    # ewc_gamma's comment continues on a comment-only line; the next field's comment is not glued to it
    assert meanings["ewc_gamma"].endswith("≈ 1,150")
    assert "pseudo-positives" in meanings["replay_size"] and "pseudo" not in meanings["ewc_gamma"]
    assert meanings["beta"] == "β of ITM (§7)"


def test_main_help_runs_end_to_end(capsys):
    main = importlib.import_module("f3crec.main").main
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ε of p_u = exp(-ε D_u) (§6)" in capsys.readouterr().out
