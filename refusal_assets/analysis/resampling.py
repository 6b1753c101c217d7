"""Resampling building blocks of the circuit comparison: set statistics of circuit masks, batched
mean effects of resampled prompt sets, seeded random streams, bootstrap CIs, and circuit selection.

A resample is a weight vector over prompts, so a batch of resampled mean vectors is one matrix product
``weights [batch, n_prompts] @ effects [n_prompts, n_nodes]``. All randomness comes from
``np.random.SeedSequence(seed, spawn_key=(stream, i, j))`` (:func:`seeded_rng`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from refusal_assets.circuits.selection import Mode, select_circuits

# Rows of resampled mean vectors handled at once: bounds memory to ~BATCH_ELEMS floats per array.
BATCH_ELEMS = 1 << 22

# Seed streams, one per kind of resampling, so adding a statistic never shifts another's draws.
PERM, PAIR_BOOT, SPLIT, CORE_BOOT, HALF, NORM_BOOT = 0, 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------- set statistics


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard of masks ``[..., n_nodes]`` -> ``[...]``; two empty circuits are equal sets, so 1."""
    inter = np.count_nonzero(a & b, axis=-1)
    union = np.count_nonzero(a | b, axis=-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def weighted_overlap(mean_a: np.ndarray, mean_b: np.ndarray) -> float:
    """Weighted Jaccard of effect magnitudes: sum min(|a|,|b|) / sum max(|a|,|b|); NaN if both are 0."""
    abs_a, abs_b = np.abs(mean_a), np.abs(mean_b)
    denom = np.maximum(abs_a, abs_b).sum()
    return float(np.minimum(abs_a, abs_b).sum() / denom) if denom > 0 else math.nan


def spearman(mean_a: np.ndarray, mean_b: np.ndarray) -> float:
    with warnings.catch_warnings():
        # A constant vector has no ranks to correlate; NaN says so, the warning adds nothing.
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(mean_a, mean_b).statistic)


def means_from_indices(effects: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mean effect ``[batch, n_nodes]`` of the prompt subsets/resamples ``idx [batch, m]`` (repeats count)."""
    idx = np.atleast_2d(idx)
    batch, m = idx.shape
    n = effects.shape[0]
    flat = (idx + n * np.arange(batch)[:, None]).ravel()
    counts = np.bincount(flat, minlength=batch * n).reshape(batch, n)  # [batch, n_prompts]
    return (counts / m) @ effects


def lead_shape(*idx: np.ndarray) -> tuple[int, ...]:
    """Batch shape of resample index arrays ``[..., n_c]``: scipy's BCa jackknife passes the left-out
    sample as ``[batch, n - 1]`` and the others as ``[1, n]``, so the shapes broadcast."""
    return np.broadcast_shapes(*(np.shape(i)[:-1] for i in idx))


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
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
    if not (
        math.isfinite(lo) and math.isfinite(hi)
    ):  # BCa undefined (e.g. a constant jackknife): percentile
        lo, hi = (float(v) for v in np.quantile(dist, [0.025, 0.975]))
    return (min(lo, estimate), max(hi, estimate))


def min_permutation_p(n_a: int, n_b: int, n_permutations: int) -> float:
    """The smallest p a two-sample label-permutation test of a symmetric statistic can give:
    1 / (#distinct relabellings), doubled when the groups are equal-sized (swapping them gives the same
    circuits), and never below the Monte Carlo floor 1 / (1 + n_permutations)."""
    n_distinct = math.comb(n_a + n_b, n_a) / (2 if n_a == n_b else 1)
    return max(1.0 / n_distinct, 1.0 / (1 + n_permutations))


def batch_rows(n_nodes: int) -> int:
    return max(1, BATCH_ELEMS // max(n_nodes, 1))


@dataclass(frozen=True, kw_only=True)
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
        """Resamples per vectorised call (memory bound, see ``BATCH_ELEMS``)."""
        return batch_rows(self.site_of_node.shape[0])
