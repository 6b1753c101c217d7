"""The execution level end to end: what the ``refusal_direction`` asset and the planted worlds run.

1. Candidates: difference of means (refused toxic vs complied-with safe training prompts) at every
   block input and the last ``positions`` post-instruction tokens (:mod:`.candidates`).
2. Selection of the pooled direction on the validation split with the paper's filters
(:mod:`.select`).
3. Measures on held-out prompts, by greedy generation judged like ``refusal_behaviour``: refusing
   toxic prompts still refusing with the pooled direction ablated at every layer and position
   (:mod:`.hooks`), with a random direction of the same norm ablated, and complied-with safe prompts
   refusing with the direction added.
4. Per category B: leave-one-category-out (the direction of every other category's refusing training
   prompts, ablated on every refusing prompt of B), B's own direction (score drop on B's held-out
   refusing prompts), cosines with split-half ceilings, and a call; then the steering trade-off and
   ``verdict_execution`` (:mod:`.verdict`).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from refusal_assets.config import DirectionsConfig
from refusal_assets.directions import verdict as vd
from refusal_assets.directions.candidates import (
    Activations,
    candidate_layers,
    collect,
    mean_difference,
    subset,
)
from refusal_assets.directions.hooks import direction_ablation
from refusal_assets.directions.measure import (
    Intervened,
    Judged,
    Rate,
    Scorer,
    bootstrap_mean_ci,
    random_direction,
)
from refusal_assets.directions.prompts import PromptRow, Splits, split_prompts
from refusal_assets.directions.result import (
    CategoryExecution,
    Example,
    ExecutionResult,
    SteeringCurve,
)
from refusal_assets.directions.select import (
    NoDirection,
    Selection,
    select_direction,
    select_for_category,
)
from refusal_assets.lm.sites import decoder_layers


@dataclass(frozen=True, kw_only=True)
class ExecutionRun:
    result: ExecutionResult
    directions: dict[str, torch.Tensor]
    """Tensors for ``directions.safetensors``: ``pooled.layer{L}`` [d] for every block input L
    (0..n_layers; block L's input is site ``resid{L-1}``'s output, layer n_layers the last block's
    output; layer 0, the token embedding, is zero at the template positions), ``category.{c}`` (each
    category's own direction at the common layer and position) and ``random`` (the control)."""


def _sample(rows: list[PromptRow], n: int, seed: int) -> list[PromptRow]:
    rows = sorted(rows, key=lambda r: r.prompt_id)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _ids(rows: list[PromptRow]) -> set[str]:
    return {r.prompt_id for r in rows}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def _split_half(harmful: torch.Tensor, harmless_mean: torch.Tensor, seed: int) -> float:
    """Cosine of the directions of two random halves of ``harmful`` [n, d] (NaN below 2 per
    half)."""
    if len(harmful) < 4:
        return math.nan
    order = torch.randperm(len(harmful), generator=torch.Generator().manual_seed(seed))
    half = len(harmful) // 2
    a, b = harmful[order[:half]].mean(0), harmful[order[half:]].mean(0)
    return _cosine(a - harmless_mean, b - harmless_mean)


def _check_splits(s: Splits) -> None:
    sizes = {
        "refused toxic training prompts": len(s.train_harmful),
        "complied-with safe training prompts": len(s.train_harmless),
        "refused toxic validation prompts": len(s.val_harmful),
        "complied-with safe validation prompts": len(s.val_harmless),
        "refusing held-out toxic prompts": len(s.test_refusing),
    }
    empty = [k for k, v in sizes.items() if v == 0]
    if empty:
        raise NoDirection(
            f"refusal directions: no {', no '.join(empty)} (sizes: {sizes}); widen the sample"
        )


def steering_curves(
    scorer: Scorer,
    directions: dict[str, torch.Tensor],
    layer: int,
    s: Splits,
    cfg: DirectionsConfig,
) -> list[SteeringCurve]:
    """One steering curve per named direction on the same held-out toxic and benign samples: the
    refusal shares (score > 0) of each as coefficient x direction is added at ``layer``
    (coefficient 0: no intervention). Every (direction, coefficient) shares one clean pass up to
    ``layer`` per batch (:meth:`Scorer.added_scores`)."""
    toxic = _sample(s.test_toxic, cfg.steering_prompts, cfg.seed)
    benign = _sample(s.test_benign, cfg.steering_prompts, cfg.seed)
    n_tox, coefficients = len(toxic), cfg.steering_coefficients
    clean = scorer.scores(toxic + benign)
    vectors = [c * r for r in directions.values() for c in coefficients]
    added = scorer.added_scores(toxic + benign, vectors, layer).reshape(
        len(directions), len(coefficients), n_tox + len(benign)
    )  # [directions, coefficients, toxic + benign]
    scores = np.concatenate([np.broadcast_to(clean, (len(directions), 1, len(clean))), added], 1)
    refusing = scores > 0  # [directions, 1 + coefficients, toxic + benign]
    return [
        SteeringCurve(
            direction=name,
            coefficients=[0.0, *map(float, coefficients)],
            toxic_refusal=refusing[i, :, :n_tox].mean(-1).tolist(),
            over_refusal=refusing[i, :, n_tox:].mean(-1).tolist(),
        )
        for i, name in enumerate(directions)
    ]


def _examples(ablated: Judged, rows: list[PromptRow], n: int) -> list[Example]:
    """The first ``n`` prompts' clean and ablated responses."""
    by_id = {row.prompt_id: row for row in rows}
    pairs = list(zip(ablated.prompt_ids, ablated.responses))[:n]
    return [
        Example(
            prompt_id=pid,
            category=by_id[pid].category,
            prompt=by_id[pid].prompt,
            clean=by_id[pid].response,
            ablated=text,
        )
        for pid, text in pairs
    ]


def _generations(
    scorer: Scorer,
    cfg: DirectionsConfig,
    s: Splits,
    acts: Activations,
    at: tuple[int, int],
    pooled: torch.Tensor,
    control: torch.Tensor,
    categories: list[str],
) -> dict[str, Judged]:
    """Every generation of the measures, decoded together (:meth:`Scorer.judge_groups`):
    ``pooled`` and ``random`` (held-out refusing prompts with the pooled direction or the control
    ablated), ``induced`` (complied-with safe prompts with the pooled direction added at its
    layer), and ``loco.{c}`` for each category with a leave-one-out direction (its refusing
    prompts with that direction ablated)."""
    p_i, l_i = acts.positions.index(at[0]), acts.layers.index(at[1])
    groups = {
        "pooled": Intervened(rows=s.test_refusing, ablate=pooled),
        "random": Intervened(rows=s.test_refusing, ablate=control),
        "induced": Intervened(rows=s.test_complied_harmless, add=pooled),
    }
    for c in categories:
        loco = loco_direction(acts, s, c, p_i, l_i)
        if loco is not None:
            refusing = [row for row in s.refusing if row.category == c]
            groups[f"loco.{c}"] = Intervened(rows=refusing, ablate=loco.direction)
    judged = scorer.judge_groups(list(groups.values()), cfg.max_new_tokens, add_layer=at[1])
    return dict(zip(groups, judged))


def _rate_of(judged: Judged, rows: list[PromptRow]) -> Rate:
    by_id = dict(zip(judged.prompt_ids, judged.refused))
    return Rate.of([by_id[r.prompt_id] for r in rows])


class LocoDirection(NamedTuple):
    direction: torch.Tensor
    """[d]: mean over the other categories' refused training prompts minus their complied-with
    ones."""
    prompt_ids: set[str]
    """Every prompt it was computed from (none of the held-out category's)."""


def loco_direction(
    acts: Activations, s: Splits, category: str, p_i: int, l_i: int
) -> LocoDirection | None:
    """The leave-one-category-out direction for ``category`` at grid cell (p_i, l_i), or None when
    the other categories have no prompts on one side."""
    harmful = [r for r in s.train_harmful if r.category != category]
    harmless = [r for r in s.train_harmless if r.category != category]
    if not harmful or not harmless:
        return None
    h1 = subset(acts, _ids(harmful))[:, p_i, l_i]  # [n1, d]
    h0 = subset(acts, _ids(harmless))[:, p_i, l_i]  # [n0, d]
    return LocoDirection(h1.mean(0) - h0.mean(0), _ids(harmful) | _ids(harmless))


def _category(
    scorer: Scorer,
    cfg: DirectionsConfig,
    c: str,
    s: Splits,
    acts: Activations,
    at: tuple[int, int],
    pooled: Selection,
    pooled_r: torch.Tensor,
    judged: dict[str, Judged],
) -> tuple[CategoryExecution, torch.Tensor]:
    """Category ``c``'s row, and its own direction at the common layer and position
    (``judged[f"loco.{c}"]``: its refusing prompts generated with its leave-one-out direction
    ablated)."""
    p_i, l_i = acts.positions.index(at[0]), acts.layers.index(at[1])
    own_h = subset(acts, _ids([r for r in s.train_harmful if r.category == c]))[
        :, p_i, l_i
    ]  # [n, d]
    harmless = subset(acts, _ids(s.train_harmless))[:, p_i, l_i]  # [m, d]
    own_r = own_h.mean(0) - harmless.mean(0) if len(own_h) else torch.zeros_like(pooled_r)
    refusing = [r for r in s.refusing if r.category == c]
    heldout = [r for r in s.test_refusing if r.category == c]
    loco = judged.get(f"loco.{c}", Judged.empty())
    # the category's own selection (a fallback to the pooled layer and position when it has few
    # prompts)
    cat_layers = [layer for layer in acts.layers if layer in pooled_layers(pooled)]
    own_sel = _own_selection(scorer, cfg, c, s, acts, cat_layers, pooled)
    clean = np.array([r.refusal_score for r in heldout])
    if heldout and own_r.norm() > 0:
        with direction_ablation(scorer.model, own_r):
            own_drop = clean - scorer.scores(heldout)
    else:
        own_drop = np.full(len(heldout), math.nan)
    loco_scores = dict(zip(loco.prompt_ids, loco.scores))
    loco_drop = clean - np.array([loco_scores.get(r.prompt_id, math.nan) for r in heldout])
    ci = bootstrap_mean_ci(own_drop, seed=cfg.seed)
    own_mean = float(own_drop.mean()) if len(own_drop) else math.nan
    printable = (
        math.isfinite(ci[0]) and (ci[0] > 0 or ci[1] < 0) and abs(own_mean) >= cfg.ratio_floor
    )
    loco_rate = Rate.of(loco.refused)
    row = CategoryExecution(
        category=c,
        n_refusing=len(refusing),
        n_train=len(own_h),
        own=own_sel,
        pooled_still_refusing=_rate_of(judged["pooled"], heldout),
        random_still_refusing=_rate_of(judged["random"], heldout),
        loco_still_refusing=loco_rate,
        own_score_drop=own_mean,
        own_score_drop_ci=ci,
        loco_score_drop=float(loco_drop.mean()) if len(loco_drop) else math.nan,
        loco_to_own=float(loco_drop.mean() / own_mean) if printable else None,
        cosine_with_pooled=_cosine(own_r, pooled_r),
        split_half_ceiling=_split_half(own_h, harmless.mean(0), cfg.seed),
        call=vd.call_category(loco_rate, cfg.min_category_prompts, cfg.margin),
    )
    return row, own_r


def pooled_layers(pooled: Selection) -> set[int]:
    return {cand.layer for cand in pooled.candidates}


def _own_selection(
    scorer: Scorer,
    cfg: DirectionsConfig,
    c: str,
    s: Splits,
    acts: Activations,
    layers: list[int],
    pooled: Selection,
) -> Selection:
    val = [r for r in s.val_harmful if r.category == c]
    if len(val) < cfg.min_selection_prompts or not layers:
        return select_for_category(scorer, None, val, [], pooled, cfg)
    l_idx = [acts.layers.index(layer) for layer in layers]
    own_h = subset(acts, _ids([r for r in s.train_harmful if r.category == c]))[:, :, l_idx]
    cands = mean_difference(
        own_h, subset(acts, _ids(s.train_harmless))[:, :, l_idx], layers, acts.positions
    )
    harmless_val = _sample(s.val_harmless, cfg.selection_prompts, cfg.seed)
    return select_for_category(
        scorer, cands, _sample(val, cfg.selection_prompts, cfg.seed), harmless_val, pooled, cfg
    )


def run_execution(
    scorer: Scorer,
    rows: list[PromptRow],
    cfg: DirectionsConfig,
    model_key: str,
    log: Callable[[str], None] = print,
) -> ExecutionRun:
    """The whole execution level of one model (see the module docstring)."""
    t0 = time.perf_counter()
    s = split_prompts(rows, cfg.val_fraction, cfg.seed)
    _check_splits(s)
    n_layers = len(decoder_layers(scorer.model))
    block_inputs = list(range(1, n_layers + 1))
    acts = collect(scorer, s.train_harmful + s.train_harmless, block_inputs, cfg.positions)
    layers = candidate_layers(n_layers, cfg.layer_stride, cfg.max_layer_fraction)
    l_idx = [acts.layers.index(layer) for layer in layers]
    harmful, harmless = subset(acts, _ids(s.train_harmful)), subset(acts, _ids(s.train_harmless))
    cands = mean_difference(harmful[:, :, l_idx], harmless[:, :, l_idx], layers, acts.positions)
    log(
        f"directions: {len(s.train_harmful)} + {len(s.train_harmless)} training prompts, "
        f"{len(layers)} layers "
        f"x {len(acts.positions)} positions, {time.perf_counter() - t0:.0f} s"
    )
    val_h, val_0 = (
        _sample(x, cfg.selection_prompts, cfg.seed) for x in (s.val_harmful, s.val_harmless)
    )
    selection = select_direction(scorer, cands, val_h, val_0, cfg)
    at = (selection.position, selection.layer)
    r = cands.direction(*at)
    log(
        f"directions: selected block {at[1]} input, position {at[0]}, "
        f"{time.perf_counter() - t0:.0f} s"
    )

    control = random_direction(r, cfg.seed)
    categories = sorted({row.category for row in rows})
    judged = _generations(scorer, cfg, s, acts, at, r, control, categories)
    induced = judged["induced"]
    log(
        "directions: pooled, random, induced and leave-one-category-out generations, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    per_cat, own_dirs = [], {}
    for c in categories:
        row, own_dirs[c] = _category(scorer, cfg, c, s, acts, at, selection, r, judged)
        per_cat.append(row)
    log(
        f"directions: leave-one-category-out over {len(categories)} categories, "
        f"{time.perf_counter() - t0:.0f} s"
    )

    named = {"pooled": r} | {c: v for c, v in own_dirs.items() if v.norm() > 0}
    curves = steering_curves(scorer, named, at[1], s, cfg)

    pooled_rate, random_rate = judged["pooled"].rate, judged["random"].rate
    loco_all = vd.pooled_rate([c.loco_still_refusing for c in per_cat if c.call != vd.TOO_FEW])
    verdict, reason = vd.verdict_execution(
        pooled_rate, random_rate, [c.call for c in per_cat], cfg.margin, loco_all=loco_all
    )
    called = [c.loco_still_refusing.rate for c in per_cat if c.call != vd.TOO_FEW]
    examples = _examples(judged["pooled"], s.test_refusing, cfg.n_examples)
    result = ExecutionResult(
        model=model_key,
        n_layers=n_layers,
        layer=at[1],
        position=at[0],
        direction_norm=float(r.norm()),
        selection=selection,
        clean_score=float(np.mean([row.refusal_score for row in s.test_refusing])),
        ablated_score=float(judged["pooled"].scores.mean()),
        pooled_still_refusing=pooled_rate,
        random_still_refusing=random_rate,
        pooled_induced_refusal=induced.rate,
        loco_still_refusing=float(statistics.median(called)) if called else math.nan,
        categories=per_cat,
        cosines=[[_cosine(own_dirs[a], own_dirs[b]) for b in categories] for a in categories],
        steering=curves,
        examples=examples,
        margin=cfg.margin,
        verdict_execution=verdict,
        verdict_reason=reason,
        seconds=round(time.perf_counter() - t0, 2),
    )
    p_i = acts.positions.index(at[0])
    pooled_all = harmful[:, p_i].mean(0) - harmless[:, p_i].mean(0)  # [n_layers, d]: inputs 1..n
    tensors = {"pooled.layer0": torch.zeros_like(r)}
    tensors |= {f"pooled.layer{layer}": pooled_all[i] for i, layer in enumerate(acts.layers)}
    tensors |= {f"category.{c}": v for c, v in own_dirs.items()} | {"random": control}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    log(f"directions: {verdict} ({reason}), {result.seconds:.0f} s")
    return ExecutionRun(result=result, directions=tensors)
