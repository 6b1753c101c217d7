"""The typed result of the execution level, its one JSON writer and reader, and a Markdown summary.

:class:`ExecutionResult` is what the ``refusal_direction`` asset writes (``result.json``) and what
the comparison and the report read: the selected pooled direction (layer, position, the layer scan),
the share of refusing held-out toxic prompts that still refuse by generation with it ablated, with a
random direction of the same norm ablated, the refusal it induces when added to complied-with
harmless prompts, per category the leave-one-category-out rate and its call, the per-category
directions' cosines with split-half ceilings, the steering trade-off, and ``verdict_execution``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from refusal_assets.directions.measure import Rate
from refusal_assets.directions.select import Selection
from refusal_assets.storage import write_text


@dataclass(frozen=True, kw_only=True)
class CategoryExecution:
    """One category B at the execution level."""

    category: str
    n_refusing: int
    """B's toxic prompts the clean model refuses (all of them: the leave-one-out test set)."""
    n_train: int
    """B's refusing training prompts (its own direction's sample)."""
    own: Selection
    """B's own layer and position (a fallback to the pooled ones says why)."""
    pooled_still_refusing: Rate
    """B's held-out refusing prompts, pooled direction ablated."""
    random_still_refusing: Rate
    loco_still_refusing: Rate
    """Every refusing prompt of B, with the direction of every other category ablated."""
    own_score_drop: float
    """Mean first-token score drop on B's held-out refusing prompts, B's own direction ablated."""
    own_score_drop_ci: tuple[float, float]
    loco_score_drop: float
    """The same prompts, the leave-one-out direction ablated."""
    loco_to_own: float | None
    """loco_score_drop / own_score_drop; None where the denominator's CI includes 0 or is below
    ``ratio_floor`` (not a number worth printing)."""
    cosine_with_pooled: float
    split_half_ceiling: float
    """Cosine of the directions of two random halves of B's refusing training prompts."""
    call: str
    """shared / specific / undecided / too few prompts (see :mod:`.verdict`)."""


@dataclass(frozen=True, kw_only=True)
class SteeringCurve:
    """Refusal (first-token score > 0) as ``coefficient`` x direction is added at its layer."""

    direction: str
    """"pooled" or a category."""
    coefficients: list[float]
    toxic_refusal: list[float]
    """Share of held-out toxic prompts refusing."""
    over_refusal: list[float]
    """Share of held-out safe and hard prompts refusing."""


@dataclass(frozen=True, kw_only=True)
class Example:
    prompt_id: str
    category: str
    prompt: str
    clean: str
    ablated: str


@dataclass(frozen=True, kw_only=True)
class ExecutionResult:
    """Refusal directions of one model, found, ablated and judged as Arditi et al. (2024) do it.

    Read ``verdict_execution`` with ``pooled_still_refusing`` (the monolithic baseline: one
    direction removes refusal?), ``random_still_refusing`` (the control) and the per-category
    ``loco_still_refusing`` calls (does the direction of the other categories remove B's
    refusal?)."""

    model: str
    n_layers: int
    layer: int
    """Block whose input the pooled direction is read at (and added to)."""
    position: int
    """Post-instruction position, as an offset from the last prompt token (-1 = the last)."""
    direction_norm: float
    selection: Selection
    clean_score: float
    """Mean first-token refusal score of the held-out refusing toxic prompts, clean."""
    ablated_score: float
    """The same, pooled direction ablated."""
    pooled_still_refusing: Rate
    random_still_refusing: Rate
    pooled_induced_refusal: Rate
    """Held-out complied-with safe prompts that refuse with the pooled direction added."""
    loco_still_refusing: float
    """Median over categories with a call of their leave-one-out still-refusing rate."""
    categories: list[CategoryExecution]
    cosines: list[list[float]]
    """[C, C] cosines of the categories' own directions (order of ``categories``)."""
    steering: list[SteeringCurve]
    examples: list[Example]
    margin: float
    verdict_execution: str
    verdict_reason: str
    seconds: float

    @classmethod
    def insufficient(
        cls, model: str, n_layers: int, reason: str, margin: float
    ) -> "ExecutionResult":
        """No direction could be found (e.g. a model that refuses too few prompts): every rate
        empty, ``layer`` -1, the verdict "insufficient evidence" with the reason."""
        empty = Rate.of([])
        return cls(
            model=model,
            n_layers=n_layers,
            layer=-1,
            position=0,
            direction_norm=math.nan,
            selection=Selection(
                position=0, layer=-1, fallback=reason, baseline_score=math.nan, candidates=[]
            ),
            clean_score=math.nan,
            ablated_score=math.nan,
            pooled_still_refusing=empty,
            random_still_refusing=empty,
            pooled_induced_refusal=empty,
            loco_still_refusing=math.nan,
            categories=[],
            cosines=[],
            steering=[],
            examples=[],
            margin=margin,
            verdict_execution="insufficient evidence",
            verdict_reason=reason,
            seconds=0.0,
        )


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_result(result: ExecutionResult, path: Path) -> Path:
    """``result.json`` (NaN written as null)."""
    return write_text(json.dumps(_clean(dataclasses.asdict(result)), indent=1), path)


def _decode(tp, value):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (
            None
            if value is None and len(args) < len(typing.get_args(tp))
            else _decode(args[0], value)
        )
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        missing = [f.name for f in dataclasses.fields(tp) if f.name not in value]
        if missing:
            raise ValueError(f"{tp.__name__}: missing {missing} in the stored result")
        return tp(**{f.name: _decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp)})
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_decode(item, v) for v in value]
    if origin is tuple:
        return tuple(_decode(a, v) for a, v in zip(typing.get_args(tp), value))
    if tp is float:
        return math.nan if value is None else float(value)
    return value


def read_result(path: Path) -> ExecutionResult:
    """The typed result from ``result.json``; a missing or malformed file is a clear error."""
    if not path.is_file():
        raise FileNotFoundError(
            f"execution result not found: {path} (materialize refusal_direction first)"
        )
    try:
        return _decode(ExecutionResult, json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a refusal_direction result ({e})") from e


def category_table(result: ExecutionResult) -> str:
    """Markdown table, one row per category."""
    lines = [
        "| category | refusing | pooled ablated | leave-one-out ablated | random | LOO/own drop | "
        "cos pooled "
        "| split-half | own layer | call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result.categories:
        ratio = "not printed" if c.loco_to_own is None else f"{c.loco_to_own:.2f}"
        own = f"{c.own.layer}" + (" (pooled)" if c.own.fallback else "")
        lines.append(
            f"| {c.category} | {c.n_refusing} | {c.pooled_still_refusing.text()} | "
            f"{c.loco_still_refusing.text()} "
            f"| {c.random_still_refusing.text()} | {ratio} | {c.cosine_with_pooled:.2f} | "
            f"{c.split_half_ceiling:.2f} "
            f"| {own} | {c.call} |"
        )
    return "\n".join(lines)


def summary_markdown(result: ExecutionResult) -> str:
    """A short Markdown summary: the verdict, the pooled and control rates, the category table."""
    fallback = f"; {result.selection.fallback}" if result.selection.fallback else ""
    return "\n".join(
        [
            f"**Execution level: {result.verdict_execution}.** {result.verdict_reason}.",
            "",
            f"- Pooled direction: block {result.layer} input, position {result.position} "
            f"(norm {result.direction_norm:.2f}){fallback}.",
            f"- Refusing held-out toxic prompts still refusing with it ablated: "
            f"{result.pooled_still_refusing.text()}; with a random direction of the same norm: "
            f"{result.random_still_refusing.text()}. Mean refusal score "
            f"{result.clean_score:.2f} -> {result.ablated_score:.2f}.",
            f"- Complied-with safe prompts refusing with it added: "
            f"{result.pooled_induced_refusal.text()}.",
            f"- Leave-one-category-out, median still refusing: {result.loco_still_refusing:.2f}.",
            "",
            category_table(result),
        ]
    )
