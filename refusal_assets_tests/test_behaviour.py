"""Refusal judgement, refusal tokens, refusal score, Wilson intervals, and run_behaviour on the tiny model."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from refusal_assets.config import DEFAULT_REFUSAL_PHRASES
from refusal_assets.lm.behaviour import (
    judge_refusal,
    last_token_refusal_prob,
    p_refusal,
    refusal_rates,
    refusal_score,
    refusal_token_ids,
    run_behaviour,
    wilson_interval,
)
from refusal_assets.lm.chat import encode_chat
from refusal_assets.prompts.orbench import load_orbench
from refusal_assets_tests.conftest import ROOT


# ------------------------------------------------------------------------------------------ judge
@pytest.mark.parametrize(
    "response, refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("i'm SORRY about that", True),
        ("I can’t do that.", True),  # curly apostrophe
        ("I’m afraid not.", False),  # no phrase, only an apostrophe
        ("As an AI language model, ...", True),
        ("UNFORTUNATELY the answer is no", True),
        ("Sure, here is a poem about the sea.", False),
        ("", False),
        ("I can help with that.", False),
    ],
)
def test_judge_refusal_default_phrases(response, refused):
    assert judge_refusal(response, DEFAULT_REFUSAL_PHRASES) is refused


def test_judge_refusal_custom_phrases():
    assert judge_refusal("Nope, NOT doing it", ["not doing"])
    assert not judge_refusal("Nope", ["not doing"])


def test_judge_refusal_curly_apostrophe_in_phrase():
    assert judge_refusal("I can’t help", ["I can’t"])
    assert judge_refusal("I can't help", ["I can’t"])


# ------------------------------------------------------------------------------- refusal tokens
def test_refusal_token_ids_configured_tokens(tiny_model):
    _, tok = tiny_model
    ids = refusal_token_ids(tok, DEFAULT_REFUSAL_PHRASES, ["I", " I"])
    assert ids == sorted(
        {
            tok.encode("I", add_special_tokens=False)[0],
            tok.encode(" I", add_special_tokens=False)[0],
        }
    )
    assert len(ids) == 2


def test_refusal_token_ids_multi_token_configured_token_raises(tiny_model):
    _, tok = tiny_model
    assert len(tok.encode("Unfortunately", add_special_tokens=False)) > 1
    with pytest.raises(ValueError, match="'Unfortunately'"):
        refusal_token_ids(tok, DEFAULT_REFUSAL_PHRASES, ["I", "Unfortunately"])


def test_refusal_token_ids_from_phrases(tiny_model):
    _, tok = tiny_model
    phrases = ["I'm sorry", "Sorry", "Unfortunately"]
    want = {tok.encode(v, add_special_tokens=False)[0] for p in phrases for v in (p, " " + p)}
    ids = refusal_token_ids(tok, phrases)
    assert ids == sorted(want) and all(isinstance(i, int) for i in ids)
    assert (
        refusal_token_ids(tok, phrases, []) == ids
    )  # an empty list means "derive from the phrases"


# -------------------------------------------------------------------------------- refusal score
def test_refusal_score_is_log_odds_and_finite_at_the_ends():
    p = torch.tensor([0.0, 1e-9, 0.1, 0.5, 0.9, 1.0])
    s = refusal_score(p)
    assert torch.isfinite(s).all()
    assert s[3].item() == pytest.approx(0.0, abs=1e-6)
    assert s[2].item() == pytest.approx(math.log(0.1 / 0.9), rel=1e-5)
    assert s[4].item() == pytest.approx(math.log(9), rel=1e-5)
    assert s[0] < s[2] < s[3] < s[4] < s[5]
    assert s[0].item() == pytest.approx(-s[5].item(), rel=1e-3)  # clamped symmetrically
    assert s[0].item() < -10


def test_last_token_refusal_prob_sums_the_refusal_mass():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    p = last_token_refusal_prob(logits, torch.tensor([1, 3]))
    torch.testing.assert_close(p, torch.tensor([0.6, 0.5]))


# ------------------------------------------------------------------------------------- Wilson
def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(1 - 0.2775, abs=1e-4) and hi == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_refusal_rates_per_split():
    df = pl.DataFrame(
        {
            "split": ["safe"] * 10 + ["toxic"] * 10,
            "refused": [False] * 10 + [True] * 5 + [False] * 5,
            "p_refusal": [0.1] * 20,
        }
    )
    rates = refusal_rates(df)
    assert set(rates) == {"all", "safe", "toxic"}
    assert rates["safe"]["rate"] == 0 and rates["safe"]["hi"] == pytest.approx(0.2775, abs=1e-4)
    assert rates["toxic"]["rate"] == 0.5 and rates["toxic"]["lo"] == pytest.approx(0.2366, abs=1e-4)
    assert rates["all"]["n"] == 20 and rates["all"]["rate"] == 0.25


# ------------------------------------------------------------------------------- run_behaviour
def test_run_behaviour_on_tiny_model(tiny_model, tiny_cfg):
    model, tok = tiny_model
    cfg = tiny_cfg.models[0]
    df, _ = load_orbench(ROOT / "data" / "orbench_sample")
    sample = df.head(5).with_columns(pl.Series("heldout", [False, True, False, False, True]))
    out = run_behaviour(model, tok, sample, cfg, log=lambda s: None)
    assert out.columns == [
        "prompt_id",
        "split",
        "heldout",
        "response",
        "refused",
        "p_refusal",
        "refusal_score",
        "stop_reason",
    ]
    assert set(out["stop_reason"]) <= {"eos", "judged", "length"}
    assert out.height == 5
    # one row per prompt (in any order), with the sample's split and heldout flag
    joined = sample.join(out, on="prompt_id", how="inner", suffix="_out")
    assert joined.height == 5 and out["prompt_id"].n_unique() == 5
    assert joined["heldout"].to_list() == joined["heldout_out"].to_list()
    assert joined["split"].to_list() == joined["split_out"].to_list()
    assert out["response"].dtype == pl.Utf8 and out["refused"].dtype == pl.Boolean
    p = out["p_refusal"].to_numpy()
    assert ((p >= 0) & (p <= 1)).all()
    s = out["refusal_score"].to_numpy()
    assert (abs(s - [math.log(max(x, 1e-6) / (1 - min(x, 1 - 1e-6))) for x in p]) < 1e-3).all()
    assert out["refused"].to_list() == [
        judge_refusal(r, cfg.refusal.phrases) for r in out["response"]
    ]
    # p_refusal does not depend on the batch: the first prompt alone gives the same value
    ids = torch.tensor(refusal_token_ids(tok, cfg.refusal.phrases, cfg.refusal.refusal_tokens))
    for pid, prompt in zip(sample["prompt_id"], sample["prompt"]):
        alone = p_refusal(model, encode_chat(tok, [prompt], cfg.chat_template.system_prompt), ids)
        assert alone.item() == pytest.approx(
            out.filter(pl.col("prompt_id") == pid)["p_refusal"].item(), abs=1e-4
        )


def test_run_behaviour_empty_sample(tiny_model, tiny_cfg):
    model, tok = tiny_model
    df, _ = load_orbench(ROOT / "data" / "orbench_sample")
    empty = df.head(0).with_columns(pl.Series("heldout", [], dtype=pl.Boolean))
    out = run_behaviour(model, tok, empty, tiny_cfg.models[0], log=lambda s: None)
    assert out.height == 0


def test_greedy_generation_does_not_depend_on_padding(tiny_model):
    from refusal_assets.lm.behaviour import generate

    def texts(batch):
        out = generate(model, tok, batch, 6)
        return out[0] if isinstance(out, tuple) else out  # (texts, first-step logits) or texts

    model, tok = tiny_model
    short, longer = (
        "Hi",
        "How do I write a poem about the sea? Please answer at length, with three examples.",
    )
    alone = texts(encode_chat(tok, [short]))
    batched = texts(encode_chat(tok, [longer, short]))
    assert batched[1] == alone[0]
    assert batched[0] == texts(encode_chat(tok, [longer]))[0]


def test_refusal_score_from_logits_is_log_odds_unclamped_with_gradients():
    from refusal_assets.lm.behaviour import refusal_score_from_logits

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    ids = torch.tensor([1, 3])
    s = refusal_score_from_logits(logits, ids)
    torch.testing.assert_close(s, torch.tensor([math.log(0.6 / 0.4), 0.0]))
    # a confident refusal: p_ref = 1 - 1e-20 in float64 terms; the clamp would give 13.8 and no gradient
    extreme = torch.tensor([[0.0, 60.0, 0.0, 60.0]], requires_grad=True)
    s = refusal_score_from_logits(extreme, ids)
    assert s.item() == pytest.approx(60.0, abs=1e-4)  # log(2 e^60) - log(2)
    s.sum().backward()
    assert (extreme.grad.abs() > 0.1).all()  # every logit still moves the score
    with pytest.raises(ValueError, match="refusal tokens"):
        refusal_score_from_logits(logits, torch.arange(4))
