"""The execution-level verdict: is refusal carried out by one shared direction?

Rule (``m`` = ``directions.margin``, the same on both sides; every interval a 95 % Wilson interval):

* Each category B with at least ``min_category_prompts`` refusing prompts gets a call from its
  leave-one-category-out rate (the share of B's refusing prompts still refusing with the direction
  built from every other category ablated): **shared** if its CI high <= m, **specific** if its CI
  low >= 1 - m, else **undecided**. Fewer prompts: "too few prompts" (no call).
* **insufficient evidence** when there are no refusing held-out prompts, when the random control
  removes refusal too (a random direction of the same norm leaves a still-refusing share whose CI
  high is below 1 - m: the ablation is not specific to the refusal direction), when fewer than two
  categories have a call, or when fewer than half of those are decided.
* Before the per-category majority: the leave-one-category-out rate pooled over every called
  category (each refusing prompt of B with the direction of the other categories ablated, all B
  together) decides when its CI is confidently on one side, because a single category's 5-11
  prompts cannot bring a Wilson interval under m: **monolithic** when the pooled direction and the
  pooled leave-one-out rate both have CI high <= m and no category is specific; **modular** when the
  pooled leave-one-out rate has CI low >= 1 - m and no category is shared (the same margin).
* **monolithic**: the pooled direction removes refusal (its CI high <= m) and no decided category
  is specific.
* **modular**: no decided category is shared (each category needs its own direction; a pooled
  direction that still removes refusal then does so as a sum of category directions).
* **shared core + specific tail**: the pooled direction removes refusal, both calls occur, and
  shared categories are at least as many as specific ones.
* **mixed**: anything else (e.g. more specific than shared categories, or shared categories while
  the pooled direction leaves refusal).
"""

from __future__ import annotations

from refusal_assets.directions.measure import Rate

SHARED, SPECIFIC, UNDECIDED, TOO_FEW = "shared", "specific", "undecided", "too few prompts"
MONOLITHIC, MODULAR, CORE_TAIL, MIXED, INSUFFICIENT = (
    "monolithic",
    "modular",
    "shared core + specific tail",
    "mixed",
    "insufficient evidence",
)


def call_category(loco: Rate, min_prompts: int, margin: float) -> str:
    if loco.n < min_prompts:
        return TOO_FEW
    if loco.ci_hi <= margin:
        return SHARED
    if loco.ci_lo >= 1 - margin:
        return SPECIFIC
    return UNDECIDED


def pooled_rate(rates: list[Rate]) -> Rate:
    """The rates' prompts together: sum of k over sum of n, with its Wilson interval."""
    k, n = sum(r.k for r in rates), sum(r.n for r in rates)
    return Rate.of([True] * k + [False] * (n - k))


def verdict_execution(
    pooled: Rate, random: Rate, calls: list[str], margin: float, loco_all: Rate | None = None
) -> tuple[str, str]:
    """(verdict, the reason in one sentence) by the rule in this module's docstring;
    ``loco_all``: :func:`pooled_rate` of the called categories' leave-one-out rates."""
    called = [c for c in calls if c != TOO_FEW]
    n_shared, n_specific = called.count(SHARED), called.count(SPECIFIC)
    n_undecided = called.count(UNDECIDED)
    counts = f"{n_shared} shared, {n_specific} specific, {n_undecided} undecided of {len(called)}"
    if not pooled.n or not random.n:
        return INSUFFICIENT, "no refusing held-out toxic prompts"
    if random.ci_hi < 1 - margin:
        return (
            INSUFFICIENT,
            f"the random control removes refusal too ({random.text()} still refusing)",
        )
    if loco_all is not None and loco_all.n and len(called) >= 2:
        pooled_removes = pooled.ci_hi <= margin
        if pooled_removes and loco_all.ci_hi <= margin and n_specific == 0:
            return MONOLITHIC, (
                f"the pooled direction removes refusal ({pooled.text()}) and so does every "
                f"category's leave-one-out direction ({loco_all.text()} still refusing); {counts}"
            )
        if loco_all.ci_lo >= 1 - margin and n_shared == 0:
            return MODULAR, (
                f"the other categories' directions leave refusal ({loco_all.text()} still "
                f"refusing); {counts}"
            )
    if len(called) < 2 or (n_shared + n_specific) < len(called) / 2:
        return INSUFFICIENT, f"too few decided categories ({counts})"
    pooled_removes = pooled.ci_hi <= margin
    if pooled_removes and n_specific == 0:
        return MONOLITHIC, f"the pooled direction removes refusal ({pooled.text()}); {counts}"
    if n_shared == 0:
        return (
            MODULAR,
            f"no category's refusal is removed by the other categories' direction ({counts})",
        )
    if pooled_removes and n_shared >= n_specific:
        return CORE_TAIL, f"the pooled direction removes refusal ({pooled.text()}); {counts}"
    return MIXED, f"pooled still refusing {pooled.text()}; {counts}"
