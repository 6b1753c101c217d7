"""Functional cross-category tests: does category A's circuit move category B's refusal?

Each test is a category x category matrix (rows A = whose circuit, columns B = whose prompts) of
mean score changes over B's prompts with bootstrap CIs, a size-matched random control per B, and
the ratio to B's own circuit (NaN, "not printed", where the own change's CI includes 0: a ratio over
a denominator that may be zero is not a number; DESIGN.md §2):

* **circuit transfer** (Marks et al. circuits): mean-ablate A's circuit (every node of it) on B's
  refusing prompts, with B's mean-ablation baseline; the loss of B's refusal against the loss from
  B's own circuit (leave-one-out: each prompt ablated by the circuit selected on the other prompts).
* **circuit faithfulness on B**: only A's circuit kept on B's refusing prompts. One batched pass per
  mask set, on the cached prefixes (:func:`refusal_assets.circuits.ablation.ablated_scores`).

The refusal directions (Arditi et al. 2024) are the execution level's asset ``refusal_direction``
(:mod:`refusal_assets.directions`), not tests here.

Every test's pair calls and verdict follow :class:`refusal_assets.analysis.verdict_rule.VerdictRule`
(shared: ratio CI low >= 1 - margin; specific: ratio CI high < modular_max_normalised).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from refusal_assets.analysis.resampling import CI, bootstrap_ci
from refusal_assets.analysis.serialise import jsonable
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.circuits.evaluation import random_like

# ------------------------------------------------------------------------------ statistics


def _mean_ci(x: np.ndarray, n_bootstrap: int, seed: int) -> CI:
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return (math.nan, math.nan)
    return bootstrap_ci(
        (x,),
        lambda a, axis=-1: a.mean(axis),
        float(x.mean()),
        n_resamples=n_bootstrap,
        batch=n_bootstrap,
        rng=np.random.default_rng(seed),
    )


def _ratio_ci(num: np.ndarray, den: np.ndarray, n_bootstrap: int, seed: int) -> CI:
    """Paired bootstrap CI of mean(num) / mean(den) over the same prompts."""
    if len(num) < 2:
        return (math.nan, math.nan)

    def stat(a, b, axis=-1):
        d = b.mean(axis)
        return np.where(d != 0, a.mean(axis) / np.where(d != 0, d, 1), np.nan)

    return bootstrap_ci(
        (num, den),
        stat,
        float(num.mean() / den.mean()),
        n_resamples=n_bootstrap,
        batch=n_bootstrap,
        rng=np.random.default_rng(seed),
        paired=True,
    )


@dataclass(frozen=True, kw_only=True)
class CrossMatrix:
    """One functional test: ``change[a, b]`` = mean change of B's refusal score by A's mechanism."""

    test: str
    categories: list[str]
    change: np.ndarray  # [n_cat, n_cat]
    change_lo: np.ndarray
    change_hi: np.ndarray
    ratio: np.ndarray  # change[a, b] / change[b, b]; NaN where change[b, b]'s CI includes 0
    ratio_lo: np.ndarray
    ratio_hi: np.ndarray
    control: np.ndarray  # [n_cat]: the size-matched random control's change on B
    control_ci: list[CI]
    n_prompts: list[int]
    calls: dict[str, str]  # "a|b" -> shared / specific / partial / undecided (a != b)
    verdict: str
    reason: str

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def _from_json(values: list) -> np.ndarray:
    """An array written by :func:`jsonable` (NaN as null), nested lists of any depth."""
    if values and isinstance(values[0], list):
        return np.array([_from_json(v) for v in values], dtype=float)
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def read_cross_matrix(data: dict) -> CrossMatrix:
    """A :class:`CrossMatrix` from its ``to_dict()`` (a test of ``transfer.json``)."""
    return CrossMatrix(
        test=data["test"],
        categories=list(data["categories"]),
        **{
            k: _from_json(data[k])
            for k in ("change", "change_lo", "change_hi", "ratio", "ratio_lo", "ratio_hi")
        },
        control=_from_json(data["control"]),
        control_ci=[(lo, hi) for lo, hi in _from_json(data["control_ci"]).reshape(-1, 2).tolist()],
        n_prompts=list(data["n_prompts"]),
        calls=dict(data["calls"]),
        verdict=data["verdict"],
        reason=data["reason"],
    )


def cross_matrix(
    test: str,
    categories: list[str],
    changes: dict[tuple[str, str], np.ndarray],
    control: dict[str, np.ndarray],
    rule: VerdictRule,
    *,
    n_bootstrap: int,
    seed: int,
) -> CrossMatrix:
    """``changes[(a, b)]`` per-prompt score changes [n_b] of B's prompts by A's mechanism -> the matrix,
    ratios, pair calls and the test's verdict. Positive changes = the mechanism carries refusal."""
    n = len(categories)
    m = {k: np.full((n, n), math.nan) for k in ("change", "lo", "hi", "ratio", "rlo", "rhi")}
    calls: dict[str, str] = {}
    for j, b in enumerate(categories):
        own = changes.get((b, b))
        own_ci = _mean_ci(own, n_bootstrap, seed + j) if own is not None else (math.nan, math.nan)
        own_defined = (
            own is not None and math.isfinite(own_ci[0]) and (own_ci[0] > 0 or own_ci[1] < 0)
        )
        for i, a in enumerate(categories):
            x = changes.get((a, b))
            if x is None:
                continue
            m["change"][i, j] = float(x.mean())
            m["lo"][i, j], m["hi"][i, j] = _mean_ci(x, n_bootstrap, seed + 1000 * i + j)
            if own_defined:
                m["ratio"][i, j] = float(x.mean() / own.mean())
                m["rlo"][i, j], m["rhi"][i, j] = _ratio_ci(x, own, n_bootstrap, seed + 1000 * i + j)
            if a != b:
                lo, hi = m["rlo"][i, j], m["rhi"][i, j]
                if math.isfinite(lo) and lo >= 1 - rule.equivalence_margin:
                    calls[f"{a}|{b}"] = "shared"
                elif math.isfinite(hi) and hi < rule.modular_max_normalised_jaccard:
                    calls[f"{a}|{b}"] = "specific"
                elif math.isfinite(hi) and hi < 1 - rule.equivalence_margin:
                    calls[f"{a}|{b}"] = "partial"
                else:
                    calls[f"{a}|{b}"] = "undecided"
    verdict, reason = verdict_from_calls(test, list(calls.values()), rule)
    ctrl = [float(control[b].mean()) if b in control else math.nan for b in categories]
    ctrl_ci = [
        _mean_ci(control[b], n_bootstrap, seed + 7 * j) if b in control else (math.nan, math.nan)
        for j, b in enumerate(categories)
    ]
    n_prompts = [len(changes[(b, b)]) if (b, b) in changes else 0 for b in categories]
    return CrossMatrix(
        test=test,
        categories=categories,
        change=m["change"],
        change_lo=m["lo"],
        change_hi=m["hi"],
        ratio=m["ratio"],
        ratio_lo=m["rlo"],
        ratio_hi=m["rhi"],
        control=np.array(ctrl),
        control_ci=ctrl_ci,
        n_prompts=n_prompts,
        calls=calls,
        verdict=verdict,
        reason=reason,
    )


def verdict_from_calls(test: str, calls: list[str], rule: VerdictRule) -> tuple[str, str]:
    """The same counting rule as :func:`refusal_assets.analysis.verdict_rule.decide_verdict`, on ordered pairs."""
    count = {c: calls.count(c) for c in ("shared", "specific", "partial", "undecided")}
    decided = len(calls) - count["undecided"]
    numbers = (
        f"{test}: of {len(calls)} ordered pairs, {count['shared']} shared (ratio CI low >= "
        f"{1 - rule.equivalence_margin:g}), {count['specific']} specific (ratio CI high < "
        f"{rule.modular_max_normalised_jaccard:g}), {count['partial']} partial, {count['undecided']} undecided (CI "
        "spans both answers, or the own change's CI includes 0)."
    )
    if decided == 0 or decided < rule.min_decided_fraction * len(calls):
        return "insufficient evidence", f"Insufficient evidence: {numbers}"
    if (
        count["shared"] >= rule.majority * decided
        and count["specific"] == 0
        and count["partial"] == 0
    ):
        return "monolithic", f"Monolithic: {numbers}"
    if count["specific"] >= rule.majority * decided and count["shared"] == 0:
        return "modular", f"Modular: {numbers}"
    return "mixed", f"Mixed: {numbers}"


# ---------------------------------------------------------------------------- circuit transfer


def circuit_transfer(
    score_fns: dict[str, Callable[[np.ndarray], np.ndarray]],
    circuits: dict[str, np.ndarray],
    own_masks: dict[str, np.ndarray],
    site_of_node: np.ndarray,
    rule: VerdictRule,
    *,
    n_bootstrap: int,
    seed: int,
) -> tuple[CrossMatrix, CrossMatrix]:
    """``score_fns[b](keeps [n_masks, n_b, n_nodes]) -> scores [n_masks, n_b]`` on B's refusing
    prompts (B's baseline), called once per B with every mask stacked;
    ``circuits[a]`` A's circuit [n_nodes]; ``own_masks[b]`` B's leave-one-out circuits [n_b, n_nodes].
    Returns (loss matrix: m(M) - m(M without A's circuit); faithfulness-gain matrix: m(A's circuit
    only) - m(∅)), each with a random circuit of B's size per site as the control."""
    cats = sorted(score_fns)
    rng = np.random.default_rng(seed)
    site_members = [np.flatnonzero(site_of_node == s) for s in np.unique(site_of_node)]
    loss: dict[tuple[str, str], np.ndarray] = {}
    keep_only: dict[tuple[str, str], np.ndarray] = {}
    loss_ctrl, keep_ctrl = {}, {}
    for b in cats:
        n_b, n_nodes = own_masks[b].shape
        rand = random_like(own_masks[b], site_members, rng)  # the control: B's own circuit sizes
        masks = {
            a: own_masks[b] if a == b else np.broadcast_to(circuits[a], (n_b, n_nodes))
            for a in cats
        }
        # one stacked call per B: full, empty, then (without A's circuit, only A's circuit) per A, then the control
        stack = [np.ones((n_b, n_nodes), bool), np.zeros((n_b, n_nodes), bool)]
        stack += [m for a in cats for m in (~masks[a], masks[a])] + [~rand, rand]
        scores = np.asarray(score_fns[b](np.stack(stack)))  # [2 + 2 * n_cats + 2, n_b]
        full, empty = scores[0], scores[1]
        for i, a in enumerate(cats):
            loss[(a, b)] = full - scores[2 + 2 * i]
            keep_only[(a, b)] = scores[3 + 2 * i] - empty
        loss_ctrl[b] = full - scores[-2]
        keep_ctrl[b] = scores[-1] - empty
    return (
        cross_matrix(
            "circuit transfer", cats, loss, loss_ctrl, rule, n_bootstrap=n_bootstrap, seed=seed
        ),
        cross_matrix(
            "circuit faithfulness on B",
            cats,
            keep_only,
            keep_ctrl,
            rule,
            n_bootstrap=n_bootstrap,
            seed=seed + 1,
        ),
    )


def loo_masks(effects: np.ndarray, select: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Leave-one-out circuits [n, n_nodes]: prompt i's circuit is selected on the other prompts."""
    n = effects.shape[0]
    total = effects.sum(0)
    return np.stack([select((total - effects[i]) / (n - 1)) for i in range(n)])
