"""The combined verdict per model: what each cross-category test says, with its CI, and one answer.

Each test contributes a :class:`TestLine` (its own verdict, a headline statistic with a 95% CI, the
level it speaks at, and whether it tests necessity or sufficiency); :func:`combine` turns the lines
into a :class:`CombinedVerdict`. Tests that say ``insufficient evidence`` do not vote; if none
decides, neither does the combination. Deciding necessity tests that disagree give ``mixed``, and
every disagreeing test is named: refusal can be executed by one shared direction while upstream
harm features differ by category (DESIGN.md §2, two levels), so disagreement is an answer.

Induced refusal is a *sufficiency* test and does not vote: any direction taken after the point
where categories are told apart feeds the one refusal output, so adding it induces refusal in every
category whether the mechanisms upstream are shared or not (on the planted modular tiny model of
``refusal-assets calibrate`` it says "monolithic" while every necessity test says "modular"). It is
reported, and named when it disagrees.

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
    role: Literal["necessity", "sufficiency"] = "necessity"
    """Necessity tests (does removing A's mechanism remove B's refusal; do the circuits coincide)
    vote; sufficiency tests (does adding A's direction cause refusal) are reported only."""


@dataclass(frozen=True)
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


def overlap_line(result: dict) -> TestLine:
    """The overlap test's line from a comparison group's ``to_dict()``: the median pair's normalised
    Jaccard (cross-category over within-category at the same half-sample size) with its CI."""
    # a group without category pairs, or none whose ceiling lets it normalise: no number to report
    pairs = [p for p in result.get("pairs", []) if p.get("normalised_jaccard") is not None]
    if not pairs:
        return TestLine(
            "circuit overlap",
            "features",
            result["verdict"],
            "median normalised Jaccard",
            math.nan,
            (math.nan, math.nan),
            result["verdict_reason"],
        )
    pairs.sort(key=lambda p: p["normalised_jaccard"])
    mid = pairs[len(pairs) // 2]
    lo, hi = (math.nan if v is None else v for v in mid["normalised_jaccard_ci"])
    return TestLine(
        "circuit overlap",
        "features",
        result["verdict"],
        f"median-pair normalised Jaccard ({mid['a']} vs {mid['b']})",
        float(mid["normalised_jaccard"]),
        (lo, hi),
        result["verdict_reason"],
    )


def combine(lines: list[TestLine], thresholds: dict[str, Any] | None = None) -> CombinedVerdict:
    """One answer from the tests' lines (see the module docstring)."""
    decided_all = [ln for ln in lines if ln.says != "insufficient evidence"]
    decided = [ln for ln in decided_all if ln.role == "necessity"]
    answers = {ln.says for ln in decided}
    if not decided:
        need = "; ".join(f"{ln.test}: {ln.reason}" for ln in lines) or "no test ran"
        return CombinedVerdict(
            "insufficient evidence",
            f"Insufficient evidence: no necessity test decides. {need}",
            lines,
            [],
            thresholds or {},
        )
    if len(answers) == 1:
        (answer,) = answers
        names = ", ".join(ln.test for ln in decided)
        dissent = [ln for ln in decided_all if ln.says != answer]
        note = "".join(f" {ln.test} (a sufficiency test, not voting) says {ln.says}." for ln in dissent)
        return CombinedVerdict(
            answer,
            f"{answer.capitalize()}: every deciding necessity test ({names}) says {answer}.{note}",
            lines,
            [ln.test for ln in dissent],
            thresholds or {},
        )
    disagree = [ln.test for ln in decided_all]
    by_level = {lvl: sorted({ln.says for ln in decided if ln.level == lvl}) for lvl in ("features", "execution")}
    return CombinedVerdict(
        "mixed",
        (
            "Mixed: the tests disagree -- "
            + "; ".join(f"{ln.test} says {ln.says}" for ln in decided)
            + (
                f". Feature level: {', '.join(by_level['features']) or 'no test'}; execution level: "
                f"{', '.join(by_level['execution']) or 'no test'}."
            )
        ),
        lines,
        disagree,
        thresholds or {},
    )


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
    doc.table(
        ["test", "level", "role", "says", "statistic", "value [95% CI]"],
        [
            [
                ln["test"],
                ln["level"],
                ln.get("role", "necessity"),
                ln["says"],
                ln["statistic"],
                _fmt(ln["value"], tuple(ln["ci"])),
            ]
            for ln in combined["lines"]
        ],
    )
    if combined.get("disagree"):
        doc.p(f"Tests that disagree: {', '.join(combined['disagree'])}.")
    if combined.get("thresholds"):
        doc.p(
            "Thresholds (comparison config): "
            + ", ".join(f"{k} = {v}" for k, v in combined["thresholds"].items())
            + "."
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
            test, "execution", res["verdict"], "median cross/own ratio", math.nan, (math.nan, math.nan), res["reason"]
        )
    cells.sort(key=lambda c: c[0])
    v, lo, hi, a, b = cells[len(cells) // 2]
    return TestLine(
        test,
        "execution",
        res["verdict"],
        f"median cross/own ratio ({a} on {b})",
        v,
        (math.nan if lo is None else lo, math.nan if hi is None else hi),
        res["reason"],
    )


def transfer_lines(transfer: dict) -> list[TestLine]:
    """Lines of the functional tests in ``transfer.json`` (none where they did not run)."""
    lines = []
    if "circuit_transfer" in transfer:
        lines.append(_median_ratio_line("circuit transfer", transfer["circuit_transfer"]))
    directions = transfer.get("directions", {})
    if "ablation" in directions:
        lines.append(_median_ratio_line("direction cross-ablation", directions["ablation"]))
    if "induced" in directions:
        line = _median_ratio_line("induced refusal", directions["induced"])
        lines.append(TestLine(**{**asdict(line), "role": "sufficiency"}))
    return lines


def _cell(v, lo, hi) -> str:
    return "n/a" if v is None else _fmt(v, (math.nan if lo is None else lo, math.nan if hi is None else hi))


def render_transfer(doc: Any, model_key: str, transfer: dict) -> None:
    """The functional tests' matrices (score change and ratio to B's own, with CIs) and the pooled direction."""
    if not transfer or not transfer.get("enabled", True):
        return
    doc.h(3, f"Functional cross-category tests ({model_key})")
    doc.p(
        "Rows A: whose circuit or direction; columns B: whose prompts. Cells: mean change of B's refusal score [95% "
        "CI], then the ratio to B's own mechanism; 'n/a' where B's own change has a CI that includes 0 (the ratio is "
        "not a number). The control is a random circuit of B's size per site, or a random direction."
    )
    if transfer.get("fallback_categories"):
        doc.p(
            "Left out (too few refusing prompts for the configured filter): "
            f"{', '.join(transfer['fallback_categories'])}."
        )
    tests = [
        transfer.get("circuit_transfer"),
        transfer.get("circuit_faithfulness"),
        transfer.get("directions", {}).get("ablation"),
        transfer.get("directions", {}).get("induced"),
    ]
    for res in (t for t in tests if t):
        cats = res["categories"]
        rows = [
            [
                a,
                *(
                    f"{_cell(res['change'][i][j], res['change_lo'][i][j], res['change_hi'][i][j])}; ratio "
                    f"{_cell(res['ratio'][i][j], res['ratio_lo'][i][j], res['ratio_hi'][i][j])}"
                    for j in range(len(cats))
                ),
            ]
            for i, a in enumerate(cats)
        ]
        rows.append(["random control", *(_cell(v, *ci) for v, ci in zip(res["control"], res["control_ci"]))])
        doc.p(f"{res['test']}: {res['reason']}")
        doc.table(["A \\ B", *cats], rows)
    directions = transfer.get("directions", {})
    if directions.get("pooled_remaining"):
        doc.p(
            "Pooled all-category direction (the monolithic baseline): share of each category's held-out refusal "
            "(score above its harmless mean) left after ablating it."
        )
        doc.table(
            ["category", "refusal left [95% CI]"],
            [[c, _cell(v, *ci)] for c, (v, ci) in directions["pooled_remaining"].items()],
        )
    render_cosines(doc, directions.get("cosine_tests"))
    if directions.get("selected"):
        doc.table(
            ["direction", "layer", "position", "norm", "train drop"],
            [
                [c, s["layer"], s["position"], f"{s['norm']:.2f}", f"{s['train_drop']:.3f}"]
                for c, s in directions["selected"].items()
            ],
        )


def render_cosines(doc: Any, cosine_tests: dict) -> None:
    """Direction cosines with their split-half ceiling and permutation null (reported, not voting)."""
    if not cosine_tests or not cosine_tests.get("pairs"):
        return
    doc.p(
        f"Refusal-direction cosines at layer {cosine_tests['layer']}, post-instruction position "
        f"{cosine_tests['position']} (the pooled direction's): full-sample cosine; half-sample cross-category cosine "
        "over the within-category split-half ceiling at the same size (~1 = one shared direction); one-sided "
        "permutation p for a cosine lower than exchangeable labels."
    )
    doc.table(
        ["a", "b", "cosine", "normalised", "ceiling", "p (permutation)", "testable"],
        [
            [
                p["a"],
                p["b"],
                f"{p['cosine']:.3f}",
                "n/a" if p["normalised"] is None else f"{p['normalised']:.3f}",
                f"{p['ceiling']:.3f}",
                f"{p['p_value']:.3f}",
                "yes" if p["testable"] else "no",
            ]
            for p in cosine_tests["pairs"]
        ],
    )
