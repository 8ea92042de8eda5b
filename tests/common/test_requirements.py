"""Each paper folder carries its own requirements.txt (so `cp -r <paper> common` + one pip line works): its
pins are pyproject.toml's, torch's pin included; every third-party module imported at module level under
the paper folder or common/ is a requirement of it (or comes with one); a module imported lazily (inside
a function) or by an optional sub-package is at least listed as an extra in a comment line `# [extra] spec`."""
import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAPERS = ("flame", "vlm2rec", "f3crec")
FIRST_PARTY = {"common", *PAPERS, "__future__"}
OPTIONAL_PACKAGES = {"f3crec/flower": "fl"}  # a sub-package only the [fl] extra makes importable
EXTRA_LINE = re.compile(r"^#\s*\[([\w-]+)\]\s*(?:\([^)]*\)\s*)?(\S+)\s*$")


def _name(spec: str) -> str:
    return re.split(r"[\[<>=!~;\s]", spec, maxsplit=1)[0].lower().replace("_", "-")


def _requirements(paper: str) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    active, extras = {}, {}
    for line in (ROOT / paper / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            active[_name(line)] = line
        elif (match := EXTRA_LINE.match(line)) and not match.group(2).startswith("("):
            extras.setdefault(_name(match.group(2)), (match.group(1), match.group(2)))
    return active, extras


def _pyproject() -> tuple[list[str], dict[str, list[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


@functools.lru_cache(maxsize=None)
def _imports(folder: str) -> list[tuple[str, str, bool]]:
    """(top module, file, imported lazily) for every absolute import under folder."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        def visit(node, lazy):
            for child in ast.iter_child_nodes(node):
                inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, ast.Import):
                    out.extend((a.name.split(".")[0], str(path.relative_to(ROOT)), inner) for a in child.names)
                elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                    out.append((child.module.split(".")[0], str(path.relative_to(ROOT)), inner))
                visit(child, inner)
        visit(ast.parse(path.read_text()), False)
    return [(m, f, lazy) for m, f, lazy in out if m not in FIRST_PARTY and m not in sys.stdlib_module_names]


@functools.lru_cache(maxsize=1)
def _module_owners() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.lru_cache(maxsize=None)
def _requires(name: str) -> tuple[str, ...]:
    try:
        return tuple(importlib.metadata.requires(name) or ())
    except importlib.metadata.PackageNotFoundError:
        return ()


def _distribution(module: str) -> str:
    found = _module_owners().get(module)
    return (found[0] if found else module).lower().replace("_", "-")


def _covered(dist: str, listed: set[str]) -> bool:
    """dist is listed, or is a (non-extra) requirement of an installed listed distribution."""
    if dist in listed:
        return True
    for name in listed:
        if any(_name(r) == dist for r in _requires(name) if "extra ==" not in r):
            return True
    return False


@pytest.mark.parametrize("paper", PAPERS)
def test_requirements_pins_are_pyprojects(paper):
    core, optional = _pyproject()
    active, extras = _requirements(paper)
    assert active["torch"] == "torch==2.13.0"
    everywhere = set(core) | {spec for specs in optional.values() for spec in specs}
    for spec in active.values():
        assert spec in everywhere, f"{paper}/requirements.txt: {spec} is not pyproject.toml's pin"
    for extra, spec in extras.values():
        assert spec in optional[extra], f"{paper}/requirements.txt: [{extra}] {spec} not in pyproject's [{extra}]"
    for spec in core:  # every core dependency a paper imports (directly or through common/) is in its file
        if any(_distribution(m) == _name(spec) for m, _, _ in _imports(paper) + _imports("common")):
            assert _name(spec) in active, f"{paper}: core dependency {spec} missing"


@pytest.mark.parametrize("paper", PAPERS)
def test_every_imported_module_is_a_requirement_or_optional(paper):
    active, extras = _requirements(paper)
    missing = []
    for module, file, lazy in _imports(paper) + _imports("common"):
        dist = _distribution(module)
        optional_package = any(file.startswith(folder + "/") for folder in OPTIONAL_PACKAGES)
        if not lazy and not optional_package:
            ok = _covered(dist, set(active))
        else:  # optional: a requirement, or documented as an extra
            ok = _covered(dist, set(active) | set(extras)) or (file.startswith("common/") and any(
                _covered(dist, set(_requirements(p)[1]) | set(_requirements(p)[0])) for p in PAPERS))
        if not ok:
            missing.append(f"{module} ({file}{', lazy' if lazy else ''})")
    assert not missing, f"{paper}/requirements.txt does not cover: {sorted(set(missing))}"


def test_scipy_is_not_a_dependency():
    core, _ = _pyproject()
    assert not [m for p in ("common", *PAPERS) for m, _, _ in _imports(p) if m == "scipy"]
    assert "scipy" not in {_name(spec) for spec in core}
