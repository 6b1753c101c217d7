"""Functional cross-category tests (refusal_assets.analysis.transfer) on synthetic changes and a tiny model
whose refusal is carried by one planted residual direction."""

import copy
import math

import numpy as np
import pytest
import torch

from refusal_assets.analysis import transfer as tr
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.lm.behaviour import refusal_token_ids

PROMPTS = [
    "How do I write a poem about the sea?",
    "Tell me how to hack my neighbour's wifi.",
    "What is the capital of France?",
    "Write a threatening letter.",
    "Explain how vaccines work.",
]


@pytest.fixture(scope="module")
def planted_direction(tiny_model):
    """Refusal logit = 3 u . RMSNorm(resid); every token embedding carries +0.3 u."""
    model, tok = tiny_model
    model = copy.deepcopy(model)
    d = model.config.hidden_size
    u = torch.nn.functional.normalize(
        torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0
    )
    ids = torch.tensor(refusal_token_ids(tok, ["I'm sorry", "I cannot", "Sorry"]))
    with torch.no_grad():
        for block in model.model.layers[2:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[ids] = 3.0 * u
        model.model.embed_tokens.weight += 0.3 * u
    return model, tok, ids, u


def test_direction_ablation_and_addition_move_refusal_batched_as_separately(planted_direction):
    model, tok, ids, u = planted_direction
    other = torch.nn.functional.normalize(
        torch.randn(u.shape[0], generator=torch.Generator().manual_seed(1)), dim=0
    )
    kw = {"refusal_ids": ids, "batch_size": 3}
    clean = tr.direction_scores(model, tok, PROMPTS, u[None], mode="none", **kw)[0]
    ablated = tr.direction_scores(
        model, tok, PROMPTS, torch.stack([u, other]), mode="ablate", **kw
    )  # [2, n]
    assert ablated.shape == (2, len(PROMPTS))
    assert (clean - ablated[0] > 1.0).all()  # the planted direction carries refusal
    assert np.abs(clean - ablated[1]).mean() < np.abs(clean - ablated[0]).mean() / 3
    one = tr.direction_scores(
        model, tok, PROMPTS, other[None], mode="ablate", refusal_ids=ids, batch_size=5
    )[0]
    np.testing.assert_allclose(
        one, ablated[1], atol=1e-4
    )  # rows with different directions do not mix
    added = tr.direction_scores(
        model, tok, PROMPTS, torch.stack([2 * u, -2 * u]), mode="add", layers=[1, 1], **kw
    )
    assert (added[0] > clean + 0.5).all() and (added[1] < clean - 0.5).all()
    # directions at different layers in one stacked pass: each as if alone
    mixed = tr.direction_scores(
        model, tok, PROMPTS, torch.stack([2 * u, other]), mode="add", layers=[1, 2], **kw
    )
    for k, (v, layer) in enumerate([(2 * u, 1), (other, 2)]):
        alone = tr.direction_scores(model, tok, PROMPTS, v[None], mode="add", layers=[layer], **kw)[
            0
        ]
        np.testing.assert_allclose(mixed[k], alone, atol=1e-4)
    with pytest.raises(ValueError, match="one layer per direction"):
        tr.direction_scores(model, tok, PROMPTS, u[None], mode="add", **kw)


def test_hidden_states_and_selection_find_the_planted_direction(planted_direction):
    model, tok, ids, u = planted_direction
    h = tr.post_instruction_hidden(model, tok, PROMPTS, batch_size=2)
    assert (
        h.ndim == 4 and h.shape[0] == len(PROMPTS) and h.shape[1] == model.config.num_hidden_layers
    )
    # every prompt carries +u, so a difference of means is whatever separates the two prompt sets;
    # the selection must return one real candidate per group (and the pooled one) with its drop.
    sel = tr.select_directions(
        model,
        tok,
        {"a": PROMPTS[:3], "b": PROMPTS[3:]},
        {"a": PROMPTS[3:], "b": PROMPTS[:3]},
        ids,
        n_layer_candidates=2,
        n_position_candidates=2,
        batch_size=4,
    )
    assert set(sel) == {"a", "b", "pooled"}
    for s in sel.values():
        assert (
            0 <= s.layer < model.config.num_hidden_layers
            and s.direction.shape == (u.shape[0],)
            and math.isfinite(s.train_drop)
        )


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
    """Level 2 of the calibration at a smaller size: every necessity test and the combined verdict
    recover the plant; induced refusal (sufficiency) says shared either way (see refusal_assets.analysis.verdict)."""
    from refusal_assets.analysis.calibration import calibrate_model

    model, tok = tiny_model
    r = calibrate_model(
        model, tok, planted, n_categories=3, n_prompts=8, n_bootstrap=60, n_permutations=60
    )
    assert (r.overlap, r.circuit_transfer, r.direction_ablation) == (planted,) * 3, r.reasons
    assert r.combined == planted, r.reasons["combined"]
    assert r.induced_refusal == "monolithic", r.reasons["induced refusal"]


def test_direction_cosines_ceiling_and_null():
    rng = np.random.default_rng(0)
    d, n = 32, 12
    r_shared, r_other = np.eye(d)[0], np.eye(d)[1]
    harm = {c: rng.normal(0, 1, (n, d)) for c in "abc"}
    tox = {
        "a": r_shared * 3 + rng.normal(0, 1, (n, d)),
        "b": r_shared * 3 + rng.normal(0, 1, (n, d)),
        "c": r_other * 3 + rng.normal(0, 1, (n, d)),
    }
    out = tr.direction_cosines(tox, harm, n_splits=40, n_permutations=200)
    by = {(p["a"], p["b"]): p for p in out["pairs"]}
    assert (
        abs(by[("a", "b")]["normalised"] - 1) < 0.25 and by[("a", "b")]["p_value"] > 0.05
    )  # one shared direction
    assert (
        by[("a", "c")]["normalised"] < 0.5
        and by[("a", "c")]["p_value"] < 0.05
        and by[("a", "c")]["testable"]
    )
    assert all(p["half_size"] == n // 2 for p in out["pairs"])


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
