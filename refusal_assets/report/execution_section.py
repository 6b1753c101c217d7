"""The report's execution-level section per model: the ``refusal_direction`` asset's result
(Arditi et al. 2024 refusal directions, :mod:`refusal_assets.directions`) as one headline sentence,
its three figures, one row per category and a few generations before and after ablation
(template ``execution``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from refusal_assets.directions import verdict as vd
from refusal_assets.directions.measure import Rate
from refusal_assets.directions.result import Example, ExecutionResult, read_result
from refusal_assets.layout import Layout
from refusal_assets.report.render import Figure, FigureStore
from refusal_assets.report.sections import Table, format_ci

FIGURES = (  # (file name under refusal_direction/<model>/, caption)
    (
        "still_refusing",
        "share of refusing prompts still refusing per category: clean, pooled direction ablated, "
        "leave-one-category-out direction ablated, random direction ablated (95% Wilson CIs)",
    ),
    ("layer_scan", "layer scan: refusal-score drop and harmless KL by block input (validation)"),
    (
        "steering",
        "steering trade-off: toxic refusal against over-refusal as the direction is added",
    ),
)
NO_RATIO = "—"
NO_RATIO_REASON = "denominator CI includes 0 or below floor"
N_EXAMPLES = 3
"""Generations shown per model."""
MAX_RESPONSE_CHARS = 400
"""A longer response is cut here (the full text is in ``examples.json``)."""

CATEGORY_HEADER = [
    "category",
    "n refusing",
    "pooled still refusing",
    "LOCO still refusing",
    "own score drop [95% CI]",
    "LOCO / own drop",
    "cosine with pooled",
    "split-half ceiling",
    "call",
]


@dataclass(frozen=True, kw_only=True)
class ExecutionSection:
    """One model's execution level; without a usable result only ``missing`` is set."""

    model_key: str
    missing: str
    """One line saying why there is nothing to show; empty when there is."""
    headline: str
    figures: list[Figure]
    table: Table | None
    """One row per category."""
    ratio_note: str
    """Why a LOCO / own ratio reads "—"; empty when every ratio is printed."""
    examples: list[Example]
    """Held-out refusing prompts, clean and ablated (whitespace collapsed, responses cut at
    :data:`MAX_RESPONSE_CHARS`)."""


def _missing(model_key: str, why: str) -> ExecutionSection:
    return ExecutionSection(
        model_key=model_key,
        missing=f"{model_key}: execution level not shown, {why}.",
        headline="",
        figures=[],
        table=None,
        ratio_note="",
        examples=[],
    )


def _number(v: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def _headline(r: ExecutionResult, loco: Rate) -> str:
    fallback = f" ({r.selection.fallback})" if r.selection.fallback else ""
    loco_text = (
        f"{loco.text()} still refusing, pooled over the categories with a call "
        f"(median per category {_number(r.loco_still_refusing)})"
        if loco.n
        else "not measured (no category has enough refusing prompts for a call)"
    )
    return (
        f"Pooled refusal direction at block {r.layer} input, post-instruction position "
        f"{r.position}{fallback}. Refusing held-out toxic prompts still refusing with it ablated: "
        f"{r.pooled_still_refusing.text()} (95% Wilson CI, k/n); with a random direction of the same "
        f"norm ablated: {r.random_still_refusing.text()}. Complied-with safe prompts refusing with "
        f"it added (induced refusal): {r.pooled_induced_refusal.text()}. Leave-one-category-out "
        f"(each category's refusing prompts, the other categories' direction ablated): {loco_text}. "
        f"Verdict: {r.verdict_execution.upper()} — {r.verdict_reason}."
    )


def _category_table(r: ExecutionResult) -> tuple[Table, bool]:
    """The per-category rows, and whether a ratio was left out."""
    rows, left_out = [], False
    for c in r.categories:
        if c.loco_to_own is None or not math.isfinite(c.loco_to_own):
            ratio, left_out = NO_RATIO, True
        else:
            ratio = f"{c.loco_to_own:.2f}"
        drop = (
            "n/a"
            if not math.isfinite(c.own_score_drop)
            else f"{c.own_score_drop:.3f} {format_ci(c.own_score_drop_ci, 3)}".removesuffix(" n/a")
        )
        rows.append(
            [
                c.category,
                c.n_refusing,
                c.pooled_still_refusing.text(),
                c.loco_still_refusing.text(),
                drop,
                ratio,
                _number(c.cosine_with_pooled),
                _number(c.split_half_ceiling),
                c.call,
            ]
        )
    return Table(header=CATEGORY_HEADER, rows=rows), left_out


def _one_line(text: str, limit: int | None = None) -> str:
    text = " ".join(str(text).split())
    return text if limit is None or len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _examples(layout: Layout, model_key: str, r: ExecutionResult) -> list[Example]:
    """The first :data:`N_EXAMPLES` of ``examples.json`` (the result's own copy where the file is
    absent)."""
    path = layout.direction_examples(model_key)
    stored = json.loads(path.read_text()) if path.is_file() else [vars(e) for e in r.examples]
    return [
        Example(
            prompt_id=str(e["prompt_id"]),
            category=str(e["category"]),
            prompt=_one_line(e["prompt"]),
            clean=_one_line(e["clean"], MAX_RESPONSE_CHARS),
            ablated=_one_line(e["ablated"], MAX_RESPONSE_CHARS),
        )
        for e in stored[:N_EXAMPLES]
    ]


def execution_section(model_key: str, layout: Layout, store: FigureStore) -> ExecutionSection:
    """One model's ``refusal_direction`` files as the report shows them; one line (``missing``)
    where the asset is not materialized, its result unreadable, or no direction was found."""
    path = layout.direction_result(model_key)
    if not path.is_file():
        return _missing(model_key, "refusal_direction not materialized")
    try:
        r = read_result(path)
    except ValueError as e:
        return _missing(model_key, f"unreadable result ({e})")
    if r.layer < 0:  # ExecutionResult.insufficient: no direction, nothing measured
        return _missing(model_key, f"{r.verdict_execution}, {r.verdict_reason}")
    loco = vd.pooled_rate([c.loco_still_refusing for c in r.categories if c.call != vd.TOO_FEW])
    table, left_out = _category_table(r)
    return ExecutionSection(
        model_key=model_key,
        missing="",
        headline=_headline(r, loco),
        figures=[
            store.figure(layout.direction_plot(model_key, name), f"{caption} ({model_key})")
            for name, caption in FIGURES
        ],
        table=table,
        ratio_note=(
            f"LOCO / own drop {NO_RATIO}: {NO_RATIO_REASON} (not a number worth printing)."
            if left_out
            else ""
        ),
        examples=_examples(layout, model_key, r),
    )
