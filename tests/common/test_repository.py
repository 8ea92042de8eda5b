"""The repository's shape: every paper folder has the same skeleton, and the licence and citation travel.

A reader who knows one paper folder finds everything at the same place in the others; `main.run(cfg)` is
the one entry point that `compare.py`, `bench.py` and tests call.
"""
import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PAPERS = ("flame", "vlm2rec", "f3crec")
ARXIV = {"flame": "2604.04038", "vlm2rec": "2603.17450", "f3crec": "2508.04792"}
# file -> public functions it must define (the skeleton of README.md "How a paper folder is laid out")
SKELETON = {"config.py": ["Config"], "main.py": ["main", "run"], "train.py": ["fit"],
            "evaluate.py": ["evaluate"], "model.py": [], "data.py": [], "bench.py": [], "compare.py": []}


def top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("paper", PAPERS)
def test_every_paper_folder_has_the_same_skeleton(paper):
    folder = ROOT / paper
    for name, symbols in SKELETON.items():
        assert (folder / name).is_file(), f"{paper}/{name} is missing"
        missing = set(symbols) - top_level_names(folder / name)
        assert not missing, f"{paper}/{name} does not define {sorted(missing)}"
    for name in ("docs/method.md", "configs/smoke.yaml", "README.md"):
        assert (folder / name).is_file(), f"{paper}/{name} is missing"


@pytest.mark.parametrize("paper", PAPERS)
def test_one_function_named_evaluate_per_paper(paper):
    owners = [p.name for p in sorted((ROOT / paper).glob("*.py")) if "evaluate" in top_level_names(p)]
    assert owners == ["evaluate.py"], f"{paper}: evaluate() defined in {owners}"


@pytest.mark.parametrize("paper", PAPERS)
def test_compare_and_bench_build_configs_not_argv(paper):
    """compare.py runs whole experiments through run(cfg); bench.py times pieces of one, from the same
    config schema. Neither drives main() with argv strings."""
    calls_run = r"\brun\(|\brun_or_reuse\(run\b"          # run(cfg, ...) directly or through common.runs.run_or_reuse
    assert re.search(calls_run, (ROOT / paper / "compare.py").read_text()), f"{paper}/compare.py does not call run(cfg)"
    for name in ("compare.py", "bench.py"):
        source = (ROOT / paper / name).read_text()
        assert re.search(r"from \.config import", source), f"{paper}/{name} does not build its config from config.py"
        assert not re.search(r"\bmain\(\s*\[", source), f"{paper}/{name} drives main() with an argv list"


def test_licence_and_citation():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["type"] == "software"
    cited = {ident["value"] for ref in cff["references"] for ident in ref.get("identifiers", [])}
    for paper, arxiv in ARXIV.items():
        assert f"arXiv:{arxiv}" in cited, f"CITATION.cff does not cite {paper}"
        readme = (ROOT / paper / "README.md").read_text()
        assert arxiv in readme, f"{paper}/README.md does not link arXiv {arxiv}"
        assert re.search(r"written from the paper", readme, re.IGNORECASE), \
            f"{paper}/README.md does not say the code was written from the paper, not copied"


def test_script_mode_only_in_each_papers_main():
    """`cd <paper> && python main.py` works (main.py puts the repository on sys.path); every other module is
    imported as a package (`python -m <paper>.bench`), so no other file edits sys.path."""
    editors = sorted(str(p.relative_to(ROOT)) for folder in (*PAPERS, "common") for p in (ROOT / folder).rglob("*.py")
                     if "sys.path.insert" in p.read_text())
    assert editors == sorted(f"{paper}/main.py" for paper in PAPERS), editors


# ----------------------------------------------------------------------------- `file.py::NAME` references
CODE_REF = re.compile(r"([\w./-]+\.py)::([A-Za-z_][\w.]*\w)")


def defined_names(path: Path) -> dict[str, set[str]]:
    """{top-level name: names defined in its body (for a class)} of a module: functions, classes, assignments."""
    out: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members = {n.name for n in getattr(node, "body", []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            members |= {t.id for n in getattr(node, "body", []) if isinstance(n, (ast.Assign, ast.AnnAssign))
                        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            out[node.name] = members if isinstance(node, ast.ClassDef) else set()
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    out[target.id] = set()
    return out


def resolves(reference: str, name: str, folder: Path) -> bool:
    """`file.py::NAME` (or `::Class.member`; a bare method name counts when one class defines it) names
    something that exists, the file taken from the repository root or from the folder of the citing paper."""
    for base in (ROOT, folder):
        path = base / reference
        if path.is_file():
            names = defined_names(path)
            head, _, member = name.partition(".")
            if member:
                return member in names.get(head, set())
            return head in names or any(head in members for members in names.values())
    return False


def test_every_code_reference_in_docs_readmes_and_yamls_exists():
    cited, unresolved = 0, []
    sources = [ROOT / "README.md"] + [p for folder in (*PAPERS, "common") for p in sorted((ROOT / folder).rglob("*"))
                                      if p.suffix in (".md", ".yaml", ".py") and "__pycache__" not in p.parts]
    for path in sources:
        folder = ROOT / path.relative_to(ROOT).parts[0] if path.parent != ROOT else ROOT
        for reference, name in CODE_REF.findall(path.read_text()):
            cited += 1
            if not resolves(reference, name, folder):
                unresolved.append(f"{path.relative_to(ROOT)}: {reference}::{name}")
    assert cited >= 25, f"only {cited} references found: the pattern no longer matches how the docs cite code"
    assert not unresolved, "references to code that does not exist: " + "; ".join(unresolved)


def test_code_reference_check_catches_a_missing_name():
    assert resolves("data.py", "check_expected", ROOT / "f3crec")
    assert resolves("f3crec/model.py", "Backbone.affine", ROOT)
    assert resolves("server.py", "_finish", ROOT / "f3crec") and resolves("server.py", "Server._finish", ROOT / "f3crec")
    assert not resolves("data.py", "EXPECTED", ROOT / "f3crec")          # deleted; the docs used to cite it
    assert not resolves("model.py", "Backbone.nothing", ROOT / "f3crec")
    assert not resolves("nowhere.py", "main", ROOT / "f3crec")
