"""The SAE training corpus (``sae.corpus``): extra prompts whose rows only train the SAEs.

What must hold: the corpus never changes which prompts are held out (so the reported numbers are
measured on the same rows with or without it), a corpus prompt that is also a study prompt is left
out, the corpus loader's errors name the file or key, and editing the corpus reruns its asset.
"""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from refusal_assets.app import cli, settings
from refusal_assets.config import SAEConfig, SAECorpusConfig, load_config
from refusal_assets.defs.build import build_defs
from refusal_assets.layout import Layout
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.sites import Site
from refusal_assets.prompts.orbench import DataError, corpus_fingerprint, load_corpus, prompt_id
from refusal_assets.sae.fit import FitOptions, fit_site
from refusal_assets.sae.splits import site_split, split_prompts

from .conftest import ROOT
from .test_sae_quality import N_PROMPTS, PER_PROMPT, PREFIX


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_corpus_reads_prompt_column_dedups_and_subsamples(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write(
        folder / "a.csv",
        'prompt,topic\nHow do I boil an egg?,food\n"Fix my code, please",code\n,empty\n',
    )
    _write(folder / "b.csv", "prompt\nHow do I boil an egg?\nWhat is a prime number?\n")
    _write(folder / "notes.md", "not a csv: ignored\n")
    df = load_corpus(SAECorpusConfig(path=str(folder)), lambda p: p)
    assert sorted(df["prompt"].to_list()) == [
        "Fix my code, please",
        "How do I boil an egg?",
        "What is a prime number?",
    ]
    assert df["prompt_id"].to_list() == [
        prompt_id(p) for p in df["prompt"].to_list()
    ]  # same ids as the study's
    assert set(df["split"].to_list()) == {"corpus"} and not df["heldout"].any()
    two = load_corpus(SAECorpusConfig(path=str(folder), max_prompts=2, seed=1), lambda p: p)
    assert two.height == 2 and set(two["prompt"]) <= set(df["prompt"])
    assert two.equals(
        load_corpus(SAECorpusConfig(path=str(folder), max_prompts=2, seed=1), lambda p: p)
    )
    # a file path works as well as a folder
    assert load_corpus(SAECorpusConfig(path=str(folder / "b.csv")), lambda p: p).height == 2


def test_load_corpus_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(DataError, match=r"sae\.corpus\.path.*does not exist"):
        load_corpus(SAECorpusConfig(path=str(tmp_path / "missing.csv")), lambda p: p)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir holds no \*\.csv"):
        load_corpus(SAECorpusConfig(path=str(tmp_path / "empty_dir")), lambda p: p)
    bad = _write(tmp_path / "bad.csv", "text,topic\nhello,x\n")
    with pytest.raises(
        DataError, match=r"bad\.csv: no 'prompt' column in the header \['text', 'topic'\]"
    ):
        load_corpus(SAECorpusConfig(path=str(bad)), lambda p: p)
    blank = _write(tmp_path / "blank.csv", "prompt\n\n  \n")
    with pytest.raises(DataError, match="holds no prompt"):
        load_corpus(SAECorpusConfig(path=str(blank)), lambda p: p)
    with pytest.raises(DataError, match=r"latin\.csv: not valid UTF-8 at line 2"):
        (tmp_path / "latin.csv").write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
        load_corpus(SAECorpusConfig(path=str(tmp_path / "latin.csv")), lambda p: p)


def test_corpus_fingerprint_follows_the_bytes(tmp_path):
    f = _write(tmp_path / "c.csv", "prompt\nA question?\n")
    cfg = SAECorpusConfig(path=str(f))
    before = corpus_fingerprint(cfg, lambda p: p)
    assert corpus_fingerprint(cfg, lambda p: p) == before
    _write(f, "prompt\nA question?\nAnother one?\n")
    assert corpus_fingerprint(cfg, lambda p: p) != before


def test_site_split_holds_out_the_same_prompts_with_a_corpus():
    cfg = SAEConfig(val_fraction=0.1, eval_fraction=0.2, seed=4)
    study = np.repeat(np.arange(40), 5)
    alone = split_prompts(study, cfg.val_fraction, cfg.eval_fraction, cfg.seed)
    # corpus groups interleaved in the codes (ids sort among the study's) and rows appended after
    study_codes = np.arange(0, 80, 2)[study]  # the study's prompts get codes 0, 2, 4, ...
    corpus_codes = np.repeat(np.arange(1, 80, 2), 3)
    groups = np.concatenate([study_codes, corpus_codes])
    train_only = np.arange(len(groups)) >= len(study)
    sp = site_split(groups, cfg, train_only)
    assert np.array_equal(sp.val, alone.val) and np.array_equal(sp.eval, alone.eval)
    assert set(np.flatnonzero(train_only)) <= set(sp.train.tolist())
    assert np.array_equal(sp.train[sp.train < len(study)], alone.train)
    assert sorted(np.concatenate(sp).tolist()) == list(range(len(groups)))
    with pytest.raises(ValueError, match="one train_only flag per row"):
        site_split(groups, cfg, train_only[:-1])


def test_fit_site_trains_on_the_corpus_and_measures_the_same_held_out_rows(tiny_model):
    model, tok = tiny_model
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_PROMPTS * PER_PROMPT, d, generator=gen).half()
    x.view(N_PROMPTS, PER_PROMPT, d)[:, :PREFIX] = x[:PREFIX]  # a shared chat-template prefix
    pids = np.array(
        [f"p{i:02d}" for i in range(N_PROMPTS) for _ in range(PER_PROMPT)], dtype=object
    )
    post = np.tile(np.arange(PER_PROMPT) >= PER_PROMPT - 3, N_PROMPTS)
    prompts = pl.DataFrame(
        {
            "prompt_id": [f"p{i:02d}" for i in range(N_PROMPTS)],
            "prompt": [f"Question {i}: what is {i} + 1?" for i in range(N_PROMPTS)],
            "category": ["a", "b"] * (N_PROMPTS // 2),
        }
    )
    # 20 corpus prompts of 8 rows: the template prefix, then their own vectors; the last corpus
    # prompt repeats study prompt p03 (same id, same rows), which must not reach training
    n_corpus, per = 20, 8
    cx = torch.randn(n_corpus, per, d, generator=gen).half()
    cx[:, :PREFIX] = x[:PREFIX]
    cx[-1] = x.view(N_PROMPTS, PER_PROMPT, d)[3, :per]
    cpids = np.array(
        [f"c{i:02d}" for i in range(n_corpus - 1) for _ in range(per)] + ["p03"] * per, dtype=object
    )
    rows = torch.cat([x, cx.reshape(-1, d)])
    all_pids = np.concatenate([pids, cpids])
    train_only = np.arange(len(rows)) >= len(x)
    cfg = SAEConfig(
        expansion_factor=2,
        k=8,
        max_steps=20,
        eval_every=10,
        batch_size=64,
        aux_k=16,
        eval_fraction=0.2,
    )
    kw = dict(options=FitOptions(refusal_ids=lambda t: refusal_token_ids(t, ["I cannot", "Sorry"])))
    lm = lambda: (model, tok)  # noqa: E731
    alone = fit_site(
        x, pids.tolist(), cfg, lm, Site(1, "resid"), prompts, post_instruction=post, **kw
    )
    both = fit_site(
        rows,
        all_pids.tolist(),
        cfg,
        lm,
        Site(1, "resid"),
        prompts,
        post_instruction=np.concatenate([post, np.zeros(len(cx.reshape(-1, d)), bool)]),
        train_only=train_only,
        **kw,
    )
    a, b = alone.metrics, both.metrics
    assert both.eval_prompt_ids == alone.eval_prompt_ids  # the same held-out prompts ...
    for key in ("n_eval_rows", "n_val_rows", "n_eval_post_instruction_rows", "n_eval_prompts"):
        assert b[key] == a[key], key  # ... and rows: the corpus only adds training rows
    assert (
        b["n_template_rows"] == a["n_template_rows"] + (n_corpus - 1) * PREFIX
    )  # its template prefix
    own_rows = (n_corpus - 1) * (
        per - PREFIX
    )  # the prefix is already a training row; p03's copy is dropped
    assert b["n_corpus_rows"] == (n_corpus - 1) * per and b["n_corpus_train_rows"] == own_rows
    assert b["n_train_rows"] == a["n_train_rows"] + own_rows
    assert b["fvu"] != a["fvu"]  # it trained on them
    with pytest.raises(ValueError, match="one train_only flag per row"):
        fit_site(x, pids.tolist(), cfg, lm, Site(1, "resid"), prompts, train_only=train_only)


@pytest.mark.slow
def test_corpus_asset_feeds_the_sae_and_follows_its_file(tmp_path, monkeypatch):
    """Through the CLI on the tiny config: the corpus asset collects every site's rows, the SAE
    trains on them, and editing the corpus file changes the corpus asset's code version only."""
    corpus = _write(
        tmp_path / "corpus.csv",
        "prompt,topic\n"
        + "".join(f"How do I water plant number {i} in my garden?,home\n" for i in range(12)),
    )
    cfg_path = tmp_path / "configs" / "p.yaml"
    cfg_path.parent.mkdir()
    tiny = (ROOT / "configs" / "tiny.yaml").read_text()
    cfg_path.write_text(tiny.replace("sae:\n", f"sae:\n  corpus: {{path: {corpus}}}\n", 1))
    for var in (settings.CONFIG_ENV, settings.DATA_DIR_ENV, settings.STORAGE_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    storage = tmp_path / "storage"
    select = "orbench_prompts,prompt_sample,activations,sae_corpus_activations,sae"
    args = ["run", "--config", str(cfg_path), "--storage", str(storage), "--select", select]
    assert cli.main([*args, "--data-dir", str(ROOT / "data" / "orbench_sample")]) == 0
    layout = Layout(storage)
    cfg = load_config(cfg_path)
    for site_key in cfg.site_keys():
        table = pq.read_table(
            layout.sae_corpus_activations(site_key), columns=["prompt_id", "split"]
        )
        assert (
            set(table["split"].to_pylist()) == {"corpus"}
            and len(set(table["prompt_id"].to_pylist())) == 12
        )
        metrics = json.loads(layout.sae_history(site_key).read_text())["metrics"]
        assert metrics["n_corpus_rows"] == table.num_rows  # no corpus prompt is a study prompt here
        assert 0 < metrics["n_corpus_train_rows"] <= metrics["n_train_rows"]
        assert "corpus" in json.loads((layout.sae(site_key) / "cfg.json").read_text())["dataset"]

    def code_versions() -> dict[str, str | None]:
        graph = build_defs(load_config(cfg_path), storage).resolve_asset_graph()
        return {
            k: graph.get(dg.AssetKey(k)).code_version for k in ("sae_corpus_activations", "sae")
        }

    before = code_versions()
    _write(corpus, corpus.read_text() + "What is the capital of Peru?,travel\n")
    after = code_versions()
    assert after["sae_corpus_activations"] != before["sae_corpus_activations"]
    assert (
        after["sae"] == before["sae"]
    )  # the SAE follows through lineage: its input's data version changed


def test_training_draws_repeat_only_template_rows():
    from refusal_assets.sae.splits import training_draws

    train = np.array([0, 2, 3, 5])
    template = np.array([True, False, False, False, True, True])  # rows 0, 4 (not trained on) and 5
    assert training_draws(train, template, 1) is train
    assert training_draws(train, template, 3).tolist() == [0, 0, 0, 2, 3, 5, 5, 5]


def test_shipped_corpus_holds_no_sample_prompt_nor_a_near_copy():
    """The default corpus only trains: a copy or a paraphrase of a sample prompt would leak a held-out
    prompt's content into training. Near copy: 40 % or more of the content words in common."""
    import re

    from refusal_assets.prompts.orbench import load_orbench

    stop = set(
        "the a an to of and how do i is what can you in my for it are does me with on that this be or so".split()
    )

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z']+", text.lower())) - stop

    corpus = load_corpus(SAECorpusConfig(path="data/sae_corpus"), lambda p: ROOT / p)
    sample, _ = load_orbench(ROOT / "data" / "orbench_sample", ["safe", "hard", "toxic"])
    assert corpus.height >= 1000
    assert not set(corpus["prompt_id"]) & set(sample["prompt_id"])
    sample_words = [words(p) for p in sample["prompt"]]
    near = [
        p
        for p in corpus["prompt"]
        if any(len(words(p) & w) / max(1, len(words(p) | w)) >= 0.4 for w in sample_words)
    ]
    assert near == []
