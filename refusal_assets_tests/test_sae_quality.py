"""Honest SAE quality: the three-way prompt split, de-duplication of template rows, held-out metrics,
the streamed (Parquet) and in-memory paths of ``fit_site`` agreeing, and the splice's refusal score."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refusal_assets.config import SAEConfig
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.sites import Site
from refusal_assets.sae.fit import FitOptions, _held_out_texts, fit_site
from refusal_assets.sae.rows import ParquetRows, TensorRows
from refusal_assets.sae.splice import splice_metrics
from refusal_assets.sae.splits import distinct_split, row_keys, split_prompts

PREFIX, PER_PROMPT, N_PROMPTS, D = 4, 12, 50, 32


def template_data(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``x [N_PROMPTS * PER_PROMPT, D]`` float16 where each prompt's first ``PREFIX`` rows are the same
    vectors in every prompt (a chat-template prefix) and its last 3 rows are post-instruction."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randn(PREFIX, D, generator=gen)
    x = torch.randn(N_PROMPTS, PER_PROMPT, D, generator=gen)
    x[:, :PREFIX] = prefix
    pids = np.array(
        [f"p{i:02d}" for i in range(N_PROMPTS) for _ in range(PER_PROMPT)], dtype=object
    )
    post = np.tile(np.arange(PER_PROMPT) >= PER_PROMPT - 3, N_PROMPTS)
    return x.reshape(-1, D).half(), pids, post


def test_split_prompts_three_way_disjoint_by_prompt():
    groups = np.repeat(np.arange(40), 7)
    rng = np.random.default_rng(1)
    sp = split_prompts(groups, 0.1, 0.2, seed=3)
    assert sorted(np.concatenate(sp).tolist()) == list(
        range(len(groups))
    )  # a partition of the rows
    train, val, ev = (set(groups[p].tolist()) for p in sp)
    assert not train & val and not train & ev and not val & ev
    assert (len(val), len(ev)) == (4, 8)
    # the split is a function of the prompt ids, not of the row order
    perm = rng.permutation(len(groups))
    again = split_prompts(groups[perm], 0.1, 0.2, seed=3)
    assert (
        set(groups[perm][again.eval].tolist()) == ev
        and set(groups[perm][again.val].tolist()) == val
    )
    with pytest.raises(ValueError, match="at least 3 groups"):
        split_prompts(np.array([0, 0, 1]), 0.1, 0.1, 0)


def test_distinct_split_drops_repeats_and_flags_template_rows():
    x, pids, _ = template_data()
    _, groups = np.unique(pids, return_inverse=True)
    keys = row_keys(TensorRows(x))
    site = distinct_split(groups, keys, SAEConfig(val_fraction=0.1, eval_fraction=0.2))
    template_at = np.tile(np.arange(PER_PROMPT) < PREFIX, N_PROMPTS)
    assert np.array_equal(site.template, template_at)
    assert site.n_distinct == PREFIX + N_PROMPTS * (PER_PROMPT - PREFIX)
    sp = site.split
    # each prefix vector is trained on once; held-out parts hold no vector that is in training
    assert len(np.unique(keys[sp.train])) == len(sp.train)
    assert template_at[sp.train].sum() == PREFIX
    assert not template_at[sp.val].any() and not template_at[sp.eval].any()
    assert not set(keys[sp.eval].tolist()) & set(keys[sp.train].tolist())
    # no validation or evaluation row shares a prompt with a training row
    train_prompts = set(groups[sp.train].tolist())
    assert not train_prompts & set(groups[sp.val].tolist()) and not train_prompts & set(
        groups[sp.eval].tolist()
    )
    assert len(sp.eval) == 10 * (PER_PROMPT - PREFIX) and len(sp.val) == 5 * (PER_PROMPT - PREFIX)


def test_config_rejects_no_training_prompts():
    with pytest.raises(
        ValueError, match=r"val_fraction \(0.5\) \+ sae.eval_fraction \(0.5\) must be < 1"
    ):
        SAEConfig(val_fraction=0.5, eval_fraction=0.5)


def write_activations(
    folder, x: torch.Tensor, pids: np.ndarray, post: np.ndarray, n_files: int = 2
) -> list:
    """The site's rows as ``n_files`` activation files (the ``activations`` asset's columns)."""
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(x)), n_files)):
        v = x[part].numpy()
        table = pa.table(
            {
                "prompt_id": pa.array(pids[part].tolist(), pa.string()),
                "is_post_instruction": pa.array(post[part]),
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(v.reshape(-1), pa.float16()), v.shape[1]
                ),
            }
        )
        paths.append(folder / f"c{i}.parquet")
        pq.write_table(table, paths[-1], row_group_size=100)
    return paths


def test_fit_site_streamed_equals_in_memory_and_measures_held_out_prompts(tiny_model, tmp_path):
    model, tok = tiny_model
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    x, pids, post = template_data()
    x = torch.randn(len(x), d, generator=gen).half()
    x.view(N_PROMPTS, PER_PROMPT, d)[:, :PREFIX] = x[
        :PREFIX
    ]  # the shared prefix, at the model's width
    prompts = pl.DataFrame(
        {
            "prompt_id": [f"p{i:02d}" for i in range(N_PROMPTS)],
            "prompt": [f"Question {i}: what is {i} + 1?" for i in range(N_PROMPTS)],
            "category": ["a", "b"] * (N_PROMPTS // 2),
        }
    )
    cfg = SAEConfig(
        expansion_factor=2,
        k=8,
        max_steps=20,
        eval_every=10,
        batch_size=64,
        aux_k=16,
        val_fraction=0.1,
        eval_fraction=0.2,
    )
    kw = dict(
        post_instruction=post,
        options=FitOptions(refusal_ids=lambda t: refusal_token_ids(t, ["I cannot", "Sorry"])),
    )
    a = fit_site(
        x, pl.Series(pids.tolist()), cfg, lambda: (model, tok), Site(1, "resid"), prompts, **kw
    )
    rows = ParquetRows.from_parquet(
        write_activations(tmp_path, x, pids, post), scratch=tmp_path / "scratch"
    )
    b = fit_site(
        rows, pl.Series(pids.tolist()), cfg, lambda: (model, tok), Site(1, "resid"), prompts, **kw
    )
    rows.close()
    assert torch.equal(a.sae.W_dec, b.sae.W_dec) and torch.equal(a.sae.W_enc, b.sae.W_enc)
    assert a.metrics == b.metrics and a.eval_prompt_ids == b.eval_prompt_ids
    m = a.metrics
    assert m["n_eval_prompts"] == 10 and len(a.eval_prompt_ids) == 10
    assert m["n_template_rows"] == N_PROMPTS * PREFIX and m[
        "n_distinct_rows"
    ] == PREFIX + N_PROMPTS * (PER_PROMPT - PREFIX)
    assert m["n_train_rows"] == PREFIX + 35 * (
        PER_PROMPT - PREFIX
    )  # the prefix once, 35 training prompts' own rows
    assert (
        m["n_eval_rows"] == 10 * (PER_PROMPT - PREFIX) and m["n_eval_post_instruction_rows"] == 30
    )
    assert 0 < m["fvu"] < 2 and 0 < m["fvu_post_instruction"] < 2 and np.isfinite(m["fvu_val"])
    assert 0 < m["fvu_train"] < m["fvu"]  # its own rows fit better than held-out prompts' rows
    assert m["l0"] == pytest.approx(8.0)
    assert (
        0 <= m["dead_fraction_with_template"] <= m["dead_fraction"] <= m["dead_fraction_val"] <= 1
    )
    s = a.splice
    # held-out prompts only: prompts_per_category (2) of each category's evaluation prompts
    assert s["n_prompts"] == 4 and s["n_tokens"] > 0
    assert s["delta_ce"] == pytest.approx(s["loss_spliced"] - s["loss_clean"])
    assert s["refusal_score_change"] == pytest.approx(
        s["refusal_score_spliced"] - s["refusal_score_clean"]
    )
    assert s["refusal_score_abs_change"] >= abs(s["refusal_score_change"]) - 1e-12


def test_splice_prompts_are_held_out_ones_per_category():
    prompts = pl.DataFrame(
        {
            "prompt_id": ["a1", "a2", "a3", "b1", "b2"],
            "prompt": ["A1", "A2", "A3", "B1", "B2"],
            "category": ["a", "a", "a", "b", "b"],
        }
    )
    assert _held_out_texts(prompts, {"a2", "a3", "b2", "zz"}, 1) == ["A2", "B2"]
    assert _held_out_texts(prompts.drop("category"), {"a3", "b1"}, 5) == ["A3", "B1"]
    with pytest.raises(ValueError, match="none of the 1 held-out"):
        _held_out_texts(prompts, {"zz"}, 2)
    with pytest.raises(ValueError, match="missing column 'prompt'"):
        _held_out_texts(prompts.drop("prompt"), {"a1"}, 2)


class Identity(torch.nn.Module):
    def encode(self, x):
        return x

    def decode(self, z):
        return z


class Zero(Identity):
    def decode(self, z):
        return torch.zeros_like(z)


def test_splice_identity_changes_nothing_and_zero_recovers_nothing(tiny_model):
    model, tok = tiny_model
    ids = torch.tensor(refusal_token_ids(tok, ["I cannot", "Sorry"]))
    prompts = ["Hello there", "What is the capital of France?", "Tell me a joke."]
    same = splice_metrics(
        model, tok, prompts, Site(1, "resid"), Identity(), batch_size=2, refusal_ids=ids
    )
    assert same["delta_ce"] == pytest.approx(0, abs=1e-5) and same["kl_spliced"] == pytest.approx(
        0, abs=1e-5
    )
    assert same["refusal_score_change"] == pytest.approx(0, abs=1e-4) and same[
        "loss_recovered"
    ] == pytest.approx(1, abs=1e-4)
    assert same["n_prompts"] == 3
    zero = splice_metrics(
        model, tok, prompts, Site(1, "resid"), Zero(), batch_size=2, refusal_ids=ids
    )
    assert zero["loss_recovered"] == pytest.approx(0, abs=1e-5) and zero["kl_spliced"] > 0
    assert zero["refusal_score_abs_change"] > 0
    assert "refusal_score_change" not in splice_metrics(
        model, tok, prompts[:1], Site(1, "resid"), Identity(), batch_size=2
    )


def test_splice_with_the_shared_prefix_once_equals_the_plain_pass(tiny_model):
    from refusal_assets.lm.chat import encode_chat
    from refusal_assets.lm.prefill import full_logits
    from refusal_assets.sae.model import TopKSAE

    model, tok = tiny_model
    prompts = [
        "Hello there",
        "What is the capital of France?",
        "Tell me a joke about a very long cat.",
    ]
    batch = encode_chat(tok, prompts)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(
        full_logits(model, batch)[real],
        full_logits(model, batch, False)[real],
        atol=1e-4,
        rtol=1e-4,
    )
    sae = TopKSAE(model.config.hidden_size, 64, 4, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor(refusal_token_ids(tok, ["I cannot", "Sorry"]))
    kw = dict(batch_size=3, refusal_ids=ids)
    shared = splice_metrics(model, tok, prompts, Site(1, "resid"), sae, **kw)
    plain = splice_metrics(model, tok, prompts, Site(1, "resid"), sae, shared_prefix=False, **kw)
    assert (
        shared["kl_spliced"] > 1e-3
    )  # the SAE does change the output: the comparison means something
    assert shared.keys() == plain.keys()
    for key in shared:
        assert shared[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-4), key


def test_fit_site_pretrained_is_measured_on_the_same_held_out_rows(tiny_model, tmp_path):
    from refusal_assets.sae.files import save_sae
    from refusal_assets.sae.model import TopKSAE

    model, tok = tiny_model
    d = model.config.hidden_size
    x = torch.randn(N_PROMPTS * PER_PROMPT, d, generator=torch.Generator().manual_seed(2)).half()
    pids = pl.Series([f"p{i // PER_PROMPT:02d}" for i in range(len(x))])
    prompts = pl.DataFrame(
        {
            "prompt_id": [f"p{i:02d}" for i in range(N_PROMPTS)],
            "prompt": ["Hello there"] * N_PROMPTS,
        }
    )
    save_sae(
        TopKSAE(d, 2 * d, 8, generator=torch.Generator().manual_seed(0)),
        tmp_path / "pre",
        {"hook_name": "resid1"},
    )
    cfg = SAEConfig(k=8, eval_fraction=0.2)
    loaded = fit_site(
        x,
        pids,
        cfg,
        lambda: (model, tok),
        Site(1, "resid"),
        prompts,
        options=FitOptions(pretrained="pre", resolve=lambda s: tmp_path / s),
    )
    assert loaded.history == {"pretrained": "pre"} and loaded.pretrained == "pre"
    assert (
        loaded.metrics["n_eval_prompts"] == 10
        and loaded.sae.d_sae == 2 * d
        and np.isfinite(loaded.metrics["fvu"])
    )
    assert np.isnan(loaded.metrics["fvu_train"])  # it never trained on the training prompts' rows
    save_sae(TopKSAE(d + 1, 8, 4), tmp_path / "wide", {"hook_name": "resid1"})
    with pytest.raises(
        ValueError,
        match=rf"wide/cfg.json: SAE has d_in {d + 1} but the site's activations have width {d}",
    ):
        fit_site(
            x,
            pids,
            cfg,
            lambda: (model, tok),
            Site(1, "resid"),
            prompts,
            options=FitOptions(pretrained=str(tmp_path / "wide")),
        )
