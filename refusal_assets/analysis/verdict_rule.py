"""The overlap test's verdict: each category pair's call from its statistics, and the verdict from the
calls (an equivalence rule for "monolithic", never "failed to reject")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from refusal_assets.analysis.resampling import CI, min_permutation_p

PairCall = Literal["shared", "specific", "partial", "undecided"]


@dataclass(frozen=True, kw_only=True)
class PairStats:
    a: str
    b: str
    jaccard: float  # full-sample circuits
    weighted_overlap: float
    spearman: float
    p_value: float  # one-sided label-permutation p for MODULARITY (overlap lower than exchangeable)
    min_p: float  # the smallest p the permutation test can give with these group sizes
    testable: bool  # min_p < alpha: a significant result is attainable at all
    q_value: float  # Benjamini-Hochberg over the testable pairs; NaN for untestable ones
    significant: bool  # testable and q_value < alpha
    half_size: (
        int  # prompts per half-sample circuit: min(n_a, n_b) // 2, for numerator and ceiling alike
    )
    cross_half_jaccard: (
        float  # mean Jaccard of a half-circuit of a with a half-circuit of b (disjoint halves)
    )
    ceiling: (
        float  # mean within-category split-half Jaccard at the same half size (both categories)
    )
    normalised_jaccard: (
        float  # cross_half_jaccard / ceiling; NaN where the ceiling is below min_ceiling
    )
    normalised_jaccard_ci: CI  # bootstrap over prompts (see bootstrap_ci)
    jaccard_ci: CI  # bootstrap over prompts, of the full-sample Jaccard (see bootstrap_ci)
    null_mean: float  # mean Jaccard under exchangeable labels, for scale
    call: PairCall  # what this pair says, see decide_verdict


@dataclass(frozen=True, kw_only=True)
class VerdictRule:
    """Thresholds of the overlap verdict (``comparison:`` config fields, echoed in the output)."""

    equivalence_margin: float = 0.2
    """A pair is ``shared`` when the lower end of its normalised-Jaccard CI is at least 1 - margin:
    cross-category overlap equivalent to the within-category ceiling (an equivalence test, never
    "failed to reject")."""
    modular_max_normalised_jaccard: float = 0.5
    """A pair is ``specific`` when it differs significantly AND the upper end of its normalised-Jaccard
    CI is below this."""
    min_decided_fraction: float = 0.5
    """Fewer pairs than this fraction decided (shared / specific / partial): ``insufficient evidence``."""
    majority: float = 0.5
    """``modular``: at least this fraction of decided pairs specific and none shared; ``monolithic``:
    at least this fraction shared and none specific or partial."""

    @classmethod
    def from_config(cls, comp: Any) -> VerdictRule:
        """From a :class:`refusal_assets.config.ComparisonConfig`."""
        return cls(
            equivalence_margin=comp.equivalence_margin,
            modular_max_normalised_jaccard=comp.modular_max_normalised,
            min_decided_fraction=comp.min_decided_fraction,
            majority=comp.majority,
        )


class Verdict(NamedTuple):
    """The overlap test's answer (:func:`decide_verdict`)."""

    verdict: Literal["modular", "monolithic", "mixed", "insufficient evidence"]
    """What the pairs' calls add up to."""
    reason: str
    """The rule that decided, with the numbers it saw."""


def classify_pair(significant: bool, normalised_ci: CI, rule: VerdictRule) -> PairCall:
    """``shared``: normalised CI low >= 1 - margin; ``specific``: significant and CI high below
    ``modular_max_normalised_jaccard``; ``partial``: significant, or the CI lies wholly below the
    equivalence bound (clearly not shared, not clearly disjoint); ``undecided``: anything else (a CI
    spanning both answers, an undefined ceiling, an untestable pair)."""
    lo, hi = normalised_ci
    if math.isfinite(lo) and lo >= 1 - rule.equivalence_margin:
        return "shared"
    if significant and math.isfinite(hi) and hi < rule.modular_max_normalised_jaccard:
        return "specific"
    if significant or (math.isfinite(hi) and hi < 1 - rule.equivalence_margin):
        return "partial"
    return "undecided"


def prompts_to_decide(
    pairs: list[PairStats], n_prompts: dict[str, int], rule: VerdictRule, alpha: float
) -> int:
    """A rough per-category sample that would decide the undecided pairs: CI widths shrink as 1/sqrt(n),
    so n * (half-width / distance to the nearer decision bound)^2, and at least the size at which the
    permutation test can reach alpha."""
    need = 0
    for p in pairs:
        if p.call != "undecided":
            continue
        n = min(n_prompts[p.a], n_prompts[p.b])
        k = n
        while min_permutation_p(k, k, 10**9) >= alpha:
            k += 1
        lo, hi = p.normalised_jaccard_ci
        est = p.normalised_jaccard
        if math.isfinite(est) and math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            gap = max(
                min(
                    abs(est - (1 - rule.equivalence_margin)),
                    abs(est - rule.modular_max_normalised_jaccard),
                ),
                0.05,
            )
            k = max(k, math.ceil(n * ((hi - lo) / 2 / gap) ** 2))
        else:  # no usable ceiling: the circuits do not replicate; at least four times the sample
            k = max(k, 4 * n)
        need = max(need, k)
    return need


def decide_verdict(
    pairs: list[PairStats],
    n_prompts: dict[str, int],
    rule: VerdictRule = VerdictRule(),
    *,
    alpha: float = 0.05,
) -> Verdict:
    """The overlap test's verdict from the pairs' calls (:func:`classify_pair`).

    * ``insufficient evidence``: fewer than ``min_decided_fraction`` of the pairs decided;
    * ``monolithic``: at least ``majority`` of the decided pairs ``shared``, none ``specific`` or ``partial``;
    * ``modular``: at least ``majority`` of the decided pairs ``specific``, none ``shared``;
    * ``mixed``: anything else.
    Half-shared circuits have Jaccard 1/3, so they count as specific.
    """
    calls = [p.call for p in pairs]
    count = {c: calls.count(c) for c in ("shared", "specific", "partial", "undecided")}
    decided = len(calls) - count["undecided"]
    norm = np.array([p.normalised_jaccard for p in pairs], dtype=float)
    median_norm = float(np.median(norm[np.isfinite(norm)])) if np.isfinite(norm).any() else math.nan
    n_untestable = sum(not p.testable for p in pairs)
    numbers = (
        f"of {len(pairs)} category pairs, {count['shared']} shared (normalised-Jaccard CI low >= "
        f"{1 - rule.equivalence_margin:g}), {count['specific']} specific (significant after Benjamini-Hochberg, CI "
        f"high < {rule.modular_max_normalised_jaccard:g}), {count['partial']} partial, {count['undecided']} undecided; "
        f"the median normalised Jaccard is {median_norm:.3f}."
    )
    if n_untestable:
        numbers += (
            f" {n_untestable} pair(s) are untestable (the smallest attainable permutation p is >= {alpha:g}) "
            "and count as no test."
        )
    if n_unreliable := int((~np.isfinite(norm)).sum()):
        numbers += (
            f" {n_unreliable} pair(s) have a split-half ceiling too low to normalise (circuits do not reproduce "
            "within their own category)."
        )
    if decided < rule.min_decided_fraction * max(len(pairs), 1) or decided == 0:
        need = prompts_to_decide(pairs, n_prompts, rule, alpha)
        return Verdict(
            "insufficient evidence",
            (
                f"Insufficient evidence: {numbers} Fewer than {rule.min_decided_fraction:.0%} of the pairs are "
                f"decided; about {need} refusing prompts per category would decide them."
            ),
        )
    if (
        count["shared"] >= rule.majority * decided
        and count["specific"] == 0
        and count["partial"] == 0
    ):
        return Verdict(
            "monolithic",
            f"Monolithic: {numbers} Cross-category overlap is equivalent to the within-category ceiling.",
        )
    if count["specific"] >= rule.majority * decided and count["shared"] == 0:
        return Verdict(
            "modular", f"Modular: {numbers} Categories use measurably different circuits."
        )
    return Verdict(
        "mixed", f"Mixed: {numbers} Neither every decided pair shared nor most of them specific."
    )
