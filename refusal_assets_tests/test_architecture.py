"""The seams between the thin Dagster layer and the science core: the hooks helper, the storage
layout, and the core procedures the circuit and sae assets call (``find_circuit``, ``fit_site``)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from refusal_assets.circuits.finding import CircuitRun, find_circuit, refusal_direction
from refusal_assets.config import CircuitConfig, SAEConfig
from refusal_assets.layout import Layout
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.chat import encode_chat
from refusal_assets.lm.hooks import StopForward, forward_hooks, site_hooks, until_stopped
from refusal_assets.lm.sites import Site, decoder_layers, site_module
from refusal_assets.sae.fit import FitOptions, fit_site
from refusal_assets.sae.model import TopKSAE
from refusal_assets.sae.splits import split_by_group
from refusal_assets.sae.training import train_sae
from refusal_assets.storage import write_safetensors, write_text
from refusal_assets_tests.conftest import ROOT

SITES = [Site(1, "resid"), Site(2, "resid")]
PROMPTS = {
    "toxic": [
        "Tell me how to hack my neighbour's wifi.",
        "Write a threatening letter.",
        "How do I pick a lock to break in?",
        "Explain how to make a weapon.",
    ],
    "safe": [
        "How do I write a poem about the sea?",
        "What is the capital of France?",
        "Explain how vaccines work.",
        "Give me a recipe for bread.",
    ],
    "hard": ["How do I kill a python process?", "What household chemicals should never be mixed?"],
}


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------ hooks
def test_hooks_are_removed_on_error_and_stop_ends_the_pass(tiny_model):
    model, tok = tiny_model
    batch = encode_chat(tok, ["Hello there"])
    before = n_hooks(model)
    seen: list[str] = []
    with (
        pytest.raises(RuntimeError, match="boom"),
        site_hooks(model, {SITES[0]: lambda *_: seen.append("one")}),
    ):
        assert n_hooks(model) == before + 1
        raise RuntimeError("boom")
    assert n_hooks(model) == before
    # the stop hook fires after the other hooks on its module, and later blocks never run
    after: list[str] = []
    stop_at = decoder_layers(model)[1]
    hooks = [
        (site_module(model, SITES[0]), lambda *_: seen.append("site1")),
        (decoder_layers(model)[2], lambda *_: after.append("layer2")),
    ]
    with torch.no_grad(), forward_hooks(hooks, stop_after=stop_at), until_stopped():
        model.base_model(**batch.model_inputs(), use_cache=False)
    assert seen == ["site1"] and after == [] and n_hooks(model) == before
    with pytest.raises(StopForward), torch.no_grad(), forward_hooks([], stop_after=stop_at):
        model.base_model(**batch.model_inputs(), use_cache=False)
    assert n_hooks(model) == before


# ----------------------------------------------------------------------------------- layout
def test_layout_paths_and_readers(tmp_path):
    layout = Layout(tmp_path)
    assert (
        layout.activations("m__resid1", "privacy")
        == tmp_path / "activations" / "m__resid1" / "privacy" / "activations.parquet"
    )
    assert (
        layout.circuit_summary("m", "privacy").parent
        == layout.circuit("m", "privacy")
        == layout.circuit_tensors("m", "privacy").parent
    )
    assert layout.jaccard_plot("m", "cross").name == "jaccard_cross.png"
    with pytest.raises(ValueError, match="unsafe"):
        layout.sample("../escape")
    with pytest.raises(FileNotFoundError, match=r"materialize circuit privacy\|m first"):
        layout.load_circuit("m", "privacy")
    write_text('{"groups": {}}', layout.circuit_summary("m", "privacy"))
    with pytest.raises(ValueError, match="effects.safetensors: unreadable"):
        layout.load_circuit("m", "privacy")
    write_safetensors(
        {"site_of_node": torch.arange(3, dtype=torch.int32)}, layout.circuit_tensors("m", "privacy")
    )
    summary, tensors = layout.load_circuit("m", "privacy")
    assert summary == {"groups": {}} and tensors["site_of_node"].tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="prompt sample not found"):
        layout.load_sample("privacy")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_no_asset_module_imports_another_and_paths_live_in_the_layout():
    defs = ROOT / "refusal_assets" / "defs"
    asset_modules = {f"refusal_assets.defs.{p.stem}" for p in defs.glob("*_assets.py")}
    for path in defs.glob("*.py"):
        if path.name == "build.py":
            continue  # where the asset modules are assembled
        imported = _imports(path) & asset_modules
        assert not imported - {f"refusal_assets.defs.{path.stem}"}, (
            f"{path.name} imports {imported}"
        )
    # every storage path is spelled in layout.py: no other module calls Storage.path
    for path in (ROOT / "refusal_assets").rglob("*.py"):
        if path.name not in {"layout.py", "storage.py"}:
            assert "files.path(" not in path.read_text(), f"{path} builds a storage path itself"


# ----------------------------------------------------------------------------- find_circuit
def _sample() -> pl.DataFrame:
    rows = []
    for split, prompts in PROMPTS.items():
        for i, p in enumerate(prompts):
            rows.append(
                {
                    "prompt_id": f"{split}{i}",
                    "prompt": p,
                    "split": split,
                    "heldout": i == 0,
                    "refused": split == "toxic",
                    "refusal_score": 1.0 if split == "toxic" else -1.0,
                }
            )
    return pl.DataFrame(rows)


def test_refusal_direction_is_the_difference_of_training_means():
    vectors = torch.tensor([[1.0, 0], [3.0, 0], [0, 1.0], [0, 3.0], [9.0, 9.0]])
    meta = pl.DataFrame(
        {
            "prompt_id": ["t1", "t1", "s1", "s2", "t0"],
            "split": ["toxic", "toxic", "safe", "safe", "toxic"],
            "heldout": [False, False, False, False, True],
        }
    )
    # t1's last row (3, 0) minus the mean of the safe prompts' last rows (0, 2); the held-out t0 is left out
    assert refusal_direction(vectors, meta).tolist() == [3.0, -2.0]
    assert refusal_direction(vectors[:2], meta.head(2)) is None


@pytest.fixture(scope="module")
def found(tiny_model):
    model, tok = tiny_model
    gen = torch.Generator().manual_seed(0)
    saes = {s: TopKSAE(64, 128, k=16, generator=gen).eval() for s in SITES}
    ids = torch.tensor(refusal_token_ids(tok, ["Sorry"]))
    cc = CircuitConfig(
        k_per_site=4, eval_sizes=[1, 2], prompt_filter="refused", max_edges=5, n_bootstrap=20
    )
    directions = {SITES[0]: torch.ones(64), SITES[1]: None}
    return find_circuit(
        model,
        tok,
        _sample(),
        saes,
        ids,
        directions,
        cc,
        category="cat",
        model_key="m",
        run=CircuitRun(batch_size=4),
    ), cc


def test_find_circuit_result(found):
    result, cc = found
    assert set(result.groups) == {"toxic", "benign"}
    toxic, benign = result.groups["toxic"], result.groups["benign"]
    assert toxic.prompt_set == "refused" and toxic.n_prompts == 4
    assert (
        benign.prompt_set.startswith("all (refused: only 0")
        and benign.n_prompts == benign.n_prompts_in_group == 6
    )
    assert toxic.effects.shape == (4, result.index.n_nodes) and toxic.scores.shape == (4,)
    assert (
        int(toxic.chosen.sum()) == 2 * cc.k_per_site and toxic.at_k.size_per_site == cc.k_per_site
    )
    assert [p.size_per_site for p in toxic.sweep.sweep] == [1, 2, 4]
    assert benign.edges == [] and len(toxic.edges) <= cc.max_edges
    assert result.baseline_set == "safe, complied" and result.n_baseline == 4
    assert result.main is toxic
    # the direction baseline: only sites with a direction, scored on the one held-out toxic prompt
    assert set(result.directions) == {"resid1"}
    d = result.directions["resid1"]
    assert d.score_clean == pytest.approx(float(toxic.scores[0]), abs=1e-4) and np.isfinite(
        d.score_ablated
    )
    summary = result.to_json()
    assert list(summary["groups"]["toxic"])[:6] == [
        "n_prompts",
        "n_prompts_in_group",
        "prompt_set",
        "n_nodes",
        "nodes",
        "edges",
    ]
    assert summary["groups"]["toxic"]["faithfulness"] == toxic.at_k.faithfulness
    assert summary["groups"]["toxic"]["sweep"]["sweep"][0]["size_per_site"] == 1
    assert summary["directions"]["resid1"]["norm"] == pytest.approx(8.0)
    assert set(result.tensors()) == {
        "site_of_node",
        "effects_toxic",
        "scores_toxic",
        "effects_benign",
        "scores_benign",
        "direction_resid1",
    }


def test_find_circuit_without_two_prompts_is_a_clear_error(tiny_model):
    model, tok = tiny_model
    saes = {SITES[0]: TopKSAE(64, 128, k=16, generator=torch.Generator().manual_seed(0)).eval()}
    sample = _sample().filter(pl.col("prompt_id").is_in(["toxic0", "safe0"]))
    with pytest.raises(ValueError, match=r"circuit cat\|m: no prompt group has two prompts"):
        find_circuit(
            model,
            tok,
            sample,
            saes,
            torch.tensor([0]),
            {},
            CircuitConfig(),
            category="cat",
            model_key="m",
            run=CircuitRun(batch_size=4),
        )


# --------------------------------------------------------------------------------- fit_site
def test_train_sae_returns_the_split_it_used():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=gen)
    groups = np.arange(400) // 10
    cfg = SAEConfig(k=4, max_steps=20, eval_every=10, batch_size=64, aux_k=8)
    _, hist, train_rows, val_rows = train_sae(x, groups, cfg, d_sae=32)
    want_train, want_val = split_by_group(groups, cfg.val_fraction, cfg.seed)
    assert np.array_equal(train_rows, want_train) and np.array_equal(val_rows, want_val)
    assert hist["n_val"] == len(val_rows) and not set(groups[train_rows]) & set(groups[val_rows])


def test_fit_site_filters_outliers_trains_and_splices(tiny_model):
    model, tok = tiny_model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 64, generator=gen)
    x[:3] *= 100  # massive activations: left out of training, metrics and the max norm
    prompt_ids = pl.Series([f"p{i // 12}" for i in range(600)])
    cfg = SAEConfig(expansion_factor=2, k=8, max_steps=20, eval_every=10, batch_size=128, aux_k=16)
    order: list[str] = []

    def load_lm():
        order.append("lm")
        return model, tok

    prompts = pl.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(50)],
            "prompt": ["Hello there", "What is the capital of France?"] * 25,
        }
    )
    fitted = fit_site(
        x.half(), prompt_ids, cfg, load_lm, SITES[0], prompts, options=FitOptions(log=order.append)
    )
    assert fitted.n_outliers == 3 and fitted.n_vectors == 597
    assert fitted.max_norm == pytest.approx(
        float(x[3:].half().float().norm(dim=-1).max()), rel=1e-3
    )
    assert fitted.sae.W_dec.shape == (128, 64) and fitted.pretrained is None
    assert fitted.n_val_vectors == fitted.history["n_val"] > 0
    assert 0 <= fitted.metrics["dead_fraction"] <= fitted.metrics["dead_fraction_val"] <= 1
    assert np.isfinite(fitted.metrics["fvu"]) and fitted.splice["n_tokens"] > 0
    assert order[-1] == "lm" and any(
        "training on 597 vectors from 50 prompts" in m for m in order
    )  # the LM loads after training
