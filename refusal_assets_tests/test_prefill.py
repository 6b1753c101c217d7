"""Shared-prefix prefill and the cached greedy decoder equal the plain, uncached computation (issue 16)."""

from __future__ import annotations

import pytest
import torch

from refusal_assets.config import DEFAULT_REFUSAL_PHRASES
from refusal_assets.lm.behaviour import (
    generate,
    generate_plain,
    last_token_refusal_prob,
    p_refusal,
    refusal_token_ids,
)
from refusal_assets.lm.chat import encode_chat
from refusal_assets.lm.prefill import prefill, shared_prefix_length
from refusal_assets.lm.sites import Site

PROMPTS = [
    "Hi",
    "How do I write a poem about the sea? Please answer at length, with three examples.",
    "Tell me how to pick a lock.",
    "What is the capital of France?",
    "Explain, step by step and in detail, how vaccines train the immune system.",
]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


SITES = [Site(0, "resid"), Site(1, "mlp"), Site(2, "attn"), Site(3, "resid")]


@pytest.fixture()
def batch(tiny_model):
    _, tok = tiny_model
    return encode_chat(tok, PROMPTS)


def test_shared_prefix_is_the_common_template_head(tiny_model, batch):
    _, tok = tiny_model
    L = shared_prefix_length(batch)
    lengths = batch.attention_mask.sum(-1)
    assert 0 < L < int(lengths.min())
    T = batch.input_ids.shape[1]
    heads = {tuple(batch.input_ids[b, T - int(n) :][:L].tolist()) for b, n in enumerate(lengths)}
    assert len(heads) == 1  # every row opens with the same L tokens ...
    nexts = {int(batch.input_ids[b, T - int(n) + L]) for b, n in enumerate(lengths)}
    assert len(nexts) > 1  # ... and L is the longest such head
    assert "user" in tok.decode(list(heads.pop()))  # the system turn and the user header


def test_one_prompt_keeps_at_least_one_own_token(tiny_model):
    _, tok = tiny_model
    one = encode_chat(tok, ["Hi"])
    assert shared_prefix_length(one) == int(one.attention_mask.sum()) - 1


def test_cached_prefill_equals_plain_prefill(tiny_model, batch):
    model, _ = tiny_model
    cached = prefill(model, batch, SITES)
    plain = prefill(model, batch, SITES, shared_prefix=False)
    assert cached.prefix_length > 0 and plain.prefix_length == 0
    real = batch.attention_mask.bool()
    for site in SITES:
        assert cached.site_outputs[site].shape == plain.site_outputs[site].shape
        close(cached.site_outputs[site][real], plain.site_outputs[site][real])
    torch.testing.assert_close(cached.last_logits, plain.last_logits, atol=1e-4, rtol=1e-4)
    # and the stopped-early pass (activations only) captures the same
    stopped = prefill(model, batch, SITES[:2], stop_early=True)
    assert stopped.cache is None and stopped.last_logits is None
    for site in SITES[:2]:
        close(stopped.site_outputs[site][real], plain.site_outputs[site][real])


def test_cached_p_ref_equals_uncached(tiny_model, batch):
    model, tok = tiny_model
    ids = torch.tensor(refusal_token_ids(tok, DEFAULT_REFUSAL_PHRASES))
    gen = generate(model, tok, batch, 3)
    close(last_token_refusal_prob(gen.first_logits, ids), p_refusal(model, batch, ids))


@pytest.mark.parametrize("stop_phrases", [None, ["the", "a"]])
def test_cached_decoder_gives_the_responses_of_model_generate(tiny_model, batch, stop_phrases):
    model, tok = tiny_model
    ours = generate(model, tok, batch, 12, stop_phrases=stop_phrases)
    no_prefix = generate(model, tok, batch, 12, stop_phrases=stop_phrases, shared_prefix=False)
    reference = generate_plain(model, tok, batch, 12, stop_phrases=stop_phrases)
    assert ours.responses == reference.responses == no_prefix.responses
    assert ours.stop_reasons == reference.stop_reasons
    assert all(r in ("eos", "judged", "length") for r in ours.stop_reasons)
    if stop_phrases:  # a common word stops most rows early, and then the loop runs fewer steps
        assert "judged" in ours.stop_reasons
        assert ours.decode_steps <= generate(model, tok, batch, 12).decode_steps
    torch.testing.assert_close(ours.first_logits, reference.first_logits, atol=1e-4, rtol=1e-4)


def test_batches_decoded_together_give_each_batch_its_own_responses(tiny_model):
    model, tok = tiny_model
    first, second = encode_chat(tok, PROMPTS[:2]), encode_chat(tok, PROMPTS[2:])  # different widths
    assert first.input_ids.shape[1] != second.input_ids.shape[1]
    joint = generate(model, tok, [first, second], 10, stop_phrases=["the"])
    alone = [generate_plain(model, tok, b, 10, stop_phrases=["the"]) for b in (first, second)]
    assert joint.responses == alone[0].responses + alone[1].responses
    assert joint.stop_reasons == alone[0].stop_reasons + alone[1].stop_reasons
    close(joint.first_logits, torch.cat([a.first_logits for a in alone]))


def test_bench_behaviour_reports_both_ways_with_identical_responses():
    from refusal_assets.bench.behaviour import run_behaviour_bench
    from refusal_assets_tests.conftest import ROOT

    out = run_behaviour_bench(
        str(ROOT / "configs" / "tiny.yaml"), n_prompts=6, repeats=1, log=lambda s: None
    )
    assert out["responses_identical"] is True and out["n_prompts"] == 6
    assert out["plain_seconds"] > 0 and out["ours_seconds"] > 0
    # seconds are kept to the microsecond (the tiny model runs in milliseconds), the ratio to 3 decimals
    assert out["ratio_ours_over_plain"] == pytest.approx(
        out["plain_seconds"] / out["ours_seconds"], rel=2e-3, abs=1e-3
    )
    assert 0 < out["ours_fraction_of_matmul_bound"] and 0 < out["plain_fraction_of_matmul_bound"]
    assert sum(out["stop_reasons"].values()) == 6
    assert out["ours_decode_rows"] <= out["plain_decode_rows"]
