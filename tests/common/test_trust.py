"""Trust corpus (issue 19): a record is never destroyed or mixed, a resume never changes what a run is, and
every operating-system error is one line. Each refusal goes through the CLI contract (exit status 2, one
stderr line naming the path or key) and leaves the earlier records byte-identical. The disk cases use a tmpfs
(root only: skipped cleanly elsewhere), the memory case an address-space ulimit in a subprocess."""
import contextlib
import dataclasses
import fcntl
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from common import checkpoints, run_folder, runs
from common.cli import run_cli
from common.io import safe_filename

ROOT = Path(__file__).resolve().parents[2]
FLAME = ["--config", str(ROOT / "flame/configs/smoke.yaml"), "train.max_epochs=1", "data.synthetic_users=60"]
VLM = ["--config", str(ROOT / "vlm2rec/configs/smoke.yaml"), "train.max_epochs=1", "seqrec.enabled=false",
       "eval.scenarios=[]", "eval.protocols=[full]", "eval.modality_modes=[both]"]
F3C = ["--config", str(ROOT / "f3crec/configs/smoke.yaml"), "federation.rounds=2", "federation.patience=2",
       "train.stop_after_block=0"]


def paper_main(paper: str):
    if paper == "flame":
        from flame.main import main
    elif paper == "vlm2rec":
        from vlm2rec.main import main
    else:
        from f3crec.main import main
    return main


ARGS = {"flame": FLAME, "vlm2rec": VLM, "f3crec": F3C}
PAPERS = ["flame", "vlm2rec", "f3crec"]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (the lock file aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != run_folder.LOCK_NAME}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished smoke run per paper (built on first use); tests copy one before using it."""
    made = {}

    def get(paper: str) -> Path:
        if paper not in made:
            base = tmp_path_factory.mktemp(f"finished-{paper}")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("REPRO_CACHE", str(base / "cache"))
                mp.setenv("REPRO_RUNS", str(base / "runs"))
                extra = []
                if paper == "flame":  # a frozen net of its own: no stage 1 in the other tests' run roots
                    main = paper_main("flame")
                    main([*FLAME, "method.name=sasrec", "--run-dir", str(base / "sasrec")])
                    extra = [f"flame.frozen={base / 'sasrec' / 'frozen.pt'}"]
                paper_main(paper)([*ARGS[paper], *extra, "--run-dir", str(base / "run")])
            made[paper] = (base / "run", extra)
        return made[paper]
    return get


@pytest.fixture
def copy_of(finished, tmp_path):
    def make(paper: str, name: str = "run") -> tuple[Path, list]:
        source, extra = finished(paper)
        target = tmp_path / name
        shutil.copytree(source, target)
        (target / run_folder.LOCK_NAME).unlink(missing_ok=True)
        return target, extra
    return make


@pytest.fixture
def refused(capsys):
    """main(argv) through run_cli: exit 2, one stderr line, no traceback; returns the line."""
    def check(paper: str, argv: list, code: int = 2) -> str:
        capsys.readouterr()
        os.environ.pop("REPRO_DEBUG", None)
        main = paper_main(paper)
        with pytest.raises(SystemExit) as info:
            run_cli(lambda: main(list(argv)))
        run_folder.release_run()
        err = capsys.readouterr().err
        assert info.value.code == code, f"exit status {info.value.code}, stderr {err!r}"
        assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
        return err.strip()
    return check


# ---------------------------------------------------------------- 1. one owner, one identity

@pytest.mark.parametrize("paper", PAPERS)
def test_a_fresh_run_into_a_finished_runs_folder_is_refused(paper, copy_of, refused):
    run, extra = copy_of(paper)
    before = snapshot(run)
    line = refused(paper, [*ARGS[paper], *extra, "--run-dir", str(run)])
    assert str(run) in line and "--overwrite" in line and "not empty" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("paper,name", [("flame", "log.txt"), ("vlm2rec", "best.pt"), ("f3crec", "results.json"),
                                        ("flame", "notes.md")])
def test_a_fresh_run_into_a_users_folder_with_one_file_is_refused(paper, name, tmp_path, refused):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / name).write_bytes(b"the user's own record\n")
    line = refused(paper, [*ARGS[paper], "--run-dir", str(folder)])
    assert str(folder) in line and name in line
    assert snapshot(folder) == {name: b"the user's own record\n"}


def test_overwrite_moves_the_old_run_aside_even_when_the_new_run_fails_at_once(copy_of, refused):
    run, extra = copy_of("flame")
    before = snapshot(run)
    line = refused("flame", [*FLAME, *extra, "train.lr=1e30", "--overwrite", "--run-dir", str(run)])
    assert "non-finite" in line
    aside = [p for p in run.iterdir() if p.name.startswith(run_folder.ASIDE)]
    assert len(aside) == 1 and snapshot(aside[0]) == before   # nothing of the good run lost


@pytest.mark.parametrize("paper", PAPERS)
def test_overwrite_runs_afresh_and_keeps_the_old_run_whole(paper, copy_of, tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))
    run, extra = copy_of(paper)
    before = snapshot(run)
    paper_main(paper)([*ARGS[paper], *extra, "--overwrite", "--run-dir", str(run)])
    run_folder.release_run()
    aside = [p for p in run.iterdir() if p.name.startswith(run_folder.ASIDE)]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert (run / "results.json").is_file() and "--overwrite: what" in (run / "log.txt").read_text()


@pytest.mark.parametrize("paper,override,key", [
    ("flame", "train.seed=7", "train.seed"), ("flame", "data.synthetic_users=70", "data.synthetic_users"),
    ("flame", "backbone.d=32", "backbone.d"),
    ("vlm2rec", "train.seed=7", "train.seed"), ("vlm2rec", "data.num_users=20", "data.num_users"),
    ("f3crec", "train.seed=7", "train.seed"), ("f3crec", "data.name=ml-100k", "data.name")])
def test_a_resume_refuses_an_override_that_changes_the_run(paper, override, key, copy_of, refused):
    run, _ = copy_of(paper)
    before = snapshot(run)
    line = refused(paper, ["--resume", str(run), override])
    assert key in line and str(run) in line and "resume runs the saved config" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("paper", PAPERS)
def test_a_resume_refuses_another_config_file(paper, copy_of, refused, tmp_path):
    run, _ = copy_of(paper)
    other = yaml.safe_load((run / "config.yaml").read_text())
    other["run_root"] = None
    section = {"flame": "train", "vlm2rec": "train", "f3crec": "train"}[paper]
    other[section]["seed"] = 11
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    before = snapshot(run)
    line = refused(paper, ["--resume", str(run), "--config", str(tmp_path / "other.yaml")])
    assert "train.seed" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("extra,words", [(["--overwrite"], "--overwrite"),
                                         (["--run-dir", "/tmp/elsewhere"], "--run-dir")])
def test_a_resume_with_overwrite_or_another_run_dir_is_refused(extra, words, copy_of, refused):
    run, _ = copy_of("f3crec")
    before = snapshot(run)
    line = refused("f3crec", ["--resume", str(run), *extra])
    assert words in line and str(run) in line
    assert snapshot(run) == before


@pytest.mark.parametrize("paper", PAPERS)
def test_a_last_pt_of_another_run_is_refused(paper, copy_of, refused):
    """Another seed's folder with this run's last.pt copied in: the digest does not match its config."""
    run, _ = copy_of(paper)
    other, _ = copy_of(paper, "other-seed")
    saved = yaml.safe_load((other / "config.yaml").read_text())
    saved["train"]["seed"] = 2
    (other / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=True))
    shutil.copy(run / "last.pt", other / "last.pt")
    before = snapshot(other)
    line = refused(paper, ["--resume", str(other)])
    assert "belongs to another run" in line and str(other / "last.pt") in line
    assert snapshot(other) == before


@pytest.mark.parametrize("paper", ["flame", "f3crec"])
def test_a_last_pt_without_identity_is_refused(paper, copy_of, refused):
    run, _ = copy_of(paper)
    state = torch.load(run / "last.pt", weights_only=True)
    del state["run_identity"]
    torch.save(state, run / "last.pt")
    before = snapshot(run)
    line = refused(paper, ["--resume", str(run)])
    assert "no run identity" in line and str(run / "last.pt") in line
    assert snapshot(run) == before


@contextlib.contextmanager
def held_by_another_process(folder: Path):
    """Another open file description holding the run folder's lock (flock: as another process would)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / run_folder.LOCK_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("pid 4242 on elsewhere\n")
        handle.flush()
        yield
        fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.mark.parametrize("paper", PAPERS)
def test_a_second_writer_of_an_empty_folder_fails_in_one_line(paper, tmp_path, refused):
    folder = tmp_path / "busy"
    with held_by_another_process(folder):
        line = refused(paper, [*ARGS[paper], "--run-dir", str(folder)])
    assert "in use by another run" in line and str(folder) in line and "4242" in line
    assert snapshot(folder) == {}


@pytest.mark.parametrize("paper", PAPERS)
def test_a_resume_of_a_folder_another_process_writes_fails_in_one_line(paper, copy_of, refused):
    run, _ = copy_of(paper)
    before = snapshot(run)
    with held_by_another_process(run):
        line = refused(paper, ["--resume", str(run)])
    assert "in use by another run" in line and str(run) in line
    assert snapshot(run) == before


def test_two_processes_given_one_folder_one_runs_one_is_refused(tmp_path):
    """Real processes: the first holds the lock while it runs; the second fails at once in one line."""
    folder = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "f3crec.main", *F3C, "federation.rounds=12",
                              "federation.patience=12", "train.stop_after_block=1", "--run-dir", str(folder)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (folder / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.Popen([sys.executable, "-m", "f3crec.main", *F3C, "--run-dir", str(folder)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        second_err = second.communicate(timeout=120)[1]
        overlapped = first.poll() is None  # the first still ran when the second had finished
    finally:
        first_err = first.communicate(timeout=180)[1].decode()
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and second_err.count("\n") == 1, second_err
    if overlapped:
        assert "in use by another run" in second_err and str(folder) in second_err
    else:  # a fast machine: the first had ended; its records still refuse a second fresh run
        assert "not empty" in second_err and str(folder) in second_err
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len({json.loads(line)["round"] for line in lines if json.loads(line)["block"] == 0}) == len(
        [line for line in lines if json.loads(line)["block"] == 0])   # one run's rounds, none twice


def test_resume_records_an_allowed_change_in_log_and_results(copy_of, tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))
    run, _ = copy_of("f3crec")
    config = (run / "config.yaml").read_bytes()
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["block"] == 0
    first = (run / "results.json").read_bytes()
    paper_main("f3crec")(["--resume", str(run), "train.stop_after_block=1"])
    run_folder.release_run()
    assert (run / "config.yaml").read_bytes() == config            # the identity is the saved config
    assert [p.read_bytes() for p in run.glob("previous-*/results.json")] == [first]   # the block-0 record kept
    results = json.loads((run / "results.json").read_text())
    assert results["resume_changes"] == {"train.stop_after_block": [0, 1]}
    assert "train.stop_after_block: 0 -> 1" in (run / "log.txt").read_text()


def test_flame_resume_under_another_run_root_uses_the_recorded_frozen_net(tmp_path, monkeypatch):
    """Stage 1 trained under root A; the resume runs with REPRO_RUNS=B: no stage-1 net is trained in B."""
    from flame.main import main
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "A"))
    main([*FLAME, "train.max_epochs=2", "--run-dir", str(tmp_path / "run")])
    run_folder.release_run()
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    assert str(tmp_path / "A") in first["frozen"]
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "B"))
    resumed = main(["--resume", str(tmp_path / "run")])
    run_folder.release_run()
    assert resumed["frozen"] == first["frozen"] and not (tmp_path / "B" / "flame").exists()
    assert resumed["convergence"]["sasrec_run"] == first["convergence"]["sasrec_run"]


def test_flame_resume_whose_recorded_frozen_net_is_gone_is_one_line(copy_of, refused, tmp_path):
    run, _ = copy_of("flame")
    state = torch.load(run / "last.pt", weights_only=True)
    state["run_identity"]["inputs"]["frozen"] = str(tmp_path / "gone" / "frozen.pt")
    torch.save(state, run / "last.pt")
    before = snapshot(run)
    line = refused("flame", ["--resume", str(run)])
    assert str(tmp_path / "gone" / "frozen.pt") in line and "recorded in its last.pt" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("paper,text", [("flame", "train: [unclosed\n"), ("vlm2rec", "train: [unclosed\n"),
                                        ("f3crec", "train: [unclosed\n"), ("flame", "- just\n- a list\n")])
def test_a_resumed_config_that_is_not_yaml_is_one_line(paper, text, copy_of, refused):
    run, _ = copy_of(paper)
    (run / "config.yaml").write_text(text)
    before = snapshot(run)
    line = refused(paper, ["--resume", str(run)])
    assert str(run / "config.yaml") in line
    assert snapshot(run) == before


# ---------------------------------------------------------------- signals and temp files

def test_ctrl_c_before_any_checkpoint_names_no_folder_to_resume(tmp_path, capsys):
    run = runs.start_run(_Cfg(), "paper", "toy", run_dir=tmp_path / "r")

    def stop():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:
        run_cli(stop)
    err = capsys.readouterr().err
    assert info.value.code == 130 and "nothing to resume" in err and f"--resume {run}" not in err
    run_folder.release_run()


def test_ctrl_c_in_flames_stage_1_says_rerun_the_command_not_resume_the_stage_1_folder(tmp_path, capsys):
    stage1 = tmp_path / "stage1" / "seed1_abc"
    runs.start_run(_Cfg(), "flame", "toy", run_dir=stage1)
    checkpoints.save_checkpoint(stage1 / "last.pt", {"epoch": 1})

    def stop():
        with runs.interrupt_hint(f"stage 1 ({stage1}) was stopped: the same command continues it from its last "
                                 "checkpoint"):
            raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        run_cli(stop)
    err = capsys.readouterr().err
    assert "the same command continues it" in err and "--resume" not in err
    run_folder.release_run()


def test_sigterm_stops_like_ctrl_c_and_leaves_no_temp_file(tmp_path):
    """A run SIGTERMed while it trains: exit 143, one line, and no `.tmp` beside its checkpoints."""
    folder = tmp_path / "term"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flame.main", *FLAME, "train.max_epochs=200", "train.patience=200",
                             "method.name=sasrec", "--run-dir", str(folder)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (folder / "last.pt").is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 143 and err.count("\n") == 1 and err.startswith("terminated"), err
    assert f"--resume {folder}" in err
    assert not list(folder.glob(".*.tmp"))


def test_a_stale_temp_file_from_a_killed_writer_is_removed_on_resume(copy_of, tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RUNS", str(tmp_path / "runs"))
    run, _ = copy_of("f3crec")
    (run / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    paper_main("f3crec")(["--resume", str(run), "train.stop_after_block=1"])
    run_folder.release_run()
    assert not (run / ".last.pt.k1ll3d.tmp").exists()
    assert ".last.pt.k1ll3d.tmp" in (run / "log.txt").read_text()


# ---------------------------------------------------------------- 3. operating-system errors, one line

@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only; skipped elsewhere): mount(size, ro=False) -> its path."""
    mounted = []

    def mount(size: str = "4m", read_only: bool = False) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("paper", PAPERS)
def test_a_read_only_run_root_is_one_line_naming_it_and_the_setting(paper, tmpfs, refused):
    root = tmpfs(read_only=True)
    line = refused(paper, [*ARGS[paper], f"run_root={root}"])
    assert str(root) in line and "not writable" in line and ("run_root" in line or "REPRO_RUNS" in line)


@pytest.mark.parametrize("paper", ["vlm2rec", "f3crec"])
def test_a_read_only_cache_is_one_line_naming_repro_cache(paper, tmpfs, refused, monkeypatch):
    cache = tmpfs(read_only=True)
    monkeypatch.setenv("REPRO_CACHE", str(cache))
    extra = ["train.share_base=true"] if paper == "f3crec" else []
    line = refused(paper, [*ARGS[paper], *extra])
    assert str(cache) in line and ("REPRO_CACHE" in line or "base_cache" in line)


@pytest.mark.parametrize("paper", ["vlm2rec", "f3crec"])
def test_repro_cache_that_is_a_file_is_one_line_naming_it(paper, tmp_path, refused, monkeypatch):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("REPRO_CACHE", str(tmp_path / "cachefile"))
    extra = ["train.share_base=true"] if paper == "f3crec" else []
    line = refused(paper, [*ARGS[paper], *extra, f"run_root={tmp_path / 'runs'}"])
    assert "REPRO_CACHE" in line and str(tmp_path / "cachefile") in line


@pytest.mark.parametrize("paper", PAPERS)
def test_a_run_dir_name_too_long_is_one_line(paper, tmp_path, refused):
    folder = tmp_path / ("x" * 300)
    line = refused(paper, [*ARGS[paper], "--run-dir", str(folder)])
    assert "too long" in line.lower() and "x" * 300 in line


@pytest.mark.parametrize("paper", PAPERS)
def test_a_run_dir_in_a_symlink_loop_is_one_line(paper, tmp_path, refused):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    line = refused(paper, [*ARGS[paper], "--run-dir", str(tmp_path / "loop" / "run")])
    assert str(tmp_path / "loop") in line and ("symbolic links" in line or "loop" in line)


@pytest.mark.parametrize("paper", PAPERS)
def test_a_run_dir_under_a_file_is_one_line(paper, tmp_path, refused):
    (tmp_path / "afile").write_text("x")
    line = refused(paper, [*ARGS[paper], "--run-dir", str(tmp_path / "afile" / "run")])
    assert str(tmp_path / "afile") in line


@pytest.mark.parametrize("paper,key", [("flame", "train.seed"), ("vlm2rec", "train.seed"), ("f3crec", "train.seed"),
                                       ("vlm2rec", "eval.neg_seed")])
def test_a_seed_outside_32_bits_is_one_line_naming_the_key(paper, key, tmp_path, refused):
    line = refused(paper, [*ARGS[paper], f"{key}={2**32}", f"run_root={tmp_path}"])
    assert key in line and str(2**32) in line
    assert not (tmp_path / paper).exists()


@pytest.mark.parametrize("paper", ["flame", "f3crec"])
def test_a_full_disk_while_writing_is_one_line_and_keeps_the_earlier_run(paper, tmpfs, finished, tmp_path):
    """The run root on a tiny tmpfs beside a finished run: the new run fails in one line naming the file it
    could not write, the finished run is byte-identical and no temp file is left."""
    disk = tmpfs("400k")
    source, extra = finished(paper)
    shutil.copytree(source, disk / "old", ignore=shutil.ignore_patterns("*.pt", run_folder.LOCK_NAME))
    before = snapshot(disk / "old")
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - 40_000, 0))   # a few tens of KB left
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "REPRO_CACHE": str(tmp_path / "c")}
    args = [*ARGS[paper], *extra]
    if paper == "flame":
        args += ["train.max_epochs=30", "train.patience=30"]
    args += ["--run-dir", str(disk / "new")]
    done = subprocess.run([sys.executable, "-m", f"{paper}.main", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "No space left" in done.stderr and str(disk / "new") in done.stderr
    assert snapshot(disk / "old") == before
    assert not [p for p in (disk / "new").rglob("*.tmp")]


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    checkpoints.save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    before = (tmp_path / "last.pt").read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as info:
        checkpoints.save_checkpoint(tmp_path / "last.pt", {"epoch": 2})
    assert info.value.filename == str(tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before and list(tmp_path.iterdir()) == [tmp_path / "last.pt"]


def test_out_of_memory_is_one_line(tmp_path):
    """A synthetic size that cannot fit under a 3 GB address-space limit: one line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    limit = 3 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    done = subprocess.run([sys.executable, "-m", "flame.main", *FLAME, "method.name=sasrec",
                           "data.synthetic_items=400000000", f"run_root={tmp_path}"], env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=cap)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "out of memory" in done.stderr


# ---------------------------------------------------------------- 5. downloads

@pytest.mark.parametrize("item_id", ["../../escape", "a/b", "..", ".hidden", "x" * 300, "C:\\win", "ok\0nul", ""])
def test_an_id_from_data_never_names_a_path(item_id):
    name = safe_filename(item_id)
    assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")
    assert 0 < len(name) <= 100 and "\0" not in name
    assert safe_filename("B000123XYZ") == "B000123XYZ"          # a real ASIN keeps its name


def test_a_crafted_item_id_cannot_write_outside_the_images_folder(tmp_path):
    from vlm2rec.prepare import download_images
    out = tmp_path / "data" / "images"
    report = download_images({"../../../outside": ""}, out, workers=1, retries=0, progress=False)
    assert report["failed"] == {"../../../outside": "no image URL"}
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("data"), Path("data/images")]


def _zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_zip_bomb_is_refused_before_any_byte_is_written(tmp_path):
    from common.download import unpack
    bomb = _zip(tmp_path / "bomb.zip", {"ml-100k/u.data": b"\0" * (8 << 20)})
    with pytest.raises(ValueError, match="zip bomb"):
        unpack(bomb, "u.data", tmp_path / "out" / "u.data")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_archive_with_too_many_members_or_bytes_is_refused(tmp_path):
    from common.download import unpack
    many = _zip(tmp_path / "many.zip", {f"f{i}": b"1" for i in range(30)})
    with pytest.raises(ValueError, match="30 members"):
        unpack(many, "f1", tmp_path / "x", max_members=20)
    big = _zip(tmp_path / "big.zip", {"a": os.urandom(50_000)})
    with pytest.raises(ValueError, match="more than the 10,000 allowed"):
        unpack(big, "a", tmp_path / "y", max_bytes=10_000)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_extraction_larger_than_the_free_space_is_one_line(tmpfs, tmp_path):
    from common.download import unpack
    disk = tmpfs("1m")
    archive = _zip(tmp_path / "a.zip", {"u.data": os.urandom(3 << 20)})
    with pytest.raises(OSError) as info:
        unpack(archive, "u.data", disk / "u.data")
    assert info.value.errno == 28 and "not enough free space" in str(info.value)
    assert list(disk.iterdir()) == []


class _Server:
    """A local HTTP server answering each path with fixed bytes (a Content-Length it may lie about)."""

    def __init__(self, files: dict):
        import http.server
        import threading
        files = dict(files)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body, length = files.get(self.path, (b"", None))
                self.send_response(200 if self.path in files else 404)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def close(self):
        self.httpd.shutdown()


def test_a_download_longer_than_its_published_size_is_refused(tmp_path):
    from common.download import fetch
    server = _Server({"/f": (b"x" * 5000, None)})
    try:
        with pytest.raises(ValueError, match="4,000"):
            fetch(server.url("/f"), tmp_path / "f", size=4000)
        with pytest.raises(ValueError, match="size mismatch"):
            fetch(server.url("/f"), tmp_path / "f", size=6000)
        assert fetch(server.url("/f"), tmp_path / "f", size=5000).read_bytes() == b"x" * 5000
    finally:
        server.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_damaged_gzip_download_is_refused_and_a_changed_file_is_caught_by_its_record(tmp_path):
    from vlm2rec.prepare import verified_download
    good = gzip.compress(b'{"asin": "A"}\n' * 100)
    server = _Server({"/bad.json.gz": (good[:-6] + b"\0" * 6, None), "/good.json.gz": (good, None)})
    try:
        with pytest.raises(ValueError, match="not a complete gzip file"):
            verified_download(server.url("/bad.json.gz"), tmp_path / "bad.json.gz", "hint")
        assert not (tmp_path / "bad.json.gz").exists()
        verified_download(server.url("/good.json.gz"), tmp_path / "good.json.gz", "hint")
    finally:
        server.close()
    record = json.loads((tmp_path / "downloads.json").read_text())["good.json.gz"]
    assert record["bytes"] == len(good)
    (tmp_path / "good.json.gz").write_bytes(gzip.compress(b'{"asin": "B"}\n' * 100))
    with pytest.raises(ValueError, match="no longer matches its record"):
        verified_download("http://127.0.0.1:9/never", tmp_path / "good.json.gz", "hint")


def test_two_prepares_of_one_dataset_at_once_both_succeed(tmp_path):
    """Two processes build one artefact: one builds, the other waits and reuses it (no vanished stats.json)."""
    raw = tmp_path / "raw" / "ml-100k"
    raw.mkdir(parents=True)
    rng = __import__("random").Random(0)
    lines = {(u, i) for u in range(1, 60) for i in rng.sample(range(1, 80), 25)}
    (raw / "u.data").write_text("".join(f"{u}\t{i}\t4\t{100 * u + i}\n" for u, i in sorted(lines)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REPRO_CACHE": str(tmp_path / "cache")}
    code = ("import sys, common.registry as r, common.prepare as p\n"
            "e = r.dataset_entry('ml-100k'); e['sha256'] = None\n"
            "r.expected_stats = lambda *a, **k: None; p.expected_stats = r.expected_stats\n"
            "print(p.build_dataset('ml-100k', sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "raw")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [proc.communicate(timeout=240) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-500:] for _, err in outs]
    built = {out.strip().splitlines()[-1] for out, _ in outs}   # a waiter prints that it waits first
    assert len(built) == 1 and (Path(built.pop()) / "stats.json").is_file()


# ---------------------------------------------------------------- common pieces

@dataclasses.dataclass
class _Cfg:
    lr: float = 0.1


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    run_folder.release_run()
    runs._HINTS.clear()


def test_flame_more_epochs_on_resume_only_where_they_do_not_move_the_lambda_horizon(tmp_path):
    from common.config import ConfigError, config_to_dict
    from flame.checks import check_more_epochs
    from flame.config import Config, FlameConfig, TrainConfig
    saved = Config(train=TrainConfig(max_epochs=3))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(saved)))
    more = Config(train=TrainConfig(max_epochs=5))
    with pytest.raises(ConfigError, match="train.max_epochs=5 .*λ's horizon"):
        check_more_epochs(more, tmp_path)                       # horizon = max_epochs: the numbers would move
    check_more_epochs(Config(train=TrainConfig(max_epochs=5), flame=FlameConfig(lambda_horizon=200)), tmp_path)
    check_more_epochs(Config(train=TrainConfig(max_epochs=3)), tmp_path)


def test_ctrl_c_in_a_real_stage_1_names_the_users_run_not_the_stage_1_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "REPRO_RUNS": str(tmp_path / "runs")}
    user = tmp_path / "mine"
    # A suite started in the background by a non-interactive shell (`make test &`, nohup) inherits SIGINT
    # ignored, and so would the child: give it the default disposition, as a terminal's Ctrl-C finds it.
    proc = subprocess.Popen([sys.executable, "-m", "flame.main", *FLAME, "train.max_epochs=200", "train.patience=200",
                             "--run-dir", str(user)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "runs").rglob("stage1/*/last.pt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    try:
        err = proc.communicate(timeout=180)[1].decode()
    except subprocess.TimeoutExpired:  # say what it printed: a hang after Ctrl-C is the failure to explain
        proc.kill()
        pytest.fail(f"still running 180 s after Ctrl-C; stderr: {proc.communicate()[1].decode()[-2000:]}")
    assert proc.returncode == 130 and err.count("\n") == 1, err
    assert "stopped in stage 1" in err and f"--run-dir {user}" in err and "--resume" not in err
    assert not user.exists()                                  # the user's run had not started
