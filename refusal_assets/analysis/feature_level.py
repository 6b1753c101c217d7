"""Feature-level answer: does a shared core of SAE latents carry each category's refusal
attribution?

Methods (quotable). The circuit-overlap test asks whether two categories' circuits are
exchangeable, and categories that share one refusal step but differ in harm topic reject that null:
their topic latents differ. This test asks instead how much of each category's refusal attribution
a shared core of latents carries, measured on prompts that did not choose the core. Every
category's prompts are split at random into a selection half (ceil(n/2) prompts) and a measurement
half (floor(n/2)). On the selection half, each category's circuit is the ``k_per_site`` latents per
site with the largest signed mean attribution effect (error nodes are never in a circuit), and the
shared core is every latent in the circuits of at least ``core_fraction`` of the categories. On the
measurement half, category c's core share is the core's summed signed mean effect divided by that
of the core plus c's own circuit. Signed held-out sums make chance picks contribute zero on average
(absolute values would add a positive bias from noise). Sums are pooled over ``n_splits`` random
splits before dividing, and the share is clipped to [0, 1]. The headline is the mean share over
categories. Its confidence interval comes from a Bayesian bootstrap over prompts (Dirichlet(1)
weights within each category, fresh splits in every draw): the estimate +- t(n_categories - 1) x
the bootstrap standard error. Harm-topic latents that fire in one category only sit in that
category's tail and lower its core share only by the attribution they carry, so one shared refusal
step that carries most of the attribution still reads as a large core share.

Verdict (symmetric, one margin ``m`` for "shared" and "specific"). A CI inside (1 - m, 1] is
"shared" (the specific part carries less than m); inside [0, m) it is "specific" (the core carries
less than m); inside [m, 1 - m] it is "partial". Swapping shared and specific (share -> 1 - share)
swaps the first two calls and keeps the third. First, the circuits must replicate: the pooled
held-out attribution of the circuits over their in-sample attribution (retention) must have a CI
lower end of at least ``min_retention`` (0.1), or the answer is "insufficient evidence" (pure-noise
circuits retain nothing on average). If at least two categories each are confidently in two
different regions (per-category intervals Bonferroni-adjusted over the categories, t with n_c - 1
df), the answer is "mixed". Otherwise the pooled CI decides: "monolithic" (shared), "modular"
(specific), "shared core + specific tail" (partial); a pooled CI that crosses m or 1 - m gives
"insufficient evidence". The thresholds (m = 0.25, core_fraction = 0.5, 95% intervals,
min_retention = 0.1) are fixed in :class:`FeatureRule` and calibrated on planted worlds at the real
per-category counts (:mod:`refusal_assets.analysis.feature_calibration`).

Dictionary-free companion (:mod:`refusal_assets.analysis.decoder_directions`, a description, not a vote). Per
category and site the effect-weighted decoder direction is sum over latents of (mean effect x W_dec
row). Each pair of categories is compared like with like. The cross cosine is taken between a
half-sample direction of A and one of B, and the ceiling between two disjoint halves of one
category, at the same half size min(n_a, n_b) // 2. The normalised cosine is cross / sqrt(ceiling_a
x ceiling_b).

All randomness comes from ``np.random.SeedSequence(seed, spawn_key=(stream, ...))`` with
categories in sorted order, so the same inputs and seed give identical numbers in any dict order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
from scipy import stats

FeatureAnswer = Literal[
    "monolithic",
    "modular",
    "shared core + specific tail",
    "mixed",
    "insufficient evidence",
]
Region = Literal["shared", "specific", "partial", "undecided"]
CI = tuple[float, float]

# Seed streams, one per kind of draw, so adding one never shifts another's numbers.
_SPLITS, _BOOT, HALVES = 0, 1, 2
# Resampled rows (split x bootstrap draw) handled at once: bounds memory to a few 10 MB.
_ROWS_PER_BATCH = 256
# Candidate latents per circuit slot in the exact pruned top-k (see _select_site).
_CANDIDATES = 8


def rng_for(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _ci_to_json(ci: CI) -> list[float | None]:
    return [finite_or_none(v) for v in ci]


def _ci_from_json(values: Sequence[float | None]) -> CI:
    lo, hi = (math.nan if v is None else float(v) for v in values)
    return (lo, hi)


# --------------------------------------------------------------------------------------- the rule


@dataclass(frozen=True, kw_only=True)
class FeatureRule:
    """Thresholds of the feature-level verdict (fixed before any real result; see the
    calibration)."""

    margin: float = 0.25
    """The same margin for both answers: "shared" = the specific part carries less than ``margin``
    of the circuit attribution; "specific" = the core carries less than ``margin``."""
    core_fraction: float = 0.5
    """A latent is in the shared core when it is in the circuits of at least this fraction of the
    categories."""
    confidence: float = 0.95
    """Two-sided level of every bootstrap interval the rule reads."""
    min_retention: float = 0.1
    """The circuits replicate when the lower end of the retention CI (held-out over in-sample
    attribution) is at least this; below it the answer is "insufficient evidence"."""

    def __post_init__(self) -> None:
        if not 0 < self.margin < 0.5:
            raise ValueError(f"margin must lie in (0, 0.5), not {self.margin}")
        if not 0 < self.core_fraction <= 1:
            raise ValueError(f"core_fraction must lie in (0, 1], not {self.core_fraction}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), not {self.confidence}")
        if not 0 < self.min_retention < 1:
            raise ValueError(f"min_retention must lie in (0, 1), not {self.min_retention}")

    def core_min_categories(self, n_categories: int) -> int:
        """How many categories' circuits a latent must be in to count as core (at least 2)."""
        return max(2, math.ceil(self.core_fraction * n_categories - 1e-9))


def region(ci: CI, margin: float) -> Region:
    """Where a core-share CI lies: wholly above 1 - margin, below margin, or between (inclusive)."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided"
    if lo > 1 - margin:
        return "shared"
    if hi < margin:
        return "specific"
    if lo >= margin and hi <= 1 - margin:
        return "partial"
    return "undecided"


MIN_CATEGORIES_PER_REGION = 2
"""Categories confidently in a region before the rule counts that region towards "mixed"."""

_ANSWER_OF_REGION: dict[Region, FeatureAnswer] = {
    "shared": "monolithic",
    "specific": "modular",
    "partial": "shared core + specific tail",
}


def verdict_features(
    core_share_ci: CI,
    category_cis: dict[str, CI],
    retention_ci: CI,
    rule: FeatureRule = FeatureRule(),
) -> tuple[FeatureAnswer, str]:
    """The feature-level answer and its reason, from the pooled core-share CI, each category's
    core-share CI and the pooled retention CI (see the module docstring for the rule)."""
    m = rule.margin
    bounds = f"shared > {1 - m:g}, specific < {m:g}, partial in [{m:g}, {1 - m:g}]"
    if not (math.isfinite(retention_ci[0]) and retention_ci[0] >= rule.min_retention):
        return (
            "insufficient evidence",
            f"Insufficient evidence: the circuits do not replicate on held-out prompts (retention "
            f"CI [{retention_ci[0]:.3f}, {retention_ci[1]:.3f}] reaches below "
            f"{rule.min_retention:g}).",
        )
    confident: dict[Region, list[str]] = {}
    for category, ci in sorted(category_cis.items()):
        call = region(ci, m)
        if call != "undecided":
            confident.setdefault(call, []).append(category)
    # One category's interval rests on 1-5 held-out prompts here, so a region needs two confident
    # categories before their disagreement counts.
    confident = {r: cs for r, cs in confident.items() if len(cs) >= MIN_CATEGORIES_PER_REGION}
    if len(confident) > 1:
        listing = "; ".join(f"{r}: {', '.join(cs)}" for r, cs in sorted(confident.items()))
        listing += f"; {bounds}"
        return (
            "mixed",
            f"Mixed: categories' core shares are confidently in different regions ({listing}).",
        )
    lo, hi = core_share_ci
    call = region(core_share_ci, m)
    shown = f"mean core share CI [{lo:.3f}, {hi:.3f}] ({bounds})"
    if call == "undecided":
        return "insufficient evidence", f"Insufficient evidence: the {shown} crosses a bound."
    answer = _ANSWER_OF_REGION[call]
    return answer, f"{answer.capitalize()}: the {shown} is {call}."


# ------------------------------------------------------------------------------------- the inputs


def default_error_nodes(site_of_node: np.ndarray) -> np.ndarray:
    """[n_nodes] bool: the last node of each site's block (the layout of
    :class:`refusal_assets.circuits.selection.NodeIndex`: each site's latents, then its error
    node)."""
    site_of_node = np.asarray(site_of_node)
    is_last = np.ones(site_of_node.shape[0], bool)
    is_last[:-1] = site_of_node[1:] != site_of_node[:-1]
    return is_last


def checked_effects(
    effects: dict[str, np.ndarray],
    n_nodes: int,
    *,
    min_prompts: int = 2,
) -> dict[str, np.ndarray]:
    """Effects as float arrays ``[n_prompts_c, n_nodes]``, categories sorted; bad input is a
    ValueError that names the category."""
    categories = sorted(effects)
    if len(categories) < 2:
        raise ValueError(f"need at least 2 categories to compare, got {categories}")
    checked = {}
    for category in categories:
        e = np.asarray(effects[category], dtype=float)
        if e.ndim != 2 or e.shape[1] != n_nodes:
            raise ValueError(
                f"effects[{category!r}] has shape {e.shape}; expected [n_prompts, {n_nodes}] "
                "(one column per node of site_of_node)"
            )
        if e.shape[0] == 0:
            raise ValueError(f"effects[{category!r}] is empty: the category has no prompts")
        if e.shape[0] < min_prompts:
            raise ValueError(
                f"effects[{category!r}] has {e.shape[0]} prompts; this test needs at least "
                f"{min_prompts} (one to select a circuit on, one to measure it on)"
            )
        if not np.isfinite(e).all():
            raise ValueError(f"effects[{category!r}] holds non-finite values")
        checked[category] = e
    return checked


def latent_view(
    effects: dict[str, np.ndarray], site_of_node: np.ndarray, error_nodes: np.ndarray | None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Checked effects restricted to latents, the latents' sites and their original node ids."""
    site_of_node = np.asarray(site_of_node)
    if site_of_node.ndim != 1:
        raise ValueError(f"site_of_node must be 1-D, not shape {site_of_node.shape}")
    E = checked_effects(effects, site_of_node.shape[0])
    if error_nodes is None:
        error_nodes = default_error_nodes(site_of_node)
    error_nodes = np.asarray(error_nodes, dtype=bool)
    if error_nodes.shape != site_of_node.shape:
        shapes = f"{error_nodes.shape} vs {site_of_node.shape}"
        raise ValueError(f"error_nodes and site_of_node must have one shape: {shapes}")
    keep = ~error_nodes
    return {c: e[:, keep] for c, e in E.items()}, site_of_node[keep], np.flatnonzero(keep)


# ------------------------------------------------------------------------- the core-share test


@dataclass(frozen=True, kw_only=True)
class CategoryCoreShare:
    category: str
    n_prompts: int
    core_share: float
    """Held-out share of this category's circuit attribution that the shared core carries."""
    core_share_ci: CI
    retention: float
    """Held-out over in-sample attribution of this category's circuit (1: it fully replicates)."""
    region: Region
    """Where ``core_share_ci`` lies (see :func:`region`)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["core_share"] = finite_or_none(self.core_share)
        out["retention"] = finite_or_none(self.retention)
        out["core_share_ci"] = _ci_to_json(self.core_share_ci)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CategoryCoreShare:
        nan_if_none = {k: _nan_if_none(data[k]) for k in ("core_share", "retention")}
        return cls(
            category=str(data["category"]),
            n_prompts=int(data["n_prompts"]),
            core_share_ci=_ci_from_json(data["core_share_ci"]),
            region=data["region"],
            **nan_if_none,
        )


@dataclass(frozen=True, kw_only=True)
class CoreShareTest:
    """The cross-fitted shared-core share and the feature-level verdict it gives."""

    categories: tuple[str, ...]
    per_category: tuple[CategoryCoreShare, ...]
    core_share: float
    """Mean over categories of the held-out core share."""
    core_share_ci: CI
    retention: float
    """Pooled held-out over in-sample circuit attribution (the circuits replicate when > 0)."""
    retention_ci: CI
    core_size: float
    """Mean number of core latents over the estimate's splits."""
    core_nonempty_fraction: float
    """Share of the estimate's splits whose core is non-empty."""
    core_nodes: tuple[int, ...]
    """Caller's node indices in the core in at least half of the estimate's splits."""
    k_per_site: int
    n_splits: int
    n_bootstrap: int
    seed: int
    rule: FeatureRule
    verdict: FeatureAnswer
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: tuples to lists, NaN to None."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(
            categories=list(self.categories),
            per_category=[c.to_dict() for c in self.per_category],
            core_share=finite_or_none(self.core_share),
            core_share_ci=_ci_to_json(self.core_share_ci),
            retention=finite_or_none(self.retention),
            retention_ci=_ci_to_json(self.retention_ci),
            core_nodes=list(self.core_nodes),
            rule=asdict(self.rule),
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoreShareTest:
        """The inverse of :meth:`to_dict`."""
        nan_if_none = {k: _nan_if_none(data[k]) for k in ("core_share", "retention")}
        return cls(
            categories=tuple(data["categories"]),
            per_category=tuple(CategoryCoreShare.from_dict(c) for c in data["per_category"]),
            core_share_ci=_ci_from_json(data["core_share_ci"]),
            retention_ci=_ci_from_json(data["retention_ci"]),
            core_size=float(data["core_size"]),
            core_nonempty_fraction=float(data["core_nonempty_fraction"]),
            core_nodes=tuple(int(n) for n in data["core_nodes"]),
            k_per_site=int(data["k_per_site"]),
            n_splits=int(data["n_splits"]),
            n_bootstrap=int(data["n_bootstrap"]),
            seed=int(data["seed"]),
            rule=FeatureRule(**data["rule"]),
            verdict=data["verdict"],
            reason=str(data["reason"]),
            **nan_if_none,
        )


@dataclass(frozen=True, kw_only=True)
class _SplitSums:
    """Per category and resample row (bootstrap draw, pooled over splits): held-out sums."""

    core: np.ndarray  # [n_cat, n_rows] signed held-out attribution on the core
    tail: np.ndarray  # [n_cat, n_rows] on the category's circuit outside the core
    held_out: np.ndarray  # [n_cat, n_rows] on the category's circuit
    in_sample: np.ndarray  # [n_cat, n_rows] on the category's circuit, selection half
    core_size: np.ndarray  # [n_rows, n_splits] latents in the core
    core_hits: np.ndarray  # [n_latents] splits of row 0 (the estimate) with the latent in the core


@dataclass(frozen=True, kw_only=True)
class _Halves:
    """One category's cross-fitting design: which prompts select, and the resampling weights."""

    in_selection: np.ndarray  # [n_rows, n_splits, n_prompts] bool
    selection: np.ndarray  # [n_rows, n_splits, n_prompts] weights, each row sums to 1
    measurement: np.ndarray  # [n_rows, n_splits, n_prompts] weights, each row sums to 1


def _halves(n_prompts: int, n_splits: int, n_bootstrap: int, seed: int, stream: int) -> _Halves:
    """Selection half ceil(n/2), measurement half floor(n/2), per split. Row 0 is the plain sample
    (uniform weights); rows 1.. are Bayesian-bootstrap draws (Dirichlet(1) over prompts), which
    never drop a prompt, so every half keeps weight however small the category. Every row draws
    its own splits, so the bootstrap spread includes the choice of split as well as the prompts."""
    prompts = np.tile(np.arange(n_prompts), (n_bootstrap + 1, n_splits, 1))
    order = rng_for(seed, _SPLITS, stream).permuted(prompts, axis=2)
    in_selection = np.zeros(prompts.shape, bool)
    np.put_along_axis(in_selection, order[..., : n_prompts - n_prompts // 2], True, axis=2)
    draws = rng_for(seed, _BOOT, stream).dirichlet(np.ones(n_prompts), size=n_bootstrap)
    w = np.concatenate([np.full((1, n_prompts), 1.0 / n_prompts), draws])[:, None, :]
    sel, meas = w * in_selection, w * ~in_selection
    return _Halves(
        in_selection=in_selection,
        selection=sel / sel.sum(-1, keepdims=True),
        measurement=meas / meas.sum(-1, keepdims=True),
    )


def _top_k_of_columns(
    means: np.ndarray,
    columns: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Of ``means [rows, columns.size]``: the k largest per row as latent ids and values."""
    if columns.size <= k:
        return np.broadcast_to(columns, means.shape).copy(), means
    top = np.argpartition(-means, k - 1, axis=1)[:, :k]
    return columns[top], np.take_along_axis(means, top, axis=1)


def _select_site(
    weights: np.ndarray, effects: np.ndarray, columns: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k latents of one site for weighted means ``weights [rows, n] @ effects [n, latents]``
    (weights convex, over one split's selection half), exactly, without forming every mean.

    A convex combination never exceeds the largest of its terms, so a latent whose largest effect is
    below a row's k-th best candidate mean cannot enter that row's top k. Candidates are the
    ``_CANDIDATES * k`` latents with the largest maximum; rows where that bound does not rule out
    the rest are recomputed over every latent."""
    upper = effects[:, columns].max(0)  # [n_site_latents]
    n_candidates = _CANDIDATES * k
    if columns.size <= n_candidates + k:
        return _top_k_of_columns(weights @ effects[:, columns], columns, k)
    order = np.argpartition(-upper, n_candidates)
    candidates, best_excluded = columns[order[:n_candidates]], upper[order[n_candidates]]
    ids, values = _top_k_of_columns(weights @ effects[:, candidates], candidates, k)
    unsure = np.flatnonzero(values.min(1) <= best_excluded)
    if unsure.size:
        full_means = weights[unsure] @ effects[:, columns]
        ids[unsure], values[unsure] = _top_k_of_columns(full_means, columns, k)
    return ids, values


def _circuits(
    halves: _Halves, effects: np.ndarray, rows: slice, site_columns: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Circuit latent ids ``[n_batch, n_splits, k * n_sites]`` chosen on the selection halves of
    ``rows``, and the circuits' in-sample attribution ``[n_batch, n_splits]``."""
    n_batch, n_splits = rows.stop - rows.start, halves.in_selection.shape[1]
    ids = np.empty((n_batch, n_splits, sum(min(k, c.size) for c in site_columns)), np.int64)
    in_sample = np.zeros((n_batch, n_splits))
    for split in range(n_splits):
        # measurement prompts have weight 0: the means stay convex combinations of the prompts
        weights = halves.selection[rows, split]  # [n_batch, n_prompts]
        at = 0
        for columns in site_columns:
            site_ids, values = _select_site(weights, effects, columns, k)
            ids[:, split, at : at + site_ids.shape[1]] = site_ids
            in_sample[:, split] += values.sum(1)
            at += site_ids.shape[1]
    return ids, in_sample


def _split_sums(
    E: dict[str, np.ndarray],
    site_of_latent: np.ndarray,
    *,
    k_per_site: int,
    min_categories: int,
    n_splits: int,
    n_bootstrap: int,
    seed: int,
) -> _SplitSums:
    """Cross-fitted sums for every (bootstrap draw, split), pooled over splits; batched over draws.
    Circuits and core are index sets, so held-out sums are gathered, never formed over every
    latent."""
    cats = list(E)
    halves = [_halves(E[c].shape[0], n_splits, n_bootstrap, seed, i) for i, c in enumerate(cats)]
    n_rows, n_latents = n_bootstrap + 1, site_of_latent.shape[0]
    site_columns = [np.flatnonzero(site_of_latent == s) for s in np.unique(site_of_latent)]
    sums = {k: np.zeros((len(cats), n_rows)) for k in ("core", "tail", "held_out", "in_sample")}
    core_size = np.zeros((n_rows, n_splits))
    core_hits = np.zeros(n_latents)
    step = max(1, _ROWS_PER_BATCH // n_splits)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        n_sub = (rows.stop - rows.start) * n_splits  # one sub-row per (draw, split)
        picks, counts = [], np.zeros((n_sub, n_latents), np.int32)
        for i, c in enumerate(cats):
            ids, in_sample = _circuits(halves[i], E[c], rows, site_columns, k_per_site)
            picks.append(ids.reshape(n_sub, -1))
            counts[np.arange(n_sub)[:, None], picks[i]] += 1  # the picks of a row are distinct
            sums["in_sample"][i, rows] = in_sample.sum(-1)
        core = counts >= min_categories  # [n_sub, n_latents]
        core_size[rows] = core.sum(-1).reshape(-1, n_splits)
        if start == 0:
            core_hits = core[:n_splits].sum(0)
        core_row, core_latent = np.nonzero(core)
        for i, c in enumerate(cats):
            meas = halves[i].measurement[rows].reshape(n_sub, -1)  # [n_sub, n_prompts]
            on_circuit = np.einsum("rn,nrk->rk", meas, E[c][:, picks[i]])  # held-out means
            outside_core = ~np.take_along_axis(core, picks[i], axis=1)
            on_core = np.einsum("rn,nr->r", meas[core_row], E[c][:, core_latent])
            per_key = {
                "core": np.bincount(core_row, on_core, minlength=n_sub),
                "held_out": on_circuit.sum(-1),
                "tail": (on_circuit * outside_core).sum(-1),
            }
            for key, value in per_key.items():
                sums[key][i, rows] = value.reshape(-1, n_splits).sum(-1)
    return _SplitSums(**sums, core_size=core_size, core_hits=core_hits)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den clipped to [0, 1]; NaN where den <= 0 (no replicated attribution to share)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.clip(num / np.where(den > 0, den, 1.0), 0.0, 1.0), np.nan)


def _centred_ci(
    draws: np.ndarray,
    estimate: float,
    confidence: float,
    df: int,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> CI:
    """estimate +- t(df) x the bootstrap standard error, clipped to ``bounds``.

    Centred on the estimate because the bootstrap distribution of a cross-fitted top-k statistic is
    shifted (reweighted prompts give noisier circuits); its spread is still a fair measure of the
    estimate's. Student's t because the standard error itself rests on a few prompts per category.
    Percentile intervals covered 0.62-0.86 on the planted worlds; these cover 0.92-0.96."""
    draws = draws[np.isfinite(draws)]
    if draws.size < 2 or not math.isfinite(estimate):
        return (math.nan, math.nan)
    half = float(stats.t.ppf(1 - (1 - confidence) / 2, max(df, 1))) * float(draws.std(ddof=1))
    return (max(estimate - half, bounds[0]), min(estimate + half, bounds[1]))


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN where a column has no finite value."""
    finite = np.isfinite(x)
    count = finite.sum(0)
    return np.where(count > 0, np.where(finite, x, 0.0).sum(0) / np.maximum(count, 1), np.nan)


def core_share_test(
    effects: dict[str, np.ndarray],
    site_of_node: np.ndarray,
    *,
    error_nodes: np.ndarray | None = None,
    k_per_site: int = 20,
    rule: FeatureRule = FeatureRule(),
    n_splits: int = 4,
    n_bootstrap: int = 50,
    seed: int = 0,
) -> CoreShareTest:
    """The cross-fitted shared-core share of every category and the feature-level verdict.

    ``effects[c]`` ``[n_prompts_c, n_nodes]``: attribution effects on the refusal score (at least 2
    prompts per category); ``site_of_node`` ``[n_nodes]``; ``error_nodes`` ``[n_nodes]`` bool, left
    out of every circuit (default: the last node of each site, the NodeIndex layout)."""
    if k_per_site < 1:
        raise ValueError(f"k_per_site must be >= 1, not {k_per_site}")
    if n_splits < 1 or n_bootstrap < 1:
        raise ValueError(f"n_splits ({n_splits}) and n_bootstrap ({n_bootstrap}) must be >= 1")
    E, site_of_latent, node_ids = latent_view(effects, site_of_node, error_nodes)
    cats = list(E)
    sums = _split_sums(
        E,
        site_of_latent,
        k_per_site=k_per_site,
        min_categories=rule.core_min_categories(len(cats)),
        n_splits=n_splits,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    shares = _ratio(sums.core, sums.core + sums.tail)  # [n_cat, n_rows]; row 0 is the estimate
    pooled = _nanmean_rows(shares)  # [n_rows]
    retention = _ratio_unclipped(sums.held_out.sum(0), sums.in_sample.sum(0))
    # "mixed" claims that two categories differ, so each category's interval is Bonferroni-adjusted
    # over the categories (family-wise level rule.confidence).
    per_category_level = 1 - (1 - rule.confidence) / len(cats)
    per_category = []
    for i, c in enumerate(cats):
        df = E[c].shape[0] - 1
        ci = _centred_ci(shares[i, 1:], float(shares[i, 0]), per_category_level, df, (0.0, 1.0))
        per_category.append(
            CategoryCoreShare(
                category=c,
                n_prompts=int(E[c].shape[0]),
                core_share=float(shares[i, 0]),
                core_share_ci=ci,
                retention=float(_ratio_unclipped(sums.held_out[i, :1], sums.in_sample[i, :1])[0]),
                region=region(ci, rule.margin),
            )
        )
    # pooled statistics average over categories: their standard error has n_categories - 1 df
    df = len(cats) - 1
    share_ci = _centred_ci(pooled[1:], float(pooled[0]), rule.confidence, df, (0.0, 1.0))
    retention_ci = _centred_ci(retention[1:], float(retention[0]), rule.confidence, df)
    verdict, reason = verdict_features(
        share_ci, {c.category: c.core_share_ci for c in per_category}, retention_ci, rule
    )
    return CoreShareTest(
        categories=tuple(cats),
        per_category=tuple(per_category),
        core_share=float(pooled[0]),
        core_share_ci=share_ci,
        retention=float(retention[0]),
        retention_ci=retention_ci,
        core_size=float(sums.core_size[0].mean()),
        core_nonempty_fraction=float((sums.core_size[0] > 0).mean()),
        core_nodes=tuple(int(n) for n in node_ids[sums.core_hits * 2 >= n_splits]),
        k_per_site=k_per_site,
        n_splits=n_splits,
        n_bootstrap=n_bootstrap,
        seed=seed,
        rule=rule,
        verdict=verdict,
        reason=reason,
    )


def _ratio_unclipped(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den; NaN where den <= 0 (circuits that carry no in-sample attribution)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
