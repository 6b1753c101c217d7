"""The combined verdict per model: what each cross-category test says, with its CI, and one answer.

Each test contributes a :class:`TestLine` (its own verdict, a headline statistic with a 95% CI, the
level it speaks at); :func:`combine` turns the lines into a :class:`CombinedVerdict`. Tests that
say ``insufficient evidence`` do not vote; if none decides, neither does the combination. Tests
that decide and disagree give ``mixed`` and are named: refusal can be executed by one shared
direction while upstream harm features differ by category (DESIGN.md §2, two levels), so
disagreement between a feature-level and an execution-level test is an answer, not an error.

Rendering for the report is :func:`render`, given any object with ``h``, ``p`` and ``table``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Answer = Literal["modular", "monolithic", "mixed", "insufficient evidence"]
Level = Literal["features", "execution"]


@dataclass(frozen=True)
class TestLine:
    test: str
    level: Level
    """``features``: which SAE latents carry refusal (overlap); ``execution``: whether one category's
    mechanism moves another's refusal (transfer, direction ablation, induced refusal)."""
    says: Answer
    statistic: str
    """What the headline number is."""
    value: float
    ci: tuple[float, float]
    reason: str


@dataclass(frozen=True)
class CombinedVerdict:
    verdict: Answer
    reason: str
    lines: list[TestLine]
    disagree: list[str]
    """Tests whose decided answer differs from another decided test's."""
    thresholds: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        from refusal_assets.comparison import _jsonable

        return _jsonable(asdict(self))


def overlap_line(result: dict) -> TestLine:
    """The overlap test's line from a comparison group's ``to_dict()``: the median pair's normalised
    Jaccard (cross-category over within-category at the same half-sample size) with its CI."""
    if "pairs" not in result:
        return TestLine("circuit overlap", "features", result["verdict"], "median normalised Jaccard", math.nan, (math.nan, math.nan),
                        result["verdict_reason"])
    pairs = [p for p in result["pairs"] if p.get("normalised_jaccard") is not None]
    if not pairs:
        return TestLine("circuit overlap", "features", result["verdict"], "median normalised Jaccard", math.nan, (math.nan, math.nan),
                        result["verdict_reason"])
    pairs.sort(key=lambda p: p["normalised_jaccard"])
    mid = pairs[len(pairs) // 2]
    lo, hi = (math.nan if v is None else v for v in mid["normalised_jaccard_ci"])
    return TestLine("circuit overlap", "features", result["verdict"], f"median-pair normalised Jaccard ({mid['a']} vs {mid['b']})",
                    float(mid["normalised_jaccard"]), (lo, hi), result["verdict_reason"])


def combine(lines: list[TestLine], thresholds: dict[str, Any] | None = None) -> CombinedVerdict:
    """One answer from the tests' lines (see the module docstring)."""
    decided = [ln for ln in lines if ln.says != "insufficient evidence"]
    answers = {ln.says for ln in decided}
    if not decided:
        need = "; ".join(f"{ln.test}: {ln.reason}" for ln in lines) or "no test ran"
        return CombinedVerdict("insufficient evidence", f"Insufficient evidence: no test decides. {need}", lines, [], thresholds or {})
    if len(answers) == 1:
        (answer,) = answers
        names = ", ".join(ln.test for ln in decided)
        return CombinedVerdict(answer, f"{answer.capitalize()}: every deciding test ({names}) says {answer}.", lines, [], thresholds or {})
    disagree = [ln.test for ln in decided]
    by_level = {lvl: sorted({ln.says for ln in decided if ln.level == lvl}) for lvl in ("features", "execution")}
    return CombinedVerdict("mixed", (
        "Mixed: the tests disagree -- " + "; ".join(f"{ln.test} says {ln.says}" for ln in decided)
        + f". Feature level: {', '.join(by_level['features']) or 'no test'}; execution level: {', '.join(by_level['execution']) or 'no test'}."
    ), lines, disagree, thresholds or {})


def _fmt(v: float, ci: tuple[float, float]) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    lo, hi = ci
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def render(doc: Any, model_key: str, combined: dict) -> None:
    """The per-model verdict table: one row per test, the combined verdict, the thresholds."""
    doc.h(3, f"Combined verdict ({model_key}): {combined['verdict']}")
    doc.p(combined["reason"])
    doc.table(["test", "level", "says", "statistic", "value [95% CI]"],
              [[ln["test"], ln["level"], ln["says"], ln["statistic"], _fmt(ln["value"], tuple(ln["ci"]))] for ln in combined["lines"]])
    if combined.get("disagree"):
        doc.p(f"Tests that disagree: {', '.join(combined['disagree'])}.")
    if combined.get("thresholds"):
        doc.p("Thresholds (comparison config): " + ", ".join(f"{k} = {v}" for k, v in combined["thresholds"].items()) + ".")
