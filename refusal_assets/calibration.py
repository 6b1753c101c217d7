"""Calibration of the comparison on planted answers (``refusal-assets calibrate --json``).

Synthetic per-prompt node effects with a known answer: ``monolithic`` (every category draws its
prompts from one mechanism: the same latent means) and ``modular`` (each category its own disjoint
latents). Latent strengths follow a decaying spectrum, so the top-k boundary is noisy and the
statistics vary from replicate to replicate; that is what makes CI coverage measurable.

Coverage of a CI statistic = the share of (replicate, pair) CIs that contain the statistic's
expectation at this sample size, estimated by the mean of its point estimates over the replicates
(the quantity a replicate's CI is an interval for). The normalised Jaccard's expectation under
identical categories must be ~1 (numerator and ceiling at the same size).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from refusal_assets.comparison import VerdictRule, compare_categories

Planted = Literal["monolithic", "modular"]
CI_STATS = ("jaccard", "normalised_jaccard", "shared_fraction")


@dataclass(frozen=True)
class SyntheticDesign:
    """Sizes of one synthetic comparison (defaults: the default config's per-category sample)."""

    n_categories: int = 4
    n_prompts: int = 14
    n_sites: int = 2
    n_latents: int = 64
    n_strong: int = 12
    """Latents per site that carry a category's mechanism (the spectrum decays over them)."""
    k_per_site: int = 8
    noise: float = 0.2
    """Per-prompt noise sd, relative to the strongest latent's mean effect (1.0)."""


def planted_effects(planted: Planted, design: SyntheticDesign, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per category ``[n_prompts, n_sites * n_latents]`` effects of the planted mechanism."""
    spectrum = np.exp(-np.arange(design.n_strong) / 4.0)  # 1, 0.78, 0.61, ...: a noisy top-k boundary
    out = {}
    for c in range(design.n_categories):
        start = 0 if planted == "monolithic" else c * design.n_strong
        if start + design.n_strong > design.n_latents:
            raise ValueError(f"modular design needs n_latents >= n_categories * n_strong = {design.n_categories * design.n_strong}")
        mean = np.zeros((design.n_sites, design.n_latents))
        mean[:, start : start + design.n_strong] = spectrum
        out[f"cat{c}"] = mean.ravel() + rng.normal(0.0, design.noise, (design.n_prompts, mean.size))
    return out


@dataclass(frozen=True)
class PlantedRun:
    planted: Planted
    n_replicates: int
    verdicts: dict[str, int]
    """Verdict -> replicates."""
    correct_fraction: float
    coverage: dict[str, float]
    """CI statistic -> share of CIs that contain its expectation."""
    expectation: dict[str, float]
    """CI statistic -> mean point estimate over replicates and pairs."""
    estimate_inside_ci: bool
    """Every point estimate lies inside its own CI."""


@dataclass(frozen=True)
class CalibrationReport:
    design: SyntheticDesign
    runs: list[PlantedRun]
    normalised_expectation_identical: float
    """Mean normalised Jaccard under identical categories (the monolithic plant): should be ~1."""
    params: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (all(r.correct_fraction >= 0.9 for r in self.runs)
                and all(v >= 0.9 for r in self.runs for v in r.coverage.values() if math.isfinite(v))
                and all(r.estimate_inside_ci for r in self.runs)
                and abs(self.normalised_expectation_identical - 1) <= 0.1)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _pair_values(result, stat: str) -> list[tuple[float, float, float]]:
    if stat == "shared_fraction":
        return [(result.shared_fraction, *result.shared_fraction_ci)]
    return [(getattr(p, stat), *getattr(p, f"{stat}_ci")) for p in result.pairs]


def run_planted(planted: Planted, design: SyntheticDesign, *, n_replicates: int, n_permutations: int, n_bootstrap: int,
                seed: int = 0, rule: VerdictRule | None = None) -> tuple[PlantedRun, list]:
    """``n_replicates`` fresh samples of one planted answer, each through the full comparison."""
    rule = rule or VerdictRule()
    site_of_node = np.repeat(np.arange(design.n_sites), design.n_latents)
    values: dict[str, list[tuple[float, float, float]]] = {s: [] for s in CI_STATS}
    verdicts: dict[str, int] = {}
    for r in range(n_replicates):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0 if planted == "monolithic" else 1, r)))
        result = compare_categories(planted_effects(planted, design, rng), site_of_node, mode="topk", k_per_site=design.k_per_site,
                                    n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed + r, rule=rule)
        verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
        for s in CI_STATS:
            values[s].extend(_pair_values(result, s))
    coverage, expectation, inside = {}, {}, True
    for s, rows in values.items():
        arr = np.array(rows, dtype=float)  # [n, 3]: estimate, lo, hi
        ok = np.isfinite(arr).all(axis=1)
        arr = arr[ok]
        if not len(arr):
            coverage[s] = expectation[s] = math.nan
            continue
        truth = float(arr[:, 0].mean())
        expectation[s] = truth
        coverage[s] = float(((arr[:, 1] <= truth + 1e-12) & (truth - 1e-12 <= arr[:, 2])).mean())
        inside &= bool(((arr[:, 1] <= arr[:, 0] + 1e-12) & (arr[:, 0] <= arr[:, 2] + 1e-12)).all())
    return PlantedRun(planted, n_replicates, verdicts, verdicts.get(planted, 0) / n_replicates, coverage, expectation, inside), values["normalised_jaccard"]


def calibrate_synthetic(design: SyntheticDesign = SyntheticDesign(), *, n_replicates: int = 200, n_permutations: int = 200,
                        n_bootstrap: int = 200, seed: int = 0, rule: VerdictRule | None = None) -> CalibrationReport:
    """Both planted answers at ``design``'s sizes; see the module docstring for what is measured."""
    rule = rule or VerdictRule()
    runs, norm_identical = [], math.nan
    for planted in ("monolithic", "modular"):
        run, norm = run_planted(planted, design, n_replicates=n_replicates, n_permutations=n_permutations, n_bootstrap=n_bootstrap,
                                seed=seed, rule=rule)
        runs.append(run)
        if planted == "monolithic":
            est = np.array([v[0] for v in norm], dtype=float)
            norm_identical = float(np.nanmean(est)) if np.isfinite(est).any() else math.nan
    return CalibrationReport(design, runs, norm_identical, dict(n_replicates=n_replicates, n_permutations=n_permutations,
                                                                 n_bootstrap=n_bootstrap, seed=seed, **asdict(rule)))


def design_from_config(cfg) -> SyntheticDesign:
    """The default design at the config's per-category sample size (toxic prompts per category)."""
    return SyntheticDesign(n_prompts=int(cfg.data.sampling.max_per_cell))


def run_calibrate(cfg, *, as_json: bool, n_replicates: int) -> int:
    """``refusal-assets calibrate``: prints verdicts and coverages; exit 0 when every check holds, 1 otherwise."""
    import json

    comp = cfg.comparison
    report = calibrate_synthetic(design_from_config(cfg), n_replicates=n_replicates, n_permutations=min(comp.n_permutations, 200),
                                 n_bootstrap=min(comp.n_bootstrap, 200), seed=comp.seed, rule=VerdictRule.from_config(comp))
    out = {"synthetic": report.to_dict(), "passed": report.passed}
    if as_json:
        print(json.dumps(out, default=float))
    else:
        for r in report.runs:
            print(f"planted {r.planted}: verdicts {r.verdicts}; coverage {r.coverage}; point inside CI {r.estimate_inside_ci}")
        print(f"normalised Jaccard under identical categories: {report.normalised_expectation_identical:.3f}; passed: {report.passed}")
    return 0 if report.passed else 1
