"""Progress of long loops (generation, activation collection, ...): counts, rates and an ETA.

Core loops call it with counts and never know where the lines go::

    with progress("behaviour", total=len(rows), unit="prompts", log=log) as p:
        for chunk in batches(rows, bs):
            ...
            p.update(len(chunk))

Lines go to ``log`` (in a Dagster step, ``context.log.info``: the run's event log) at a cadence a
reader can follow: when ``every_s`` seconds have passed since the last line, or when another
``every_fraction`` of the total is done (but not more often than ``min_gap_s``), never once per
item, plus one line at the start and one at the end. Rates are over the whole loop so far, so
the ETA does not jump with one slow batch.

A live tqdm bar is drawn as well where someone watches a terminal: ``refusal-assets run`` sets
``$REFUSAL_ASSETS_PROGRESS_BAR=1`` when its stderr is a TTY (set it to 0 to turn bars off). No
bar otherwise: a bar in a Dagster compute log or a CI log is noise.

No Dagster import here: the science core calls it.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BAR_ENV = "REFUSAL_ASSETS_PROGRESS_BAR"
# Position 0 belongs to the runner's own bar (one line per `refusal-assets run`); a step's
# loops draw theirs below it.
STEP_BAR_POSITION = 1


def bars_enabled() -> bool:
    """Whether loops draw a live bar: only when the runner (or the user) asked for one."""
    return os.environ.get(BAR_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def bar_stream():
    """The process's real stderr: a bar must reach the terminal even where a step's ``sys.stderr``
    is swapped for a capture buffer."""
    return sys.__stderr__ if sys.__stderr__ is not None else sys.stderr


def bar_width_kwargs(stream) -> dict[str, Any]:
    """tqdm size options: follow the terminal as it is resized, except where it reports a size of
    0 (some CI pseudo-terminals), where tqdm would draw nothing at all."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    fallback = shutil.get_terminal_size((100, 24))
    return {"ncols": fallback.columns, "nrows": fallback.lines}


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass(frozen=True)
class ProgressSnapshot:
    """Where a loop stands: what a log line says, as numbers."""

    name: str
    unit: str
    done: int
    total: int | None
    elapsed_s: float
    extra: str = ""

    @property
    def rate(self) -> float:
        """Items per second over the loop so far (0 before any time has passed)."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None without a total or before the first item."""
        if self.total is None or self.rate <= 0:
            return None
        return max(0, self.total - self.done) / self.rate

    def line(self, finished: bool = False) -> str:
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        pct = f" ({100 * self.fraction:.0f} %)" if self.fraction is not None else ""
        rate = (
            f"{self.rate:.2f} {self.unit}/s" if self.rate < 10 else f"{self.rate:.0f} {self.unit}/s"
        )
        if finished:
            tail = f"done in {_duration(self.elapsed_s)}, {rate}"
        else:
            eta = self.eta_s
            tail = f"{_duration(self.elapsed_s)} elapsed, {rate}" + (
                f", ETA {_duration(eta)}" if eta is not None else ""
            )
        extra = f"; {self.extra}" if self.extra else ""
        return f"{self.name}: {count} {self.unit}{pct}, {tail}{extra}"


class Progress:
    """Counts of one loop; logs at a cadence (see the module docstring) and drives an optional bar."""

    def __init__(
        self,
        name: str,
        total: int | None,
        log: Callable[[str], None],
        *,
        unit: str = "items",
        every_s: float = 10.0,
        every_fraction: float = 0.1,
        min_gap_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        bar: bool | None = None,
    ):
        if total is not None and total < 0:
            raise ValueError(f"progress {name!r}: total must be >= 0, got {total}")
        if every_s <= 0 or not 0 < every_fraction <= 1:
            raise ValueError(
                f"progress {name!r}: every_s must be > 0 and every_fraction in (0, 1], got {every_s}, {every_fraction}"
            )
        self.name, self.total, self.unit, self.log = name, total, unit, log
        self.every_s, self.every_fraction, self.min_gap_s, self.clock = (
            every_s,
            every_fraction,
            min_gap_s,
            clock,
        )
        self.done = 0
        self.extra = ""
        self.lines: list[str] = []  # what was logged, for the caller's metadata or a test
        self._t0 = clock()
        self._last_log = self._t0
        self._next_milestone = every_fraction
        self._bar: Any = None
        if bars_enabled() if bar is None else bar:
            from tqdm import tqdm

            stream = bar_stream()
            self._bar = tqdm(
                total=total,
                desc=name,
                unit=f" {unit}",
                position=STEP_BAR_POSITION,
                leave=False,
                file=stream,
                mininterval=0.5,
                **bar_width_kwargs(stream),
            )

    def snapshot(self) -> ProgressSnapshot:
        return ProgressSnapshot(
            self.name, self.unit, self.done, self.total, self.clock() - self._t0, self.extra
        )

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        self.log(line)

    def start(self) -> None:
        total = f"{self.total} {self.unit}" if self.total is not None else self.unit
        self._emit(f"{self.name}: started, {total}" + (f"; {self.extra}" if self.extra else ""))

    def update(self, n: int = 1, extra: str | None = None) -> None:
        """``n`` more items done; ``extra`` replaces the free-text tail of the lines (e.g. rows written)."""
        if n < 0:
            raise ValueError(f"progress {self.name!r}: update by {n} < 0")
        self.done += n
        if extra is not None:
            self.extra = extra
        if self._bar is not None:
            self._bar.update(n)
            if extra is not None:
                self._bar.set_postfix_str(extra, refresh=False)
        now = self.clock()
        since = now - self._last_log
        crossed = False
        if self.total:
            fraction = self.done / self.total
            if fraction >= self._next_milestone:
                crossed = True
                # skip every milestone this update jumped over: one line, not one per 10 %
                self._next_milestone = (
                    math.floor(fraction / self.every_fraction + 1e-9) + 1
                ) * self.every_fraction
        finished = self.total is not None and self.done >= self.total
        if finished:
            return  # the closing line says it
        if since >= self.every_s or (crossed and since >= self.min_gap_s):
            self._last_log = now
            self._emit(self.snapshot().line())

    def close(self, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        snap = self.snapshot()
        self._emit(
            snap.line(finished=True) if not failed else f"{snap.line()} (stopped by an error)"
        )

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def progress(name: str, total: int | None, log: Callable[[str], None], **kwargs: Any) -> Progress:
    """A :class:`Progress`; as a context manager it logs its start and, on exit, its totals (or
    that an error stopped it)."""
    return Progress(name, total, log, **kwargs)
