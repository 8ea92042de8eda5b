"""No paper folder imports a sibling paper (CONVENTIONS.md §2): each folder + common/ can be copied out."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPERS = ("flame", "vlm2rec", "f3crec")


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("paper", PAPERS)
def test_paper_imports_no_sibling(paper):
    files = sorted((ROOT / paper).rglob("*.py"))
    assert files, f"{paper}/ has no Python files"
    for path in files:
        bad = imported_top_levels(path) & (set(PAPERS) - {paper})
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_common_imports_no_paper():
    for path in sorted((ROOT / "common").rglob("*.py")):
        bad = imported_top_levels(path) & set(PAPERS)
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
