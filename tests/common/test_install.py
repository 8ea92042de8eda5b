"""Installable pieces: a copied-out paper folder runs with what its one pip line installs, and an installed
(non-editable) project writes runs/ and data/ under the working directory, never into site-packages.

How "one pip line" is tested, honestly and fast. A fresh venv that downloads and unpacks torch for each
paper costs minutes and a package index; a `--system-site-packages` venv proves nothing (every package of
the shared environment is importable). So the tests split the claim in two:
- `test_a_copied_paper_runs_with_only_its_requirements`: `<paper>/requirements.txt` is resolved against the
  installed distributions (each line's version range must hold; the dependencies of every distribution,
  markers evaluated, are followed), and an interpreter started with `-S` (no site-packages at all) sees
  exactly that closure: one symlink per top-level entry of each distribution's files. The copied folder then
  runs its smoke config from its own root. A module the paper imports but its requirements.txt does not
  list (transformers in FLAME, say) is an ImportError here, as in a fresh venv.
- `test_the_pip_line_resolves` (slow: it needs a package index) asks pip itself, in dry-run mode, what
  `pip install -r <paper>/requirements.txt` would install into an empty target.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAPERS = ("flame", "vlm2rec", "f3crec")
IGNORE = shutil.ignore_patterns("__pycache__", "runs", "data", "*.egg-info")
# seconds, not minutes: the smoke configs cut further
FAST = {"flame": ["train.max_epochs=1"],
        "f3crec": ["federation.rounds=2", "train.stop_after_block=1"],
        "vlm2rec": ["zero_shot=false", "train.max_epochs=1", "train.max_steps_per_epoch=2", "eval.protocols=[full]",
                    "eval.modality_modes=[both]", "eval.scenarios=[]", "seqrec.enabled=false"]}
REPRO_VARS = ("REPRO_RUNS", "REPRO_DATA", "REPRO_CACHE")


def _requirement_lines(paper: str) -> list[str]:
    lines = (ROOT / paper / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def closure(lines: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """name -> installed distribution for every requirement line and, recursively, its (non-extra)
    dependencies; a line whose installed version falls outside its range fails here."""
    from packaging.requirements import Requirement
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [(Requirement(line), set()) for line in lines]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        dist = importlib.metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{req}: installed {dist.version}"
        new_extras = set(req.extras)
        if key in seen and not new_extras:
            continue
        seen[key] = dist
        todo += [(Requirement(r), new_extras) for r in dist.requires or ()]
    return seen


def isolated_site(dists: dict[str, importlib.metadata.Distribution], folder: Path) -> Path:
    """A folder that makes exactly `dists` importable (symlinks to their top-level files and folders)."""
    folder.mkdir()
    for dist in dists.values():
        for top in {Path(str(f)).parts[0] for f in dist.files or ()}:
            if top.startswith("..") or top == "__pycache__" or (folder / top).exists():
                continue
            (folder / top).symlink_to(Path(dist.locate_file(top)).resolve())
    return folder


def copy_out(paper: str, where: Path) -> Path:
    for name in (paper, "common"):
        shutil.copytree(ROOT / name, where / name, ignore=IGNORE)
    return where


@pytest.mark.heavy
@pytest.mark.parametrize("paper", PAPERS)
def test_a_copied_paper_runs_with_only_its_requirements(paper, tmp_path):
    dists = closure(_requirement_lines(paper))
    assert "torch" in dists and (("transformers" in dists) == (paper == "vlm2rec"))  # only VLM2Rec pulls it in
    site = isolated_site(dists, tmp_path / "site")
    project = copy_out(paper, tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k not in (*REPRO_VARS, "PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # -S: no site-packages, so nothing of the shared environment beyond the closure is importable
    cmd = [sys.executable, "-S", "-m", f"{paper}.main", "--config", f"{paper}/configs/smoke.yaml", *FAST[paper]]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in (project / "runs" / paper).rglob("results.json")]
    assert runs, f"no run under {project / 'runs'}: {done.stdout[-1000:]}"
    assert not (ROOT / paper / "runs").exists()


def test_the_closure_catches_a_missing_requirement(tmp_path):
    """The isolation is real: FLAME's closure cannot import transformers, the shared environment can."""
    site = isolated_site(closure(_requirement_lines("flame")), tmp_path / "site")
    probe = [sys.executable, "-S", "-c", "import torch, yaml, numpy, tqdm; import transformers"]
    done = subprocess.run(probe, env={"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "No module named 'transformers'" in done.stderr, done.stderr[-500:]
    with pytest.raises(AssertionError, match="installed"):
        closure(["torch==0.0.1"])


@pytest.mark.slow
@pytest.mark.parametrize("paper", PAPERS)
def test_the_pip_line_resolves(paper, tmp_path):
    """`pip install -r <paper>/requirements.txt` into an empty target resolves (pip's dry run against the
    package index pip is configured with; skipped when none answers) and brings no package the paper does
    not need (transformers only for VLM2Rec)."""
    import json
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(tmp_path / "report.json"), "--target", str(tmp_path / "t"),
                           "-r", str(ROOT / paper / "requirements.txt")], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and re.search(r"(?i)connection|network|could not find a version", done.stderr):
        pytest.skip(f"no package index answers here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert {"torch", "numpy", "pyyaml", "tqdm"} <= names
    assert ("transformers" in names) == (paper == "vlm2rec")


@pytest.mark.heavy
def test_an_installed_project_runs_and_writes_under_the_working_directory(tmp_path):
    """pip install --target (no -e, no dependencies: they are the environment's): the installed package's
    default run root, data root and cache are under the current directory, a smoke run started there
    (its config read from the installed package) writes there, and nothing lands inside the install."""
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for name in ("common", *PAPERS):
        shutil.copytree(ROOT / name, source / name, ignore=IGNORE)
    target = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(source)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    metadata = next(target.glob("repro_recsys-*.dist-info")) / "METADATA"
    text = metadata.read_text()
    assert {"flame", "vlm2rec", "f3crec", "track", "plot", "fl"} <= set(re.findall(r"^Provides-Extra: (\S+)$", text, re.M))
    core = [line for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M) if "extra ==" not in line]
    assert not [line for line in core if line.startswith(("transformers", "accelerate", "scipy"))], core
    assert (target / "f3crec" / "flower" / "app" / "pyproject.toml").is_file()   # the Flower App ships too
    before = sorted(str(p.relative_to(target)) for p in target.rglob("*") if "__pycache__" not in p.parts)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (*REPRO_VARS, "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    probe = ("import common, common.io as io, common.runs as runs; "
             "print(common.__file__); print(runs.default_run_root()); print(io.data_root()); print(io.cache_root())")
    where = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                           timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    module, run_root, data, cache = where.stdout.split("\n")[:4]
    assert Path(module).is_relative_to(target)
    assert (Path(run_root), Path(data), Path(cache)) == (work / "runs", work / "data" / "raw", work / "data" / "processed")
    config = target / "f3crec" / "configs" / "smoke.yaml"
    done = subprocess.run([sys.executable, "-m", "f3crec.main", "--config", str(config), *FAST["f3crec"]], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((work / "runs" / "f3crec").rglob("results.json"))
    after = sorted(str(p.relative_to(target)) for p in target.rglob("*") if "__pycache__" not in p.parts)
    assert after == before   # nothing written into the installed package
