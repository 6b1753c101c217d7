"""Direction selection on a validation split, with the reference's filters
(``select_direction.py``).

For every candidate (position, layer): the mean refusal score of harmful validation prompts with the
direction ablated (lower is better), the KL divergence of the harmless prompts' last-position
next-token distribution under ablation (discard above ``kl_threshold``: the ablation must not wreck
the model), and the steering score, the harmless prompts' mean refusal score with the direction
added at its layer (discard below ``induce_threshold``: a refusal direction must also induce
refusal). One more filter, ours: a direction whose norm is below ``min_relative_norm`` of the mean
activation norm there is noise (a near-zero difference of means) and is discarded before scoring.
The best survivor has the lowest ablated score. A category with too few validation prompts does not
select at all: it takes the pooled layer and position and says so (:func:`select_for_category`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from refusal_assets.config import DirectionsConfig
from refusal_assets.directions.candidates import Candidates
from refusal_assets.directions.hooks import direction_ablation
from refusal_assets.directions.measure import Scorer, kl_last_position
from refusal_assets.directions.prompts import PromptRow


class NoDirection(ValueError):
    """No direction can be found: too few prompts in a group, or only near-zero candidates."""


@dataclass(frozen=True, kw_only=True)
class CandidateScore:
    position: int
    layer: int
    norm: float
    relative_norm: float
    ablated_score: float
    """Mean refusal score of the harmful validation prompts under ablation (NaN: not scored)."""
    kl: float
    steering_score: float
    rejected: str | None
    """Why the filters discarded it ("norm", "kl", "steering"), or None."""


@dataclass(frozen=True, kw_only=True)
class Selection:
    position: int
    layer: int
    fallback: str | None
    """Why this is not a filtered selection of its own (too few prompts, nothing survived), or
    None."""
    baseline_score: float
    """Mean refusal score of the harmful validation prompts without intervention (NaN: not
    scored)."""
    candidates: list[CandidateScore]


def score_candidates(
    scorer: Scorer,
    cands: Candidates,
    harmful: list[PromptRow],
    harmless: list[PromptRow],
    cfg: DirectionsConfig,
) -> tuple[float, list[CandidateScore]]:
    """(clean mean score of ``harmful``, one score per candidate), filters applied."""
    both = harmful + harmless
    clean = scorer.last_logits(harmless)
    baseline = float(scorer.scores(harmful).mean())
    out = []
    for p_i, position in enumerate(cands.positions):
        for l_i, layer in enumerate(cands.layers):
            r = cands.directions[p_i, l_i]
            norm, scale = float(r.norm()), float(cands.activation_norms[p_i, l_i])
            rel = norm / scale if scale > 0 else 0.0
            if rel < cfg.min_relative_norm or norm == 0:
                out.append(
                    CandidateScore(
                        position=position,
                        layer=layer,
                        norm=norm,
                        relative_norm=rel,
                        ablated_score=math.nan,
                        kl=math.nan,
                        steering_score=math.nan,
                        rejected="norm",
                    )
                )
                continue
            with direction_ablation(scorer.model, r):
                logits = scorer.last_logits(both)  # [n_harmful + n_harmless, vocab]
            ablated = scorer.scores_from_logits(logits[: len(harmful)])
            kl = kl_last_position(clean, logits[len(harmful) :])
            steering = float(scorer.added_scores(harmless, [r], layer)[0].mean())
            rejected = (
                "kl"
                if kl > cfg.kl_threshold
                else "steering"
                if steering < cfg.induce_threshold
                else None
            )
            out.append(
                CandidateScore(
                    position=position,
                    layer=layer,
                    norm=norm,
                    relative_norm=rel,
                    ablated_score=float(ablated.mean()),
                    kl=kl,
                    steering_score=steering,
                    rejected=rejected,
                )
            )
    return baseline, out


def pick(scores: list[CandidateScore], baseline: float) -> Selection:
    """The survivor with the lowest ablated score; if none survives, the lowest ablated score of all
    scored candidates, marked as a fallback."""
    survivors = [s for s in scores if s.rejected is None]
    fallback = None
    if not survivors:
        survivors = [s for s in scores if not math.isnan(s.ablated_score)]
        fallback = "no candidate passed the filters: the lowest ablated score of all scored ones"
        if not survivors:
            raise NoDirection(
                "direction selection: every candidate has a near-zero norm; no direction to select"
            )
    best = min(survivors, key=lambda s: s.ablated_score)
    return Selection(
        position=best.position,
        layer=best.layer,
        fallback=fallback,
        baseline_score=baseline,
        candidates=scores,
    )


def select_direction(
    scorer: Scorer,
    cands: Candidates,
    harmful: list[PromptRow],
    harmless: list[PromptRow],
    cfg: DirectionsConfig,
) -> Selection:
    baseline, scores = score_candidates(scorer, cands, harmful, harmless, cfg)
    return pick(scores, baseline)


def select_for_category(
    scorer: Scorer,
    cands: Candidates | None,
    harmful: list[PromptRow],
    harmless: list[PromptRow],
    pooled: Selection,
    cfg: DirectionsConfig,
) -> Selection:
    """A category's own selection, or the pooled layer and position when it has fewer than
    ``min_selection_prompts`` refusing validation prompts or nothing of its own passes the
    filters."""
    if len(harmful) < cfg.min_selection_prompts:
        reason = (
            f"{len(harmful)} refusing validation prompts < {cfg.min_selection_prompts}: "
            "pooled layer and position"
        )
        return Selection(
            position=pooled.position,
            layer=pooled.layer,
            fallback=reason,
            baseline_score=math.nan,
            candidates=[],
        )
    if cands is None:
        raise ValueError(
            f"select_for_category: {len(harmful)} validation prompts but no candidates to select "
            "from"
        )
    own = select_direction(scorer, cands, harmful, harmless, cfg)
    if own.fallback is None:
        return own
    reason = "no candidate of its own passed the filters: pooled layer and position"
    return Selection(
        position=pooled.position,
        layer=pooled.layer,
        fallback=reason,
        baseline_score=own.baseline_score,
        candidates=own.candidates,
    )
