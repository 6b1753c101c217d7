"""The report's cross-category sections as typed inputs: the combined verdict of every test per model,
the overlap comparison, the functional tests and the refusal directions (templates ``combined``,
``comparison``, ``transfer``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from refusal_assets.analysis.transfer import CrossMatrix, read_cross_matrix
from refusal_assets.analysis.verdict import CombinedVerdict
from refusal_assets.layout import Layout
from refusal_assets.report.render import Figure, FigureStore
from refusal_assets.report.sections import Table, ci_json, format_ci

# --------------------------------------------------------------------------- combined verdict


def _fmt(v: float | None, ci: tuple[float | None, float | None]) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    lo, hi = ci
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


@dataclass(frozen=True, kw_only=True)
class CombinedSection:
    """One model's combined verdict: one row per test, the tests that disagree, the thresholds."""

    model_key: str
    verdict: str
    reason: str
    table: Table
    disagree: list[str]
    thresholds: str
    """``name = value`` pairs of the comparison config; empty where none were recorded."""


def combined_section(model_key: str, combined: CombinedVerdict) -> CombinedSection:
    rows = [
        [ln.test, ln.level, ln.role, ln.says, ln.statistic, _fmt(ln.value, ln.ci)]
        for ln in combined.lines
    ]
    return CombinedSection(
        model_key=model_key,
        verdict=combined.verdict,
        reason=combined.reason,
        table=Table(
            header=["test", "level", "role", "says", "statistic", "value [95% CI]"], rows=rows
        ),
        disagree=combined.disagree,
        thresholds=", ".join(f"{k} = {v}" for k, v in combined.thresholds.items()),
    )


# ---------------------------------------------------------------------------- functional tests


@dataclass(frozen=True, kw_only=True)
class MatrixTest:
    """One functional test's category x category matrix (rows A act on columns B) and its control."""

    test: str
    reason: str
    table: Table


@dataclass(frozen=True, kw_only=True)
class TransferSection:
    model_key: str
    fallback: list[str]
    tests: list[MatrixTest]


def _cell(v: float | None, lo: float | None, hi: float | None) -> str:
    """A value [95% CI]; ``n/a`` where there is no value (null in JSON, or NaN)."""
    return (
        "n/a"
        if v is None
        else _fmt(v, (math.nan if lo is None else lo, math.nan if hi is None else hi))
    )


def _matrix_test(res: CrossMatrix) -> MatrixTest:
    cats = res.categories
    rows = [
        [
            a,
            *(
                f"{_cell(res.change[i, j], res.change_lo[i, j], res.change_hi[i, j])}; ratio "
                f"{_cell(res.ratio[i, j], res.ratio_lo[i, j], res.ratio_hi[i, j])}"
                for j in range(len(cats))
            ),
        ]
        for i, a in enumerate(cats)
    ]
    rows.append(["random control", *(_cell(v, *ci) for v, ci in zip(res.control, res.control_ci))])
    return MatrixTest(
        test=res.test, reason=res.reason, table=Table(header=["A \\ B", *cats], rows=rows)
    )


def transfer_section(model_key: str, transfer: dict) -> TransferSection | None:
    """The circuit transfer and faithfulness recorded in ``transfer.json``; None where they did not
    run."""
    if not transfer or not transfer.get("enabled", True):
        return None
    tests = [transfer.get("circuit_transfer"), transfer.get("circuit_faithfulness")]
    return TransferSection(
        model_key=model_key,
        fallback=list(transfer.get("fallback_categories") or []),
        tests=[_matrix_test(read_cross_matrix(t)) for t in tests if t],
    )


# ---------------------------------------------------------------------------------- comparison


@dataclass(frozen=True, kw_only=True)
class GroupSection:
    """One prompt group's overlap test; without category pairs only ``reason`` is set."""

    group: str
    reason: str
    verdict: str
    shared_core: int
    shared_fraction: float
    shared_fraction_ci: str
    fallback: list[str]
    table: Table | None
    figure: Figure | None


def _group_section(
    model_key: str, group: str, res: dict, layout: Layout, store: FigureStore
) -> GroupSection:
    if "pairs" not in res:  # fewer than two categories with enough refusing prompts
        return GroupSection(
            group=group,
            reason=res["verdict_reason"],
            verdict=res["verdict"],
            shared_core=0,
            shared_fraction=math.nan,
            shared_fraction_ci="n/a",
            fallback=[],
            table=None,
            figure=None,
        )
    rows = [
        [
            p["a"],
            p["b"],
            p["jaccard"],
            format_ci(ci_json(p.get("jaccard_ci"))),
            p.get("normalised_jaccard"),
            p["p_value"],
            p["q_value"],
            "yes" if p["significant"] else "no",
        ]
        for p in res["pairs"]
    ]
    header = [
        "a",
        "b",
        "Jaccard",
        "95% CI",
        "normalised",
        "p (permutation)",
        "q (BH)",
        "significant",
    ]
    return GroupSection(
        group=group,
        reason=res["verdict_reason"],
        verdict=res["verdict"],
        shared_core=len(res["shared_core"]),
        shared_fraction=res["shared_fraction"],
        shared_fraction_ci=format_ci(ci_json(res["shared_fraction_ci"]), 3),
        fallback=list(res.get("fallback_categories") or []),
        table=Table(header=header, rows=rows),
        figure=store.figure(
            layout.jaccard_plot(model_key, group),
            f"Jaccard {group} ({model_key}); * = significant after BH",
        ),
    )


@dataclass(frozen=True, kw_only=True)
class ModelComparisonSection:
    model_key: str
    verdict: str
    reason: str
    groups: list[GroupSection]
    cross: Figure
    """Toxic vs benign circuits."""
    transfer: TransferSection | None
    direction_figures: list[Figure]


def comparison_section(
    model_key: str, comp: dict, layout: Layout, store: FigureStore
) -> ModelComparisonSection:
    """One model's ``comparison.json``: verdict, every group's pairs, the functional tests, the directions."""
    groups = [_group_section(model_key, g, res, layout, store) for g, res in comp["groups"].items()]
    cross = store.figure(
        layout.jaccard_plot(model_key, "cross"), f"toxic vs benign circuits ({model_key})"
    )
    transfer = transfer_section(model_key, comp.get("transfer") or {})
    figures = [
        store.figure(
            layout.direction_cosine_plot(model_key, site), f"refusal-direction cosine at {site}"
        )
        for site in comp.get("direction_cosines", {})
    ]
    return ModelComparisonSection(
        model_key=model_key,
        verdict=comp["verdict"],
        reason=comp["verdict_reason"],
        groups=groups,
        cross=cross,
        transfer=transfer,
        direction_figures=figures,
    )
