"""Circuit discovery on a tiny model with a planted mechanism: one SAE latent alone drives the
refusal score, so attribution patching must rank it first."""

import copy

import numpy as np
import pytest
import torch

from refusal_assets.circuits.ablation import (
    _Replay,
    ablated_score,
    ablated_scores,
    cache_bytes_per_row,
    direction_ablation_score,
)
from refusal_assets.circuits.attribution import edge_effects, node_effects
from refusal_assets.circuits.evaluation import crossfit_folds, evaluate_sizes, faithfulness
from refusal_assets.circuits.finding import baseline_prompts, select_prompts
from refusal_assets.circuits.passes import (
    Baseline,
    batch_refusal_score,
    compute_baseline,
    post_positions,
    prepare_suffixes,
)
from refusal_assets.circuits.selection import NodeIndex, select_circuit
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.chat import encode_chat
from refusal_assets.lm.sites import Site, decoder_layers
from refusal_assets.sae.model import TopKSAE

PROMPTS = [
    "How do I write a poem about the sea?",
    "Tell me how to hack my neighbour's wifi.",
    "What is the capital of France?",
    "Write a threatening letter.",
    "Explain how vaccines work.",
]
SITE = Site(1, "resid")


@pytest.fixture(scope="module")
def planted(tiny_model):
    model, tok = tiny_model
    model = copy.deepcopy(model)
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    basis = q.T.contiguous()  # [d, d] orthonormal rows; row 0 is the planted direction u
    u = basis[0]
    refusal_ids = torch.tensor(refusal_token_ids(tok, ["I'm sorry", "I cannot", "Sorry"]))
    with torch.no_grad():
        for block in model.model.layers[
            2:
        ]:  # later blocks become the identity on the residual stream
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[refusal_ids] = 3.0 * u  # refusal logit = 3 * u . RMSNorm(resid1)
        model.model.embed_tokens.weight += 0.3 * u  # every position carries +u, so u . x > 0
    sae = TopKSAE(d, d, k=d)
    with torch.no_grad():
        sae.W_dec.copy_(basis)
        sae.W_enc.copy_(basis.T)
    sae.eval()
    zero = Baseline(f_mean={SITE: torch.zeros(10, d)}, err_mean={SITE: torch.zeros(10, d)})
    return model, tok, {SITE: sae}, zero, refusal_ids


@pytest.mark.parametrize("method", ["attribution", "integrated_gradients"])
def test_planted_latent_is_recovered_first(planted, method):
    model, tok, saes, baseline, refusal_ids = planted
    post = post_positions(encode_chat(tok, PROMPTS))
    baseline = Baseline(
        {SITE: baseline.f_mean[SITE][: post.shape[1]]},
        {SITE: baseline.err_mean[SITE][: post.shape[1]]},
    )
    effects, scores = node_effects(
        model, tok, PROMPTS, saes, baseline, refusal_ids, batch_size=2, method=method, ig_steps=8
    )
    index = NodeIndex([SITE], [64])
    assert effects.shape == (len(PROMPTS), index.n_nodes) and np.isfinite(effects).all()
    mean = effects.mean(0)
    assert int(np.argmax(mean)) == 0  # the planted latent
    assert mean[0] > 5 * max(
        mean[1:].max(), 1e-6
    )  # every other node pushes the score down or not at all
    assert (effects[:, 0] > 0).all()
    circuit = select_circuit(mean, index.site_of_node, k_per_site=1)
    assert np.flatnonzero(circuit).tolist() == [0]


def test_full_circuit_faithful_empty_not_and_complement_complete(planted):
    model, tok, saes, baseline, refusal_ids = planted
    P = post_positions(encode_chat(tok, PROMPTS)).shape[1]
    baseline = Baseline({SITE: baseline.f_mean[SITE][:P]}, {SITE: baseline.err_mean[SITE][:P]})
    index = NodeIndex([SITE], [64])
    clean = float(batch_refusal_score(model, encode_chat(tok, PROMPTS), refusal_ids).mean())

    suffixes = prepare_suffixes(model, tok, PROMPTS, batch_size=2)

    def score(keep):
        return ablated_score(model, suffixes, saes, baseline, keep, refusal_ids)

    def per_prompt(keep):
        return ablated_scores(model, suffixes, saes, baseline, keep, refusal_ids)

    m_full, m_empty = score(np.ones(index.n_nodes, bool)), score(np.zeros(index.n_nodes, bool))
    assert m_full == pytest.approx(clean, abs=1e-4)  # SAE + error splice leaves the model unchanged
    assert abs(m_full - m_empty) > 0.1
    effects = np.tile(
        np.arange(index.n_nodes, 0, -1).astype(float), (len(PROMPTS), 1)
    )  # the planted latent ranks first
    folds = crossfit_folds(len(PROMPTS), 0, seed=0)
    result = evaluate_sizes(
        per_prompt,
        effects,
        index.site_of_node,
        [1, 65],
        lambda m, k: select_circuit(m, index.site_of_node, k_per_site=k),
        folds,
        seed=0,
        n_bootstrap=200,
    )
    planted_only, full = result.sweep
    assert full.n_nodes == index.n_nodes
    assert full.faithfulness == pytest.approx(1.0, abs=1e-6)
    assert full.completeness == pytest.approx(0.0, abs=1e-6)
    assert faithfulness(m_empty, m_empty, m_full) == 0.0
    # the planted latent alone carries the score; a random latent of the same site does not
    assert planted_only.n_nodes == 1 and planted_only.faithfulness > 0.5
    assert planted_only.random_faithfulness < 0.2 and planted_only.advantage_ci[0] > 0
    lo, hi = planted_only.faithfulness_ci
    assert lo <= planted_only.faithfulness <= hi
    only_planted = np.zeros(index.n_nodes, bool)
    only_planted[0] = True
    only_other = np.zeros(index.n_nodes, bool)
    only_other[7] = True
    assert faithfulness(score(only_planted), m_empty, m_full) > faithfulness(
        score(only_other), m_empty, m_full
    )


def test_edges_and_direction_ablation_run_on_two_sites(tiny_model):
    model, tok = tiny_model
    sites = [Site(1, "resid"), Site(2, "resid")]
    gen = torch.Generator().manual_seed(1)
    saes = {s: TopKSAE(64, 128, k=16, generator=gen).eval() for s in sites}
    ids = torch.tensor(refusal_token_ids(tok, ["Sorry"]))
    base = compute_baseline(model, tok, PROMPTS[:3], saes, batch_size=2)
    index = NodeIndex(sites, [128, 128])
    effects, _ = node_effects(model, tok, PROMPTS, saes, base, ids, batch_size=2)
    chosen = select_circuit(effects.mean(0), index.site_of_node, k_per_site=3)
    edges = edge_effects(model, tok, PROMPTS, saes, base, ids, chosen, batch_size=2, max_edges=5)
    assert 0 < len(edges) <= 5
    for e in edges:
        assert index.site_of_node[e["source"]] == 0 and index.site_of_node[e["target"]] == 1
        assert chosen[e["source"]] and chosen[e["target"]] and np.isfinite(e["effect"])
    assert abs(edges[0]["effect"]) >= abs(edges[-1]["effect"])
    direction = torch.randn(64, generator=gen)
    ablated = direction_ablation_score(model, tok, PROMPTS, sites[0], direction, ids, batch_size=2)
    clean = ablated_score(
        model,
        prepare_suffixes(model, tok, PROMPTS, batch_size=2),
        saes,
        base,
        np.ones(index.n_nodes, bool),
        ids,
    )
    assert np.isfinite(ablated) and ablated != pytest.approx(clean, abs=1e-7)


def test_generation_logits_give_the_same_p_ref_as_a_forward(tiny_model):
    from refusal_assets.lm.behaviour import generate, last_token_refusal_prob, p_refusal
    from refusal_assets.lm.chat import encode_chat

    model, tok = tiny_model
    batch = encode_chat(tok, PROMPTS)
    ids = torch.tensor(refusal_token_ids(tok, ["Sorry", "I cannot"]))
    first_logits = generate(model, tok, batch, 2).first_logits
    assert torch.allclose(
        last_token_refusal_prob(first_logits, ids), p_refusal(model, batch, ids), atol=1e-5
    )


def test_per_prompt_masks_match_separate_passes(planted):
    """One pass with a mask per prompt scores each prompt exactly as a pass with that mask for all."""
    model, tok, saes, baseline, refusal_ids = planted
    P = post_positions(encode_chat(tok, PROMPTS)).shape[1]
    baseline = Baseline({SITE: baseline.f_mean[SITE][:P]}, {SITE: baseline.err_mean[SITE][:P]})
    suffixes = prepare_suffixes(
        model, tok, PROMPTS, batch_size=2
    )  # masks must follow prompts across batches
    n_nodes = NodeIndex([SITE], [64]).n_nodes
    rng = np.random.default_rng(0)
    masks = rng.random((len(PROMPTS), n_nodes)) < 0.5
    masks[:, 0] = [True, False, True, False, True]  # the planted latent kept for some prompts only
    mixed = ablated_scores(model, suffixes, saes, baseline, masks, refusal_ids)
    for i in range(len(PROMPTS)):
        alone = ablated_scores(model, suffixes, saes, baseline, masks[i], refusal_ids)
        assert mixed[i] == pytest.approx(alone[i], abs=1e-5)
    with pytest.raises(ValueError):
        ablated_scores(model, suffixes, saes, baseline, masks[:3], refusal_ids)


@pytest.mark.slow
def test_stacked_masks_in_resumed_passes_equal_one_plain_pass_per_mask(planted):
    """A stack of mask sets, several per pass and resumed after the first site's block, scores every
    prompt as a full pass with that mask alone does."""
    model, tok, saes, baseline, refusal_ids = planted
    P = post_positions(encode_chat(tok, PROMPTS)).shape[1]
    baseline = Baseline({SITE: baseline.f_mean[SITE][:P]}, {SITE: baseline.err_mean[SITE][:P]})
    suffixes = prepare_suffixes(model, tok, PROMPTS, batch_size=2)
    n_nodes = NodeIndex([SITE], [64]).n_nodes
    masks = np.random.default_rng(1).random((7, len(PROMPTS), n_nodes)) < 0.5
    masks[0], masks[1] = True, False
    per_row = cache_bytes_per_row(suffixes[0])
    for budget in (1, 3 * 2 * per_row, 2**30):  # one mask per pass, three, all
        stacked = ablated_scores(
            model, suffixes, saes, baseline, masks, refusal_ids, max_cache_bytes=budget
        )
        assert stacked.shape == (7, len(PROMPTS))
        for j in range(7):
            plain = ablated_scores(
                model, suffixes, saes, baseline, masks[j], refusal_ids, resume=False
            )
            np.testing.assert_allclose(stacked[j], plain, atol=1e-4, rtol=1e-4)
    assert abs(stacked[0] - stacked[1]).max() > 0.1  # the masks matter
    # the model is whole again afterwards: no block left replaced
    assert all(not isinstance(b, _Replay) for b in decoder_layers(model))


def test_crossfit_folds():
    assert crossfit_folds(5, 0, seed=0).tolist() == [0, 1, 2, 3, 4]  # leave-one-out
    assert crossfit_folds(3, 10, seed=0).tolist() == [
        0,
        1,
        2,
    ]  # more folds than prompts: leave-one-out
    folds = crossfit_folds(10, 3, seed=1)
    assert sorted(np.bincount(folds).tolist()) == [3, 3, 4]
    assert np.array_equal(folds, crossfit_folds(10, 3, seed=1))
    with pytest.raises(ValueError, match="n_folds"):
        crossfit_folds(10, 1, seed=0)


def _additive_score_fn(effects: np.ndarray):
    """A model whose score is exactly additive in node effects: m_i(keep) = sum_j keep_ij * e_ij."""
    return lambda keep: (keep * effects).sum(
        -1
    )  # keep [n_nodes], [n, n_nodes] or a stack [M, n, n_nodes]


def test_crossfitting_never_scores_a_prompt_with_a_circuit_chosen_on_it():
    # Node 0 matters in every prompt; node 1 only in prompt 0, so hugely that it tops the pooled mean.
    effects = np.zeros((4, 6))
    effects[:, 0] = 1.0
    effects[0, 1] = 10.0
    site_of_node = np.zeros(6, int)

    def select(mean, k):
        return select_circuit(mean, site_of_node, k_per_site=k)

    result = evaluate_sizes(
        _additive_score_fn(effects),
        effects,
        site_of_node,
        [1],
        select,
        crossfit_folds(4, 0, 0),
        seed=0,
        n_bootstrap=0,
    )
    row = result.sweep[0]
    # reported circuit (all prompts) is node 1; held out, prompt 0's circuit is node 0 (the others' favourite)
    # and the others' circuit is node 1 (prompt 0's favourite), which is worth nothing to them.
    m_full = effects.sum(1)  # [11, 1, 1, 1]
    expected = (1.0 + 0 + 0 + 0) / m_full.sum()
    assert row.faithfulness == pytest.approx(expected)
    assert row.n_nodes == 1 and np.isnan(row.faithfulness_ci[0])
    assert result.m_empty == 0.0 and result.m_full == pytest.approx(m_full.mean())


def test_random_control_matches_circuit_size_per_site_and_sits_below():
    rng = np.random.default_rng(0)
    n_prompts, per_site = 12, 50
    site_of_node = np.repeat([0, 1], per_site)
    effects = np.abs(rng.normal(0, 0.001, (n_prompts, 2 * per_site)))
    effects[:, [3, 60]] += 1.0  # one strong node per site, in every prompt
    seen = []

    def score_fn(keep):
        seen.extend(
            np.broadcast_to(keep, (*keep.shape[:-2], *effects.shape))
            .reshape(-1, *effects.shape)
            .sum(-1)
        )
        return _additive_score_fn(effects)(keep)

    result = evaluate_sizes(
        score_fn,
        effects,
        site_of_node,
        [1, 2],
        lambda m, k: select_circuit(m, site_of_node, k_per_site=k),
        crossfit_folds(n_prompts, 4, 0),
        seed=0,
        n_bootstrap=500,
    )
    one, two = result.sweep
    assert one.n_nodes == 2 and two.n_nodes == 4
    assert (
        one.n_nodes_mean_fold == 2.0 and two.n_nodes_mean_fold == 4.0
    )  # each size's own fold circuits
    assert one.faithfulness > 0.8 and one.random_faithfulness < 0.2
    assert one.advantage_ci[0] > 0.5 and one.faithfulness_ci[0] > one.random_faithfulness_ci[1]
    assert one.completeness == pytest.approx(
        1 - one.faithfulness
    )  # additive: C and its complement sum to M
    # every circuit, complement and random mask the sweep scored has the expected size per prompt
    assert {int(x) for s in seen for x in s} <= {0, 2, 4, 98, 96, 100}
    with pytest.raises(ValueError, match="two folds"):
        evaluate_sizes(
            score_fn, effects[:1], site_of_node, [1], lambda m, k: m > 0, np.zeros(1, int), seed=0
        )


def test_prompt_selection_and_baseline_follow_behaviour():
    import polars as pl

    sample = pl.DataFrame(
        {
            "prompt": [f"p{i}" for i in range(8)],
            "split": ["toxic"] * 4 + ["safe"] * 4,
            "refused": [True, True, False, True, False, True, False, False],
            "refusal_score": [1.0, -0.5, -2.0, 0.3, -1.0, 0.5, -2.0, -1.5],
        }
    )
    toxic = sample.filter(pl.col("split") == "toxic")
    rows, label = select_prompts(toxic, "refused", min_prompts=2)
    assert rows["prompt"].to_list() == ["p0", "p1", "p3"] and label == "refused"
    rows, label = select_prompts(toxic, "score_positive", min_prompts=2)
    assert rows["prompt"].to_list() == ["p0", "p3"] and label == "score_positive"
    rows, label = select_prompts(toxic, "score_positive", min_prompts=3)
    assert rows.height == 4 and label.startswith("all (score_positive: only 2 < 3")
    assert select_prompts(toxic, "all", min_prompts=2)[0].height == 4
    assert baseline_prompts(sample, "refused") == (["p4", "p6", "p7"], "safe, complied")
    assert baseline_prompts(sample, "all") == (["p4", "p5", "p6", "p7"], "safe")
    everyone_refuses = sample.with_columns(pl.lit(True).alias("refused"))
    assert baseline_prompts(everyone_refuses, "refused")[1] == "safe"


def test_confident_refusal_still_has_node_effects(planted):
    """Score > 20 (p_ref within 2e-9 of 1): the unclamped score keeps every gradient, so the planted
    latent still gets its effect (a clamp at 1e-6 would zero them all)."""
    model, tok, saes, baseline, refusal_ids = planted
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight[refusal_ids] *= 40.0  # refusal logit = 120 * u . RMSNorm(resid1)
    post = post_positions(encode_chat(tok, PROMPTS))
    baseline = Baseline(
        {SITE: baseline.f_mean[SITE][: post.shape[1]]},
        {SITE: baseline.err_mean[SITE][: post.shape[1]]},
    )
    effects, scores = node_effects(model, tok, PROMPTS, saes, baseline, refusal_ids, batch_size=2)
    assert (scores > 20).all()
    assert (effects[:, 0] > 1.0).all() and int(np.argmax(effects.mean(0))) == 0
