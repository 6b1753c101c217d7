"""Rules that flag weak results: each takes plain numbers (read from an asset's files) and returns a
:class:`Finding` that says whether the result holds up and, if not, why, in numbers.

They are the decision logic of the WARN asset checks (``defs/checks.py`` wraps them); they never
block a run, because a weak result is still a result, but a researcher should see it before
believing a verdict built on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

CI = tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class Finding:
    """The outcome of one rule: ``passed`` False means warn; ``why`` says so in words, ``values``
    carries the numbers behind it (floats/ints/strings, for the check's metadata)."""

    passed: bool
    why: str
    values: dict[str, float | int | str] = field(default_factory=dict)


def _finite(ci: CI) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci)


def _ci_text(ci: CI) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if _finite(ci) else "n/a"


def every_group(findings: list[tuple[str, Finding]], ok: str) -> Finding:
    """One finding over several groups: passes only if every group passes."""
    failed = [(g, f) for g, f in findings if not f.passed]
    values = {f"{g}_{k}": v for g, f in findings for k, v in f.values.items()}
    if not failed:
        return Finding(passed=True, why=ok, values=values)
    return Finding(passed=False, why=" ".join(f"{g}: {f.why}" for g, f in failed), values=values)


# ------------------------------------------------------------------------------ circuit checks


def denominator_excludes_zero(denominator: float, ci: CI) -> Finding:
    """m(M) - m(∅), the denominator of faithfulness and completeness: if its CI includes 0 (or there
    is no CI) the ratios are ill-conditioned and can take any value."""
    values = {"m_full_minus_m_empty": denominator, "ci_lo": ci[0], "ci_hi": ci[1]}
    if not _finite(ci):
        return Finding(
            passed=False,
            why=f"m(M) - m(∅) = {denominator:.3f} has no CI (too few prompts or no resamples): "
            "its distance from 0 is unknown.",
            values=values,
        )
    if ci[0] <= 0 <= ci[1]:
        return Finding(
            passed=False,
            why=f"m(M) - m(∅) = {denominator:.3f}, 95% CI {_ci_text(ci)} includes 0: ablating every node may not "
            "change the refusal score, so faithfulness and completeness are ill-conditioned.",
            values=values,
        )
    return Finding(
        passed=True,
        why=f"m(M) - m(∅) = {denominator:.3f}, 95% CI {_ci_text(ci)} excludes 0.",
        values=values,
    )


def faithfulness_beats_random(
    faithfulness: float, faithfulness_ci: CI, random_faithfulness: float, advantage_ci: CI
) -> Finding:
    """The circuit against a random circuit of its size: the paired CI of faithfulness minus the
    control's must lie above 0, else the circuit is no better than chance."""
    values = {
        "faithfulness": faithfulness,
        "faithfulness_ci_lo": faithfulness_ci[0],
        "faithfulness_ci_hi": faithfulness_ci[1],
        "random_faithfulness": random_faithfulness,
        "advantage_ci_lo": advantage_ci[0],
        "advantage_ci_hi": advantage_ci[1],
    }
    head = f"faithfulness {faithfulness:.3f} {_ci_text(faithfulness_ci)} vs random control {random_faithfulness:.3f}"
    if not _finite(advantage_ci):
        return Finding(
            passed=False,
            why=f"{head}; no CI of the difference (too few prompts), so it is not shown to beat chance.",
            values=values,
        )
    if advantage_ci[0] <= 0:
        return Finding(
            passed=False,
            why=f"{head}; the paired 95% CI of the difference {_ci_text(advantage_ci)} is not above 0: "
            "the circuit is no better than a random one of its size.",
            values=values,
        )
    return Finding(
        passed=True,
        why=f"{head}; the difference's 95% CI {_ci_text(advantage_ci)} is above 0.",
        values=values,
    )


class GroupPrompts(NamedTuple):
    """How many prompts a circuit group had and used."""

    n_in_group: int
    n_used: int
    prompt_set: str
    """The filter applied, or the fallback label ``all (<filter>: only n < m)``."""


def enough_prompts(
    groups: Mapping[str, GroupPrompts], min_prompts: int, prompt_filter: str
) -> Finding:
    """Every group's circuit was found on at least ``min_prompts`` prompts that pass the prompt filter;
    a group the filter left short fell back to all its prompts (refusing or not), a different question."""
    found = []
    for g, p in sorted(groups.items()):
        values = {"n_in_group": p.n_in_group, "n_used": p.n_used, "prompt_set": p.prompt_set}
        if p.n_used < min_prompts:
            found.append(
                (
                    g,
                    Finding(
                        passed=False,
                        why=f"only {p.n_used} prompts (< min_prompts {min_prompts}).",
                        values=values,
                    ),
                )
            )
        elif p.prompt_set != prompt_filter:
            found.append(
                (
                    g,
                    Finding(
                        passed=False,
                        why=f"fewer than min_prompts {min_prompts} prompts pass the '{prompt_filter}' filter, "
                        f"so the circuit uses {p.prompt_set}: {p.n_used} prompts, refusing or not.",
                        values=values,
                    ),
                )
            )
        else:
            found.append(
                (
                    g,
                    Finding(
                        passed=True, why=f"{p.n_used} '{prompt_filter}' prompts.", values=values
                    ),
                )
            )
    if not found:
        return Finding(passed=False, why="no prompt group at all.", values={})
    return every_group(
        found, f"every group has at least min_prompts {min_prompts} '{prompt_filter}' prompts."
    )


# ---------------------------------------------------------------------------- behaviour check


class SplitRate(NamedTuple):
    rate: float
    lo: float
    hi: float
    n: int


def toxic_refused_more_than_safe(toxic: SplitRate | None, safe: SplitRate | None) -> Finding:
    """A model that refuses safe prompts at least as often as toxic ones does not discriminate harm in
    this category, so its "refusal circuit" may be a generic-caution circuit."""
    if toxic is None or safe is None or toxic.n == 0 or safe.n == 0:
        missing = [s for s, r in (("toxic", toxic), ("safe", safe)) if r is None or r.n == 0]
        return Finding(
            passed=False,
            why=f"no {' or '.join(missing)} prompts, so refusal of toxic and safe prompts cannot be compared.",
            values={},
        )
    values = {
        "refusal_rate_toxic": toxic.rate,
        "refusal_rate_toxic_ci_lo": toxic.lo,
        "refusal_rate_toxic_ci_hi": toxic.hi,
        "n_toxic": toxic.n,
        "refusal_rate_safe": safe.rate,
        "refusal_rate_safe_ci_lo": safe.lo,
        "refusal_rate_safe_ci_hi": safe.hi,
        "n_safe": safe.n,
    }
    text = (
        f"refusal rate toxic {toxic.rate:.2f} [{toxic.lo:.2f}, {toxic.hi:.2f}] (n={toxic.n}) vs "
        f"safe {safe.rate:.2f} [{safe.lo:.2f}, {safe.hi:.2f}] (n={safe.n})"
    )
    if toxic.rate <= safe.rate:
        return Finding(
            passed=False,
            why=f"{text}: the model refuses safe prompts at least as often as toxic ones.",
            values=values,
        )
    return Finding(passed=True, why=f"{text}.", values=values)


# --------------------------------------------------------------------------- comparison check


def enough_categories(
    categories_by_group: Mapping[str, list[str]], expected_groups: list[str]
) -> Finding:
    """A cross-category comparison needs at least two categories with a circuit in every prompt group;
    a group with fewer is not compared at all."""
    found = []
    for g in sorted(set(expected_groups) | set(categories_by_group)):
        cats = categories_by_group.get(g, [])
        values = {"n_categories": len(cats), "categories": ", ".join(cats)}
        if len(cats) < 2:
            found.append(
                (
                    g,
                    Finding(
                        passed=False,
                        why=f"{len(cats)} categor{'y' if len(cats) == 1 else 'ies'} ({', '.join(cats) or 'none'}): "
                        "fewer than 2, so nothing is compared.",
                        values=values,
                    ),
                )
            )
        else:
            found.append((g, Finding(passed=True, why=f"{len(cats)} categories.", values=values)))
    if not found:
        return Finding(passed=False, why="no prompt group was compared.", values={})
    return every_group(found, "every prompt group compares at least 2 categories.")
