"""Progress of a long phase (epochs, steps, feature caching, rounds) that shows in a terminal AND in a log.

    for batch in track(batches, "epoch 3", total=len(batches), unit="step"):
        ...
    with Progress(total=200, desc="flame", unit="epoch") as progress:
        for epoch in ...:
            ...
            progress.update()

On a terminal (stdout is a TTY): a tqdm bar on stderr, with tqdm's own time-left estimate. Otherwise (nohup,
SLURM, a pipe, CI): plain lines on stdout, which the run's log.txt copies, e.g.

    [flame] 30/200 epoch (15%) | 4m10s elapsed | ~23m36s left (estimate)

A phase that ends within `quiet_s` (10 s) prints nothing; after that, a line whenever `every_s` (30 s) have
passed since the last one or another tenth of the total is done, and one closing line. Each phase also says,
after its first unit, what the whole phase should take on this device ("estimate: ... from the first
epoch's 12.3 s"), when that is longer than `quiet_s`. The estimates are extrapolations (the first unit
includes warm-up; early stopping may end sooner); they say so.

$REPRO_PROGRESS=bar|lines|off forces a mode (default: bar on a TTY, else lines). `clock` is injectable so
tests drive the line mode with a fake clock instead of sleeping.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TextIO, TypeVar

T = TypeVar("T")
QUIET_S, EVERY_S, EVERY_FRACTION = 10.0, 30.0, 0.1


def duration(seconds: float) -> str:
    """3s, 4m10s, 2h05m: a short human duration."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def plural(unit: str, count: int) -> str:
    return unit if count == 1 else f"{unit}es" if unit.endswith(("tch", "sh", "ss", "x")) else f"{unit}s"


def mode(stream: Optional[TextIO] = None) -> str:
    """"bar", "lines" or "off": $REPRO_PROGRESS, else a bar when `stream` (stdout) is a terminal."""
    forced = os.environ.get("REPRO_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    stream = stream if stream is not None else sys.stdout
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or foreign stream
        return "lines"


class Progress:
    """Progress over `total` units of `unit` (see the module docstring). update(n) after each unit."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "step", initial: int = 0,
                 clock: Callable[[], float] = time.monotonic, stream: Optional[TextIO] = None,
                 quiet_s: float = QUIET_S, every_s: float = EVERY_S, every_fraction: float = EVERY_FRACTION,
                 enabled: bool = True, leave: bool = False, show: Optional[str] = None,
                 also: Optional[Callable[[float], str]] = None, estimate: bool = True):
        """also(seconds per unit) -> text added to the estimate line (e.g. what the whole run should take);
        estimate=False: no estimate line (a phase repeated every epoch says it once, the first time)."""
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.clock, self.quiet_s, self.every_s, self.every_fraction = clock, quiet_s, every_s, every_fraction
        self.stream, self.also = stream, also
        self.mode = "off" if not enabled else (show or mode(stream))
        self.start = clock()
        self.last_line: Optional[float] = None   # when the last plain line was written
        self.last_fraction = initial / total if total else 0.0
        self.estimated = not estimate
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                            file=sys.stderr)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream or sys.stdout)
        else:
            print(text, file=self.stream or sys.stdout, flush=True)

    def left(self, now: float) -> Optional[float]:
        """Seconds left at the rate so far (None when unknown: no total, nothing done yet)."""
        done = self.n - self.initial
        if not self.total or done <= 0:
            return None
        return (now - self.start) / done * (self.total - self.n)

    def _tenth(self, fraction: float) -> int:
        """Which every_fraction slice `fraction` is in (0.3 / 0.1 is 2.999... in floating point)."""
        return int(fraction / self.every_fraction + 1e-9)

    def line(self, now: Optional[float] = None) -> str:
        """The plain progress line of now."""
        now = self.clock() if now is None else now
        if self.total:
            percent = 100 * self.n / self.total
            head = f"[{self.desc}] {self.n}/{self.total} {plural(self.unit, self.total)} ({percent:.0f}%)"
        else:
            head = f"[{self.desc}] {self.n} {plural(self.unit, self.n)}"
        left = self.left(now)
        tail = f" | ~{duration(left)} left (estimate)" if left is not None and self.n < (self.total or 0) else ""
        return f"{head} | {duration(now - self.start)} elapsed{tail}"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.update(n)
        now = self.clock()
        if not self.estimated and self.total and self.n > self.initial:
            self.estimated = True
            elapsed, done = now - self.start, self.n - self.initial
            whole = elapsed / done * (self.total - self.initial)
            more = self.also(elapsed / done) if self.also is not None else ""
            if (whole >= self.quiet_s or more) and self.n < self.total:
                first = f"the first {self.unit}'s {duration(elapsed)}" if done == 1 else \
                    f"the first {done} {self.unit}s' {duration(elapsed)}"
                count = self.total - self.initial
                self._write(f"[{self.desc}] estimate: ~{duration(whole)} for {count} {plural(self.unit, count)} "
                            f"on this device (from {first}){more}")
        if self.bar is not None or now - self.start < self.quiet_s:
            return
        fraction = self.n / self.total if self.total else 0.0
        since = now - self.last_line if self.last_line is not None else None
        due = since is None or since >= self.every_s
        # another tenth done: a line too, but not closer than a sixth of every_s to the last one
        step = (bool(self.total) and since is not None and since >= self.every_s / 6
                and self._tenth(fraction) > self._tenth(self.last_fraction))
        if due or step:
            self._write(self.line(now))
            self.last_line, self.last_fraction = now, fraction

    def close(self) -> None:
        """The bar goes; in a log, one closing line when the phase wrote any."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and self.last_line is not None:
            now = self.clock()
            self._write(f"[{self.desc}] {self.n}" + (f"/{self.total}" if self.total else "")
                        + f" {plural(self.unit, self.total or self.n)} done in {duration(now - self.start)}")
        self.mode = "off"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "step", **options) -> Iterator[T]:
    """Iterate `iterable`, reporting progress (a bar on a terminal, lines in a log); `options` go to Progress."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    progress = Progress(total, desc, unit, **options)
    try:
        for item in iterable:
            yield item
            progress.update()
    finally:
        progress.close()
