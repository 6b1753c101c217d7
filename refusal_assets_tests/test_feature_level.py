"""The feature-level test and its verdict on planted worlds at the real per-category counts."""

import json
import math

import numpy as np
import pytest

from refusal_assets.analysis import decoder_directions
from refusal_assets.analysis import feature_level as fl
from refusal_assets.analysis.feature_calibration import (
    REAL_COUNTS,
    WORLDS,
    PlantDesign,
    calibrate_feature_level,
    planted_effects,
)

DESIGN = PlantDesign()


def _world(world: str, seed: int = 0) -> dict[str, np.ndarray]:
    return planted_effects(world, REAL_COUNTS, DESIGN, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def calibration():
    return calibrate_feature_level(n_replicates=3, seed=0)


def test_planted_worlds_come_back_right_at_the_real_counts(calibration):
    assert set(calibration.worlds) == set(WORLDS)
    assert calibration.counts == REAL_COUNTS
    for name, world in calibration.worlds.items():
        features = world.features
        assert features.false_answer_rate == 0.0, (name, features.answers)
        assert features.power >= 2 / 3, (name, features.answers)
        assert sum(features.answers.values()) == world.n_replicates == 3
    assert calibration.votes


def test_the_core_is_the_planted_shared_set():
    mono = fl.core_share_test(_world("monolithic"), DESIGN.site_of_node(), seed=0)
    two_level = fl.core_share_test(_world("two_level"), DESIGN.site_of_node(), seed=0)
    modular = fl.core_share_test(_world("modular"), DESIGN.site_of_node(), seed=0)
    assert mono.core_share > 0.75 and modular.core_share < 0.05
    assert 0.25 < two_level.core_share < 0.75
    # two_level plants 4 core latents at the last site; the core found there is about that size
    assert 2 <= two_level.core_size <= 6
    last_site_start = DESIGN.latents_per_site + 1
    assert all(n >= last_site_start for n in two_level.core_nodes)
    assert modular.core_size < 1


def test_pure_noise_does_not_replicate():
    rule = fl.FeatureRule()
    shares = {"a": (0.0, 0.0), "b": (0.0, 0.0)}
    answer, reason = fl.verdict_features((0.0, 0.0), shares, (-0.05, 0.3), rule)
    assert answer == "insufficient evidence" and "do not replicate" in reason
    # the same shares with replicating circuits are a modular answer
    assert fl.verdict_features((0.0, 0.0), {"a": (0.0, 0.0)}, (0.5, 0.8), rule)[0] == "modular"


def _mirror(ci):
    return (1 - ci[1], 1 - ci[0])


MIRRORED = {
    "monolithic": "modular",
    "modular": "monolithic",
    "shared core + specific tail": "shared core + specific tail",
    "mixed": "mixed",
    "insufficient evidence": "insufficient evidence",
}


def test_the_rule_is_symmetric_in_shared_and_specific():
    rng = np.random.default_rng(0)
    rule = fl.FeatureRule()
    seen = set()
    for _ in range(2000):
        lo = rng.uniform(0, 1, 11)
        hi = np.minimum(1, lo + rng.exponential(0.1, 11))
        pooled, cats = (lo[0], hi[0]), {f"c{i}": (lo[i], hi[i]) for i in range(1, 11)}
        retention = (0.5, 0.9)
        answer, _ = fl.verdict_features(pooled, cats, retention, rule)
        mirrored_cats = {c: _mirror(ci) for c, ci in cats.items()}
        mirrored, _ = fl.verdict_features(_mirror(pooled), mirrored_cats, retention, rule)
        assert mirrored == MIRRORED[answer]
        seen.add(answer)
    assert seen == set(MIRRORED)  # every answer was reached, so the check covered each branch
    swap = {
        "shared": "specific",
        "specific": "shared",
        "partial": "partial",
        "undecided": "undecided",
    }
    for ci in [(0.8, 0.9), (0.1, 0.2), (0.3, 0.6), (0.2, 0.9), (0.74, 0.76)]:
        assert fl.region(_mirror(ci), rule.margin) == swap[fl.region(ci, rule.margin)]


def test_the_margin_moves_both_answers_alike():
    narrow, wide = fl.FeatureRule(margin=0.1), fl.FeatureRule(margin=0.3)
    assert fl.region((0.8, 0.85), narrow.margin) == "partial"
    assert fl.region((0.8, 0.85), wide.margin) == "shared"
    assert fl.region((0.15, 0.2), narrow.margin) == "partial"
    assert fl.region((0.15, 0.2), wide.margin) == "specific"


def test_typed_results_round_trip():
    result = fl.core_share_test(_world("two_level"), DESIGN.site_of_node(), seed=1, n_bootstrap=20)
    data = json.loads(json.dumps(result.to_dict()))
    back = fl.CoreShareTest.from_dict(data)
    assert back == result
    assert back.to_dict() == result.to_dict()
    assert isinstance(back.rule, fl.FeatureRule)
    assert isinstance(back.per_category[0], fl.CategoryCoreShare)


def test_calibration_json_is_keyed_by_world_with_features(calibration):
    data = json.loads(calibration.to_json())
    for world in WORLDS:
        features = data["worlds"][world]["features"]
        assert {"power", "false_answer_rate", "votes", "answers", "planted_answer"} <= set(features)
    assert data["worlds"]["no_signal"]["features"]["planted_core_share"] is None
    assert data["votes"] is True and data["counts"] == REAL_COUNTS


def test_the_pruned_top_k_equals_the_full_one():
    rng = np.random.default_rng(3)
    effects = rng.standard_t(2, (5, 400))
    weights = rng.dirichlet(np.ones(5), 64)
    columns = np.arange(400)
    ids, values = fl._select_site(weights, effects, columns, 7)
    full = weights @ effects
    expected = np.sort(np.argsort(-full, axis=1)[:, :7], axis=1)
    assert np.array_equal(np.sort(ids, axis=1), expected)
    expected_values = np.take_along_axis(full, expected, 1)
    assert np.allclose(np.sort(values, axis=1), np.sort(expected_values, axis=1))


def test_decoder_directions_tell_the_shared_site_from_the_specific_one():
    rng = np.random.default_rng(0)
    decoders = [rng.normal(size=(DESIGN.latents_per_site, 32)) for _ in range(DESIGN.n_sites)]
    site = DESIGN.site_of_node()
    two_level = decoder_directions.compare_decoder_directions(
        _world("two_level", 1), site, decoders
    )
    modular = decoder_directions.compare_decoder_directions(_world("modular", 1), site, decoders)
    assert two_level.median_normalised_cosine[1] > 0.6  # the shared core sits at the last site
    assert two_level.median_normalised_cosine[0] < 0.3  # the upstream tail is category-specific
    assert max(modular.median_normalised_cosine.values()) < 0.3
    assert len(two_level.pairs) == 2 * math.comb(len(REAL_COUNTS), 2)
    assert all(p.half_size == min(REAL_COUNTS[p.a], REAL_COUNTS[p.b]) // 2 for p in two_level.pairs)
    assert json.loads(json.dumps(two_level.to_dict()))["categories"] == sorted(REAL_COUNTS)


def test_bad_input_is_a_clear_error():
    site = np.repeat([0, 1], 4)
    good = np.zeros((3, 8))
    with pytest.raises(ValueError, match="'hate'.*shape"):
        fl.core_share_test({"hate": np.zeros((3, 7)), "illegal": good}, site)
    with pytest.raises(ValueError, match=r"effects\['hate'\] is empty"):
        fl.core_share_test({"hate": np.zeros((0, 8)), "illegal": good}, site)
    with pytest.raises(ValueError, match=r"effects\['hate'\] has 1 prompts"):
        fl.core_share_test({"hate": np.zeros((1, 8)), "illegal": good}, site)
    with pytest.raises(ValueError, match=r"effects\['hate'\] holds non-finite"):
        fl.core_share_test({"hate": np.full((3, 8), np.nan), "illegal": good}, site)
    with pytest.raises(ValueError, match="at least 2 categories"):
        fl.core_share_test({"hate": good}, site)
    with pytest.raises(ValueError, match="error_nodes"):
        fl.core_share_test({"hate": good, "illegal": good}, site, error_nodes=np.zeros(7, bool))
    with pytest.raises(ValueError, match="decoder of site 1"):
        wrong_sizes = [np.zeros((3, 4)), np.zeros((2, 4))]
        decoder_directions.compare_decoder_directions(
            {"hate": good, "illegal": good}, site, wrong_sizes
        )
    with pytest.raises(ValueError, match="margin"):
        fl.FeatureRule(margin=0.5)
    with pytest.raises(ValueError, match=r"counts\['hate'\]"):
        calibrate_feature_level(n_replicates=1, counts={"hate": 1, "illegal": 4})


def test_the_order_of_the_categories_does_not_matter():
    effects = _world("two_level", 2)
    reordered = dict(reversed(list(effects.items())))
    first = fl.core_share_test(effects, DESIGN.site_of_node(), seed=5, n_bootstrap=10)
    second = fl.core_share_test(reordered, DESIGN.site_of_node(), seed=5, n_bootstrap=10)
    assert first == second
