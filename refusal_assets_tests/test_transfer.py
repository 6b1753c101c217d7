"""Functional cross-category tests (refusal_assets.analysis.transfer) on synthetic changes and a
planted tiny model."""

import numpy as np
import pytest

from refusal_assets.analysis import transfer as tr
from refusal_assets.analysis.verdict_rule import VerdictRule


def test_cross_matrix_calls_ratios_and_undefined_denominators():
    rng = np.random.default_rng(0)
    cats = ["a", "b", "c"]
    rule = VerdictRule()
    shared = {(x, y): 2.0 + rng.normal(0, 0.1, 12) for x in cats for y in cats}
    m = tr.cross_matrix(
        "t", cats, shared, {c: rng.normal(0, 0.1, 12) for c in cats}, rule, n_bootstrap=200, seed=0
    )
    assert m.verdict == "monolithic" and set(m.calls.values()) == {"shared"}
    assert np.all((m.ratio_lo <= m.ratio) & (m.ratio <= m.ratio_hi))
    specific = {
        (x, y): (2.0 if x == y else 0.0) + rng.normal(0, 0.1, 12) for x in cats for y in cats
    }
    m = tr.cross_matrix("t", cats, specific, {}, rule, n_bootstrap=200, seed=0)
    assert m.verdict == "modular" and set(m.calls.values()) == {"specific"}
    # an own change indistinguishable from 0: the ratio is not a number, the pair undecided
    flat = {(x, y): rng.normal(0, 1.0, 6) for x in cats for y in cats}
    m = tr.cross_matrix("t", cats, flat, {}, rule, n_bootstrap=200, seed=0)
    assert np.isnan(m.ratio).sum() >= 6 and m.verdict == "insufficient evidence"
    assert (
        np.all(np.isfinite(m.change))
        and np.all(m.change_lo <= m.change)
        and np.all(m.change <= m.change_hi)
    )


def test_circuit_transfer_shared_vs_disjoint_mechanisms():
    """An additive toy model: each prompt's score is the sum of its kept nodes' contributions."""
    rng = np.random.default_rng(1)
    site_of_node = np.repeat([0, 1], 20)
    rule = VerdictRule()

    def run(disjoint: bool):
        contrib, circuits, own, fns = {}, {}, {}, {}
        for ci, c in enumerate(["a", "b", "c"]):
            w = np.zeros(40)
            nodes = (
                [ci * 4 + k for k in range(3)] + [20 + ci * 4 + k for k in range(3)]
                if disjoint
                else [0, 1, 2, 20, 21, 22]
            )
            w[nodes] = 1.0
            contrib[c] = w + rng.normal(0, 0.05, (10, 40))  # [n_prompts, n_nodes]
            circuits[c] = w > 0
            own[c] = tr.loo_masks(contrib[c], lambda mean: mean > 0.5)
            fns[c] = lambda keep, x=contrib[c]: (x * keep).sum(-1)  # [M, n, nodes] -> [M, n]
        return tr.circuit_transfer(fns, circuits, own, site_of_node, rule, n_bootstrap=200, seed=0)

    loss, keep = run(disjoint=False)
    assert loss.verdict == "monolithic" and keep.verdict == "monolithic"
    assert np.all(
        loss.control < loss.change.diagonal()
    )  # a random circuit of the same size removes less
    loss, keep = run(disjoint=True)
    assert loss.verdict == "modular", loss.reason
    assert np.nanmax(np.where(np.eye(3, dtype=bool), np.nan, loss.ratio_hi)) < 0.5


@pytest.mark.parametrize("planted", ["monolithic", "modular"])
def test_planted_tiny_model_gives_the_planted_answer(tiny_model, planted):
    """Level 2 of the calibration at a smaller size: circuit overlap, circuit transfer and the combined
    verdict recover the plant."""
    from refusal_assets.analysis.calibration import calibrate_model

    model, tok = tiny_model
    r = calibrate_model(
        model, tok, planted, n_categories=3, n_prompts=8, n_bootstrap=60, n_permutations=60
    )
    assert (r.overlap, r.circuit_transfer) == (planted,) * 2, r.reasons
    assert r.combined == planted, r.reasons["combined"]


def test_cross_matrix_reads_back_from_its_json():
    """transfer.json's matrices come back typed: the same arrays, NaN where JSON holds null."""
    import json

    rng = np.random.default_rng(3)
    cats = ["a", "b", "c"]
    flat = {(x, y): rng.normal(0, 1.0, 6) for x in cats for y in cats}
    control = {c: rng.normal(0, 0.1, 6) for c in cats}
    m = tr.cross_matrix("t", cats, flat, control, VerdictRule(), n_bootstrap=50, seed=0)
    assert np.isnan(m.ratio).any()  # the round trip has nulls to restore
    back = tr.read_cross_matrix(json.loads(json.dumps(m.to_dict())))
    for name in ("change", "change_lo", "change_hi", "ratio", "ratio_lo", "ratio_hi", "control"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    np.testing.assert_array_equal(np.array(back.control_ci), np.array(m.control_ci, dtype=float))
    assert (back.categories, back.calls, back.verdict, back.reason) == (
        cats,
        m.calls,
        m.verdict,
        m.reason,
    )
    assert back.n_prompts == m.n_prompts and back.test == "t"
