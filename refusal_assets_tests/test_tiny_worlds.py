"""The tiny model's planted worlds (attention on, trained SAEs, noisy directions) are recovered at
both levels by the real pipeline, and the calibration's JSON blocks carry the voting rule."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_world_answers(tiny_model, tiny_cfg):
    from refusal_assets.analysis.feature_calibration import REAL_COUNTS
    from refusal_assets.analysis.tiny_worlds import calibrate_tiny_worlds

    model, tok = tiny_model
    return calibrate_tiny_worlds(model, tok, tiny_cfg.models[0], REAL_COUNTS, n_replicates=1)


def test_two_level_is_monolithic_in_execution_and_not_in_features(tiny_world_answers):
    two = tiny_world_answers["two_level"]
    assert two.execution == ["monolithic"]
    assert two.features == ["shared core + specific tail"]
    assert 0.25 < two.core_share[0] < 0.75


@pytest.mark.parametrize("world", ["monolithic", "modular"])
def test_pure_worlds_are_right_at_both_levels(tiny_world_answers, world):
    answers = tiny_world_answers[world]
    assert answers.execution == [world] and answers.features == [world]


def test_rates_and_votes():
    from refusal_assets.analysis.tiny_worlds import EXPECTED_FEATURES, rates_of

    rates = rates_of(
        {
            "monolithic": ["monolithic", "insufficient evidence"],
            "modular": ["modular", "modular"],
            "two_level": ["monolithic", "shared core + specific tail"],
        },
        EXPECTED_FEATURES,
    )
    assert rates.power == {"monolithic": 0.5, "modular": 1.0, "two_level": 0.5}
    assert rates.false_answer_rate == {"monolithic": 0.0, "modular": 0.0, "two_level": 0.5}
    assert not rates.votes and not rates.to_dict()["votes"]


def test_worlds_passed_reads_every_rule():
    from refusal_assets.analysis.calibration import worlds_passed

    def report(two_features: str, false_rate: float, votes: bool) -> dict:
        worlds = {w: {"execution": w, "features": w} for w in ("monolithic", "modular")}
        worlds["two_level"] = {"execution": "monolithic", "features": two_features}
        test = {"votes": votes, "false_answer_rate": {"two_level": false_rate}}
        return {"worlds": worlds, "tests": {"t": test}}

    assert worlds_passed(report("shared core + specific tail", 0.0, True))
    assert not worlds_passed(report("monolithic", 0.0, True))
    assert not worlds_passed(report("shared core + specific tail", 0.2, True))
    assert worlds_passed(report("shared core + specific tail", 0.2, False))
