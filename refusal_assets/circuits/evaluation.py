"""Evaluating circuits: faithfulness and completeness (unclipped; every node outside the set, or
inside it for completeness, replaced by its mean), cross-fitted over prompt folds and swept over
circuit sizes, against a random circuit of the same size, with bootstrap CIs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def faithfulness(m_c: float, m_empty: float, m_full: float) -> float:
    """(m(C) - m(∅)) / (m(M) - m(∅)), unclipped."""
    return float((m_c - m_empty) / (m_full - m_empty)) if m_full != m_empty else float("nan")


def crossfit_folds(n_prompts: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each prompt [n_prompts]: ``n_folds`` = 0 (or >= n_prompts) is leave-one-out; else a
    seeded, balanced assignment to ``n_folds`` folds."""
    if n_folds < 0 or n_folds == 1:
        raise ValueError(f"n_folds must be 0 (leave-one-out) or at least 2, not {n_folds}")
    if n_folds == 0 or n_folds >= n_prompts:
        return np.arange(n_prompts)
    order = np.random.default_rng(seed).permutation(n_prompts)
    folds = np.empty(n_prompts, dtype=np.int64)
    folds[order] = np.arange(n_prompts) % n_folds
    return folds


def _ratio_ci(
    num: np.ndarray, den: np.ndarray, n_bootstrap: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI over prompts of mean(num) / mean(den) (paired resampling)."""
    if len(num) < 2 or n_bootstrap < 1:
        return float("nan"), float("nan")
    res = stats.bootstrap(
        (num, den),
        lambda a, b, axis=-1: a.mean(axis) / b.mean(axis),
        paired=True,
        vectorized=True,
        n_resamples=n_bootstrap,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


CI = tuple[float, float]


@dataclass(frozen=True)
class SweepPoint:
    """Cross-fitted scores of the circuits of one size (``size_per_site`` nodes at every site)."""

    size_per_site: int
    n_nodes: int
    """Nodes of the circuit selected on all prompts (the one the asset reports)."""
    n_nodes_mean_fold: float
    """Mean nodes of the out-of-fold circuits that actually scored the prompts."""
    faithfulness: float
    faithfulness_ci: CI
    completeness: float
    completeness_ci: CI
    random_faithfulness: float
    """The control: a random circuit with the same number of nodes per site."""
    random_faithfulness_ci: CI
    advantage_ci: CI
    """CI of faithfulness minus the control's, paired by prompt."""


@dataclass(frozen=True)
class SizeSweep:
    """Faithfulness and completeness over circuit sizes, with the ratios' shared denominator."""

    m_full: float
    """Mean score with no node ablated, m(M)."""
    m_empty: float
    """Mean score with every node ablated, m(∅)."""
    denominator_ci: CI
    n_prompts: int
    n_folds: int
    sweep: list[SweepPoint]

    def at(self, size_per_site: int) -> SweepPoint:
        return next(p for p in self.sweep if p.size_per_site == size_per_site)

    def to_json(self) -> dict:
        return asdict(self)


def evaluate_sizes(
    score_fn: Callable[[np.ndarray], np.ndarray],
    effects: np.ndarray,
    site_of_node: np.ndarray,
    sizes: list[int],
    select: Callable[[np.ndarray, int], np.ndarray],
    folds: np.ndarray,
    *,
    seed: int,
    n_bootstrap: int = 1000,
    log: Callable[[str], None] | None = None,
) -> SizeSweep:
    """Cross-fitted faithfulness and completeness over circuit sizes.

    ``effects`` [n_prompts, n_nodes] are the per-prompt node effects and ``folds`` [n_prompts] a fold
    per prompt: each prompt is scored with the circuit selected from the mean effect over the OTHER
    folds only, so no prompt evaluates a circuit that was chosen on it. ``score_fn(keep)`` maps
    per-prompt masks [n_prompts, n_nodes] to per-prompt scores [n_prompts]. The control is a random
    circuit per prompt with its circuit's number of nodes at every site (a fresh draw per prompt, so
    the mean averages over draws). ``score_fn`` is called once, with every mask of the sweep stacked
    [n_masks, n_prompts, n_nodes] -> [n_masks, n_prompts]. Ratios are of means over prompts, with
    percentile bootstrap CIs;
    ``advantage_ci`` is the CI of faithfulness minus the control's (paired by prompt).
    """
    n_prompts, n_nodes = effects.shape
    folds = np.asarray(folds)
    if folds.shape != (n_prompts,):
        raise ValueError(f"folds {folds.shape} must have one entry per prompt ({n_prompts})")
    if len(np.unique(folds)) < 2:
        raise ValueError("cross-fitting needs at least two folds (two prompts)")
    fold_means = {
        f: effects[folds != f].mean(0) for f in np.unique(folds)
    }  # out-of-fold mean effect per fold
    rng = np.random.default_rng(seed)
    site_members = [np.flatnonzero(site_of_node == s) for s in np.unique(site_of_node)]
    # Every mask of the sweep first, then one call: the model scores the whole stack in few passes.
    circuits = [_crossfit_circuit(n, select, folds, fold_means) for n in sizes]
    stack = [np.ones((n_prompts, n_nodes), bool), np.zeros((n_prompts, n_nodes), bool)]
    for circuit in circuits:
        stack += [circuit, ~circuit, random_like(circuit, site_members, rng)]
    if log:
        log(f"faithfulness sweep: {len(sizes)} sizes x 3 masks + 2 on {n_prompts} prompts")
    scores = np.asarray(score_fn(np.stack(stack)))  # [n_masks, n_prompts]
    m_full, m_empty = scores[0], scores[1]
    den = m_full - m_empty
    rows = [
        _sweep_point(
            n,
            circuit,
            *scores[2 + 3 * i : 5 + 3 * i],
            effects,
            select,
            m_full,
            m_empty,
            den,
            n_bootstrap,
            seed,
        )
        for i, (n, circuit) in enumerate(zip(sizes, circuits))
    ]
    return SizeSweep(
        m_full=float(m_full.mean()),
        m_empty=float(m_empty.mean()),
        denominator_ci=_ratio_ci(den, np.ones_like(den), n_bootstrap, seed),
        n_prompts=n_prompts,
        n_folds=int(len(np.unique(folds))),
        sweep=rows,
    )


def _crossfit_circuit(
    n: int, select: Callable[[np.ndarray, int], np.ndarray], folds: np.ndarray, fold_means: dict
):
    """[n_prompts, n_nodes]: each prompt's circuit of size ``n``, selected on the other folds."""
    circuits = {f: select(mean, n) for f, mean in fold_means.items()}
    return np.stack([circuits[f] for f in folds])


def random_like(
    circuit: np.ndarray, site_members: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """The control: per prompt, a random circuit with ``circuit``'s number of nodes at every site."""
    random = np.zeros_like(circuit)
    for i in range(len(circuit)):
        for members in site_members:
            random[i, rng.choice(members, size=int(circuit[i, members].sum()), replace=False)] = (
                True
            )
    return random


def _sweep_point(
    n: int,
    circuit: np.ndarray,
    m_c: np.ndarray,
    m_comp: np.ndarray,
    m_rand: np.ndarray,
    effects: np.ndarray,
    select: Callable[[np.ndarray, int], np.ndarray],
    m_full: np.ndarray,
    m_empty: np.ndarray,
    den: np.ndarray,
    n_bootstrap: int,
    seed: int,
) -> SweepPoint:
    """One size of :func:`evaluate_sizes` from the scores of its cross-fitted circuit, the
    complement and the random control."""
    full_circuit = select(effects.mean(0), n)  # the circuit that the asset reports at this size
    return SweepPoint(
        size_per_site=n,
        n_nodes=int(full_circuit.sum()),
        n_nodes_mean_fold=float(circuit.sum(1).mean()),
        faithfulness=faithfulness(m_c.mean(), m_empty.mean(), m_full.mean()),
        faithfulness_ci=_ratio_ci(m_c - m_empty, den, n_bootstrap, seed),
        completeness=faithfulness(m_comp.mean(), m_empty.mean(), m_full.mean()),
        completeness_ci=_ratio_ci(m_comp - m_empty, den, n_bootstrap, seed),
        random_faithfulness=faithfulness(m_rand.mean(), m_empty.mean(), m_full.mean()),
        random_faithfulness_ci=_ratio_ci(m_rand - m_empty, den, n_bootstrap, seed),
        advantage_ci=_ratio_ci(m_c - m_rand, den, n_bootstrap, seed),
    )
