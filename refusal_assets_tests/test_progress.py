"""Progress lines: counts, rates and ETA at a readable cadence (fake clock), and the live bar only
when asked for."""

import io
import re

import pytest

from refusal_assets.progress import BAR_ENV, Progress, ProgressSnapshot, bars_enabled, progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def tick(self, s: float) -> None:
        self.t += s


def test_lines_carry_counts_rates_and_eta():
    clock, lines = FakeClock(), []
    with progress(
        "behaviour: generation", total=100, unit="prompts", log=lines.append, clock=clock, bar=False
    ) as p:
        clock.tick(4)
        p.update(20)  # 20 % after 4 s: a milestone, past the minimum gap
    assert lines[0] == "behaviour: generation: started, 100 prompts"
    assert (
        lines[1]
        == "behaviour: generation: 20/100 prompts (20 %), 4 s elapsed, 5.00 prompts/s, ETA 16 s"
    )
    assert lines[2] == "behaviour: generation: 20/100 prompts (20 %), done in 4 s, 5.00 prompts/s"


def test_cadence_every_ten_percent_or_ten_seconds_never_per_item():
    clock, lines = FakeClock(), []
    p = Progress("gen", total=1000, log=lines.append, clock=clock, bar=False)
    for _ in range(1000):  # one item every 0.2 s: 200 s in all
        clock.tick(0.2)
        p.update(1)
    p.close()
    progress_lines = lines[:-1]
    # a line per 10 % (every 20 s here, so the 10 s rule fires in between): about 20, never ~1000
    assert 15 <= len(progress_lines) <= 25, progress_lines
    counts = [int(re.match(r"gen: (\d+)/1000", line).group(1)) for line in progress_lines]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    gaps = [b - a for a, b in zip(counts, counts[1:])]
    assert max(gaps) <= 100  # never more than 10 % (20 s) between lines
    assert min(gaps) >= 5  # never closer than the 1 s minimum gap (5 items)
    assert lines[-1] == "gen: 1000/1000 items (100 %), done in 3 min 20 s, 5.00 items/s"


def test_time_cadence_without_a_total_and_fast_updates_are_batched():
    clock, lines = FakeClock(), []
    p = Progress(
        "sweep", total=None, unit="edges", log=lines.append, clock=clock, bar=False, every_s=10
    )
    for _ in range(95):
        clock.tick(1)
        p.update(3)
    p.close()
    assert len(lines) == 9 + 1  # at 10, 20, ..., 90 s, then the closing line
    assert lines[0] == "sweep: 30 edges, 10 s elapsed, 3.00 edges/s"
    assert lines[-1] == "sweep: 285 edges, done in 1 min 35 s, 3.00 edges/s"


def test_milestones_need_the_minimum_gap_and_big_jumps_give_one_line():
    clock, lines = FakeClock(), []
    p = Progress("acts", total=10, log=lines.append, clock=clock, bar=False)
    clock.tick(0.1)
    p.update(1)  # 10 % but only 0.1 s in: no line
    clock.tick(2)
    p.update(6)  # jumps over 20..70 %: one line
    clock.tick(2)
    p.update(3)  # done: the closing line says it
    p.close()
    assert lines == [
        "acts: 7/10 items (70 %), 2 s elapsed, 3.33 items/s, ETA 1 s",
        "acts: 10/10 items (100 %), done in 4 s, 2.44 items/s",
    ]


def test_extra_text_and_error_line():
    clock, lines = FakeClock(), []
    with pytest.raises(RuntimeError):
        with progress(
            "activations: collection",
            total=4,
            unit="prompts",
            log=lines.append,
            clock=clock,
            bar=False,
        ) as p:
            clock.tick(20)
            p.update(1, extra="36 rows")
            raise RuntimeError("out of memory")
    assert (
        lines[1]
        == "activations: collection: 1/4 prompts (25 %), 20 s elapsed, 0.05 prompts/s, ETA 1 min 00 s; 36 rows"
    )
    assert lines[2].endswith("(stopped by an error)") and "1/4 prompts" in lines[2]


def test_snapshot_numbers():
    s = ProgressSnapshot("x", "items", done=30, total=120, elapsed_s=15.0)
    assert s.rate == 2.0 and s.fraction == 0.25 and s.eta_s == 45.0
    assert ProgressSnapshot("x", "items", 0, 10, 0.0).eta_s is None
    assert ProgressSnapshot("x", "items", 5, None, 1.0).eta_s is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="total must be >= 0"):
        Progress("x", total=-1, log=print, bar=False)
    p = Progress("x", total=3, log=lambda s: None, bar=False)
    with pytest.raises(ValueError, match="update by -1"):
        p.update(-1)


def test_bar_only_when_asked(monkeypatch):
    monkeypatch.delenv(BAR_ENV, raising=False)
    assert not bars_enabled()
    monkeypatch.setenv(BAR_ENV, "1")
    assert bars_enabled()
    monkeypatch.setenv(BAR_ENV, "0")
    assert not bars_enabled()


def test_bar_draws_to_the_real_stderr_and_clears_itself(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.__stderr__", stream)
    monkeypatch.setenv(BAR_ENV, "1")
    lines = []
    with progress("behaviour: generation", total=8, unit="prompts", log=lines.append) as p:
        p.update(8)
    drawn = stream.getvalue()
    assert "behaviour: generation:" in drawn and "0/8" in drawn and "prompts/s" in drawn
    assert drawn.rstrip("\x1b[A").endswith(
        " "
    )  # leave=False: the step's bar is blanked when it ends
    assert lines[-1].startswith("behaviour: generation: 8/8 prompts (100 %), done in")
