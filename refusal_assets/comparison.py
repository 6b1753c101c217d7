"""Cross-category comparison of refusal circuits: is refusal monolithic or modular?

Inputs, per harm category ``c``: ``effects[c]`` ``[n_prompts_c, n_nodes]``, the attribution-patching
effect of every node (an SAE latent at some site, or a site's error node) on the refusal score, per
prompt, in one node index space shared by all categories; and ``site_of_node`` ``[n_nodes]``.

A circuit is a boolean node mask built from the MEAN effect over a set of prompts
(:func:`refusal_assets.circuits.select_circuit`). Every statistic that needs circuits of resampled prompt sets (permutation
null, split-half ceiling, bootstraps) rebuilds them with that same function, batched: a resample is
a weight vector over prompts, so a batch of resampled mean vectors is one matrix product
``weights [batch, n_prompts] @ effects [n_prompts, n_nodes]``.

All randomness comes from ``np.random.SeedSequence(seed, spawn_key=(stream, i, j))`` with
categories in sorted order, so the same inputs and seed give identical numbers whatever the order of
the ``effects`` dict.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy import stats

from refusal_assets.circuits import Mode, select_circuits
from refusal_assets.plots import new_figure, save_png

# Rows of resampled mean vectors handled at once: bounds memory to ~_BATCH_ELEMS floats per array.
_BATCH_ELEMS = 1 << 22

# Seed streams, one per kind of resampling, so adding a statistic never shifts another's draws.
_PERM, _PAIR_BOOT, _SPLIT, _CORE_BOOT = 0, 1, 2, 3


# ----------------------------------------------------------------------------- set statistics


def _jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard of masks ``[..., n_nodes]`` -> ``[...]``; two empty circuits are equal sets, so 1."""
    inter = np.count_nonzero(a & b, axis=-1)
    union = np.count_nonzero(a | b, axis=-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def weighted_overlap(mean_a: np.ndarray, mean_b: np.ndarray) -> float:
    """Weighted Jaccard of effect magnitudes: sum min(|a|,|b|) / sum max(|a|,|b|); NaN if both are 0."""
    abs_a, abs_b = np.abs(mean_a), np.abs(mean_b)
    denom = np.maximum(abs_a, abs_b).sum()
    return float(np.minimum(abs_a, abs_b).sum() / denom) if denom > 0 else math.nan


def _spearman(mean_a: np.ndarray, mean_b: np.ndarray) -> float:
    with warnings.catch_warnings():
        # A constant vector has no ranks to correlate; NaN says so, the warning adds nothing.
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(mean_a, mean_b).statistic)


def _means_from_indices(effects: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mean effect ``[batch, n_nodes]`` of the prompt subsets/resamples ``idx [batch, m]`` (repeats count)."""
    idx = np.atleast_2d(idx)
    batch, m = idx.shape
    n = effects.shape[0]
    flat = (idx + n * np.arange(batch)[:, None]).ravel()
    counts = np.bincount(flat, minlength=batch * n).reshape(batch, n)  # [batch, n_prompts]
    return (counts / m) @ effects


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ---------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class PairStats:
    a: str
    b: str
    jaccard: float
    weighted_overlap: float
    spearman: float
    p_value: float  # one-sided label-permutation p for MODULARITY (overlap lower than exchangeable)
    q_value: float  # Benjamini-Hochberg over all pairs
    significant: bool  # q_value < alpha
    ceiling: float  # geometric mean of the two categories' split-half ceilings
    normalised_jaccard: float  # jaccard / ceiling; NaN where the ceiling is below min_ceiling
    jaccard_ci: tuple[float, float]  # percentile bootstrap over prompts
    null_mean: float  # mean Jaccard under exchangeable labels, for scale


@dataclass(frozen=True)
class ComparisonResult:
    categories: list[str]  # sorted; the order of every matrix
    n_prompts: dict[str, int]
    circuit_size: dict[str, int]
    ceiling: dict[str, float]  # split-half Jaccard reliability of each category's circuit
    pairs: list[PairStats]
    jaccard: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    weighted_overlap: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    spearman: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    normalised_jaccard: np.ndarray  # [n_cat, n_cat], NaN on the diagonal (no test of a category with itself)
    p_value: np.ndarray  # [n_cat, n_cat], NaN on the diagonal
    q_value: np.ndarray  # [n_cat, n_cat], NaN on the diagonal
    significant: np.ndarray  # [n_cat, n_cat] bool, False on the diagonal
    shared_core: np.ndarray  # node indices in every category's circuit
    specific_tail: dict[str, np.ndarray]  # node indices only in that category's circuit
    shared_fraction: float  # |core| / mean circuit size
    shared_fraction_ci: tuple[float, float]
    verdict: Literal["modular", "monolithic", "mixed"]
    verdict_reason: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: arrays to lists, NaN to None."""
        return _jsonable(asdict(self))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(obj) else float(obj)
    return obj


# ----------------------------------------------------------------------------------- the verdict


class Verdict(NamedTuple):
    verdict: Literal["modular", "monolithic", "mixed"]
    reason: str
    """The rule that decided, with the numbers it saw."""


def decide_verdict(
    pairs: list[PairStats],
    shared_fraction_ci: tuple[float, float],
    *,
    modular_min_significant_fraction: float = 0.5,
    modular_max_normalised_jaccard: float = 0.5,
    monolithic_min_shared_ci_low: float = 0.5,
    monolithic_min_normalised_jaccard: float = 0.8,
    monolithic_min_ceiling: float = 0.4,
) -> Verdict:
    """The documented rule.

    * ``modular``: at least ``modular_min_significant_fraction`` of the pairs differ significantly
      after Benjamini-Hochberg (their circuits overlap less than exchangeable labels would give) AND
      the median normalised Jaccard is below ``modular_max_normalised_jaccard``.
    * ``monolithic``: no pair is significant after BH AND either the lower end of the shared-fraction
      95% CI is at least ``monolithic_min_shared_ci_low`` or the median normalised Jaccard is at least
      ``monolithic_min_normalised_jaccard`` (pairwise overlap near the reliability ceiling; with many
      categories the all-category core can be small even when every pair overlaps well).
    * ``mixed``: anything else.

    NaN normalised Jaccards (pair ceiling below ``min_ceiling``) are left out of the median; if all
    are NaN neither median condition holds. Note half-shared circuits have Jaccard 1/3, so they count
    as modular.
    """
    n_pairs = len(pairs)
    n_sig = sum(p.significant for p in pairs)
    norm = np.array([p.normalised_jaccard for p in pairs], dtype=float)
    median_norm = float(np.median(norm[np.isfinite(norm)])) if np.isfinite(norm).any() else math.nan
    ci_low = shared_fraction_ci[0]
    numbers = (
        f"{n_sig} of {n_pairs} category pairs differ significantly after Benjamini-Hochberg; "
        f"the median normalised Jaccard is {median_norm:.3f}; the shared-core fraction 95% CI is "
        f"[{shared_fraction_ci[0]:.3f}, {shared_fraction_ci[1]:.3f}]."
    )
    if n_unreliable := int((~np.isfinite(norm)).sum()):
        numbers += (
            f" {n_unreliable} pair(s) have a split-half ceiling too low to normalise (circuits do not reproduce "
            "within their own category) and are left out of the median."
        )
    if n_sig >= modular_min_significant_fraction * n_pairs and median_norm < modular_max_normalised_jaccard:
        return Verdict("modular", (
            f"Modular: {numbers} At least {modular_min_significant_fraction:.0%} of pairs are significant and "
            f"the median normalised Jaccard is below {modular_max_normalised_jaccard}, so categories use "
            "measurably different circuits."
        ))
    # The normalised-Jaccard route needs circuits that replicate within a category: with split-half
    # ceilings near chance, "no significant difference" means no power, not one shared circuit.
    median_ceiling = float(np.median([p.ceiling for p in pairs])) if pairs else 0.0
    reliable = median_ceiling >= monolithic_min_ceiling
    if n_sig == 0 and (ci_low >= monolithic_min_shared_ci_low or (reliable and median_norm >= monolithic_min_normalised_jaccard)):
        why = (
            f"the shared-fraction CI lower end is at least {monolithic_min_shared_ci_low}"
            if ci_low >= monolithic_min_shared_ci_low
            else f"the median normalised Jaccard is at least {monolithic_min_normalised_jaccard}"
        )
        return Verdict("monolithic", (
            f"Monolithic: {numbers} No pair overlaps less than exchangeable labels would give, and {why}, "
            "so one circuit serves every category."
        ))
    return Verdict("mixed", (
        f"Mixed: {numbers} Neither the modular rule (>= {modular_min_significant_fraction:.0%} of pairs "
        f"significant and median normalised Jaccard < {modular_max_normalised_jaccard}) nor the monolithic rule "
        f"(no pair significant and shared CI low >= {monolithic_min_shared_ci_low} or median normalised "
        f"Jaccard >= {monolithic_min_normalised_jaccard} with a median split-half ceiling >= {monolithic_min_ceiling}) holds"
        + ("" if reliable else f"; the circuits barely replicate within a category (median ceiling {median_ceiling:.2f}), so the test has little power")
        + "."
    ))


# ------------------------------------------------------------------------------------ comparison


def _batch_rows(n_nodes: int) -> int:
    return max(1, _BATCH_ELEMS // max(n_nodes, 1))


@dataclass(frozen=True)
class Selector:
    """Circuit selection for batches of mean effects ``[batch, n_nodes]`` -> masks ``[batch, n_nodes]``."""

    site_of_node: np.ndarray
    mode: Mode
    k_per_site: int
    threshold: float

    def __call__(self, means: np.ndarray) -> np.ndarray:
        return select_circuits(means, self.site_of_node, self.mode, self.k_per_site, self.threshold)

    @property
    def batch(self) -> int:
        """Resamples per vectorised call (memory bound, see ``_BATCH_ELEMS``)."""
        return _batch_rows(self.site_of_node.shape[0])


@dataclass(frozen=True)
class SplitHalfCeilings:
    """How reproducible each category's circuit is from independent halves of its own prompts."""

    ceiling: dict[str, float]
    """Mean split-half Jaccard per category."""
    n_splits: int


def split_half_ceilings(E: dict[str, np.ndarray], select: Selector, *, n_bootstrap: int, seed: int) -> SplitHalfCeilings:
    """Mean Jaccard of circuits from random halves of each category's prompts (``E`` in sorted order)."""
    n_splits = max(20, n_bootstrap // 5)
    ceiling: dict[str, float] = {}
    for ci, c in enumerate(E):
        n = E[c].shape[0]
        order = _rng(seed, _SPLIT, ci).permuted(np.tile(np.arange(n), (n_splits, 1)), axis=1)  # [n_splits, n]
        js = [
            _jaccard(select(_means_from_indices(E[c], rows[:, : n // 2])), select(_means_from_indices(E[c], rows[:, n // 2 :])))
            for rows in np.array_split(order, math.ceil(n_splits / select.batch))  # chunks of <= batch rows
        ]
        ceiling[c] = float(np.concatenate(js).mean())
    return SplitHalfCeilings(ceiling, n_splits)


@dataclass(frozen=True)
class PairTests:
    """Every pair (a < b) of categories, with Benjamini-Hochberg across pairs."""

    categories: list[str]
    pairs: list[PairStats]

    def matrix(self, attr: str, diag: float) -> np.ndarray:
        """A pair statistic as a symmetric ``[n_cat, n_cat]`` matrix with ``diag`` on the diagonal."""
        n = len(self.categories)
        m = np.full((n, n), diag, dtype=float)
        for (i, j), p in zip(combinations(range(n), 2), self.pairs):
            m[i, j] = m[j, i] = getattr(p, attr)
        return m


def _pair_stats(E: dict[str, np.ndarray], a: str, b: str, key: tuple[int, int], circuit: dict[str, np.ndarray], mean: dict[str, np.ndarray],
                ceilings: SplitHalfCeilings, select: Selector, *, n_permutations: int, n_bootstrap: int, seed: int,
                min_ceiling: float) -> dict[str, Any]:
    """One pair's statistics before the multiple-testing correction."""
    na = E[a].shape[0]
    pooled = np.vstack([E[a], E[b]])  # [na + nb, n_nodes]

    def perm_stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        # Indices into the pooled prompts; a permutation only changes which rows feed each mean.
        jac = _jaccard(select(_means_from_indices(pooled, ia)), select(_means_from_indices(pooled, ib)))
        return jac.reshape(np.shape(ia)[:-1])  # scalar for the observed labels, [batch] for resamples

    perm = stats.permutation_test(
        (np.arange(na), np.arange(na, pooled.shape[0])), perm_stat, permutation_type="independent", vectorized=True,
        n_resamples=n_permutations, alternative="less", batch=select.batch, rng=_rng(seed, _PERM, *key),
    )

    def boot_stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        jac = _jaccard(select(_means_from_indices(E[a], ia)), select(_means_from_indices(E[b], ib)))
        return jac.reshape(np.shape(ia)[:-1])

    boot = stats.bootstrap(
        (np.arange(na), np.arange(E[b].shape[0])), boot_stat, vectorized=True, paired=False, n_resamples=n_bootstrap,
        confidence_level=0.95, method="percentile", batch=select.batch, rng=_rng(seed, _PAIR_BOOT, *key),
    )
    jac = float(_jaccard(circuit[a], circuit[b]))
    pair_ceiling = math.sqrt(ceilings.ceiling[a] * ceilings.ceiling[b])
    return dict(
        a=a, b=b, jaccard=jac, weighted_overlap=weighted_overlap(mean[a], mean[b]), spearman=_spearman(mean[a], mean[b]),
        p_value=float(perm.pvalue), ceiling=pair_ceiling,
        normalised_jaccard=jac / pair_ceiling if pair_ceiling >= max(min_ceiling, 1e-12) else math.nan,
        jaccard_ci=(float(boot.confidence_interval.low), float(boot.confidence_interval.high)),
        null_mean=float(perm.null_distribution.mean()),
    )


def pair_statistics(E: dict[str, np.ndarray], circuit: dict[str, np.ndarray], ceilings: SplitHalfCeilings, select: Selector, *,
                    n_permutations: int, n_bootstrap: int, alpha: float, seed: int, min_ceiling: float) -> PairTests:
    """Per pair: Jaccard, weighted overlap, Spearman, the permutation p-value, the normalised Jaccard
    and its bootstrap CI; then BH q-values across pairs."""
    cats = list(E)
    mean = {c: E[c].mean(axis=0) for c in cats}  # [n_nodes]
    raw = [_pair_stats(E, cats[i], cats[j], (i, j), circuit, mean, ceilings, select, n_permutations=n_permutations,
                       n_bootstrap=n_bootstrap, seed=seed, min_ceiling=min_ceiling)
           for i, j in combinations(range(len(cats)), 2)]
    q = stats.false_discovery_control([p["p_value"] for p in raw], method="bh")
    return PairTests(cats, [PairStats(**p, q_value=float(qv), significant=bool(qv < alpha)) for p, qv in zip(raw, q)])


@dataclass(frozen=True)
class SharedCore:
    """Nodes in every category's circuit, nodes in only one, and the core's share of a circuit."""

    core: np.ndarray
    """Node indices in every category's circuit."""
    specific_tail: dict[str, np.ndarray]
    """Node indices only in that category's circuit."""
    fraction: float
    """|core| / mean circuit size."""
    fraction_ci: tuple[float, float]
    """Percentile bootstrap, each category's prompts resampled independently."""


def _core_fraction(masks: np.ndarray) -> np.ndarray:
    """masks ``[n_cat, batch, n_nodes]`` -> |core| / mean circuit size ``[batch]`` (NaN if all empty)."""
    core = np.count_nonzero(masks.all(axis=0), axis=-1)
    size = np.count_nonzero(masks, axis=-1).mean(axis=0)
    return np.where(size > 0, core / np.maximum(size, 1e-300), np.nan)


def shared_core(E: dict[str, np.ndarray], circuit: dict[str, np.ndarray], select: Selector, *, n_bootstrap: int, seed: int) -> SharedCore:
    """Shared core and specific tails of the full-sample circuits, with the shared fraction's CI."""
    cats = list(E)
    masks = np.stack([circuit[c] for c in cats])  # [n_cat, n_nodes]
    in_count = masks.sum(axis=0)  # [n_nodes]

    def core_stat(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        frac = _core_fraction(np.stack([select(_means_from_indices(E[c], ic)) for c, ic in zip(cats, idx)]))
        return frac.reshape(np.shape(idx[0])[:-1])

    boot = stats.bootstrap(
        tuple(np.arange(E[c].shape[0]) for c in cats), core_stat, vectorized=True, paired=False, n_resamples=n_bootstrap,
        confidence_level=0.95, method="percentile", batch=max(1, select.batch // len(cats)), rng=_rng(seed, _CORE_BOOT),
    )
    return SharedCore(
        core=np.flatnonzero(in_count == len(cats)),
        specific_tail={c: np.flatnonzero(masks[ci] & (in_count == 1)) for ci, c in enumerate(cats)},
        fraction=float(_core_fraction(masks[:, None])[0]),
        fraction_ci=(float(boot.confidence_interval.low), float(boot.confidence_interval.high)),
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
            raise ValueError(f"effects[{c!r}] has {e.shape[0]} prompts; the split-half ceiling needs at least 2")
        if not np.isfinite(e).all():
            raise ValueError(f"effects[{c!r}] holds non-finite values")
    return E


def compare_categories(
    effects: dict[str, np.ndarray],
    site_of_node: np.ndarray,
    *,
    mode: Mode = "topk",
    k_per_site: int = 20,
    threshold: float = 0.0,
    n_permutations: int = 500,
    n_bootstrap: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    modular_min_significant_fraction: float = 0.5,
    modular_max_normalised_jaccard: float = 0.5,
    monolithic_min_shared_ci_low: float = 0.5,
    monolithic_min_normalised_jaccard: float = 0.8,
    min_ceiling: float = 0.2,
) -> ComparisonResult:
    """Compare every pair of categories' refusal circuits and give a monolithic/modular verdict.

    Four steps: :func:`split_half_ceilings`; :func:`pair_statistics` per pair (a < b): Jaccard of
    the circuits, weighted overlap and Spearman of the mean effects; a one-sided label-permutation
    p-value for modularity (``scipy.stats.permutation_test``, ``alternative="less"``:
    p = (1 + #{null <= observed}) / (1 + n_permutations)); Jaccard divided by the pair's split-half
    reliability ceiling; a percentile bootstrap CI (``scipy.stats.bootstrap``, each category's prompts
    resampled independently); BH q-values across pairs; :func:`shared_core` across categories (shared
    core, specific tails, shared fraction with a bootstrap CI); and :func:`decide_verdict`.

    The split-half ceiling builds circuits from half the prompts, so it is a conservative (low)
    estimate of the full-sample reliability; normalised Jaccard can exceed 1 and is not clipped.
    Where the pair ceiling is below ``min_ceiling`` the normalised Jaccard is NaN: circuits that do
    not reproduce within their own category are mostly noise picks, and chance overlap divided by a
    chance-level ceiling is ~1 -- which would read as "monolithic" for pure noise.
    """
    site_of_node = np.asarray(site_of_node)
    if k_per_site < 0:
        raise ValueError(f"k_per_site must be >= 0, not {k_per_site}")
    E = _checked_effects(effects, site_of_node.shape[0])  # [n_prompts_c, n_nodes], sorted categories
    cats = list(E)
    select = Selector(site_of_node, mode, k_per_site, threshold)
    circuit = {c: select(E[c].mean(axis=0)[None])[0] for c in cats}  # [n_nodes] bool

    ceilings = split_half_ceilings(E, select, n_bootstrap=n_bootstrap, seed=seed)
    tests = pair_statistics(E, circuit, ceilings, select, n_permutations=n_permutations, n_bootstrap=n_bootstrap, alpha=alpha,
                            seed=seed, min_ceiling=min_ceiling)
    core = shared_core(E, circuit, select, n_bootstrap=n_bootstrap, seed=seed)
    verdict = decide_verdict(
        tests.pairs, core.fraction_ci,
        modular_min_significant_fraction=modular_min_significant_fraction, modular_max_normalised_jaccard=modular_max_normalised_jaccard,
        monolithic_min_shared_ci_low=monolithic_min_shared_ci_low, monolithic_min_normalised_jaccard=monolithic_min_normalised_jaccard,
    )
    return ComparisonResult(
        categories=cats,
        n_prompts={c: int(E[c].shape[0]) for c in cats},
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
        shared_core=core.core,
        specific_tail=core.specific_tail,
        shared_fraction=core.fraction,
        shared_fraction_ci=core.fraction_ci,
        verdict=verdict.verdict,
        verdict_reason=verdict.reason,
        params=dict(
            mode=mode,
            k_per_site=k_per_site,
            threshold=threshold,
            n_permutations=n_permutations,
            n_bootstrap=n_bootstrap,
            n_splits=ceilings.n_splits,
            alpha=alpha,
            seed=seed,
            modular_min_significant_fraction=modular_min_significant_fraction,
            modular_max_normalised_jaccard=modular_max_normalised_jaccard,
            monolithic_min_shared_ci_low=monolithic_min_shared_ci_low,
            monolithic_min_normalised_jaccard=monolithic_min_normalised_jaccard,
            min_ceiling=min_ceiling,
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


def plot_heatmap(
    matrix: np.ndarray,
    labels: list[str],
    title: str,
    path: str | Path,
    annotate_significance: np.ndarray | None = None,
) -> Path:
    """Write a labelled heatmap of ``matrix [n, n]``; cells where ``annotate_significance`` is True get a ``*``."""
    matrix = np.asarray(matrix, dtype=float)
    n = len(labels)
    if matrix.shape != (n, n):
        raise ValueError(f"matrix shape {matrix.shape} does not match {n} labels")
    path = Path(path)
    fig = new_figure((1.2 + 0.8 * n, 1.0 + 0.7 * n), constrained=True)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_title(title)
    finite = matrix[np.isfinite(matrix)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(n):
        for j in range(n):
            if not np.isfinite(matrix[i, j]):
                continue
            star = "*" if annotate_significance is not None and annotate_significance[i, j] else ""
            colour = "black" if matrix[i, j] > mid else "white"  # readable on both ends of viridis
            ax.text(j, i, f"{matrix[i, j]:.2f}{star}", ha="center", va="center", fontsize=8, color=colour)
    return save_png(fig, path, dpi=150)
