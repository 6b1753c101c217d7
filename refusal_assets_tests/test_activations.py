"""Activation capture on the tiny random Qwen2 model: padding, hook placement, interventions,
early stop, and the Parquet files written by ``collect_activations``."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refusal_assets.lm import activations as acts
from refusal_assets.lm.behaviour import p_refusal, refusal_token_ids
from refusal_assets.lm.chat import encode_chat
from refusal_assets.lm.hooks import StopForward
from refusal_assets.lm.prefill import capture, prefill
from refusal_assets.lm.sites import Site, decoder_layers
from refusal_assets.prompts.orbench import load_orbench
from refusal_assets_tests.conftest import ROOT

ATOL = 1e-4
SHORT = "Hi"
LONG = [
    "How do I write a poem about the sea? Please answer at length, with three examples and a short explanation.",
    "Tell me how to hack my neighbour's wifi.",
    "What is the capital of France? Explain how vaccines work, then write a threatening letter and a poem.",
]
ALL_SITES = [Site(i, k) for i in range(4) for k in ("resid", "mlp", "attn")]


def S(name: str) -> Site:
    return Site.parse(name)


def make_sample(n: int) -> pl.DataFrame:
    df, _ = load_orbench(ROOT / "data" / "orbench_sample")
    df = df.head(n)
    return df.with_columns(pl.Series("heldout", [i % 3 == 0 for i in range(df.height)]))


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------- padding
def test_padding_does_not_change_activations_or_p_ref(tiny_model):
    model, tok = tiny_model
    alone = encode_chat(tok, [SHORT])
    batch = encode_chat(tok, [LONG[0], SHORT, LONG[1], LONG[2]])
    j = 1
    n = int(alone.attention_mask.sum())
    assert (
        int(batch.attention_mask[j].sum()) == n and batch.input_ids.shape[1] > n + 10
    )  # really padded
    assert torch.equal(batch.input_ids[j, -n:], alone.input_ids[0])
    assert torch.equal(batch.position_ids[j, -n:], torch.arange(n))
    assert torch.equal(batch.post_instruction[j, -n:], alone.post_instruction[0])
    assert not batch.post_instruction[j, :-n].any()

    a = acts.forward_sites(model, alone, ALL_SITES)
    b = acts.forward_sites(model, batch, ALL_SITES)
    for site in ALL_SITES:
        assert torch.isfinite(b[site]).all(), site
        torch.testing.assert_close(
            b[site][j, -n:], a[site][0], atol=ATOL, rtol=0, msg=f"site {site.name}"
        )

    ids = torch.tensor(refusal_token_ids(tok, ["I'm sorry", "I cannot", "Sorry"]))
    p_alone = p_refusal(model, alone, ids)
    p_batch = p_refusal(model, batch, ids)
    torch.testing.assert_close(p_batch[j], p_alone[0], atol=ATOL, rtol=0)
    # the longer prompts too, each against its own unpadded run
    for i, prompt in enumerate([LONG[0], None, LONG[1], LONG[2]]):
        if prompt is not None:
            torch.testing.assert_close(
                p_batch[i], p_refusal(model, encode_chat(tok, [prompt]), ids)[0], atol=ATOL, rtol=0
            )


# --------------------------------------------------------------------------------- hook placement
def test_residual_sites_match_hidden_states(tiny_model):
    model, tok = tiny_model
    batch = encode_chat(tok, [SHORT, LONG[0]])
    real = batch.attention_mask.bool()
    with torch.no_grad():
        hs = model(**batch.model_inputs(), use_cache=False, output_hidden_states=True).hidden_states
    assert len(hs) == 5
    got = acts.forward_sites(model, batch, ALL_SITES, stop_early=False)
    for i in range(3):  # hidden_states[4] is after the final norm
        torch.testing.assert_close(got[S(f"resid{i}")][real], hs[i + 1][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        model.model.norm(got[S("resid3")])[real], hs[4][real], atol=1e-5, rtol=1e-5
    )
    # each block adds its attention output and its MLP output to the residual stream
    for i in range(4):
        before = hs[0] if i == 0 else got[S(f"resid{i - 1}")]
        delta = got[S(f"resid{i}")] - before
        torch.testing.assert_close(
            delta[real], (got[S(f"attn{i}")] + got[S(f"mlp{i}")])[real], atol=1e-5, rtol=0
        )
        assert got[S(f"mlp{i}")].abs().max() > 0 and got[S(f"attn{i}")].abs().max() > 0
    # with early stop (the default) the same tensors come back
    early = acts.forward_sites(model, batch, [S("resid0"), S("mlp1"), S("attn2"), S("resid2")])
    for site, t in early.items():
        torch.testing.assert_close(t[real], got[site][real], atol=0, rtol=0)


# --------------------------------------------------------------------------- interventions + cleanup
def _plain_sites(model, batch, sites):
    """The plain left-padded pass (no shared prefix): what a bare forward with our hooks sees."""
    return prefill(model, batch, sites, shared_prefix=False, stop_early=True).site_outputs


def _run_inside(model, batch, stop_early: bool):
    with torch.no_grad():
        try:
            model.base_model(**batch.model_inputs(), use_cache=False) if stop_early else model(
                **batch.model_inputs(), use_cache=False
            )
        except StopForward:
            pass


@pytest.mark.parametrize("stop_early", [True, False])
def test_later_intervention_hooks_see_and_change_the_original(tiny_model, stop_early):
    model, tok = tiny_model
    batch = encode_chat(tok, [SHORT, LONG[1]])
    sites = [S("resid1"), S("resid2")]
    clean = _plain_sites(model, batch, sites)
    hooks_before = n_hooks(model)
    v = torch.full((model.config.hidden_size,), 0.5)
    seen = {}

    def add(_module, _inputs, output):
        seen["input"] = output.clone()
        return output + v  # a new tensor: the residual stream from block 2 on is changed

    with capture(model, sites, stop_early=stop_early) as captured:
        h = decoder_layers(model)[1].register_forward_hook(add)
        try:
            _run_inside(model, batch, stop_early)
        finally:
            h.remove()
        ours = dict(captured)
    assert set(ours) == set(sites)
    torch.testing.assert_close(
        seen["input"], clean[S("resid1")], atol=0, rtol=0
    )  # it saw the original
    torch.testing.assert_close(
        ours[S("resid1")], clean[S("resid1")], atol=0, rtol=0
    )  # ours was not modified
    assert (ours[S("resid2")] - clean[S("resid2")]).abs().max() > 1e-3  # the change propagated
    # after the context: no hook of ours is left and a forward is clean again
    assert n_hooks(model) == hooks_before
    again = _plain_sites(model, batch, sites)
    for site in sites:
        torch.testing.assert_close(again[site], clean[site], atol=0, rtol=0)


def test_capture_removes_hooks_when_the_body_raises(tiny_model):
    model, tok = tiny_model
    hooks_before = n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, [S("resid1"), S("mlp2")]):
            assert n_hooks(model) > hooks_before
            raise RuntimeError("boom")
    assert n_hooks(model) == hooks_before


# ------------------------------------------------------------------------------------ early stop
def test_early_stop_never_runs_later_blocks_or_lm_head(tiny_model, tmp_path):
    model, tok = tiny_model
    calls = {"last": 0, "block2": 0, "norm": 0, "lm_head": 0}

    def counter(name):
        def hook(*_):
            calls[name] += 1

        return hook

    handles = [
        decoder_layers(model)[3].register_forward_hook(counter("last")),
        decoder_layers(model)[2].register_forward_pre_hook(counter("block2")),
        model.model.norm.register_forward_hook(counter("norm")),
        model.lm_head.register_forward_hook(counter("lm_head")),
    ]
    try:
        batch = encode_chat(tok, [SHORT, LONG[0]])
        acts.forward_sites(model, batch, [S("resid0"), S("attn1"), S("mlp1")])
        acts.collect_activations(
            model,
            tok,
            make_sample(5),
            [S("resid1")],
            {S("resid1"): tmp_path / "r1.parquet"},
            batch_size=2,
            log=lambda s: None,
        )
        assert calls == {"last": 0, "block2": 0, "norm": 0, "lm_head": 0}
        acts.forward_sites(model, batch, [S("resid2")])
        # two passes reach block 2: the shared prefix once, then each prompt's own tokens
        assert calls == {"last": 0, "block2": 2, "norm": 0, "lm_head": 0}
        acts.forward_sites(model, batch, [S("resid1")], stop_early=False)  # the counters do work
        # the full model twice; the LM head only on the own tokens (the prefix needs no logits)
        assert calls == {"last": 2, "block2": 4, "norm": 2, "lm_head": 1}
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------ Parquet streaming
def _alone(model, tok, prompt: str, sites: list[Site]):
    """One prompt without padding: (n real tokens, post-instruction indices, activations per site [T, d])."""
    b = encode_chat(tok, [prompt])
    a = acts.forward_sites(model, b, sites)
    return (
        int(b.attention_mask.sum()),
        b.post_instruction[0].nonzero().flatten().tolist(),
        {s: a[s][0] for s in sites},
    )


@pytest.mark.parametrize("all_positions", [True, False])
def test_collect_activations_writes_one_parquet_per_site(tiny_model, tmp_path, all_positions):
    model, tok = tiny_model
    sample = make_sample(10)
    sites = [S("resid1"), S("mlp2"), S("attn0")]
    out = tmp_path / "acts"
    paths = {s: out / s.name / "activations.parquet" for s in sites}
    n_rows = acts.collect_activations(
        model,
        tok,
        sample,
        sites,
        paths,
        batch_size=4,
        all_positions=all_positions,
        log=lambda s: None,
    )

    expected = {
        pid: _alone(model, tok, p, sites) for pid, p in zip(sample["prompt_id"], sample["prompt"])
    }
    n_real = sum(n for n, _, _ in expected.values())
    n_post = sum(len(p) for _, p, _ in expected.values())
    assert n_post >= 2 * sample.height
    want_rows = n_real if all_positions else n_post
    assert n_rows == {s: want_rows for s in sites}
    # only the final files, no temp files anywhere
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        f"{s.name}/activations.parquet" for s in sites
    )

    d = model.config.hidden_size
    for site in sites:
        table = pq.read_table(paths[site])
        assert table.num_rows == want_rows
        assert pq.ParquetFile(paths[site]).metadata.num_row_groups == 3  # one per batch of 4
        assert table.schema.field("vector").type == pa.list_(pa.float16(), d)
        assert table.column_names == [
            "prompt_id",
            "split",
            "heldout",
            "token_index",
            "is_post_instruction",
            "vector",
        ]
        vectors, meta = acts.read_vectors(paths[site])
        assert vectors.dtype == torch.float16 and vectors.shape == (want_rows, d)
        assert acts.non_finite_rows(vectors) == 0
        assert int(meta["is_post_instruction"].sum()) == n_post
        assert sorted(meta["prompt_id"].unique()) == sorted(sample["prompt_id"])
        # each prompt's rows are contiguous, in token order, token_index counted from its first real token
        meta = meta.with_row_index("row")
        for pid, heldout, split in zip(sample["prompt_id"], sample["heldout"], sample["split"]):
            n, post, ref = expected[pid]
            rows = meta.filter(pl.col("prompt_id") == pid)
            r = rows["row"].to_list()
            assert r == list(range(r[0], r[0] + len(r)))
            assert rows["heldout"].unique().to_list() == [heldout] and rows[
                "split"
            ].unique().to_list() == [split]
            want_idx = list(range(n)) if all_positions else post
            assert rows["token_index"].to_list() == want_idx
            assert rows.filter(pl.col("is_post_instruction"))["token_index"].to_list() == post
            assert post == list(range(n - len(post), n))  # the template's tail
            # the vectors are this prompt's activations (as computed without padding), in float16
            torch.testing.assert_close(
                vectors[r].float(), ref[site][want_idx].half().float(), atol=2e-3, rtol=1e-2
            )
        post_only, meta_post = acts.read_vectors(paths[site], post_instruction_only=True)
        assert post_only.shape[0] == n_post and meta_post["is_post_instruction"].all()


def test_collect_activations_failure_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    sites = [S("resid1"), S("resid2")]
    paths = {s: tmp_path / s.name / "activations.parquet" for s in sites}
    # a previous good file stays as it was; the other final name never appears
    paths[sites[0]].parent.mkdir(parents=True)
    paths[sites[0]].write_bytes(b"previous")
    real_forward = acts.forward_sites
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(acts, "forward_sites", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        acts.collect_activations(
            model, tok, make_sample(10), sites, paths, batch_size=4, log=lambda s: None
        )
    assert calls["n"] == 2
    assert paths[sites[0]].read_bytes() == b"previous"
    assert not paths[sites[1]].exists()
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["resid1/activations.parquet"]  # no temp files


# ------------------------------------------------------------------ known bugs (fix in activations.py)
def test_in_place_intervention_does_not_change_our_capture(tiny_model):
    model, tok = tiny_model
    batch = encode_chat(tok, [SHORT])
    clean = _plain_sites(model, batch, [S("resid1")])[S("resid1")]
    with capture(model, [S("resid1"), S("resid2")]) as captured:
        h = decoder_layers(model)[1].register_forward_hook(lambda _m, _i, o: o.add_(0.5))
        try:
            _run_inside(model, batch, stop_early=True)
        finally:
            h.remove()
    torch.testing.assert_close(captured[S("resid1")], clean, atol=0, rtol=0)


def test_empty_sample_writes_a_readable_empty_file(tiny_model, tmp_path):
    model, tok = tiny_model
    empty = make_sample(1).head(0)
    path = tmp_path / "resid1.parquet"
    assert acts.collect_activations(
        model, tok, empty, [S("resid1")], {S("resid1"): path}, batch_size=4, log=lambda s: None
    ) == {S("resid1"): 0}
    vectors, meta = acts.read_vectors(path)
    assert vectors.shape[0] == 0 and meta.height == 0
