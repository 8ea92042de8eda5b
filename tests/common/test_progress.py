"""common/progress.py: with stdout not a terminal (nohup, SLURM), a long phase writes plain lines with the time
left, every ~30 s or 10 %, silent for a phase under 10 s; and a run's console shows only the config keys that
differ from the paper's defaults. Driven by a fake clock, never by sleeping."""
import io
import re
from dataclasses import dataclass, field

import pytest

from common.progress import Progress, duration, mode, track


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines_mode(total, desc="flame", unit="epoch", **options):
    clock, out = Clock(), io.StringIO()
    return Progress(total, desc, unit, clock=clock, stream=out, show="lines", **options), clock, out


def test_a_long_phase_writes_lines_with_the_time_left_every_30_s():
    progress, clock, out = lines_mode(100, unit="step")
    for _ in range(100):  # 2 s a step: 200 s in all
        clock.now += 2.0
        progress.update()
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[flame] estimate: ~3m20s for 100 steps on this device (from the first step's 2.0s)"
    ticks = [line for line in lines[1:-1]]
    # first line once 10 s have passed, then every 30 s (15 steps), and each new tenth (10 steps) when sooner
    done = [int(re.match(r"\[flame\] (\d+)/100 steps", line).group(1)) for line in ticks]
    assert done[0] == 5 and all(b > a for a, b in zip(done, done[1:]))
    assert all(b - a <= 15 for a, b in zip(done, done[1:]))
    for line, n in zip(ticks, done):   # the time left is the rate so far times what is left
        left = 2.0 * (100 - n)
        if n < 100:
            assert line.endswith(f"| ~{duration(left)} left (estimate)"), line
    assert "[flame] 10/100 steps (10%) | 20s elapsed | ~3m00s left (estimate)" in ticks
    assert lines[-1] == "[flame] 100/100 steps done in 3m20s"


def test_a_new_tenth_gives_a_line_before_30_s_pass():
    progress, clock, out = lines_mode(10)
    for _ in range(10):  # 12 s an epoch: a tenth every 12 s, sooner than 30 s
        clock.now += 12.0
        progress.update()
    ticks = [line for line in out.getvalue().splitlines() if "elapsed" in line]
    assert [line.split()[1] for line in ticks] == [f"{n}/10" for n in range(1, 11)]
    assert ticks[2] == "[flame] 3/10 epochs (30%) | 36s elapsed | ~1m24s left (estimate)"


def test_a_phase_under_10_s_prints_nothing():
    progress, clock, out = lines_mode(50, unit="step")
    for _ in range(50):
        clock.now += 0.15  # 7.5 s in all
        progress.update()
    progress.close()
    assert out.getvalue() == ""


def test_the_first_units_estimate_the_whole_run_and_say_it_is_an_estimate():
    progress, clock, out = lines_mode(20, unit="step", also=lambda per_step: f"; 5 epochs: ~{duration(per_step * 100)}")
    clock.now += 0.5   # a short phase: the estimate line still comes, for the run as a whole
    progress.update()
    assert out.getvalue().splitlines() == [
        "[flame] estimate: ~10s for 20 steps on this device (from the first step's 0.5s); 5 epochs: ~50s"]
    quiet, clock, out = lines_mode(20, unit="step", estimate=False)
    clock.now += 5.0
    quiet.update()
    assert out.getvalue() == ""


def test_track_reports_over_an_iterable_and_off_writes_nothing(monkeypatch):
    clock, out = Clock(), io.StringIO()

    def slow():
        for i in range(4):
            clock.now += 20.0
            yield i

    assert list(track(slow(), "vlm2rec features", total=4, unit="batch", clock=clock, stream=out, show="lines")) \
        == [0, 1, 2, 3]
    text = out.getvalue().splitlines()
    assert text[1] == "[vlm2rec features] 1/4 batches (25%) | 20s elapsed | ~1m00s left (estimate)"
    assert text[-1] == "[vlm2rec features] 4/4 batches done in 1m20s"
    monkeypatch.setenv("REPRO_PROGRESS", "off")
    assert mode() == "off"
    monkeypatch.setenv("REPRO_PROGRESS", "")
    assert mode(io.StringIO()) == "lines"   # not a terminal: lines


@dataclass
class Section:
    lr: float = 0.1
    epochs: int = 10


@dataclass
class Cfg:
    train: Section = field(default_factory=Section)
    name: str = "paper"


def test_the_console_shows_only_the_keys_that_differ_and_config_yaml_keeps_all(tmp_path, capsys):
    import yaml

    from common.runs import start_run
    run = start_run(Cfg(train=Section(lr=0.5)), "paper", "toy", root=tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [f"config: 1 key(s) differ from the paper's defaults (all keys in {run / 'config.yaml'}):",
                       "  train.lr = 0.5"]
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"name": "paper", "train": {"epochs": 10, "lr": 0.5}}
    again = start_run(Cfg(), "paper", "toy", root=tmp_path)
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"config: the paper's defaults (all keys in {again / 'config.yaml'})"]


def test_a_flower_process_log_holds_no_colour_codes_and_no_deprecation_warnings(tmp_path):
    """common/flower_ops.py starts every Flower process through spawn_logged with _env: Flower colours its level
    names whatever the stream (no switch), and its CLIs import typer/click, which warn on every start."""
    import sys
    import time

    from common.flower_ops import _env, spawn_logged
    script = ("import warnings, sys; print('\\x1b[92mINFO \\x1b[0m:      Starting Flower SuperLink'); "
              "warnings.warn('get_text_stream is deprecated', DeprecationWarning); "
              "print('\\x1b[93mWARNING \\x1b[0m:   careful', file=sys.stderr); print('done')")
    log = tmp_path / "logs" / "superlink.log"
    popen = spawn_logged([sys.executable, "-c", script], log, _env(tmp_path), tmp_path)
    assert popen.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while "done" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    assert "\x1b" not in text and "Deprecat" not in text
    assert "INFO :      Starting Flower SuperLink" in text and "WARNING :   careful" in text and "done" in text
