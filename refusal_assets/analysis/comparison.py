"""Cross-category comparison of refusal circuits: is refusal monolithic or modular?

Inputs, per harm category ``c``: ``effects[c]`` ``[n_prompts_c, n_nodes]``, the attribution-patching
effect of every node (an SAE latent at some site, or a site's error node) on the refusal score, per
prompt, in one node index space shared by all categories; and ``site_of_node`` ``[n_nodes]``.

A circuit is a boolean node mask built from the MEAN effect over a set of prompts
(:func:`refusal_assets.circuits.circuit.select_circuit`). Every statistic that needs circuits of resampled
prompt sets (permutation null, split-half ceiling, bootstraps) rebuilds them with that same function,
batched: a resample is a weight vector over prompts, so a batch of resampled mean vectors is one matrix product
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

from refusal_assets.circuits.circuit import Mode, select_circuits
from refusal_assets.plots import new_figure, save_png

# Rows of resampled mean vectors handled at once: bounds memory to ~_BATCH_ELEMS floats per array.
_BATCH_ELEMS = 1 << 22

# Seed streams, one per kind of resampling, so adding a statistic never shifts another's draws.
_PERM, _PAIR_BOOT, _SPLIT, _CORE_BOOT, _HALF, _NORM_BOOT = 0, 1, 2, 3, 4, 5


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


def _lead_shape(*idx: np.ndarray) -> tuple[int, ...]:
    """Batch shape of resample index arrays ``[..., n_c]``: scipy's BCa jackknife passes the left-out
    sample as ``[batch, n - 1]`` and the others as ``[1, n]``, so the shapes broadcast."""
    return np.broadcast_shapes(*(np.shape(i)[:-1] for i in idx))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ----------------------------------------------------------------------------- bootstrap CIs

CI = tuple[float, float]


def bootstrap_ci(
    data: tuple[np.ndarray, ...],
    statistic,
    estimate: float,
    *,
    n_resamples: int,
    batch: int,
    rng: np.random.Generator,
    paired: bool = False,
    method: Literal["normal", "BCa"] = "normal",
) -> CI:
    """95% bootstrap CI over prompts that always contains ``estimate``.

    ``normal`` (the default): estimate ± t(0.975, n_min - 1) × the bootstrap standard error. Top-k set statistics
    are biased in a bootstrap (resampled prompts repeat, so resampled circuits are noisier and overlap
    less): percentile intervals then sit below the estimate, and BCa's bias correction aims at the
    infinite-sample value, not at the statistic's expectation at this sample size, which is what the
    comparison compares (numerator and ceiling at the same size). The spread of the bootstrap is
    still a fair (if slightly wide) measure of the estimate's own spread, so the interval is centred on
    the estimate. Its coverage is measured by ``refusal-assets calibrate``. ``BCa``:
    ``scipy.stats.bootstrap(method="BCa")``, widened to include the estimate. A degenerate bootstrap
    (every resample the same value, e.g. identical circuits) gives the point interval."""
    if not math.isfinite(estimate):
        return (math.nan, math.nan)
    with warnings.catch_warnings():
        # Degenerate or NaN-holding distributions: handled below, the warning adds nothing.
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            data,
            statistic,
            vectorized=True,
            paired=paired,
            n_resamples=n_resamples,
            confidence_level=0.95,
            method="percentile" if method == "normal" else method,
            batch=batch,
            rng=rng,
        )
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    dist = dist[np.isfinite(dist)]
    if not dist.size:
        return (math.nan, math.nan)
    if np.ptp(dist) == 0 and dist[0] == estimate:
        return (estimate, estimate)
    if method == "normal":
        # Student's t with the smallest sample's degrees of freedom: the bootstrap SE of a statistic
        # of a dozen prompts is itself uncertain (1.96 under-covers at the default sizes; measured).
        df = max(min(len(d) for d in data) - 1, 1)
        half = float(stats.t.ppf(0.975, df)) * float(dist.std(ddof=1))
        return (estimate - half, estimate + half)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # BCa undefined (e.g. a constant jackknife): percentile
        lo, hi = (float(v) for v in np.quantile(dist, [0.025, 0.975]))
    return (min(lo, estimate), max(hi, estimate))


def min_permutation_p(n_a: int, n_b: int, n_permutations: int) -> float:
    """The smallest p a two-sample label-permutation test of a symmetric statistic can give:
    1 / (#distinct relabellings), doubled when the groups are equal-sized (swapping them gives the same
    circuits), and never below the Monte Carlo floor 1 / (1 + n_permutations)."""
    n_distinct = math.comb(n_a + n_b, n_a) / (2 if n_a == n_b else 1)
    return max(1.0 / n_distinct, 1.0 / (1 + n_permutations))


# ---------------------------------------------------------------------------------------- result

PairCall = Literal["shared", "specific", "partial", "undecided"]


@dataclass(frozen=True)
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
    half_size: int  # prompts per half-sample circuit: min(n_a, n_b) // 2, for numerator and ceiling alike
    cross_half_jaccard: float  # mean Jaccard of a half-circuit of a with a half-circuit of b (disjoint halves)
    ceiling: float  # mean within-category split-half Jaccard at the same half size (both categories)
    normalised_jaccard: float  # cross_half_jaccard / ceiling; NaN where the ceiling is below min_ceiling
    normalised_jaccard_ci: CI  # bootstrap over prompts (see bootstrap_ci)
    jaccard_ci: CI  # bootstrap over prompts, of the full-sample Jaccard (see bootstrap_ci)
    null_mean: float  # mean Jaccard under exchangeable labels, for scale
    call: PairCall  # what this pair says, see decide_verdict


@dataclass(frozen=True)
class ComparisonResult:
    categories: list[str]  # sorted; the order of every matrix
    n_prompts: dict[str, int]
    circuit_size: dict[str, int]
    ceiling: dict[str, float]  # split-half Jaccard reliability of each category's circuit (halves of its own size)
    pairs: list[PairStats]
    jaccard: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    weighted_overlap: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    spearman: np.ndarray  # [n_cat, n_cat], 1 on the diagonal
    normalised_jaccard: np.ndarray  # [n_cat, n_cat], NaN on the diagonal (no test of a category with itself)
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


@dataclass(frozen=True)
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
        return cls(comp.equivalence_margin, comp.modular_max_normalised, comp.min_decided_fraction, comp.majority)


class Verdict(NamedTuple):
    verdict: Literal["modular", "monolithic", "mixed", "insufficient evidence"]
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


def prompts_to_decide(pairs: list[PairStats], n_prompts: dict[str, int], rule: VerdictRule, alpha: float) -> int:
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
                min(abs(est - (1 - rule.equivalence_margin)), abs(est - rule.modular_max_normalised_jaccard)), 0.05
            )
            k = max(k, math.ceil(n * ((hi - lo) / 2 / gap) ** 2))
        else:  # no usable ceiling: the circuits do not replicate; at least four times the sample
            k = max(k, 4 * n)
        need = max(need, k)
    return need


def decide_verdict(
    pairs: list[PairStats], n_prompts: dict[str, int], rule: VerdictRule = VerdictRule(), *, alpha: float = 0.05
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
    if count["shared"] >= rule.majority * decided and count["specific"] == 0 and count["partial"] == 0:
        return Verdict(
            "monolithic", f"Monolithic: {numbers} Cross-category overlap is equivalent to the within-category ceiling."
        )
    if count["specific"] >= rule.majority * decided and count["shared"] == 0:
        return Verdict("modular", f"Modular: {numbers} Categories use measurably different circuits.")
    return Verdict("mixed", f"Mixed: {numbers} Neither every decided pair shared nor most of them specific.")


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


def split_half_ceilings(
    E: dict[str, np.ndarray], select: Selector, *, n_bootstrap: int, seed: int
) -> SplitHalfCeilings:
    """Mean Jaccard of circuits from random halves of each category's prompts (``E`` in sorted order)."""
    n_splits = max(20, n_bootstrap // 5)
    ceiling: dict[str, float] = {}
    for ci, c in enumerate(E):
        n = E[c].shape[0]
        order = _rng(seed, _SPLIT, ci).permuted(np.tile(np.arange(n), (n_splits, 1)), axis=1)  # [n_splits, n]
        js = [
            _jaccard(
                select(_means_from_indices(E[c], rows[:, : n // 2])),
                select(_means_from_indices(E[c], rows[:, n // 2 : 2 * (n // 2)])),
            )
            for rows in np.array_split(order, math.ceil(n_splits / select.batch))  # chunks of <= batch rows
        ]
        ceiling[c] = float(np.concatenate(js).mean())
    return SplitHalfCeilings(ceiling, n_splits)


@dataclass(frozen=True)
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
        return cls(rng.random((n_splits, n_a)), rng.random((n_splits, n_b)), min(n_a, n_b) // 2)

    def sums(
        self, Ea: np.ndarray, Eb: np.ndarray, ia: np.ndarray, ib: np.ndarray, select: Selector
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sums over splits of cross and within Jaccards for resamples ``ia [batch, n_a]``, ``ib [batch, n_b]``."""
        ia, ib = np.atleast_2d(ia), np.atleast_2d(ib)
        m = self.m
        cross = np.zeros(max(ia.shape[0], ib.shape[0]))  # BCa's jackknife holds one sample fixed as [1, n]
        within = np.zeros_like(cross)
        for ka, kb in zip(self.keys_a, self.keys_b):
            sa = np.take_along_axis(ia, np.argsort(ka[ia], axis=1, kind="stable"), axis=1)
            sb = np.take_along_axis(ib, np.argsort(kb[ib], axis=1, kind="stable"), axis=1)
            a1, a2 = select(_means_from_indices(Ea, sa[:, :m])), select(_means_from_indices(Ea, sa[:, m : 2 * m]))
            b1, b2 = select(_means_from_indices(Eb, sb[:, :m])), select(_means_from_indices(Eb, sb[:, m : 2 * m]))
            cross += (_jaccard(a1, b1) + _jaccard(a2, b2) + _jaccard(a1, b2) + _jaccard(a2, b1)) / 4
            within += (_jaccard(a1, a2) + _jaccard(b1, b2)) / 2
        return cross, within


@dataclass(frozen=True)
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
    pooled = np.vstack([E[a], E[b]])  # [na + nb, n_nodes]

    def perm_stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        # Indices into the pooled prompts; a permutation only changes which rows feed each mean.
        jac = _jaccard(select(_means_from_indices(pooled, ia)), select(_means_from_indices(pooled, ib)))
        return jac.reshape(np.shape(ia)[:-1])  # scalar for the observed labels, [batch] for resamples

    perm = stats.permutation_test(
        (np.arange(na), np.arange(na, pooled.shape[0])),
        perm_stat,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_permutations,
        alternative="less",
        batch=select.batch,
        rng=_rng(seed, _PERM, *key),
    )

    def boot_stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        jac = _jaccard(
            select(_means_from_indices(E[a], ia.reshape(-1, ia.shape[-1]))),
            select(_means_from_indices(E[b], ib.reshape(-1, ib.shape[-1]))),
        )
        return jac.reshape(_lead_shape(ia, ib))

    jac = float(_jaccard(circuit[a], circuit[b]))
    jac_ci = bootstrap_ci(
        (np.arange(na), np.arange(nb)),
        boot_stat,
        jac,
        n_resamples=n_bootstrap,
        batch=select.batch,
        rng=_rng(seed, _PAIR_BOOT, *key),
    )

    halves = HalfSampleOverlap.draw(na, nb, n_splits, _rng(seed, _HALF, *key))
    half_batch = max(1, select.batch // (4 * n_splits))

    def norm_stat(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        cross, within = halves.sums(E[a], E[b], ia.reshape(-1, ia.shape[-1]), ib.reshape(-1, ib.shape[-1]), select)
        # A resample whose halves do not replicate at all has no ceiling to normalise by.
        out = np.where(within > 0, cross / np.maximum(within, 1e-300), np.nan)
        return out.reshape(_lead_shape(ia, ib))

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
            rng=_rng(seed, _NORM_BOOT, *key),
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
        spearman=_spearman(mean[a], mean[b]),
        p_value=float(perm.pvalue),
        min_p=min_p,
        testable=min_p < alpha,
        half_size=halves.m,
        cross_half_jaccard=cross_half,
        ceiling=ceiling,
        normalised_jaccard=norm,
        normalised_jaccard_ci=norm_ci,
        jaccard_ci=jac_ci,
        null_mean=float(perm.null_distribution.mean()),
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
        q[testable] = stats.false_discovery_control([raw[k]["p_value"] for k in testable], method="bh")
    pairs = []
    for p, qv in zip(raw, q):
        sig = bool(p["testable"] and qv < alpha)
        pairs.append(
            PairStats(
                **p, q_value=float(qv), significant=sig, call=classify_pair(sig, p["normalised_jaccard_ci"], rule)
            )
        )
    return PairTests(cats, pairs)


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
    """Bootstrap CI (see :func:`bootstrap_ci`), each category's prompts resampled independently."""


def _core_fraction(masks: np.ndarray) -> np.ndarray:
    """masks ``[n_cat, batch, n_nodes]`` -> |core| / mean circuit size ``[batch]`` (NaN if all empty)."""
    core = np.count_nonzero(masks.all(axis=0), axis=-1)
    size = np.count_nonzero(masks, axis=-1).mean(axis=0)
    return np.where(size > 0, core / np.maximum(size, 1e-300), np.nan)


def shared_core(
    E: dict[str, np.ndarray], circuit: dict[str, np.ndarray], select: Selector, *, n_bootstrap: int, seed: int
) -> SharedCore:
    """Shared core and specific tails of the full-sample circuits, with the shared fraction's CI."""
    cats = list(E)
    masks = np.stack([circuit[c] for c in cats])  # [n_cat, n_nodes]
    site_of_node = select.site_of_node
    in_count = masks.sum(axis=0)  # [n_nodes]

    def core_stat(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        lead = _lead_shape(*idx)
        masks = [
            np.broadcast_to(
                select(_means_from_indices(E[c], ic.reshape(-1, ic.shape[-1]))), (math.prod(lead), len(site_of_node))
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
        rng=_rng(seed, _CORE_BOOT),
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
            raise ValueError(f"effects[{c!r}] has {e.shape[0]} prompts; the split-half ceiling needs at least 2")
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
        if group in summary["groups"] and summary["groups"][group].get("prompt_set", prompt_filter) != prompt_filter
    )


def error_node_mask(site_of_node: np.ndarray) -> np.ndarray:
    """[n_nodes] bool: the error node of every site (the last node of each site's block, see
    :class:`refusal_assets.circuits.circuit.NodeIndex`)."""
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
    E = _checked_effects(effects, site_of_node.shape[0])  # [n_prompts_c, n_nodes], sorted categories
    err_share: dict[str, float] = {}
    if error_nodes is not None:
        error_nodes = np.asarray(error_nodes, dtype=bool)
        if error_nodes.shape != site_of_node.shape:
            raise ValueError(f"error_nodes {error_nodes.shape} must match site_of_node {site_of_node.shape}")
        err_share = error_share(E, error_nodes)
        keep = ~error_nodes
        E = {c: e[:, keep] for c, e in E.items()}
        node_ids, site_of_node = np.flatnonzero(keep), site_of_node[keep]
    else:
        node_ids = np.arange(site_of_node.shape[0])
    cats = list(E)
    select = Selector(site_of_node, mode, k_per_site, threshold)
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
