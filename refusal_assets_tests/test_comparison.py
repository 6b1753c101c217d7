"""Cross-category comparison statistics on synthetic per-prompt node effects with a known answer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refusal_assets.analysis.calibration import (
    SyntheticDesign,
    calibrate_synthetic,
    planted_effects,
)
from refusal_assets.analysis.overlap import (
    ComparisonResult,
    compare_categories,
    refusal_direction_cosines,
)
from refusal_assets.analysis.resampling import min_permutation_p
from refusal_assets.circuits.selection import select_circuit
from refusal_assets.plots import plot_heatmap

N_SITES, N_LATENTS, N_PROMPTS, N_STRONG = 3, 50, 40, 10
CATS = ["cyber", "drugs", "violence", "weapons"]
RESAMPLES = dict(n_permutations=200, n_bootstrap=200, seed=0)
# Threshold 0.3 sits well above the noise of a 40-prompt mean (sd 0.3/sqrt(40) ~ 0.05) and below the
# ~0.5 that a category-specific latent reaches in a label-shuffled (half/half) group, so shuffled
# groups select the union of both patterns consistently. A cut AT that 0.5 (threshold 0.5, or top-k
# with k = one category's 10 strong latents) makes shuffled circuits flip with the group imbalance,
# which puts null mass at Jaccard 0 and keeps disjoint pairs near p ~ 0.05.
FAST = dict(mode="threshold", threshold=0.3, **RESAMPLES)
TOPK = dict(mode="topk", k_per_site=N_STRONG, **RESAMPLES)
SITE_OF_NODE = np.repeat(np.arange(N_SITES), N_LATENTS)  # [n_nodes]


def make_effects(n_shared: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Per category ``[N_PROMPTS, n_nodes]``: at every site ``n_shared`` latents strong in all categories,
    ``N_STRONG - n_shared`` strong only in this category; mean ~1.0 on strong latents, noise sd 0.3."""
    rng = np.random.default_rng(seed)
    n_specific = N_STRONG - n_shared
    effects = {}
    for ci, cat in enumerate(CATS):
        mean = np.zeros((N_SITES, N_LATENTS))
        mean[:, :n_shared] = 1.0
        start = n_shared + ci * n_specific  # disjoint blocks of category-specific latents
        mean[:, start : start + n_specific] = 1.0
        mean = mean.ravel() + rng.uniform(-0.1, 0.1, mean.size) * (mean.ravel() > 0)
        effects[cat] = mean + rng.normal(0.0, 0.3, (N_PROMPTS, mean.size))
    return effects


@pytest.fixture(scope="module", params=["threshold", "topk"])
def shared(request: pytest.FixtureRequest) -> ComparisonResult:
    config = FAST if request.param == "threshold" else TOPK
    return compare_categories(make_effects(n_shared=N_STRONG), SITE_OF_NODE, **config)


@pytest.fixture(scope="module")
def disjoint() -> ComparisonResult:
    return compare_categories(make_effects(n_shared=0), SITE_OF_NODE, **FAST)


def test_shared_circuit_is_monolithic(shared: ComparisonResult) -> None:
    assert shared.verdict == "monolithic", shared.verdict_reason
    for pair in shared.pairs:
        assert pair.jaccard == 1.0
        assert pair.p_value > 0.05 and pair.q_value > 0.05 and not pair.significant
    assert shared.shared_fraction > 0.9 and shared.shared_fraction_ci[0] >= 0.5
    assert len(shared.shared_core) == N_SITES * N_STRONG
    assert all(len(t) == 0 for t in shared.specific_tail.values())
    assert all(c == pytest.approx(1.0) for c in shared.ceiling.values())


def test_disjoint_circuits_are_modular(disjoint: ComparisonResult) -> None:
    assert disjoint.verdict == "modular", disjoint.verdict_reason
    for pair in disjoint.pairs:
        assert pair.jaccard == pytest.approx(0.0, abs=0.05)
        assert pair.p_value < 0.05 and pair.significant
        assert (
            pair.null_mean > 0.2
        )  # exchangeable labels mix the two patterns, so overlap would be high
        assert pair.jaccard_ci[1] < 0.1
    assert disjoint.shared_core.size == 0
    assert disjoint.shared_fraction == 0.0
    assert all(len(t) == N_SITES * N_STRONG for t in disjoint.specific_tail.values())


def test_disjoint_topk_larger_than_one_pattern_is_significant() -> None:
    # Top-k with room for both patterns: shuffled groups keep both categories' latents (Jaccard ~ 1),
    # the real circuits share only noise picks, so every pair sits at the p-value floor.
    result = compare_categories(
        make_effects(n_shared=0), SITE_OF_NODE, **dict(TOPK, k_per_site=2 * N_STRONG)
    )
    assert all(p.p_value == pytest.approx(1 / 201) and p.significant for p in result.pairs)
    assert all(p.jaccard < 0.5 < p.null_mean for p in result.pairs)


def test_half_shared_is_modular_by_the_rule() -> None:
    # Half of each circuit shared gives Jaccard 5/15 = 1/3 per pair: every pair is significant and the
    # median normalised Jaccard (~0.33) is below 0.5, so the documented rule says "modular".
    result = compare_categories(make_effects(n_shared=N_STRONG // 2), SITE_OF_NODE, **FAST)
    assert result.verdict == "modular", result.verdict_reason
    assert all(p.jaccard == pytest.approx(1 / 3, abs=0.05) and p.significant for p in result.pairs)
    assert len(result.shared_core) == N_SITES * N_STRONG // 2
    assert result.shared_fraction == pytest.approx(0.5, abs=0.05)


def test_mostly_shared_is_mixed() -> None:
    # 7 of 10 shared: Jaccard 7/13 ~ 0.54 -- pairs still differ significantly (not monolithic) but the
    # median normalised Jaccard is >= 0.5 (not modular).
    result = compare_categories(make_effects(n_shared=7), SITE_OF_NODE, **FAST)
    assert result.verdict == "mixed", result.verdict_reason
    assert all(p.significant for p in result.pairs)
    assert np.median([p.normalised_jaccard for p in result.pairs]) >= 0.5
    assert "Mixed" in result.verdict_reason


def test_pure_noise_is_not_monolithic() -> None:
    # No refusal signal: circuits are noise picks, the split-half ceiling is near chance, so the
    # normalised Jaccard is left undefined instead of reading chance/chance ~ 1 as "monolithic".
    rng = np.random.default_rng(3)
    effects = {c: rng.normal(0.0, 0.3, (N_PROMPTS, SITE_OF_NODE.size)) for c in CATS}
    result = compare_categories(effects, SITE_OF_NODE, **dict(TOPK, k_per_site=2))
    assert max(result.ceiling.values()) < 0.2
    assert np.all(np.isnan([p.normalised_jaccard for p in result.pairs]))
    # No signal is "insufficient evidence" (issue 14), not "mixed": nothing was decided either way.
    assert result.verdict == "insufficient evidence", result.verdict_reason
    assert "too low to normalise" in result.verdict_reason
    assert all(p.call == "undecided" for p in result.pairs)


def test_select_circuit_topk_per_site_and_ties() -> None:
    site = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    mean = np.array([0.5, 2.0, 0.5, -1.0, -3.0, -0.1, -0.2, 7.0])
    mask = select_circuit(mean, site, mode="topk", k_per_site=2)
    # site 0: 2.0 then a tie at 0.5 broken by the lower index; site 1: the largest signed values;
    # site 2 has one node, so it keeps it.
    assert np.flatnonzero(mask).tolist() == [0, 1, 5, 6, 7]
    assert np.bincount(site[mask]).tolist() == [2, 2, 1]
    assert select_circuit(mean, site, mode="topk", k_per_site=0).sum() == 0


def test_select_circuit_threshold() -> None:
    site = np.array([0, 0, 1, 1])
    mean = np.array([0.2, 0.5, 0.5, -1.0])
    assert np.flatnonzero(select_circuit(mean, site, mode="threshold", threshold=0.5)).tolist() == [
        1,
        2,
    ]
    assert np.flatnonzero(select_circuit(mean, site, mode="threshold", threshold=0.0)).tolist() == [
        0,
        1,
        2,
    ]
    with pytest.raises(ValueError, match="topk_abs"):
        select_circuit(mean, site, mode="bogus")  # type: ignore[arg-type]


def test_select_circuit_by_magnitude_keeps_suppressors() -> None:
    site = np.array([0, 0, 0, 0, 1, 1, 1])
    mean = np.array([0.5, 2.0, 0.1, -1.0, -3.0, -0.1, -0.2])
    # site 0: 2.0 and -1.0 (|-1.0| beats 0.5); site 1: -3.0 and -0.2
    assert np.flatnonzero(select_circuit(mean, site, mode="topk_abs", k_per_site=2)).tolist() == [
        1,
        3,
        4,
        6,
    ]
    assert np.flatnonzero(
        select_circuit(mean, site, mode="threshold_abs", threshold=0.5)
    ).tolist() == [0, 1, 3, 4]
    # the signed modes never pick the suppressors
    assert np.flatnonzero(select_circuit(mean, site, mode="topk", k_per_site=2)).tolist() == [
        0,
        1,
        5,
        6,
    ]


def test_deterministic_and_well_formed(disjoint: ComparisonResult) -> None:
    effects = make_effects(n_shared=N_STRONG // 2)
    # Dict order must not matter: categories are sorted and seeds are keyed by the sorted index.
    reversed_effects = dict(reversed(list(effects.items())))
    kw = dict(TOPK, n_permutations=50, n_bootstrap=50)
    r1 = compare_categories(effects, SITE_OF_NODE, **kw)
    r2 = compare_categories(reversed_effects, SITE_OF_NODE, **kw)
    assert json.dumps(r1.to_dict()) == json.dumps(r2.to_dict())

    n = len(CATS)
    assert disjoint.categories == sorted(CATS)
    for m in (disjoint.jaccard, disjoint.weighted_overlap, disjoint.spearman):
        assert m.shape == (n, n)
        np.testing.assert_array_equal(m, m.T)
        np.testing.assert_array_equal(np.diag(m), np.ones(n))
    for m in (disjoint.q_value, disjoint.p_value):
        off = m[~np.eye(n, dtype=bool)]
        assert np.all((off > 0) & (off <= 1)) and np.all(np.isnan(np.diag(m)))
        np.testing.assert_array_equal(np.nan_to_num(m), np.nan_to_num(m.T))
    assert len(disjoint.pairs) == n * (n - 1) // 2
    assert all(p.a < p.b for p in disjoint.pairs)
    # p = (1 + #{null <= observed}) / (1 + n_permutations): observed 0 below every null draw gives the floor.
    assert min(p.p_value for p in disjoint.pairs) == pytest.approx(1 / 201)
    json.dumps(disjoint.to_dict())  # JSON-serialisable, NaN turned into null


def test_weighted_overlap_and_spearman_track_patterns(
    shared: ComparisonResult, disjoint: ComparisonResult
) -> None:
    assert np.all(shared.weighted_overlap[np.triu_indices(len(CATS), 1)] > 0.6)
    assert np.all(disjoint.weighted_overlap[np.triu_indices(len(CATS), 1)] < 0.3)
    assert np.all(
        shared.spearman[np.triu_indices(len(CATS), 1)]
        > disjoint.spearman[np.triu_indices(len(CATS), 1)]
    )


def test_refusal_direction_cosines() -> None:
    labels, m = refusal_direction_cosines(
        {
            "b": np.array([0.0, 2.0, 0.0]),
            "a": np.array([1.0, 0.0, 0.0]),
            "c": np.array([1.0, 1.0, 0.0]),
        }
    )
    assert labels == ["a", "b", "c"]
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(m, [[1, 0, s], [0, 1, s], [s, s, 1]], atol=1e-12)
    with pytest.raises(ValueError):
        refusal_direction_cosines({"a": np.zeros(3), "b": np.ones(3)})


def test_plot_heatmap(tmp_path, disjoint: ComparisonResult) -> None:
    out = plot_heatmap(
        disjoint.q_value,
        disjoint.categories,
        "BH q",
        tmp_path / "q.png",
        annotate_significance=disjoint.significant,
    )
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------ issue 14: sound statistics


def test_min_permutation_p_and_untestable_pairs_leave_the_count() -> None:
    assert min_permutation_p(3, 3, 1000) == pytest.approx(
        2 / 20
    )  # 20 relabellings, halved by the swap symmetry
    assert min_permutation_p(3, 4, 1000) == pytest.approx(1 / 35)
    assert min_permutation_p(20, 20, 200) == pytest.approx(1 / 201)  # the Monte Carlo floor
    # 3 prompts per category: even perfectly disjoint circuits cannot reach p < 0.05, so no pair is
    # significant, none is in BH, and the verdict is "insufficient evidence", not "monolithic".
    effects = {c: e[:3] for c, e in make_effects(n_shared=0).items()}
    result = compare_categories(effects, SITE_OF_NODE, **FAST)
    assert all(not p.testable and not p.significant and np.isnan(p.q_value) for p in result.pairs)
    assert result.verdict != "monolithic"
    assert "untestable" in result.verdict_reason


def test_identical_categories_normalise_to_one_and_estimates_sit_in_their_cis() -> None:
    design = SyntheticDesign(n_categories=3, n_prompts=14)
    rng = np.random.default_rng(5)
    norms = []
    for _ in range(6):
        result = compare_categories(
            planted_effects("monolithic", design, rng),
            np.repeat(np.arange(design.n_sites), design.n_latents),
            mode="topk",
            k_per_site=design.k_per_site,
            n_permutations=50,
            n_bootstrap=60,
        )
        for p in result.pairs:
            norms.append(p.normalised_jaccard)
            for est, (lo, hi) in (
                (p.jaccard, p.jaccard_ci),
                (p.normalised_jaccard, p.normalised_jaccard_ci),
            ):
                assert lo <= est <= hi
            assert p.half_size == design.n_prompts // 2
        lo, hi = result.shared_fraction_ci
        assert lo <= result.shared_fraction <= hi
    # numerator and ceiling at the same size: ~1 (the old full-sample numerator gave 1.2-1.7)
    assert abs(np.mean(norms) - 1) < 0.1


def test_error_nodes_are_left_out_and_their_share_reported() -> None:
    effects = make_effects(n_shared=N_STRONG)
    error_nodes = np.zeros(SITE_OF_NODE.size, bool)
    error_nodes[N_LATENTS - 1 :: N_LATENTS] = True  # the last node of every site
    for e in effects.values():
        e[:, error_nodes] = 5.0  # the strongest node of every site, if it were allowed
    result = compare_categories(effects, SITE_OF_NODE, error_nodes=error_nodes, **TOPK)
    assert not set(result.shared_core.tolist()) & set(np.flatnonzero(error_nodes).tolist())
    assert (
        len(result.shared_core) == N_SITES * N_STRONG
    )  # the planted latents, in the caller's node indices
    assert set(result.shared_core.tolist()) == {
        s * N_LATENTS + i for s in range(N_SITES) for i in range(N_STRONG)
    }
    for share in result.error_share.values():
        assert share == pytest.approx(15 / (15 + 30), abs=0.05)  # 3 x 5.0 vs 30 latents at ~1.0
    with pytest.raises(ValueError, match="error_nodes"):
        compare_categories(effects, SITE_OF_NODE, error_nodes=error_nodes[:-1], **TOPK)


def test_calibration_small() -> None:
    """Planted answers decide correctly, every CI covers, the normalised statistic is ~1 when identical."""
    report = calibrate_synthetic(
        SyntheticDesign(n_categories=3), n_replicates=24, n_permutations=100, n_bootstrap=100
    )
    mono, mod = report.runs
    assert mono.planted == "monolithic" and mono.correct_fraction >= 0.9, mono.verdicts
    assert mod.planted == "modular" and mod.correct_fraction >= 0.9, mod.verdicts
    for run in report.runs:
        assert run.estimate_inside_ci
        assert all(v >= 0.9 for v in run.coverage.values()), run.coverage
    assert abs(report.normalised_expectation_identical - 1) <= 0.1
    assert report.passed


def test_combined_verdict_agreement_disagreement_and_insufficient() -> None:
    from refusal_assets.analysis.verdict import TestLine, combine, overlap_line

    def line(test, level, says):
        return TestLine(
            test=test, level=level, says=says, statistic="x", value=0.5, ci=(0.4, 0.6), reason="r"
        )

    agree = combine(
        [line("overlap", "features", "modular"), line("transfer", "execution", "modular")],
        {"alpha": 0.05},
    )
    assert (
        agree.verdict == "modular" and agree.disagree == [] and agree.thresholds == {"alpha": 0.05}
    )
    split = combine(
        [
            line("overlap", "features", "modular"),
            line("direction ablation", "execution", "monolithic"),
            line("transfer", "execution", "insufficient evidence"),
        ]
    )
    assert split.verdict == "mixed" and split.disagree == ["overlap", "direction ablation"]
    assert "Feature level: modular; execution level: monolithic" in split.reason
    assert (
        combine([line("overlap", "features", "insufficient evidence")]).verdict
        == "insufficient evidence"
    )
    # a sufficiency test reports but does not vote; its disagreement is named
    induced = TestLine(
        test="induced refusal",
        level="execution",
        says="monolithic",
        statistic="x",
        value=1.0,
        ci=(0.9, 1.1),
        reason="r",
        role="sufficiency",
    )
    mod = combine(
        [line("overlap", "features", "modular"), line("transfer", "execution", "modular"), induced]
    )
    assert (
        mod.verdict == "modular"
        and mod.disagree == ["induced refusal"]
        and "not voting" in mod.reason
    )
    assert combine([induced]).verdict == "insufficient evidence"
    result = compare_categories(
        make_effects(n_shared=N_STRONG // 2), SITE_OF_NODE, **FAST
    ).to_dict()
    ov = overlap_line(result)
    assert (
        ov.says == "modular"
        and ov.ci[0] <= ov.value <= ov.ci[1]
        and ov.value == pytest.approx(1 / 3, abs=0.05)
    )


def test_fallback_categories_and_error_node_mask() -> None:
    from refusal_assets.analysis.overlap import error_node_mask, fallback_categories
    from refusal_assets.circuits.selection import NodeIndex
    from refusal_assets.lm.sites import Site

    summaries = {
        "a": {"groups": {"toxic": {"prompt_set": "score_positive"}}},
        "b": {"groups": {"toxic": {"prompt_set": "all (score_positive: only 1 < 2)"}}},
        "c": {"groups": {"benign": {"prompt_set": "all (score_positive: only 0 < 2)"}}},
    }
    assert fallback_categories(summaries, "toxic", "score_positive") == ["b"]
    assert fallback_categories(summaries, "benign", "score_positive") == ["c"]
    index = NodeIndex([Site(1, "resid"), Site(2, "resid")], [3, 4])
    assert np.flatnonzero(error_node_mask(index.site_of_node)).tolist() == [
        index.error_node(0),
        index.error_node(1),
    ]


def test_compare_model_leaves_fallback_categories_out_and_writes_what_the_report_reads(
    tiny_cfg,
) -> None:
    """The comparison step of one model: the fallback category stays out of the overlap test, the
    cross-Jaccard pairs toxic rows with benign columns, direction cosines per site, one combined verdict."""
    from refusal_assets.analysis.comparison import compare_model

    cc, comp = tiny_cfg.circuits, tiny_cfg.comparison
    effects = make_effects(n_shared=0)
    rng = np.random.default_rng(7)
    circuits = {}
    for i, c in enumerate(CATS):
        toxic_nodes, benign_nodes = [0, 1, 2 + i], [0, 10 + i]
        prompt_set = cc.prompt_filter if c != "weapons" else f"all ({cc.prompt_filter}: only 1 < 2)"
        summary = {
            "sites": ["resid1"],
            "groups": {
                "toxic": {"prompt_set": prompt_set, "nodes": [{"node": n} for n in toxic_nodes]},
                "benign": {"prompt_set": prompt_set, "nodes": [{"node": n} for n in benign_nodes]},
            },
        }
        tensors = {
            "site_of_node": SITE_OF_NODE,
            "effects_toxic": effects[c],
            "direction_resid1": rng.normal(size=8) + 2.0,
        }
        circuits[c] = (summary, tensors)
    result = compare_model("m", CATS, circuits, {}, circuits_cfg=cc, comparison_cfg=comp)
    toxic = result.groups["toxic"]
    assert toxic.fallback == ["weapons"] and toxic.result is not None
    assert toxic.result.categories == ["cyber", "drugs", "violence"]
    benign = result.groups["benign"]  # no benign effects stored: nothing to compare
    assert benign.result is None and benign.verdict == "insufficient evidence"
    # cyber's toxic circuit {0, 1, 2} vs drugs' benign circuit {0, 11}: one node of four
    assert result.cross_jaccard[0, 1] == pytest.approx(1 / 4)
    assert result.direction_cosines["resid1"].labels == CATS
    assert result.combined.lines[0].test == "circuit overlap"
    out = json.loads(json.dumps(result.to_json(seconds=1.5), default=float))
    assert list(out) == [
        "model",
        "categories",
        "groups",
        "cross_jaccard",
        "direction_cosines",
        "transfer",
        "combined",
        "verdict",
        "verdict_reason",
        "verdict_execution",
        "execution_reason",
        "verdict_features",
        "feature_reason",
        "verdict_features_by_seed",
        "feature_stability",
        "feature_test",
        "feature_tests_by_seed",
        "seconds",
    ]
    # no refusal_direction given: the execution level says so; one SAE training, one entry
    assert out["verdict_execution"] == "insufficient evidence"
    assert out["verdict_features_by_seed"] == [out["verdict_features"]]
    assert out["feature_stability"].startswith("1 SAE training, seed 0: stability")
    assert out["groups"]["toxic"]["fallback_categories"] == ["weapons"]
    assert out["groups"]["benign"]["verdict_reason"].startswith("Insufficient evidence: only []")
    assert out["verdict"] == result.combined.verdict


# ------------------------------------------------------------- the two levels in compare_model
@pytest.mark.parametrize(
    "world, answer",
    [("monolithic", "monolithic"), ("two_level", "shared core + specific tail")],
)
def test_compare_model_gives_the_feature_level_answer_of_a_planted_world(world, answer):
    """The comparison step runs the feature-level test on the main group's circuit effects and
    carries the execution level's answer through, both into comparison.json."""
    from refusal_assets.analysis.comparison import compare_model
    from refusal_assets.analysis.feature_calibration import PlantDesign, planted_effects
    from refusal_assets.config import CircuitConfig, ComparisonConfig

    design = PlantDesign()
    counts = {"deception": 6, "hate": 3, "illegal": 9, "privacy": 6, "sexual": 5, "violence": 4}
    effects = planted_effects(world, counts, design, np.random.default_rng(0))
    site_of_node = design.site_of_node()
    circuits = {
        c: (
            {"sites": [], "groups": {"toxic": {"nodes": [], "prompt_filter": "score_positive"}}},
            {"effects_toxic": e, "site_of_node": site_of_node},
        )
        for c, e in effects.items()
    }
    cc = CircuitConfig(k_per_site=design.k_per_site)
    comp = ComparisonConfig(n_permutations=20, n_bootstrap=20)
    result = compare_model(
        "m",
        sorted(counts),
        circuits,
        {},
        circuits_cfg=cc,
        comparison_cfg=comp,
        execution=("monolithic", "pooled direction removes refusal"),
    )
    assert result.verdict_features == answer
    assert result.verdict_features_by_seed == [answer]
    out = result.to_json(seconds=0.0)
    assert out["verdict_execution"] == "monolithic"
    assert out["verdict_features"] == answer
    assert out["feature_test"]["verdict"] == answer
    json.dumps(out, default=float)  # serialisable as the asset writes it


def _planted_circuits(worlds: dict[int, str], counts: dict[str, int]):
    """Circuit files whose main effects (seed 0) and replicate effects (the other seeds) each come
    from a planted world drawn with that seed: one SAE training per seed (seed 2's monolithic
    draw is one of the 6 % the test leaves undecided at these counts, so the tests use 0, 1, 3)."""
    from refusal_assets.analysis.feature_calibration import PlantDesign, planted_effects
    from refusal_assets.layout import replicate_effects_key

    design = PlantDesign()
    by_seed = {
        seed: planted_effects(world, counts, design, np.random.default_rng(seed))
        for seed, world in worlds.items()
    }
    replicates = sorted(seed for seed in worlds if seed != 0)
    circuits = {}
    for c in counts:
        tensors = {"effects_toxic": by_seed[0][c], "site_of_node": design.site_of_node()}
        tensors |= {replicate_effects_key("toxic", s): by_seed[s][c] for s in replicates}
        summary = {
            "sites": [],
            "sae_replicate_seeds": replicates,
            "groups": {"toxic": {"nodes": [], "prompt_filter": "score_positive"}},
        }
        circuits[c] = (summary, tensors)
    return circuits, design


def _compare_planted(circuits, design):
    """compare_model on planted circuit files, with few resamples (the overlap test is not read)."""
    from refusal_assets.analysis.comparison import compare_model
    from refusal_assets.config import CircuitConfig, ComparisonConfig

    return compare_model(
        "m",
        sorted(circuits),
        circuits,
        {},
        circuits_cfg=CircuitConfig(k_per_site=design.k_per_site),
        comparison_cfg=ComparisonConfig(n_permutations=20, n_bootstrap=20),
    )


@pytest.mark.parametrize(
    "worlds, verdict, by_seed",
    [
        (
            {0: "monolithic", 1: "monolithic", 3: "monolithic"},
            "monolithic",
            ["monolithic"] * 3,
        ),
        (
            {0: "monolithic", 1: "monolithic", 3: "modular"},
            "unstable across SAE trainings",
            ["monolithic", "monolithic", "modular"],
        ),
    ],
)
def test_feature_verdict_is_repeated_per_sae_training_and_says_when_they_disagree(
    worlds, verdict, by_seed
):
    """Each SAE training's effects get their own feature-level test; the verdict is theirs only
    when all agree, else "unstable across SAE trainings" (never one seed's answer)."""

    counts = {"deception": 6, "hate": 3, "illegal": 9, "privacy": 6, "sexual": 5, "violence": 4}
    circuits, design = _planted_circuits(worlds, counts)
    result = _compare_planted(circuits, design)
    assert result.verdict_features_by_seed == by_seed
    assert result.verdict_features == verdict
    out = result.to_json(seconds=0.0)
    assert list(out["feature_tests_by_seed"]) == ["0", "1", "3"]
    assert [t["verdict"] for t in out["feature_tests_by_seed"].values()] == by_seed
    if verdict == "unstable across SAE trainings":
        assert out["feature_stability"] == (
            "unstable across SAE trainings: seed 0 monolithic; seed 1 monolithic; seed 3 modular"
        )
        assert out["feature_reason"].startswith("unstable across SAE trainings")
    else:
        assert out["feature_stability"] == "stable across 3 SAE trainings: seeds 0, 1, 3"


def test_a_replicate_seed_missing_from_one_circuit_is_left_out():
    """Only the trainings every category's circuit was found through are compared."""

    counts = {"deception": 6, "hate": 3, "illegal": 9}
    circuits, design = _planted_circuits({0: "monolithic", 1: "monolithic"}, counts)
    circuits["hate"][0]["sae_replicate_seeds"] = []
    result = _compare_planted(circuits, design)
    assert list(result.feature_tests) == [0]
