"""Calibration of the feature-level test on planted worlds at the real sample.

The default run has 10 harm categories with 3-9 score-positive toxic prompts each
(:data:`REAL_COUNTS`) and about 3,600 SAE latents over 2 sites plus one error node per site.
Every planted world is built at those sizes, with effects that are harder than i.i.d. Gaussian
noise:

* **sparse, heavy-tailed magnitudes**: a mechanism's latents have log-normal mean effects (sd 1 on
  the log scale), and each fires on a prompt with probability 0.85, with log-normal size noise;
* **per-prompt correlated noise**: a log-normal scale per prompt multiplies all of its latents,
  and a rank-3 nuisance factor moves a fixed set of 200 latents together (zero mean, both signs);
* **background**: 150 random latents per prompt get Student-t(3) effects of both signs, and every
  latent gets a little Gaussian noise; each category's strength varies (log-normal, sd 0.3);
* **harm-topic latents in every world**: each category has its own 3 topic latents per site. They
  fire reliably but carry only ``topic_budget`` (0.15) of the attribution of the refusal mechanism.
  They are harm-topic detectors, not refusal machinery, so they differ between categories even
  where the refusal step is shared.

Worlds (attribution budgets relative to the mechanism's 1.0):

* ``monolithic``: one shared set of refusal latents (12 per site) carries budget 1 in every
  category.
  The strengths of the shared latents vary by category (log-normal jitter, sd 0.3). Planted answer:
  "monolithic".
* ``modular``: each category has its own refusal latents (12 per site), none shared. Planted answer:
  "modular".
* ``two_level``: a small shared core (4 latents at the last site, budget 0.8) plus a
  category-specific upstream tail (10 latents per site, budget 1) that carries most of the
  attribution. Planted answer: "shared core + specific tail".
* ``no_signal``: no planted latents at all, only the noise above (no topics either). Planted
  answer: "insufficient evidence"; every decided answer is false.

For each world and replicate, :func:`refusal_assets.analysis.feature_level.core_share_test` gives
an answer. ``power`` is the share of replicates that give the planted answer. ``false_answer_rate``
is the share that give a different decided answer (monolithic, modular or core + tail). "mixed" and
"insufficient evidence" are neither false nor power. ``votes`` holds when the false-answer rate is
at most :data:`MAX_FALSE_ANSWER_RATE`.

How the thresholds were chosen: by meaning, before any real result was looked at, and then
checked here. The margin 0.25 says that a part carrying under a quarter of a circuit's attribution
does not count. A latent is core when it is in the circuits of half the categories. Intervals are at
95%, and circuits must keep a tenth of their attribution on held-out prompts. At these values, 50
replicates per world (seed 0) gave power 0.94 / 1.00 / 1.00 / 1.00 (monolithic / modular /
two_level / no_signal), false-answer rate 0 in every world, and core-share CI coverage 0.92-0.96.
Harder variants (seed 1, 50 replicates) kept every false-answer rate at or below 0.02, and the lost
power went to "insufficient evidence". The variants were: topic latents carrying 0.3 (planted
monolithic share 0.77, just above the 0.75 bound: monolithic power 0.16), twice the background noise
(monolithic power 0.34), firing probability 0.6 (monolithic power 0.70), and a weaker two-level core
of 0.5 (two_level power 0.84). Monolithic is the hardest answer to reach at 3-9 prompts.
The percentile intervals tried first covered only 0.62-0.86, and one overconfident small category
could call "mixed". The intervals became centred t intervals with fresh splits per draw, and "mixed"
now needs two categories per region. No threshold was changed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from refusal_assets.analysis.feature_level import FeatureAnswer, FeatureRule, core_share_test

World = Literal["monolithic", "modular", "two_level", "no_signal"]
WORLDS: tuple[World, ...] = ("monolithic", "modular", "two_level", "no_signal")
PLANTED_ANSWER: dict[World, FeatureAnswer] = {
    "monolithic": "monolithic",
    "modular": "modular",
    "two_level": "shared core + specific tail",
    "no_signal": "insufficient evidence",
}
DECIDED: tuple[FeatureAnswer, ...] = ("monolithic", "modular", "shared core + specific tail")
MAX_FALSE_ANSWER_RATE = 0.10

REAL_COUNTS: dict[str, int] = {
    "deception": 6,
    "harassment": 4,
    "harmful": 4,
    "hate": 3,
    "illegal": 9,
    "privacy": 6,
    "self-harm": 4,
    "sexual": 5,
    "unethical": 6,
    "violence": 4,
}
"""Score-positive toxic prompts per category in the default run (the behaviour asset)."""


@dataclass(frozen=True, kw_only=True)
class PlantDesign:
    """Sizes and noise of the planted worlds (defaults: the default run's dictionary sizes)."""

    latents_per_site: int = 1800
    n_sites: int = 2
    k_per_site: int = 20
    mechanism_per_site: int = 12
    """Refusal latents per site: the shared set (monolithic) or each category's own (modular)."""
    core_latents: int = 4
    """two_level: shared core latents, all at the last site (the execution step)."""
    core_budget: float = 0.8
    tail_per_site: int = 10
    """two_level: each category's own upstream latents per site (budget 1)."""
    topic_per_site: int = 3
    topic_budget: float = 0.15
    fire_probability: float = 0.85
    magnitude_sigma: float = 1.0
    """Log-normal sd of latent mean effects within a set (the heavy tail)."""
    size_sigma: float = 0.5
    """Log-normal sd of a firing latent's size on one prompt."""
    prompt_sigma: float = 0.5
    """Log-normal sd of the per-prompt scale shared by all of a prompt's latents."""
    category_sigma: float = 0.3
    """Log-normal sd of a category's overall strength and of the shared latents' per-category
    jitter."""
    background_per_prompt: int = 150
    background_scale: float = 0.01
    nuisance_rank: int = 3
    nuisance_latents: int = 200
    nuisance_scale: float = 0.01
    dense_noise: float = 0.002

    @property
    def n_nodes(self) -> int:
        return self.n_sites * (self.latents_per_site + 1)

    def site_of_node(self) -> np.ndarray:
        """[n_nodes]: each site's latents, then its error node (the NodeIndex layout)."""
        return np.repeat(np.arange(self.n_sites), self.latents_per_site + 1)

    def planted_core_share(self, world: World) -> float:
        """The share of circuit attribution on the shared part if circuits held exactly the planted
        latents: shared / (shared + category-specific)."""
        if world == "no_signal":
            return math.nan
        shared = {"monolithic": 1.0, "modular": 0.0, "two_level": self.core_budget}[world]
        specific = self.topic_budget + (1.0 if world != "monolithic" else 0.0)
        return shared / (shared + specific)


# --------------------------------------------------------------------------------- planted worlds


@dataclass(frozen=True, kw_only=True)
class _LatentSets:
    """Node ids of every planted set of one replicate (disjoint, drawn at random per site)."""

    shared: np.ndarray  # [mechanism_per_site * n_sites]
    own: np.ndarray  # [n_categories, mechanism_per_site * n_sites]
    topic: np.ndarray  # [n_categories, topic_per_site * n_sites]
    core: np.ndarray  # [core_latents], last site
    tail: np.ndarray  # [n_categories, tail_per_site * n_sites]
    nuisance: np.ndarray  # [nuisance_latents], anywhere


def _latent_sets(design: PlantDesign, n_categories: int, rng: np.random.Generator) -> _LatentSets:
    per_site = {
        "shared": design.mechanism_per_site,
        "own": n_categories * design.mechanism_per_site,
    }
    per_site |= {
        "topic": n_categories * design.topic_per_site,
        "tail": n_categories * design.tail_per_site,
    }
    need = sum(per_site.values()) + design.core_latents
    if need > design.latents_per_site:
        have = design.latents_per_site
        raise ValueError(f"the planted sets need {need} latents per site; the design has {have}")
    taken: dict[str, list[np.ndarray]] = {name: [] for name in per_site}
    for site in range(design.n_sites):
        ids = site * (design.latents_per_site + 1) + rng.permutation(design.latents_per_site)
        at = 0
        for name, size in per_site.items():
            rows = 1 if name == "shared" else n_categories
            taken[name].append(ids[at : at + size].reshape(rows, -1))
            at += size
        if site == design.n_sites - 1:
            core = ids[at : at + design.core_latents]
    site = design.site_of_node()
    latents = np.flatnonzero(site[1:] == site[:-1])  # every node but the error nodes
    return _LatentSets(
        shared=np.concatenate(taken["shared"], axis=1).ravel(),
        own=np.concatenate(taken["own"], axis=1),
        topic=np.concatenate(taken["topic"], axis=1),
        core=core,
        tail=np.concatenate(taken["tail"], axis=1),
        nuisance=rng.choice(latents, design.nuisance_latents, replace=False),
    )


def _magnitudes(size: int, budget: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Log-normal (heavy-tailed) mean effects of one set, summing to ``budget``."""
    m = rng.lognormal(0.0, sigma, size)
    return budget * m / m.sum()


def _mean_effects(
    world: World,
    design: PlantDesign,
    sets: _LatentSets,
    rng: np.random.Generator,
) -> np.ndarray:
    """Planted mean effects ``[n_categories, n_nodes]`` of every category in ``world``."""
    n_categories = sets.topic.shape[0]
    mean = np.zeros((n_categories, design.n_nodes))
    if world == "no_signal":
        return mean
    sigma = design.magnitude_sigma
    shared = _magnitudes(sets.shared.size, 1.0, sigma, rng)
    core = _magnitudes(sets.core.size, design.core_budget, sigma, rng)
    for c in range(n_categories):
        mean[c, sets.topic[c]] = _magnitudes(sets.topic.shape[1], design.topic_budget, sigma, rng)
        if world == "monolithic":  # the same latents, with per-category strengths, same total
            jitter = shared * rng.lognormal(0.0, design.category_sigma, shared.size)
            mean[c, sets.shared] = jitter / jitter.sum()
        elif world == "modular":
            mean[c, sets.own[c]] = _magnitudes(sets.own.shape[1], 1.0, sigma, rng)
        else:
            jitter = core * rng.lognormal(0.0, design.category_sigma, core.size)
            mean[c, sets.core] = design.core_budget * jitter / jitter.sum()
            mean[c, sets.tail[c]] = _magnitudes(sets.tail.shape[1], 1.0, sigma, rng)
    strength = rng.lognormal(0.0, design.category_sigma, (n_categories, 1))
    return mean * strength


def _prompt_effects(
    mean: np.ndarray,
    n_prompts: int,
    design: PlantDesign,
    sets: _LatentSets,
    rng: np.random.Generator,
) -> np.ndarray:
    """Per-prompt effects ``[n_prompts, n_nodes]`` around one category's planted means
    ``[n_nodes]``: sparse firing with log-normal sizes scaled per prompt, nuisance factors,
    background and noise.
    Firing and size noise are normalised so that the expected effect is the planted mean."""
    n_nodes = mean.size
    p, s_size, s_prompt = design.fire_probability, design.size_sigma, design.prompt_sigma
    fire = rng.random((n_prompts, n_nodes)) < p
    size = rng.lognormal(-(s_size**2) / 2, s_size, (n_prompts, n_nodes))
    scale = rng.lognormal(-(s_prompt**2) / 2, s_prompt, (n_prompts, 1))
    effects = scale * mean * fire * size / p
    loadings = rng.normal(0.0, design.nuisance_scale, (design.nuisance_rank, sets.nuisance.size))
    effects[:, sets.nuisance] += rng.normal(size=(n_prompts, design.nuisance_rank)) @ loadings
    hits = rng.integers(0, n_nodes, (n_prompts, design.background_per_prompt))
    np.add.at(
        effects,
        (np.repeat(np.arange(n_prompts), design.background_per_prompt), hits.ravel()),
        design.background_scale * rng.standard_t(3, hits.size),
    )
    effects += rng.normal(0.0, design.dense_noise, effects.shape)
    error_nodes = np.flatnonzero(np.diff(np.append(design.site_of_node(), -1)) != 0)
    # the error nodes: what the SAE misses (left out of every circuit)
    effects[:, error_nodes] = rng.normal(0.2, 0.1, (n_prompts, error_nodes.size))
    return effects


def planted_effects(
    world: World, counts: dict[str, int], design: PlantDesign, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One replicate of ``world``: per category ``[counts[c], n_nodes]`` attribution effects."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {WORLDS}")
    categories = sorted(counts)
    sets = _latent_sets(design, len(categories), rng)
    mean = _mean_effects(world, design, sets, rng)
    effects = {}
    for c, row in zip(categories, mean):
        effects[c] = _prompt_effects(row, counts[c], design, sets, rng)
    return effects


# ----------------------------------------------------------------------------------- calibration


@dataclass(frozen=True, kw_only=True)
class FeatureCalibration:
    """How the feature-level test answers one planted world over its replicates."""

    planted_answer: FeatureAnswer
    answers: dict[str, int]
    """Recovered answer -> replicates."""
    power: float
    """Share of replicates giving the planted answer."""
    false_answer_rate: float
    """Share giving a different decided answer ("mixed" and "insufficient evidence" are not
    false)."""
    votes: bool
    """false_answer_rate <= MAX_FALSE_ANSWER_RATE: the test may vote at this sample size."""
    mean_core_share: float
    """Mean point estimate of the core share over replicates."""
    planted_core_share: float
    """Shared / (shared + specific) attribution as planted (see PlantDesign.planted_core_share)."""
    core_share_coverage: float
    """Share of replicates whose 95% core-share CI contains the mean estimate over replicates (the
    statistic's expectation at this sample size); NaN with fewer than 2 finite estimates."""


@dataclass(frozen=True, kw_only=True)
class PlantedWorld:
    world: World
    n_replicates: int
    features: FeatureCalibration


@dataclass(frozen=True, kw_only=True)
class FeatureCalibrationReport:
    counts: dict[str, int]
    design: PlantDesign
    rule: FeatureRule
    n_replicates: int
    n_splits: int
    n_bootstrap: int
    seed: int
    worlds: dict[str, PlantedWorld] = field(default_factory=dict)
    """Keyed by world name: ``monolithic``, ``modular``, ``two_level``."""

    @property
    def votes(self) -> bool:
        """The feature-level test may vote: every world's false-answer rate is within bounds."""
        return all(w.features.votes for w in self.worlds.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; NaN to None."""
        out = asdict(self)
        for world in out["worlds"].values():
            features = world["features"]
            for key in ("mean_core_share", "planted_core_share", "core_share_coverage"):
                features[key] = features[key] if math.isfinite(features[key]) else None
        return {**out, "votes": self.votes, "max_false_answer_rate": MAX_FALSE_ANSWER_RATE}

    def to_json(self) -> str:
        """For ``refusal-assets calibrate --json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _coverage(intervals: list[tuple[float, float]], value: float) -> float:
    """Share of intervals that contain ``value`` (an undefined interval counts as a miss)."""
    tolerance = 1e-12  # an interval that is a point at the value contains it
    hits = [lo - tolerance <= value <= hi + tolerance for lo, hi in intervals]
    return float(np.mean(hits))


def calibrate_world(
    world: World,
    counts: dict[str, int],
    design: PlantDesign,
    rule: FeatureRule,
    *,
    n_replicates: int,
    n_splits: int,
    n_bootstrap: int,
    seed: int,
) -> PlantedWorld:
    """``n_replicates`` fresh samples of ``world``, each through :func:`core_share_test`."""
    planted = PLANTED_ANSWER[world]
    answers: dict[str, int] = {}
    shares, intervals = [], []
    for replicate in range(n_replicates):
        key = (WORLDS.index(world), replicate)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
        result = core_share_test(
            planted_effects(world, counts, design, rng),
            design.site_of_node(),
            k_per_site=design.k_per_site,
            rule=rule,
            n_splits=n_splits,
            n_bootstrap=n_bootstrap,
            seed=seed + replicate,
        )
        answers[result.verdict] = answers.get(result.verdict, 0) + 1
        shares.append(result.core_share)
        intervals.append(result.core_share_ci)
    false = sum(n for answer, n in answers.items() if answer in DECIDED and answer != planted)
    false_rate = false / n_replicates
    finite = [s for s in shares if math.isfinite(s)]
    expectation = float(np.mean(finite)) if finite else math.nan
    features = FeatureCalibration(
        planted_answer=planted,
        answers=dict(sorted(answers.items())),
        power=answers.get(planted, 0) / n_replicates,
        false_answer_rate=false_rate,
        votes=false_rate <= MAX_FALSE_ANSWER_RATE,
        mean_core_share=expectation,
        planted_core_share=design.planted_core_share(world),
        core_share_coverage=_coverage(intervals, expectation) if len(finite) > 1 else math.nan,
    )
    return PlantedWorld(world=world, n_replicates=n_replicates, features=features)


def calibrate_feature_level(
    n_replicates: int = 50,
    seed: int = 0,
    counts: dict[str, int] | None = None,
    *,
    design: PlantDesign = PlantDesign(),
    rule: FeatureRule = FeatureRule(),
    n_splits: int = 4,
    n_bootstrap: int = 50,
) -> FeatureCalibrationReport:
    """Every planted world at ``counts`` (default: :data:`REAL_COUNTS`) through the feature-level
    test."""
    counts = dict(REAL_COUNTS if counts is None else counts)
    if n_replicates < 1:
        raise ValueError(f"n_replicates must be >= 1, not {n_replicates}")
    for category, n in counts.items():
        if n < 2:
            need = "the test needs at least 2 prompts per category"
            raise ValueError(f"counts[{category!r}] is {n}; {need}")
    worlds = {
        world: calibrate_world(
            world,
            counts,
            design,
            rule,
            n_replicates=n_replicates,
            n_splits=n_splits,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
        for world in WORLDS
    }
    return FeatureCalibrationReport(
        counts=counts,
        design=design,
        rule=rule,
        n_replicates=n_replicates,
        n_splits=n_splits,
        n_bootstrap=n_bootstrap,
        seed=seed,
        worlds=worlds,
    )
