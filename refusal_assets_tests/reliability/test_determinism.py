"""Same config and seed -> byte-identical SAE files and identical circuit node sets, on the tiny
model's real activations (one category, both sites of configs/tiny.yaml).

Twice in this process, and once more in a child process with another ``PYTHONHASHSEED`` (set or
dict ordering of strings must not leak into files or node sets). The whole tiny graph twice through
the CLI (the brief's bonus) takes about 3 minutes per run on this 2-core machine, far over budget,
so it is left out; the steps whose randomness matters (activations, SAE training, circuit
selection) are run here exactly as the ``activations``, ``sae`` and ``circuit`` assets call them.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pytest
import torch

from refusal_assets.circuits.attribution import node_effects
from refusal_assets.circuits.passes import compute_baseline
from refusal_assets.circuits.selection import NodeIndex, select_circuit
from refusal_assets.lm import activations as acts_core
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.sites import Site
from refusal_assets.prompts.orbench import load_orbench, sample_category
from refusal_assets.sae.files import WEIGHTS_FILE, load_sae, save_sae
from refusal_assets.sae.splits import split_by_group
from refusal_assets.sae.training import train_sae
from refusal_assets_tests.reliability.helpers import SAMPLE, TINY, Child

pytestmark = pytest.mark.slow  # another process and two SAE trainings: a minute or more
SITES = [Site(1, "resid"), Site(2, "resid")]
CATEGORY = "harassment"


def collect(cfg, model_tok, folder):
    """The tiny sample of one category and its activations at both sites, as the ``activations`` asset makes them."""
    model, tok = model_tok
    df, _ = load_orbench(SAMPLE, categories=[CATEGORY])
    sample = sample_category(
        df, CATEGORY, cfg.data.sampling, cfg.data.seed, cfg.data.heldout_fraction
    )
    paths = {s: folder / s.name / "activations.parquet" for s in SITES}
    acts_core.collect_activations(
        model, tok, sample, SITES, paths, batch_size=cfg.models[0].batch_size, log=lambda s: None
    )
    return sample, {s: acts_core.read_vectors(p) for s, p in paths.items()}


CHILD = """
import json
from pathlib import Path
from refusal_assets.config import load_config
from refusal_assets.lm.models import load_model
from refusal_assets_tests.reliability import test_determinism as T

cfg = load_config({tiny!r})
model_tok = load_model(cfg.models[0], cfg.resolve, "cpu", log=lambda s: None)
root = Path({root!r})
sample, acts = T.collect(cfg, model_tok, root / "acts")
folders = {{s: root / "sae" / s.name for s in T.SITES}}
for s in T.SITES:
    T._train_and_save(cfg, *acts[s], folders[s])
nodes, _ = T._circuit(cfg, model_tok, sample, folders)
print("RESULT " + json.dumps(nodes), flush=True)
"""


@pytest.fixture(scope="module")
def other_process(tiny_model, tmp_path_factory):
    """The same steps in a separate process with another hash seed (and, like this one, one torch
    thread: see conftest.py). It runs alone, before this process's own runs."""
    root = tmp_path_factory.mktemp("det_child")
    child = Child(
        CHILD.format(tiny=str(TINY), root=str(root)),
        env={"PYTHONHASHSEED": "4242"},
        stderr_path=root / "child.err",
    )
    try:
        rc = child.finish(timeout=300)
    finally:
        child.kill()
    return rc, child, root


@pytest.fixture(scope="module")
def tiny_acts(tiny_cfg, tiny_model, other_process, tmp_path_factory):
    return collect(tiny_cfg, tiny_model, tmp_path_factory.mktemp("det_acts"))


def _train_and_save(tiny_cfg, vectors, meta, folder, sae_cfg=None):
    """Exactly the ``sae`` asset's call: group ids from prompt ids, d_sae = expansion x d_model."""
    sae_cfg = sae_cfg or tiny_cfg.sae
    group_ids = meta["prompt_id"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    sae, history = train_sae(
        vectors, group_ids, sae_cfg, d_sae=sae_cfg.expansion_factor * vectors.shape[1]
    )[:2]
    save_sae(
        sae,
        folder,
        {
            "hook_name": folder.name,
            "model_name": "tiny-qwen2",
            "site_key": f"tiny-qwen2__{folder.name}",
        },
    )
    return sae, history


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained_twice(tiny_cfg, tiny_acts, tmp_path_factory):
    _, acts = tiny_acts
    out = {}
    for run in ("a", "b"):
        root = tmp_path_factory.mktemp(f"det_sae_{run}")
        out[run] = {
            s: (root / s.name, *_train_and_save(tiny_cfg, *acts[s], root / s.name)) for s in SITES
        }
    return out


def test_sae_training_twice_gives_byte_identical_files(
    tiny_cfg, tiny_acts, trained_twice, tmp_path
):
    _, acts = tiny_acts
    for site in SITES:
        (folder_a, _, hist_a), (folder_b, _, hist_b) = (
            trained_twice["a"][site],
            trained_twice["b"][site],
        )
        assert folder_a != folder_b
        assert (folder_a / WEIGHTS_FILE).read_bytes() == (folder_b / WEIGHTS_FILE).read_bytes(), (
            site
        )
        assert (folder_a / "cfg.json").read_bytes() == (folder_b / "cfg.json").read_bytes(), site
        assert (
            hist_a["val_fvu"] == hist_b["val_fvu"] and hist_a["train_loss"] == hist_b["train_loss"]
        )
        assert hist_a["best_step"] == hist_b["best_step"] and len(hist_a["step"]) >= 2
        # it really learned something, on the real rows (not a degenerate constant SAE)
        assert min(hist_a["val_fvu"]) < 0.9 and hist_a["n_train"] + hist_a["n_val"] == len(
            acts[site][0]
        )
    # control: another seed gives other bytes, so the comparison above can tell runs apart
    site = SITES[0]
    other = tiny_cfg.sae.model_copy(update={"seed": tiny_cfg.sae.seed + 1})
    _train_and_save(tiny_cfg, *acts[site], tmp_path / site.name, other)
    assert _digest(tmp_path / site.name / WEIGHTS_FILE) != _digest(
        trained_twice["a"][site][0] / WEIGHTS_FILE
    )


def test_train_validation_split_is_by_prompt_and_seeded(tiny_cfg, tiny_acts):
    _, acts = tiny_acts
    _, meta = acts[SITES[0]]
    group_ids = meta["prompt_id"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    train, val = split_by_group(group_ids, tiny_cfg.sae.val_fraction, tiny_cfg.sae.seed)
    again = split_by_group(group_ids, tiny_cfg.sae.val_fraction, tiny_cfg.sae.seed)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not set(group_ids[train]) & set(group_ids[val])  # no prompt on both sides


def _circuit(
    tiny_cfg, tiny_model, sample, sae_folders
) -> tuple[dict[str, list[int]], dict[str, np.ndarray]]:
    """The ``circuit`` asset's node selection for each group, with SAEs loaded from disk as it does."""
    model, tok = tiny_model
    mc, cc = tiny_cfg.models[0], tiny_cfg.circuits
    saes = {s: load_sae(sae_folders[s]).eval() for s in SITES}
    refusal_ids = torch.tensor(
        refusal_token_ids(tok, mc.refusal.phrases, mc.refusal.refusal_tokens)
    )
    kw = dict(batch_size=mc.batch_size, system_prompt=mc.chat_template.system_prompt)
    safe_train = sample.filter((pl.col("split") == "safe") & ~pl.col("heldout"))["prompt"].to_list()
    baseline = compute_baseline(model, tok, safe_train, saes, **kw)
    index = NodeIndex(SITES, [baseline.f_mean[s].shape[-1] for s in SITES])
    nodes, effects_by_group = {}, {}
    for group, splits in {"toxic": ["toxic"], "benign": ["safe", "hard"]}.items():
        rows = sample.filter(pl.col("split").is_in(splits))
        effects, _ = node_effects(
            model,
            tok,
            rows["prompt"].to_list(),
            saes,
            baseline,
            refusal_ids,
            method=cc.method,
            **kw,
        )
        mean_effect = effects.mean(0)
        chosen = select_circuit(
            mean_effect,
            index.site_of_node,
            mode=cc.selection,
            k_per_site=cc.k_per_site,
            threshold=cc.threshold,
        )
        nodes[group] = np.flatnonzero(chosen).tolist()
        effects_by_group[group] = effects
        per_site = np.bincount(index.site_of_node[chosen], minlength=len(SITES))
        assert per_site.tolist() == [cc.k_per_site] * len(SITES)
    return nodes, effects_by_group


def test_circuit_node_sets_are_identical_across_runs(
    tiny_cfg, tiny_model, tiny_acts, trained_twice
):
    sample, _ = tiny_acts
    nodes_a, effects_a = _circuit(
        tiny_cfg, tiny_model, sample, {s: trained_twice["a"][s][0] for s in SITES}
    )
    nodes_b, effects_b = _circuit(
        tiny_cfg, tiny_model, sample, {s: trained_twice["b"][s][0] for s in SITES}
    )
    assert nodes_a == nodes_b
    for group in effects_a:
        assert np.isfinite(effects_a[group]).all()
        assert effects_a[group].tobytes() == effects_b[group].tobytes(), group


def test_another_process_with_another_hash_seed_gets_the_same_bytes_and_nodes(
    tiny_cfg, tiny_model, tiny_acts, trained_twice, other_process
):
    rc, child, root = other_process
    assert rc == 0, child.stderr_tail()
    nodes_child = json.loads(
        next(line for line in child.lines if line.startswith("RESULT "))[len("RESULT ") :]
    )
    sample, acts = tiny_acts
    nodes_here, _ = _circuit(
        tiny_cfg, tiny_model, sample, {s: trained_twice["a"][s][0] for s in SITES}
    )
    assert nodes_child == nodes_here
    for site in SITES:
        vectors_child, meta_child = acts_core.read_vectors(
            root / "acts" / site.name / "activations.parquet"
        )
        assert vectors_child.numpy().tobytes() == acts[site][0].numpy().tobytes()
        assert meta_child.equals(acts[site][1])
        assert (root / "sae" / site.name / WEIGHTS_FILE).read_bytes() == (
            trained_twice["a"][site][0] / WEIGHTS_FILE
        ).read_bytes()
