"""Dictionary-free companion of the feature-level test (a description, not a vote): per category
and site the effect-weighted decoder direction (sum over latents of mean effect x W_dec row),
compared across categories against split-half ceilings computed like with like (half of A vs half
of B, against half vs half within a category). See :mod:`refusal_assets.analysis.feature_level`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from refusal_assets.analysis.feature_level import HALVES, finite_or_none, latent_view, rng_for

# ------------------------------------------------------------ dictionary-free: decoder directions


@dataclass(frozen=True, kw_only=True)
class DirectionPair:
    """Two categories' effect-weighted decoder directions at one site, half sample against half."""

    a: str
    b: str
    site: int
    half_size: int
    """Prompts per half: min(n_a, n_b) // 2, for the cross cosine and both ceilings alike."""
    cross_cosine: float
    """Mean cosine of a half-sample direction of a with a half-sample direction of b."""
    ceiling_a: float
    """Mean cosine of two disjoint half-sample directions of a (its split-half reliability)."""
    ceiling_b: float
    normalised_cosine: float
    """cross / sqrt(ceiling_a * ceiling_b); NaN where a ceiling is below the minimum."""


@dataclass(frozen=True, kw_only=True)
class DecoderDirectionComparison:
    """A description, not a vote: do categories' attributions point the same way in the residual
    stream, whatever the dictionary's basis? (See the module docstring.)"""

    categories: tuple[str, ...]
    sites: tuple[int, ...]
    pairs: tuple[DirectionPair, ...]
    full_cosine: dict[int, tuple[tuple[float, ...], ...]]
    """Per site, cosines of the full-sample directions [n_cat][n_cat] (for display; not like
    with like)."""
    median_normalised_cosine: dict[int, float]
    """Per site, the median normalised cosine over pairs with usable ceilings (NaN if none)."""
    min_ceiling: float
    n_splits: int
    seed: int
    description: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: NaN to None, site keys as strings."""

        def clean(value: Any) -> Any:
            if isinstance(value, float):
                return finite_or_none(value)
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        return clean(asdict(self))


def _unit_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``[..., d]`` arrays; NaN where a row is zero."""
    norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (x * y).sum(-1) / np.where(norms > 0, norms, 1.0), np.nan)


def _two_halves(
    n: int,
    m: int,
    n_splits: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean weights ``[n_splits, n]`` of two disjoint random halves of m prompts each."""
    order = rng.permuted(np.tile(np.arange(n), (n_splits, 1)), axis=1)
    first, second = np.zeros((n_splits, n)), np.zeros((n_splits, n))
    np.put_along_axis(first, order[:, :m], 1.0 / m, axis=1)
    np.put_along_axis(second, order[:, m : 2 * m], 1.0 / m, axis=1)
    return first, second


def _pair_directions(
    proj_a: np.ndarray, proj_b: np.ndarray, n_splits: int, rng: np.random.Generator
) -> tuple[int, float, float, float]:
    """Half size, cross cosine and both ceilings for per-prompt directions ``[n, d]`` of a and b."""
    m = min(proj_a.shape[0], proj_b.shape[0]) // 2
    a1, a2 = _two_halves(proj_a.shape[0], m, n_splits, rng)
    b1, b2 = _two_halves(proj_b.shape[0], m, n_splits, rng)
    da1, da2, db1, db2 = a1 @ proj_a, a2 @ proj_a, b1 @ proj_b, b2 @ proj_b  # [n_splits, d]
    cross = np.nanmean(np.concatenate([_unit_cosine(da1, db1), _unit_cosine(da2, db2)]))
    return (
        m,
        float(cross),
        float(np.nanmean(_unit_cosine(da1, da2))),
        float(np.nanmean(_unit_cosine(db1, db2))),
    )


def _checked_decoders(
    decoders: Sequence[np.ndarray],
    site_of_latent: np.ndarray,
) -> list[np.ndarray]:
    sites = np.unique(site_of_latent)
    if len(decoders) != sites.size:
        raise ValueError(f"got {len(decoders)} decoders for {sites.size} sites; one W_dec per site")
    checked = []
    for site, w_dec in zip(sites, decoders):
        w_dec = np.asarray(w_dec, dtype=float)
        n_latents = int((site_of_latent == site).sum())
        if w_dec.ndim != 2 or w_dec.shape[0] != n_latents:
            expected = f"[{n_latents}, d_in]"
            raise ValueError(f"decoder of site {site} has shape {w_dec.shape}; expected {expected}")
        checked.append(w_dec)
    return checked


def compare_decoder_directions(
    effects: dict[str, np.ndarray],
    site_of_node: np.ndarray,
    decoders: Sequence[np.ndarray],
    *,
    error_nodes: np.ndarray | None = None,
    min_ceiling: float = 0.1,
    n_splits: int = 16,
    seed: int = 0,
) -> DecoderDirectionComparison:
    """Per category and site the effect-weighted decoder direction (sum over latents of mean
    effect x ``W_dec`` row); every pair compared half against half, with within-category
    split-half ceilings at the same half size. ``decoders[s]`` ``[n_latents_s, d_in]`` in site
    order."""
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, not {n_splits}")
    E, site_of_latent, _ = latent_view(effects, site_of_node, error_nodes)
    cats, sites = list(E), [int(s) for s in np.unique(site_of_latent)]
    w_decs = _checked_decoders(decoders, site_of_latent)
    pairs, full_cosine, median = [], {}, {}
    for s, w_dec in zip(sites, w_decs):
        columns = site_of_latent == s
        proj = {c: E[c][:, columns] @ w_dec for c in cats}  # per-prompt directions [n_c, d_in]
        full = np.stack([proj[c].mean(0) for c in cats])
        cosines = _unit_cosine(full[:, None], full[None])  # [n_cat, n_cat]
        full_cosine[s] = tuple(tuple(float(v) for v in row) for row in cosines)
        normalised = []
        for i, a in enumerate(cats):
            for j in range(i + 1, len(cats)):
                b = cats[j]
                rng = rng_for(seed, HALVES, s, i, j)
                m, cross, ceil_a, ceil_b = _pair_directions(proj[a], proj[b], n_splits, rng)
                usable = min(ceil_a, ceil_b) >= min_ceiling  # NaN compares False: unusable
                norm = cross / math.sqrt(ceil_a * ceil_b) if usable else math.nan
                normalised.append(norm)
                pairs.append(
                    DirectionPair(
                        a=a,
                        b=b,
                        site=s,
                        half_size=m,
                        cross_cosine=cross,
                        ceiling_a=ceil_a,
                        ceiling_b=ceil_b,
                        normalised_cosine=norm,
                    )
                )
        finite = [v for v in normalised if math.isfinite(v)]
        median[s] = float(np.median(finite)) if finite else math.nan
    return DecoderDirectionComparison(
        categories=tuple(cats),
        sites=tuple(sites),
        pairs=tuple(pairs),
        full_cosine=full_cosine,
        median_normalised_cosine=median,
        min_ceiling=min_ceiling,
        n_splits=n_splits,
        seed=seed,
        description=_describe_directions(pairs, sites, median, min_ceiling),
    )


def _describe_directions(
    pairs: list[DirectionPair], sites: list[int], median: dict[int, float], min_ceiling: float
) -> str:
    """One sentence per site: the median normalised cosine and how many pairs could be
    normalised."""
    parts = []
    for s in sites:
        at_site = [p for p in pairs if p.site == s]
        usable = sum(math.isfinite(p.normalised_cosine) for p in at_site)
        shown = f"{median[s]:.2f}" if math.isfinite(median[s]) else "undefined"
        parts.append(
            f"site {s}: median normalised cosine {shown} over {usable} of {len(at_site)} pairs "
            f"(the others have a split-half ceiling below {min_ceiling:g})"
        )
    return (
        "Effect-weighted decoder directions, half sample against half (1 = as alike as two halves "
        "of one category): " + "; ".join(parts) + "."
    )
