"""Structure the copy-out use depends on: each paper folder + common/ is complete on its own.

- no paper imports a sibling paper, and common/ imports no paper;
- no import cycle anywhere in the repository's modules, deferred (function-level) imports included;
- every citation in a paper folder (`§7.5`, `quirk 4`, `Q4`, `[R]`) resolves inside that paper's own
  docs/method.md, and no file of common/ or a paper folder points outside the repository (the design
  documents, an issue, a tracker).
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAPERS = ("flame", "vlm2rec", "f3crec")
PACKAGES = ("common",) + PAPERS
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".txt")


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


def test_only_the_flower_adapter_imports_flwr():
    """flwr is an optional extra: the core of every paper (and common/) runs without it."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "f3crec" / "flower"):
                continue
            assert "flwr" not in imported_top_levels(path), f"{path.relative_to(ROOT)} imports flwr"


PUBLIC_FLWR = {"flwr.app", "flwr.serverapp", "flwr.clientapp"}   # Flower's documented App API


def test_the_flower_app_uses_public_flower_modules_only():
    """f3crec/flower imports only Flower's public App API (no flwr.supercore / flwr.superlink / flwr.common ...),
    so the `fl` extra can be a version range; common/flower_ops.py drives Flower through its CLIs only."""
    for path in sorted((ROOT / "f3crec" / "flower").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                if name.split(".")[0] == "flwr":
                    assert name in PUBLIC_FLWR, f"{path.relative_to(ROOT)} imports {name}"
    assert "flwr" not in imported_top_levels(ROOT / "common" / "flower_ops.py")


# ------------------------------------------------------------------------------------------ import cycles
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(path: Path, modules: set[str]) -> set[str]:
    """Repository modules `path` imports, at module level or inside functions (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    edges = set()
    for target in targets:
        while target and target not in modules:  # `import a.b.c` where only a.b is a module of ours
            target = target.rpartition(".")[0]
        if target and target != name and target not in PACKAGES:  # an empty package __init__ carries nothing
            edges.add(target)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None (iterative three-colour DFS)."""
    state = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for start in sorted(graph):
        if state[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state[child] == 1:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif state[child] == 0:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
    return None


def repository_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {module_name(p) for p in files}
    return {module_name(p): import_edges(p, modules) for p in files}


def test_no_import_cycle_even_through_deferred_imports():
    graph = repository_graph()
    assert len(graph) > 30 and graph["common.prepare"] >= {"common.data", "common.registry"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_deferred_back_edge():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# ----------------------------------------------------------------------------- citations and references
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
QUIRK_WORD = re.compile(r"\bquirks?\s+(\d+)((?:\s*(?:[-–,]|and)\s*\d+)*)", re.IGNORECASE)
QUIRK_ID = re.compile(r"\bQ(\d+)\b")
TAG = re.compile(r"(?<![\w\]\[`])\[([A-Z](?:/[A-Z])*)\](?!\()")
OUTSIDE = re.compile(r"\.\./shared|shared/(?:specs|data|reviews)|CONVENTIONS\.md|\bspecs?/|\bspec §|"
                     r"\bthe spec\b|\b[Ii]ssues? #?\d+|\b(?:issue|bug)[- ]tracker\b")  # an experiment tracker is fine


def method_anchors(paper: str) -> tuple[set[str], set[int], set[str]]:
    """(section numbers, quirk numbers, tags) that <paper>/docs/method.md defines."""
    text = (ROOT / paper / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^#{1,6}\s+§(\d+(?:\.\d+)*)", text, re.MULTILINE))
    quirks = {int(n) for n in re.findall(r"^\|\s*Q(\d+)\s*\|", text, re.MULTILINE)}
    tags = set(re.findall(r"^- \*\*\[([A-Z](?:/[A-Z])*)\]\*\*", text, re.MULTILINE))
    return sections, quirks, tags


def cited_quirks(text: str) -> set[int]:
    numbers = {int(n) for n in QUIRK_ID.findall(text)}
    for first, rest in QUIRK_WORD.findall(text):
        bounds = [int(first)] + [int(n) for n in re.findall(r"\d+", rest)]
        numbers.update(bounds)
        for a, b in zip(bounds, bounds[1:]):  # "quirks 7-8" and "quirks 3–6" name the range
            numbers.update(range(min(a, b), max(a, b) + 1))
    return numbers


def folder_texts(folder: str):
    for path in sorted((ROOT / folder).rglob("*")):
        if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
            yield path, path.read_text()


def tag_letters() -> set[str]:
    """Bracketed capitals that are tags somewhere; others ([B], [N, d]) are tensor shapes, not citations."""
    return {letter for paper in PAPERS for tag in method_anchors(paper)[2] for letter in tag.split("/")}


@pytest.mark.parametrize("paper", PAPERS)
def test_every_citation_resolves_in_the_papers_own_method_notes(paper):
    sections, quirks, tags = method_anchors(paper)
    letters = tag_letters()
    assert len(sections) >= 10 and quirks and tags, f"{paper}/docs/method.md lacks §-headings, Q-rows or tags"
    unresolved = []
    for path, text in folder_texts(paper):
        where = path.relative_to(ROOT)
        unresolved += [f"{where}: §{s}" for s in SECTION.findall(text) if s.rstrip(".") not in sections]
        unresolved += [f"{where}: quirk {q}" for q in sorted(cited_quirks(text) - quirks)]
        unresolved += [f"{where}: [{t}]" for t in TAG.findall(text)
                       if t not in tags and set(t.split("/")) <= letters]
    assert not unresolved, "citations with no anchor in docs/method.md: " + "; ".join(sorted(set(unresolved)))


@pytest.mark.parametrize("folder", PACKAGES)
def test_no_reference_leaves_the_repository(folder):
    hits = [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
            for path, text in folder_texts(folder) for m in OUTSIDE.finditer(text)]
    assert not hits, "references to documents outside the repository: " + "; ".join(hits)


def test_common_cites_no_paper_sections():
    hits = [str(path.relative_to(ROOT)) for path, text in folder_texts("common") if SECTION.search(text)]
    assert not hits, f"common/ has no method notes to cite, yet these files cite a §: {hits}"


def test_citation_checks_catch_what_they_name():
    assert cited_quirks("see quirks 7-8 and quirk 15; Q3") == {3, 7, 8, 15}
    assert TAG.findall("a [Q] flag, [S/R] detail, list[C] type, [link](x)") == ["Q", "S/R"]
    assert OUTSIDE.search("as ../shared/specs/flame.md says") and OUTSIDE.search("fixed in issue 3")
    assert OUTSIDE.search("see the issue tracker")
    assert not OUTSIDE.search("the method notes (docs/method.md §7.5)")
    assert not OUTSIDE.search("train.track=tensorboard: the experiment tracker gets every record")
