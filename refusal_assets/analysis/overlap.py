"""Cross-category comparison of refusal circuits: is refusal monolithic or modular?

Inputs, per harm category ``c``: ``effects[c]`` ``[n_prompts_c, n_nodes]``, the attribution-patching
effect of every node (an SAE latent at some site, or a site's error node) on the refusal score, per
prompt, in one node index space shared by all categories; and ``site_of_node`` ``[n_nodes]``.

A circuit is a boolean node mask built from the MEAN effect over a set of prompts
(:func:`refusal_assets.circuits.selection.select_circuit`). Every statistic that needs circuits of resampled
prompt sets (permutation null, split-half ceiling, bootstraps) rebuilds them with that same function,
batched: a resample is a weight vector over prompts, so a batch of resampled mean vectors is one matrix product
``weights [batch, n_prompts] @ effects [n_prompts, n_nodes]``.

All randomness comes from ``np.random.SeedSequence(seed, spawn_key=(stream, i, j))`` with
categories in sorted order, so the same inputs and seed give identical numbers whatever the order of
the ``effects`` dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any, Literal

import numpy as np
from scipy import stats

from refusal_assets.analysis.resampling import (
    CORE_BOOT,
    HALF,
    NORM_BOOT,
    PAIR_BOOT,
    PERM,
    SPLIT,
    Selector,
    bootstrap_ci,
    jaccard,
    lead_shape,
    means_from_indices,
    min_permutation_p,
    seeded_rng,
    spearman,
    weighted_overlap,
)
from refusal_assets.analysis.serialise import jsonable
from refusal_assets.analysis.verdict_rule import (
    PairStats,
    VerdictRule,
    classify_pair,
    decide_verdict,
)
from refusal_assets.circuits.selection import Mode


@dataclass(frozen=True, kw_only=True)
class ComparisonResult:
    categories: list[str]  # sorted; the order of every matrix
    n_prompts: dict[str, int]
    circuit_size: dict[str, int]
    ceiling: dict[
        str, float
    ]  # split-half Jaccard reliability of each category's circuit (halves of its own size)
    pairs: list[PairStats]
    jaccard: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    weighted_overlap: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    spearman: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    normalised_jaccard: (
        np.ndarray
    )  # [n_cat, n_cat], NaN on the diagonal (no test of a category with itself)
    p_value: np.ndarray  # [n_cat, n_cat], NaN on the diagonal
    q_value: np.ndarray  # [n_cat, n_cat], NaN on the diagonal and for untestable pairs
    significant: np.ndarray  # [n_cat, n_cat] bool, False on the diagonal
    shared_core: np.ndarray  # node indices in every category's circuit
    specific_tail: dict[str, np.ndarray]  # node indices only in that category's circuit
    shared_fraction: float  # |core| / mean circuit size
    shared_fraction_ci: tuple[float, float]
    error_share: dict[
        str, float
    ]  # share of the mean |effect| that sits on error nodes (left out of every circuit here)
    verdict: Literal["modular", "monolithic", "mixed", "insufficient evidence"]
    verdict_reason: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: arrays to lists, NaN to None."""
        return jsonable(asdict(self))


@dataclass(frozen=True, kw_only=True)
class SplitHalfCeilings:
    """How reproducible each category's circuit is from independent halves of its own prompts."""

    ceiling: dict[str, float]
    """Mean split-half Jaccard per category."""
    n_splits: int


def split_half_ceilings(
    E: dict[str, np.ndarray], select: Selector, *, n_bootstrap: int, seed: int
) -> SplitHalfCeilings:
    """Mean Jaccard of circuits from random halves of each category's prompts (``E`` in sorted order)."""
    n_splits = max(20, n_bootstrap // 5)
    ceiling: dict[str, float] = {}
    for ci, c in enumerate(E):
        n = E[c].shape[0]
        order = seeded_rng(seed, SPLIT, ci).permuted(
            np.tile(np.arange(n), (n_splits, 1)), axis=1
        )  # [n_splits, n]
        js = [
            jaccard(
                select(means_from_indices(E[c], rows[:, : n // 2])),
                select(means_from_indices(E[c], rows[:, n // 2 : 2 * (n // 2)])),
            )
            for rows in np.array_split(
                order, math.ceil(n_splits / select.batch)
            )  # chunks of <= batch rows
        ]
        ceiling[c] = float(np.concatenate(js).mean())
    return SplitHalfCeilings(ceiling=ceiling, n_splits=n_splits)


@dataclass(frozen=True, kw_only=True)
class HalfSampleOverlap:
    """Numerator and ceiling at the same sample size: circuits of disjoint halves of ``m`` prompts.

    For a pair (a, b) with m = min(n_a, n_b) // 2, each split draws halves a1, a2 of a and b1, b2 of
    b; ``cross`` = mean of J(a_i, b_j), ``within`` = mean of J(a1, a2) and J(b1, b2). When a and b are
    the same population, the four halves are exchangeable, so E[cross] = E[within] exactly and the
    ratio of their means over splits is ~1 (a full-sample numerator over a half-sample ceiling is not).
    A split orders the prompts by a fixed random key per prompt: copies of a prompt in a bootstrap
    resample share a key and so land in the same half (a copy in both halves would inflate ``within``)."""

    keys_a: np.ndarray  # [n_splits, n_a]
    keys_b: np.ndarray  # [n_splits, n_b]
    m: int

    @classmethod
    def draw(cls, n_a: int, n_b: int, n_splits: int, rng: np.random.Generator) -> HalfSampleOverlap:
        return cls(
            keys_a=rng.random((n_splits, n_a)),
            keys_b=rng.random((n_splits, n_b)),
            m=min(n_a, n_b) // 2,
        )

    def sums(
        self, Ea: np.ndarray, Eb: np.ndarray, ia: np.ndarray, ib: np.ndarray, select: Selector
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sums over splits of cross and within Jaccards for resamples ``ia [batch, n_a]``, ``ib [batch, n_b]``."""
        ia, ib = np.atleast_2d(ia), np.atleast_2d(ib)
        m = self.m
        cross = np.zeros(
            max(ia.shape[0], ib.shape[0])
        )  # BCa's jackknife holds one sample fixed as [1, n]
        within = np.zeros_like(cross)
        for ka, kb in zip(self.keys_a, self.keys_b):
            sa = np.take_along_axis(ia, np.argsort(ka[ia], axis=1, kind="stable"), axis=1)
            sb = np.take_along_axis(ib, np.argsort(kb[ib], axis=1, kind="stable"), axis=1)
            a1, a2 = (
                select(means_from_indices(Ea, sa[:, :m])),
                select(means_from_indices(Ea, sa[:, m : 2 * m])),
            )
            b1, b2 = (
                select(means_from_indices(Eb, sb[:, :m])),
                select(means_from_indices(Eb, sb[:, m : 2 * m])),
            )
            cross += (jaccard(a1, b1) + jaccard(a2, b2) + jaccard(a1, b2) + jaccard(a2, b1)) / 4
            within += (jaccard(a1, a2) + jaccard(b1, b2)) / 2
        return cross, within


@dataclass(frozen=True, kw_only=True)
class PairTests:
    """Every pair (a < b) of categories, with Benjamini-Hochberg across the testable pairs."""

    categories: list[str]
    pairs: list[PairStats]

    def matrix(self, attr: str, diag: float) -> np.ndarray:
        """A pair statistic as a symmetric ``[n_cat, n_cat]`` matrix with ``diag`` on the diagonal."""
        n = len(self.categories)
        m = np.full((n, n), diag, dtype=float)
        for (i, j), p in zip(combinations(range(n), 2), self.pairs):
            m[i, j] = m[j, i] = getattr(p, attr)
        return m


def _jaccard_permutation_test(
    Ea: np.ndarray,
    Eb: np.ndarray,
    select: Selector,
    *,
    n_permutations: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """One-sided permutation test that the two circuits overlap less than shuffled labels would:
    ``(p_value, mean Jaccard under the null)``."""
    na = Ea.shape[0]
    pooled = np.vstack([Ea, Eb])  # [na + nb, n_nodes]

    def perm_stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        # Indices into the pooled prompts; a permutation only changes which rows feed each mean.
        jac = jaccard(
            select(means_from_indices(pooled, ia)), select(means_from_indices(pooled, ib))
        )
        return jac.reshape(
            np.shape(ia)[:-1]
        )  # scalar for the observed labels, [batch] for resamples

    perm = stats.permutation_test(
        (np.arange(na), np.arange(na, pooled.shape[0])),
        perm_stat,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_permutations,
        alternative="less",
        batch=select.batch,
        rng=rng,
    )
    return float(perm.pvalue), float(perm.null_distribution.mean())


def _pair_stats(
    E: dict[str, np.ndarray],
    a: str,
    b: str,
    key: tuple[int, int],
    circuit: dict[str, np.ndarray],
    mean: dict[str, np.ndarray],
    select: Selector,
    *,
    n_permutations: int,
    n_bootstrap: int,
    n_splits: int,
    seed: int,
    alpha: float,
    min_ceiling: float,
) -> dict[str, Any]:
    """One pair's statistics before the multiple-testing correction."""
    na, nb = E[a].shape[0], E[b].shape[0]
    p_value, null_mean = _jaccard_permutation_test(
        E[a], E[b], select, n_permutations=n_permutations, rng=seeded_rng(seed, PERM, *key)
    )

    def boot_stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        jac = jaccard(
            select(means_from_indices(E[a], ia.reshape(-1, ia.shape[-1]))),
            select(means_from_indices(E[b], ib.reshape(-1, ib.shape[-1]))),
        )
        return jac.reshape(lead_shape(ia, ib))

    jac = float(jaccard(circuit[a], circuit[b]))
    jac_ci = bootstrap_ci(
        (np.arange(na), np.arange(nb)),
        boot_stat,
        jac,
        n_resamples=n_bootstrap,
        batch=select.batch,
        rng=seeded_rng(seed, PAIR_BOOT, *key),
    )

    halves = HalfSampleOverlap.draw(na, nb, n_splits, seeded_rng(seed, HALF, *key))
    half_batch = max(1, select.batch // (4 * n_splits))

    def norm_stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        cross, within = halves.sums(
            E[a], E[b], ia.reshape(-1, ia.shape[-1]), ib.reshape(-1, ib.shape[-1]), select
        )
        # A resample whose halves do not replicate at all has no ceiling to normalise by.
        out = np.where(within > 0, cross / np.maximum(within, 1e-300), np.nan)
        return out.reshape(lead_shape(ia, ib))

    cross, within = halves.sums(E[a], E[b], np.arange(na), np.arange(nb), select)
    cross_half, ceiling = float(cross[0] / n_splits), float(within[0] / n_splits)
    reliable = ceiling >= max(min_ceiling, 1e-12)
    norm = cross_half / ceiling if reliable else math.nan
    norm_ci = (
        bootstrap_ci(
            (np.arange(na), np.arange(nb)),
            norm_stat,
            norm,
            n_resamples=n_bootstrap,
            batch=half_batch,
            rng=seeded_rng(seed, NORM_BOOT, *key),
        )
        if reliable
        else (math.nan, math.nan)
    )
    min_p = min_permutation_p(na, nb, n_permutations)
    return dict(
        a=a,
        b=b,
        jaccard=jac,
        weighted_overlap=weighted_overlap(mean[a], mean[b]),
        spearman=spearman(mean[a], mean[b]),
        p_value=p_value,
        min_p=min_p,
        testable=min_p < alpha,
        half_size=halves.m,
        cross_half_jaccard=cross_half,
        ceiling=ceiling,
        normalised_jaccard=norm,
        normalised_jaccard_ci=norm_ci,
        jaccard_ci=jac_ci,
        null_mean=null_mean,
    )


def pair_statistics(
    E: dict[str, np.ndarray],
    circuit: dict[str, np.ndarray],
    select: Selector,
    *,
    n_permutations: int,
    n_bootstrap: int,
    n_splits: int,
    alpha: float,
    seed: int,
    min_ceiling: float,
    rule: VerdictRule = VerdictRule(),
) -> PairTests:
    """Per pair: Jaccard, weighted overlap, Spearman, the permutation p-value (and whether it can reach
    alpha at all), the half-sample normalised Jaccard with its bootstrap CI; BH q-values over the testable
    pairs only (an untestable pair is no test, not a negative one); each pair's call."""
    cats = list(E)
    mean = {c: E[c].mean(axis=0) for c in cats}  # [n_nodes]
    raw = [
        _pair_stats(
            E,
            cats[i],
            cats[j],
            (i, j),
            circuit,
            mean,
            select,
            n_permutations=n_permutations,
            n_bootstrap=n_bootstrap,
            n_splits=n_splits,
            seed=seed,
            alpha=alpha,
            min_ceiling=min_ceiling,
        )
        for i, j in combinations(range(len(cats)), 2)
    ]
    testable = [k for k, p in enumerate(raw) if p["testable"]]
    q = np.full(len(raw), math.nan)
    if testable:
        q[testable] = stats.false_discovery_control(
            [raw[k]["p_value"] for k in testable], method="bh"
        )
    pairs = []
    for p, qv in zip(raw, q):
        sig = bool(p["testable"] and qv < alpha)
        pairs.append(
            PairStats(
                **p,
                q_value=float(qv),
                significant=sig,
                call=classify_pair(sig, p["normalised_jaccard_ci"], rule),
            )
        )
    return PairTests(categories=cats, pairs=pairs)


@dataclass(frozen=True, kw_only=True)
class SharedCore:
    """Nodes in every category's circuit, nodes in only one, and the core's share of a circuit."""

    core: np.ndarray
    """Node indices in every category's circuit."""
    specific_tail: dict[str, np.ndarray]
    """Node indices only in that category's circuit."""
    fraction: float
    """|core| / mean circuit size."""
    fraction_ci: tuple[float, float]
    """Bootstrap CI (see :func:`bootstrap_ci`), each category's prompts resampled independently."""


def _core_fraction(masks: np.ndarray) -> np.ndarray:
    """masks ``[n_cat, batch, n_nodes]`` -> |core| / mean circuit size ``[batch]`` (NaN if all empty)."""
    core = np.count_nonzero(masks.all(axis=0), axis=-1)
    size = np.count_nonzero(masks, axis=-1).mean(axis=0)
    return np.where(size > 0, core / np.maximum(size, 1e-300), np.nan)


def shared_core(
    E: dict[str, np.ndarray],
    circuit: dict[str, np.ndarray],
    select: Selector,
    *,
    n_bootstrap: int,
    seed: int,
) -> SharedCore:
    """Shared core and specific tails of the full-sample circuits, with the shared fraction's CI."""
    cats = list(E)
    masks = np.stack([circuit[c] for c in cats])  # [n_cat, n_nodes]
    site_of_node = select.site_of_node
    in_count = masks.sum(axis=0)  # [n_nodes]

    def core_stat(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        lead = lead_shape(*idx)
        masks = [
            np.broadcast_to(
                select(means_from_indices(E[c], ic.reshape(-1, ic.shape[-1]))),
                (math.prod(lead), len(site_of_node)),
            )
            for c, ic in zip(cats, idx)
        ]
        return _core_fraction(np.stack(masks)).reshape(lead)

    fraction = float(_core_fraction(masks[:, None])[0])
    ci = bootstrap_ci(
        tuple(np.arange(E[c].shape[0]) for c in cats),
        core_stat,
        fraction,
        n_resamples=n_bootstrap,
        batch=max(1, select.batch // len(cats)),
        rng=seeded_rng(seed, CORE_BOOT),
    )
    return SharedCore(
        core=np.flatnonzero(in_count == len(cats)),
        specific_tail={c: np.flatnonzero(masks[ci] & (in_count == 1)) for ci, c in enumerate(cats)},
        fraction=fraction,
        fraction_ci=ci,
    )


def _checked_effects(effects: dict[str, np.ndarray], n_nodes: int) -> dict[str, np.ndarray]:
    """Effects as float arrays ``[n_prompts_c, n_nodes]``, categories sorted; bad input is a clear error."""
    cats = sorted(effects)
    if len(cats) < 2:
        raise ValueError(f"need at least 2 categories to compare, got {cats}")
    E = {c: np.asarray(effects[c], dtype=float) for c in cats}
    for c, e in E.items():
        if e.ndim != 2 or e.shape[1] != n_nodes:
            raise ValueError(f"effects[{c!r}] has shape {e.shape}; expected [n_prompts, {n_nodes}]")
        if e.shape[0] < 2:
            raise ValueError(
                f"effects[{c!r}] has {e.shape[0]} prompts; the split-half ceiling needs at least 2"
            )
        if not np.isfinite(e).all():
            raise ValueError(f"effects[{c!r}] holds non-finite values")
    return E


def fallback_categories(summaries: dict[str, dict], group: str, prompt_filter: str) -> list[str]:
    """Categories whose ``group`` circuit could not use the configured prompt filter (too few
    refusing prompts: it mixes refused and complied prompts), from their ``circuit.json`` summaries.
    They are reported and left out of the verdict."""
    return sorted(
        c
        for c, summary in summaries.items()
        if group in summary["groups"]
        and summary["groups"][group].get("prompt_set", prompt_filter) != prompt_filter
    )


def error_node_mask(site_of_node: np.ndarray) -> np.ndarray:
    """[n_nodes] bool: the error node of every site (the last node of each site's block, see
    :class:`refusal_assets.circuits.selection.NodeIndex`)."""
    site_of_node = np.asarray(site_of_node)
    mask = np.zeros(site_of_node.shape[0], bool)
    mask[np.flatnonzero(np.diff(np.append(site_of_node, np.iinfo(np.int64).min)) != 0)] = True
    return mask


def error_share(E: dict[str, np.ndarray], error_nodes: np.ndarray) -> dict[str, float]:
    """Per category, the share of sum |mean effect| that sits on error nodes (what the SAEs miss)."""
    out = {}
    for c, e in E.items():
        total = np.abs(e.mean(0)).sum()
        out[c] = float(np.abs(e.mean(0)[error_nodes]).sum() / total) if total > 0 else math.nan
    return out


def _without_error_nodes(
    E: dict[str, np.ndarray], site_of_node: np.ndarray, error_nodes: np.ndarray | None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, float]]:
    """(effects without the error nodes, the kept nodes' indices, their sites, each category's error share)."""
    if error_nodes is None:
        return E, np.arange(site_of_node.shape[0]), site_of_node, {}
    error_nodes = np.asarray(error_nodes, dtype=bool)
    if error_nodes.shape != site_of_node.shape:
        raise ValueError(
            f"error_nodes {error_nodes.shape} must match site_of_node {site_of_node.shape}"
        )
    keep = ~error_nodes
    return (
        {c: e[:, keep] for c, e in E.items()},
        np.flatnonzero(keep),
        site_of_node[keep],
        error_share(E, error_nodes),
    )


def compare_categories(
    effects: dict[str, np.ndarray],
    site_of_node: np.ndarray,
    *,
    mode: Mode = "topk",
    k_per_site: int = 20,
    threshold: float = 0.0,
    n_permutations: int = 500,
    n_bootstrap: int = 500,
    n_splits: int = 4,
    alpha: float = 0.05,
    seed: int = 0,
    error_nodes: np.ndarray | None = None,
    rule: VerdictRule = VerdictRule(),
    min_ceiling: float = 0.2,
) -> ComparisonResult:
    """Compare every pair of categories' refusal circuits and give the overlap test's verdict.

    Steps: :func:`split_half_ceilings` (per category, for scale); :func:`pair_statistics` per pair
    (a < b): Jaccard of the full-sample circuits with a bootstrap CI (:func:`bootstrap_ci`); weighted
    overlap and Spearman of the mean effects; a one-sided label-permutation p-value for modularity
    (``scipy.stats.permutation_test``, ``alternative="less"``: p = (1 + #{null <= observed}) /
    (1 + n_permutations)) and whether it can reach ``alpha`` at all; the normalised Jaccard from half-sample
    circuits, numerator and ceiling at the same size (:class:`HalfSampleOverlap`), with a BCa CI; BH
    q-values over the testable pairs; :func:`shared_core` across categories; and :func:`decide_verdict`
    (an equivalence rule for "monolithic").

    ``error_nodes`` [n_nodes] bool: nodes left out of every circuit (the SAE error terms are not
    interpretable features; two categories sharing "what the SAE missed" says nothing about shared
    features); their share of |effect| is reported instead. Where a pair's ceiling is below
    ``min_ceiling`` the normalised Jaccard is NaN: circuits that do not reproduce within their own
    category are noise picks, and chance over chance is ~1.
    """
    site_of_node = np.asarray(site_of_node)
    if k_per_site < 0:
        raise ValueError(f"k_per_site must be >= 0, not {k_per_site}")
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, not {n_splits}")
    E = _checked_effects(
        effects, site_of_node.shape[0]
    )  # [n_prompts_c, n_nodes], sorted categories
    E, node_ids, site_of_node, err_share = _without_error_nodes(E, site_of_node, error_nodes)
    cats = list(E)
    select = Selector(
        site_of_node=site_of_node, mode=mode, k_per_site=k_per_site, threshold=threshold
    )
    circuit = {c: select(E[c].mean(axis=0)[None])[0] for c in cats}  # [n_nodes] bool

    ceilings = split_half_ceilings(E, select, n_bootstrap=n_bootstrap, seed=seed)
    tests = pair_statistics(
        E,
        circuit,
        select,
        n_permutations=n_permutations,
        n_bootstrap=n_bootstrap,
        n_splits=n_splits,
        alpha=alpha,
        seed=seed,
        min_ceiling=min_ceiling,
        rule=rule,
    )
    core = shared_core(E, circuit, select, n_bootstrap=n_bootstrap, seed=seed)
    n_prompts = {c: int(E[c].shape[0]) for c in cats}
    verdict = decide_verdict(tests.pairs, n_prompts, rule, alpha=alpha)
    return ComparisonResult(
        categories=cats,
        n_prompts=n_prompts,
        circuit_size={c: int(circuit[c].sum()) for c in cats},
        ceiling=ceilings.ceiling,
        pairs=tests.pairs,
        jaccard=tests.matrix("jaccard", 1.0),
        weighted_overlap=tests.matrix("weighted_overlap", 1.0),
        spearman=tests.matrix("spearman", 1.0),
        normalised_jaccard=tests.matrix("normalised_jaccard", math.nan),
        p_value=tests.matrix("p_value", math.nan),
        q_value=tests.matrix("q_value", math.nan),
        significant=tests.matrix("significant", 0.0).astype(bool),
        shared_core=node_ids[core.core],  # back to the caller's node indices
        specific_tail={c: node_ids[t] for c, t in core.specific_tail.items()},
        shared_fraction=core.fraction,
        shared_fraction_ci=core.fraction_ci,
        error_share=err_share,
        verdict=verdict.verdict,
        verdict_reason=verdict.reason,
        params=dict(
            mode=mode,
            k_per_site=k_per_site,
            threshold=threshold,
            n_permutations=n_permutations,
            n_bootstrap=n_bootstrap,
            n_splits=n_splits,
            n_ceiling_splits=ceilings.n_splits,
            alpha=alpha,
            seed=seed,
            min_ceiling=min_ceiling,
            **asdict(rule),
        ),
    )


# ------------------------------------------------------------------------ directions and figures


def refusal_direction_cosines(directions: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Sorted labels and the cosine-similarity matrix ``[n_cat, n_cat]`` of per-category refusal
    directions ``[d_model]`` (difference of means, harmful minus harmless)."""
    labels = sorted(directions)
    D = np.stack([np.asarray(directions[c], dtype=float) for c in labels])  # [n_cat, d_model]
    if D.ndim != 2:
        raise ValueError(f"every direction must be 1-D [d_model]; stacked shape is {D.shape}")
    norms = np.linalg.norm(D, axis=1)  # [n_cat]
    if (norms == 0).any():
        zero = [c for c, n in zip(labels, norms) if n == 0]
        raise ValueError(f"zero refusal direction for {zero}: cosine is undefined")
    U = D / norms[:, None]
    return labels, np.clip(U @ U.T, -1.0, 1.0)
