"""The rules behind the WARN checks, on plain numbers: each fires on a weak result and passes a sound one."""

import math

from refusal_assets.analysis import weak_results as weak

NAN = (math.nan, math.nan)


def test_denominator_ci_including_zero_warns():
    f = weak.denominator_excludes_zero(0.01, (-0.02, 0.04))
    assert not f.passed and "includes 0" in f.why
    assert f.values == {"m_full_minus_m_empty": 0.01, "ci_lo": -0.02, "ci_hi": 0.04}
    assert not weak.denominator_excludes_zero(0.01, NAN).passed  # no CI: distance from 0 unknown


def test_denominator_ci_away_from_zero_passes():
    assert weak.denominator_excludes_zero(1.5, (0.9, 2.1)).passed
    assert weak.denominator_excludes_zero(
        -1.5, (-2.1, -0.9)
    ).passed  # a negative denominator is far from 0 too


def test_faithfulness_not_above_random_warns():
    f = weak.faithfulness_beats_random(0.6, (0.2, 0.9), 0.5, (-0.1, 0.3))
    assert (
        not f.passed and "no better than a random" in f.why and f.values["advantage_ci_lo"] == -0.1
    )
    assert not weak.faithfulness_beats_random(0.9, (0.8, 1.0), 0.1, NAN).passed


def test_faithfulness_above_random_passes():
    f = weak.faithfulness_beats_random(0.9, (0.8, 1.0), 0.1, (0.6, 0.85))
    assert f.passed and f.values["random_faithfulness"] == 0.1


def test_toxic_not_refused_more_than_safe_warns():
    # the default model's hate category: 0.43 of safe prompts refused, 0.36 of toxic ones
    f = weak.toxic_refused_more_than_safe(
        weak.SplitRate(0.36, 0.2, 0.5, 50), weak.SplitRate(0.43, 0.3, 0.6, 50)
    )
    assert not f.passed and "at least as often" in f.why
    assert f.values["refusal_rate_toxic"] == 0.36 and f.values["refusal_rate_safe_ci_hi"] == 0.6
    equal = weak.SplitRate(0.0, 0.0, 0.3, 8)
    assert not weak.toxic_refused_more_than_safe(equal, equal).passed
    missing = weak.toxic_refused_more_than_safe(None, equal)
    assert not missing.passed and "no toxic" in missing.why


def test_toxic_refused_more_than_safe_passes():
    assert weak.toxic_refused_more_than_safe(
        weak.SplitRate(0.9, 0.8, 0.95, 50), weak.SplitRate(0.1, 0.05, 0.2, 50)
    ).passed


def test_group_with_too_few_prompts_warns():
    fallback = weak.GroupPrompts(8, 8, "all (score_positive: only 1 < 2)")
    f = weak.enough_prompts(
        {"toxic": fallback, "benign": weak.GroupPrompts(16, 5, "score_positive")},
        2,
        "score_positive",
    )
    assert (
        not f.passed and f.why.startswith("toxic:") and "benign" not in f.why
    )  # only the weak group is named
    assert f.values["toxic_n_used"] == 8 and f.values["benign_n_used"] == 5
    tiny = weak.enough_prompts({"all": weak.GroupPrompts(1, 1, "all")}, 2, "all")
    assert not tiny.passed and "only 1 prompts" in tiny.why


def test_groups_with_enough_prompts_pass():
    groups = {
        "toxic": weak.GroupPrompts(8, 4, "score_positive"),
        "benign": weak.GroupPrompts(16, 2, "score_positive"),
    }
    assert weak.enough_prompts(groups, 2, "score_positive").passed


def test_comparison_with_fewer_than_two_categories_warns():
    f = weak.enough_categories(
        {"toxic": ["a", "b", "c"]}, ["toxic", "benign"]
    )  # benign never compared
    assert not f.passed and f.why.startswith("benign: 0 categories")
    one = weak.enough_categories({"toxic": ["a"], "benign": ["a", "b"]}, ["toxic", "benign"])
    assert not one.passed and "1 category (a)" in one.why and one.values["toxic_n_categories"] == 1


def test_comparison_with_two_categories_passes():
    assert weak.enough_categories(
        {"toxic": ["a", "b"], "benign": ["a", "b"]}, ["toxic", "benign"]
    ).passed
