"""The combined verdict per model: what each cross-category test says, with its CI, and one answer.

Each test contributes a :class:`TestLine` (its own verdict, a headline statistic with a 95% CI, the
level it speaks at, and whether it tests necessity or sufficiency); :func:`combine` turns the lines
into a :class:`CombinedVerdict`. Tests that say ``insufficient evidence`` do not vote; if none
decides, neither does the combination. Deciding necessity tests that disagree give ``mixed``, and
every disagreeing test is named: refusal can be executed by one shared direction while upstream
harm features differ by category (DESIGN.md §2, two levels), so disagreement is an answer.

A *sufficiency* test (does adding A's mechanism cause B's refusal?) does not vote: a mechanism
taken after the point where categories are told apart feeds the one refusal output, so adding it
causes refusal in every category whether the mechanisms upstream are shared or not. Such a line is
reported, and named when it disagrees.

The report shows the combined verdict with :mod:`refusal_assets.report.comparison_sections`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Answer = Literal["modular", "monolithic", "mixed", "insufficient evidence"]
Level = Literal["features", "execution"]


@dataclass(frozen=True, kw_only=True)
class TestLine:
    test: str
    level: Level
    """``features``: which SAE latents carry refusal (overlap); ``execution``: whether one category's
    mechanism moves another's refusal (circuit transfer)."""
    says: Answer
    statistic: str
    """What the headline number is."""
    value: float
    ci: tuple[float, float]
    reason: str
    role: Literal["necessity", "sufficiency"] = "necessity"
    """Necessity tests (does removing A's mechanism remove B's refusal; do the circuits coincide)
    vote; sufficiency tests (does adding A's direction cause refusal) are reported only."""


@dataclass(frozen=True, kw_only=True)
class CombinedVerdict:
    verdict: Answer
    reason: str
    lines: list[TestLine]
    disagree: list[str]
    """Tests whose decided answer differs from another decided test's."""
    thresholds: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        from refusal_assets.analysis.serialise import jsonable

        return jsonable(asdict(self))


def _number(v: float | None) -> float:
    """A number read from JSON, where NaN was written as null."""
    return math.nan if v is None else float(v)


def read_combined(data: dict[str, Any]) -> CombinedVerdict:
    """A :class:`CombinedVerdict` from its ``to_dict()`` (``comparison.json``'s ``combined``)."""
    lines = [
        TestLine(
            test=ln["test"],
            level=ln["level"],
            says=ln["says"],
            statistic=ln["statistic"],
            value=_number(ln["value"]),
            ci=(_number(ln["ci"][0]), _number(ln["ci"][1])),
            reason=ln["reason"],
            role=ln.get("role", "necessity"),
        )
        for ln in data["lines"]
    ]
    return CombinedVerdict(
        verdict=data["verdict"],
        reason=data["reason"],
        lines=lines,
        disagree=list(data.get("disagree") or []),
        thresholds=dict(data.get("thresholds") or {}),
    )


def overlap_line(result: dict) -> TestLine:
    """The overlap test's line from a comparison group's ``to_dict()``: the median pair's normalised
    Jaccard (cross-category over within-category at the same half-sample size) with its CI."""
    # a group without category pairs, or none whose ceiling lets it normalise: no number to report
    pairs = [p for p in result.get("pairs", []) if p.get("normalised_jaccard") is not None]
    if not pairs:
        return TestLine(
            test="circuit overlap",
            level="features",
            says=result["verdict"],
            statistic="median normalised Jaccard",
            value=math.nan,
            ci=(math.nan, math.nan),
            reason=result["verdict_reason"],
        )
    pairs.sort(key=lambda p: p["normalised_jaccard"])
    mid = pairs[len(pairs) // 2]
    lo, hi = (math.nan if v is None else v for v in mid["normalised_jaccard_ci"])
    return TestLine(
        test="circuit overlap",
        level="features",
        says=result["verdict"],
        statistic=f"median-pair normalised Jaccard ({mid['a']} vs {mid['b']})",
        value=float(mid["normalised_jaccard"]),
        ci=(lo, hi),
        reason=result["verdict_reason"],
    )


def combine(lines: list[TestLine], thresholds: dict[str, Any] | None = None) -> CombinedVerdict:
    """One answer from the tests' lines (see the module docstring)."""
    decided_all = [ln for ln in lines if ln.says != "insufficient evidence"]
    decided = [ln for ln in decided_all if ln.role == "necessity"]
    answers = {ln.says for ln in decided}
    if not decided:
        need = "; ".join(f"{ln.test}: {ln.reason}" for ln in lines) or "no test ran"
        return CombinedVerdict(
            verdict="insufficient evidence",
            reason=f"Insufficient evidence: no necessity test decides. {need}",
            lines=lines,
            disagree=[],
            thresholds=thresholds or {},
        )
    if len(answers) == 1:
        (answer,) = answers
        names = ", ".join(ln.test for ln in decided)
        dissent = [ln for ln in decided_all if ln.says != answer]
        note = "".join(
            f" {ln.test} (a sufficiency test, not voting) says {ln.says}." for ln in dissent
        )
        return CombinedVerdict(
            verdict=answer,
            reason=f"{answer.capitalize()}: every deciding necessity test ({names}) says {answer}.{note}",
            lines=lines,
            disagree=[ln.test for ln in dissent],
            thresholds=thresholds or {},
        )
    disagree = [ln.test for ln in decided_all]
    by_level = {
        lvl: sorted({ln.says for ln in decided if ln.level == lvl})
        for lvl in ("features", "execution")
    }
    return CombinedVerdict(
        verdict="mixed",
        reason="Mixed: the tests disagree -- "
        + "; ".join(f"{ln.test} says {ln.says}" for ln in decided)
        + (
            f". Feature level: {', '.join(by_level['features']) or 'no test'}; execution level: "
            f"{', '.join(by_level['execution']) or 'no test'}."
        ),
        lines=lines,
        disagree=disagree,
        thresholds=thresholds or {},
    )


def _median_ratio_line(test: str, res: dict) -> TestLine:
    """A functional test's line: the median off-diagonal ratio (A's mechanism on B over B's own) and its CI."""
    cats = res["categories"]
    cells = [
        (res["ratio"][i][j], res["ratio_lo"][i][j], res["ratio_hi"][i][j], a, b)
        for i, a in enumerate(cats)
        for j, b in enumerate(cats)
        if i != j and res["ratio"][i][j] is not None
    ]
    if not cells:
        return TestLine(
            test=test,
            level="execution",
            says=res["verdict"],
            statistic="median cross/own ratio",
            value=math.nan,
            ci=(math.nan, math.nan),
            reason=res["reason"],
        )
    cells.sort(key=lambda c: c[0])
    v, lo, hi, a, b = cells[len(cells) // 2]
    return TestLine(
        test=test,
        level="execution",
        says=res["verdict"],
        statistic=f"median cross/own ratio ({a} on {b})",
        value=v,
        ci=(math.nan if lo is None else lo, math.nan if hi is None else hi),
        reason=res["reason"],
    )


def transfer_lines(transfer: dict) -> list[TestLine]:
    """The circuit transfer's line from ``transfer.json`` (none where it did not run)."""
    if "circuit_transfer" not in transfer:
        return []
    return [_median_ratio_line("circuit transfer", transfer["circuit_transfer"])]
