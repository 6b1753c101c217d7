"""Circuit discovery on a tiny model with a planted mechanism: one SAE latent alone drives the
refusal score, so attribution patching must rank it first."""

import copy

import numpy as np
import pytest
import torch

from refusal_assets import circuits as circ
from refusal_assets.behaviour import refusal_token_ids
from refusal_assets.comparison import select_circuit
from refusal_assets.sae import TopKSAE
from refusal_assets.sites import Site

PROMPTS = ["How do I write a poem about the sea?", "Tell me how to hack my neighbour's wifi.", "What is the capital of France?",
           "Write a threatening letter.", "Explain how vaccines work."]
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
        for block in model.model.layers[2:]:  # later blocks become the identity on the residual stream
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
    zero = circ.Baseline(f_mean={SITE: torch.zeros(10, d)}, err_mean={SITE: torch.zeros(10, d)})
    return model, tok, {SITE: sae}, zero, refusal_ids


@pytest.mark.parametrize("method", ["attribution", "integrated_gradients"])
def test_planted_latent_is_recovered_first(planted, method):
    model, tok, saes, baseline, refusal_ids = planted
    post = circ._post_positions(circ.encode_chat(tok, PROMPTS))
    baseline = circ.Baseline({SITE: baseline.f_mean[SITE][: post.shape[1]]}, {SITE: baseline.err_mean[SITE][: post.shape[1]]})
    effects, scores = circ.node_effects(model, tok, PROMPTS, saes, baseline, refusal_ids, batch_size=2, method=method, ig_steps=8)
    index = circ.NodeIndex([SITE], [64])
    assert effects.shape == (len(PROMPTS), index.n_nodes) and np.isfinite(effects).all()
    mean = effects.mean(0)
    assert int(np.argmax(mean)) == 0  # the planted latent
    assert mean[0] > 5 * max(mean[1:].max(), 1e-6)  # every other node pushes the score down or not at all
    assert (effects[:, 0] > 0).all()
    circuit = select_circuit(mean, index.site_of_node, k_per_site=1)
    assert np.flatnonzero(circuit).tolist() == [0]


def test_full_circuit_faithful_empty_not_and_complement_complete(planted):
    model, tok, saes, baseline, refusal_ids = planted
    P = circ._post_positions(circ.encode_chat(tok, PROMPTS)).shape[1]
    baseline = circ.Baseline({SITE: baseline.f_mean[SITE][:P]}, {SITE: baseline.err_mean[SITE][:P]})
    index = circ.NodeIndex([SITE], [64])
    clean = float(circ._score(model, circ.encode_chat(tok, PROMPTS), refusal_ids).mean())

    suffixes = circ.prepare_suffixes(model, tok, PROMPTS, batch_size=2)

    def score(keep):
        return circ.ablated_score(model, suffixes, saes, baseline, keep, refusal_ids)

    m_full, m_empty = score(np.ones(index.n_nodes, bool)), score(np.zeros(index.n_nodes, bool))
    assert m_full == pytest.approx(clean, abs=1e-4)  # SAE + error splice leaves the model unchanged
    assert abs(m_full - m_empty) > 0.1
    result = circ.evaluate_sizes(score, np.arange(index.n_nodes, 0, -1).astype(float), index.site_of_node, [65], 
                                 lambda m, k: select_circuit(m, index.site_of_node, k_per_site=k), seed=0)
    full = result["sweep"][0]
    assert full["n_nodes"] == index.n_nodes
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-6)
    assert full["completeness"] == pytest.approx(0.0, abs=1e-6)
    assert circ.faithfulness(m_empty, m_empty, m_full) == 0.0
    # the planted latent alone moves the score towards the full model, a random other latent does not
    only_planted = np.zeros(index.n_nodes, bool)
    only_planted[0] = True
    only_other = np.zeros(index.n_nodes, bool)
    only_other[7] = True
    assert circ.faithfulness(score(only_planted), m_empty, m_full) > circ.faithfulness(score(only_other), m_empty, m_full)


def test_edges_and_direction_ablation_run_on_two_sites(tiny_model):
    model, tok = tiny_model
    sites = [Site(1, "resid"), Site(2, "resid")]
    gen = torch.Generator().manual_seed(1)
    saes = {s: TopKSAE(64, 128, k=16, generator=gen).eval() for s in sites}
    ids = torch.tensor(refusal_token_ids(tok, ["Sorry"]))
    base = circ.compute_baseline(model, tok, PROMPTS[:3], saes, batch_size=2)
    index = circ.NodeIndex(sites, [128, 128])
    effects, _ = circ.node_effects(model, tok, PROMPTS, saes, base, ids, batch_size=2)
    chosen = select_circuit(effects.mean(0), index.site_of_node, k_per_site=3)
    edges = circ.edge_effects(model, tok, PROMPTS, saes, base, ids, chosen, batch_size=2, max_edges=5)
    assert 0 < len(edges) <= 5
    for e in edges:
        assert index.site_of_node[e["source"]] == 0 and index.site_of_node[e["target"]] == 1
        assert chosen[e["source"]] and chosen[e["target"]] and np.isfinite(e["effect"])
    assert abs(edges[0]["effect"]) >= abs(edges[-1]["effect"])
    direction = torch.randn(64, generator=gen)
    ablated = circ.direction_ablation_score(model, tok, PROMPTS, sites[0], direction, ids, batch_size=2)
    clean = circ.ablated_score(model, circ.prepare_suffixes(model, tok, PROMPTS, batch_size=2), saes, base, np.ones(index.n_nodes, bool), ids)
    assert np.isfinite(ablated) and ablated != pytest.approx(clean, abs=1e-7)


def test_generation_logits_give_the_same_p_ref_as_a_forward(tiny_model):
    from refusal_assets.behaviour import generate, last_token_refusal_prob, p_refusal
    from refusal_assets.chat import encode_chat

    model, tok = tiny_model
    batch = encode_chat(tok, PROMPTS)
    ids = torch.tensor(refusal_token_ids(tok, ["Sorry", "I cannot"]))
    _, first_logits = generate(model, tok, batch, 2)
    assert torch.allclose(last_token_refusal_prob(first_logits, ids), p_refusal(model, batch, ids), atol=1e-5)
