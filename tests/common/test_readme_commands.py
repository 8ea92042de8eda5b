"""Every shell command in the READMEs parses through the CLI it calls (item 1 of issue 22).

Collected: each line of the fenced ```bash/```sh/```console blocks of README.md and the three papers' READMEs
(backslash continuations joined, `#` comments dropped, `&&` chains split, `cd <paper>` followed), the complete
inline `make ...` / `python -m ...` spans of their prose, and F3CRec's inline `ARGS="... --methods ..."` examples of its results section (run through `make f3crec-compare`).
Checked, without reading data or training:
- `python -m <paper>.main|compare ...` and `cd <paper> && python main.py ...`: the module's own parser with
  `--dry-run` (config resolved, overrides applied, check_config run, exit 0); `torchrun`/`accelerate launch`
  check the `<paper>.main` arguments they pass on;
- `python -m flame.table ...`: its parse(); other modules: importable;
- `make TARGET VAR=...`: `make -n` with the variables (the target exists), then each python line it would run,
  checked as above. A swallowed override, a wrong order or an unknown key fails.
Commands with a `<placeholder>` (a run folder of the reader's) are checked as far as the placeholder allows.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READMES = ["README.md", "flame/README.md", "vlm2rec/README.md", "f3crec/README.md"]
PAPERS = ("flame", "vlm2rec", "f3crec")
FAKE_DATA = "/tmp/readme-data"


def _commands(readme: str) -> list[str]:
    """Every command line of the fenced shell blocks of one README."""
    lines, on, text = [], False, (REPO / readme).read_text()
    for raw in text.splitlines():
        stripped = raw.strip()
        if re.match(r"^```(bash|sh|console)\b", stripped):
            on = True
            continue
        if stripped.startswith("```"):
            on = False
            continue
        if on:
            lines.append(raw)
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _f3crec_args() -> list[str]:
    text = (REPO / "f3crec/README.md").read_text()
    return sorted({m for m in re.findall(r'`ARGS="([^"`]*--methods[^"`]*)"`', text)})


def _inline(readme: str) -> list[str]:
    """Inline `make ...` / `python -m ...` spans that give variables, overrides or options and no placeholder
    (`…`, `<run>`, `[optional]`, `DATA=NAME`): complete commands written in the prose."""
    spans = re.findall(r"`((?:make|python -m) [^`]+)`", (REPO / readme).read_text())
    return [" ".join(s.split()) for s in spans
            if not any(x in s for x in ("…", "...", "<", "[", "=NAME")) and re.search(r"=|--", s)]


ALL = [(readme, cmd) for readme in READMES for cmd in dict.fromkeys(_commands(readme) + _inline(readme))]


def _tokens(command: str) -> list[str]:
    command = command.replace("$REPRO_DATA", FAKE_DATA).replace("<your data root>", FAKE_DATA)
    return shlex.split(command, comments=True)


def _call_main(module: str, argv: list[str], cwd: Path) -> None:
    """The module's parser in dry-run mode, in this process: it must exit 0 having printed its plan."""
    mod = importlib.import_module(module)
    entry = getattr(mod, "compare", None) if module == "vlm2rec.compare" else mod.main
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as text, pytest.raises(SystemExit) as stop:
            entry([*argv, "--dry-run"])
    finally:
        os.chdir(old)
    assert stop.value.code == 0, f"{module} {' '.join(argv)}: the parser exited {stop.value.code}"
    assert text.getvalue().startswith("dry run:"), text.getvalue()


def check_python(module: str, argv: list[str], cwd: Path = REPO) -> str:
    """Check one `python -m module argv` command; returns what was checked."""
    if any("<" in a for a in argv):  # a placeholder for the reader's run folder: the module must exist
        importlib.import_module(module)
        return "placeholder: module imported"
    if module.split(".")[0] in PAPERS and module.split(".")[1] in ("main", "compare"):
        _call_main(module, argv, cwd)
        return "dry run"
    if module in ("flame.table", "flame.bench"):  # their own parse(): options and config, no data read
        importlib.import_module(module).parse(argv)
        return "parse()"
    importlib.import_module(module)
    return "module imported"


def check(command: str, cwd: Path = REPO) -> list[str]:
    """Check one README command line; returns what was checked for each part."""
    done = []
    parts: list[list[str]] = [[]]
    for token in _tokens(command):
        if token == "&&":
            parts.append([])
        else:
            parts[-1].append(token)
    for argv in parts:
        part = " ".join(argv)
        while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
            argv = argv[1:]
        if not argv:
            continue
        head = argv[0]
        if head == "cd":
            cwd = (cwd / argv[1]) if not argv[1].startswith("~") else cwd
            continue
        if head in ("python", "python3") and argv[1:2] == ["-m"]:
            done.append(check_python(argv[2], argv[3:], cwd))
        elif head in ("python", "python3") and argv[1] == "main.py":
            done.append(check_python(f"{cwd.name}.main", argv[2:], cwd))
        elif head in ("python", "python3"):
            assert (cwd / argv[1]).is_file(), f"{argv[1]}: no such script"
            done.append("script exists")
        elif head == "torchrun" or argv[:2] == ["accelerate", "launch"]:
            i = argv.index("-m")
            done.append(check_python(argv[i + 1], argv[i + 2:], cwd))
        elif head == "make":
            done += check_make(argv[1:])
        elif head in ("export", "mkdir", "pip", "cp", "source", "tensorboard"):
            done.append("shell")
        else:
            raise AssertionError(f"no checker for {part!r}")
    return done


def check_make(argv: list[str]) -> list[str]:
    """`make -n` with the README's variables, then every python line it would run."""
    env = {**os.environ, "REPRO_DATA": FAKE_DATA}
    proc = subprocess.run(["make", "-n", "--no-print-directory", *argv, "PY=python", "STAMP="], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"make -n {' '.join(argv)}: {proc.stderr.strip()}"
    done = [f"make -n {argv[0]}"]
    for line in proc.stdout.replace("\\\n", " ").splitlines():
        if re.search(r"(^|\s)python -m ", line) and "pytest" not in line and "pip install" not in line:
            tokens = shlex.split(line)
            while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
                tokens = tokens[1:]
            if tokens[2] == "common.flower_ops":  # a Flower deployment: its --run-config overrides are the run's
                done += check_flower(tokens)
                continue
            done.append(check_python(tokens[2], tokens[3:]))
    return done


def check_flower(tokens: list[str]) -> list[str]:
    """make f3crec-deploy/-sim: the run config it hands the app names a config file and overrides that parse."""
    if "--run-config" not in tokens:
        return ["flower build"]
    run_config = tokens[tokens.index("--run-config") + 1]
    config = re.search(r'config="([^"]+)"', run_config).group(1)
    overrides = shlex.split(re.search(r'overrides="([^"]*)"', run_config).group(1))
    return [check_python("f3crec.main", ["--config", config, *overrides])]


@pytest.mark.parametrize("readme,command", ALL, ids=[f"{r}:{c[:60]}" for r, c in ALL])
def test_readme_command_parses(readme, command, monkeypatch):
    monkeypatch.setenv("REPRO_DATA", FAKE_DATA)
    assert check(command), command


@pytest.mark.parametrize("args", _f3crec_args())
def test_f3crec_results_args_parse(args, monkeypatch):
    """F3CRec's results section: `make f3crec-compare DATA=ml-100k ARGS="<args>"` as the README gives it."""
    monkeypatch.setenv("REPRO_DATA", FAKE_DATA)
    assert check_make(["f3crec-compare", "DATA=ml-100k", "SEEDS=1 2 3", f"ARGS={args.replace('<ε>', '0.01')}"])


def test_every_readme_has_commands():
    for readme in READMES:
        assert _commands(readme), f"{readme}: no fenced shell commands found"
    assert len(_f3crec_args()) >= 3


@pytest.mark.parametrize("command", [
    "python -m vlm2rec.compare --config vlm2rec/configs/ml-100k.yaml --seeds 0 x1 2",
    "python -m flame.main --config flame/configs/smoke.yaml train.no_such_key=1",
    "python -m f3crec.compare --config f3crec/configs/ml-100k.yaml --methods ft nosuchmethod",
    "make flame DATA=no-such-config",
    "make no-such-target",
])
def test_a_broken_command_fails(command, monkeypatch):
    monkeypatch.setenv("REPRO_DATA", FAKE_DATA)
    with pytest.raises((AssertionError, SystemExit, ValueError, FileNotFoundError)):
        check(command)


def test_overrides_after_a_list_option_are_overrides():
    """`--seeds 0 1 2 key=value` / `--methods a b key=value`: the override is neither a seed nor a method."""
    import argparse

    from common.config import parse_with_overrides
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--methods", nargs="+", default=["ft"])
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*")
    args = parse_with_overrides(parser, ["--methods", "ft", "arm", "backbone.name=fedncf", "--seeds", "0", "1",
                                         "crtr.stopgrad=none", "--out=a=b", "x.y=1"])
    assert args.methods == ["ft", "arm"] and args.seeds == [0, 1] and args.out == "a=b"
    assert args.overrides == ["backbone.name=fedncf", "crtr.stopgrad=none", "x.y=1"]


def test_the_dry_run_plan_shows_the_overrides_after_methods(capsys, monkeypatch):
    """F3CRec's FedNCF line: the overrides after `--methods` reach the config (the plan lists them)."""
    monkeypatch.setenv("REPRO_DATA", FAKE_DATA)
    from f3crec.compare import main
    with pytest.raises(SystemExit) as stop:
        main(["--config", "f3crec/configs/ml-100k.yaml", "--methods", "ft", "f3crec", "backbone.name=fedncf",
              "backbone.lr=0.05", "--seeds", "1", "2", "method.eps=0.001", "--dry-run"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert "['ft', 'f3crec'] x seeds [1, 2]" in out
    assert "backbone.name = 'fedncf'" in out and "backbone.lr = 0.05" in out and "method.eps = 0.001" in out
