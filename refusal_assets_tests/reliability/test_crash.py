"""A run killed with SIGKILL while writing activations or SAE weights leaves no file that a later run
would read as valid, and the rerun succeeds.

Each victim is a separate Python process (``python -c``) with one step slowed down so that the kill
lands mid-write; the test waits for the child's "started" line, kills it with SIGKILL (no cleanup
handlers, no ``finally``), inspects the folder, then reruns the same write in-process.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refusal_assets.lm import activations as acts_core
from refusal_assets.lm.chat import encode_chat
from refusal_assets.lm.sites import Site
from refusal_assets.prompts.orbench import load_orbench, sample_category
from refusal_assets.sae import files as sae_files
from refusal_assets.sae import model as sae_model
from refusal_assets.sae.files import CFG_FILE, WEIGHTS_FILE, load_sae, save_sae
from refusal_assets.sae.model import TopKSAE
from refusal_assets.storage import write_parquet
from refusal_assets_tests.reliability.helpers import SAMPLE, TINY, Child, files_under

SITES = [Site(1, "resid"), Site(2, "resid")]

ACTIVATIONS_CHILD = """
import time
from pathlib import Path
from refusal_assets.lm import activations as A
from refusal_assets.config import load_config
from refusal_assets.prompts.orbench import load_orbench, sample_category
from refusal_assets.lm.models import load_model
from refusal_assets.lm.sites import Site

cfg = load_config({tiny!r})
model, tok = load_model(cfg.models[0], cfg.resolve, "cpu", log=lambda s: None)
df, _ = load_orbench(Path({sample!r}), categories=["harassment"])
sample = sample_category(df, "harassment", cfg.data.sampling, cfg.data.seed, cfg.data.heldout_fraction)
sites = [Site(1, "resid"), Site(2, "resid")]
paths = {{s: Path(p) for s, p in zip(sites, {paths!r})}}
real, calls = A._row_table, [0]

def slow_row_table(*args, **kwargs):
    calls[0] += 1
    if calls[0] == len(sites) + 1:  # batch 1 is in both temp files, batch 2 is being written
        print("started", flush=True)
    time.sleep(0.5)
    return real(*args, **kwargs)

A._row_table = slow_row_table
A.collect_activations(model, tok, sample, sites, paths, batch_size=4, log=lambda s: None)
print("finished", flush=True)
"""


def _tiny_sample():
    from refusal_assets.config import load_config

    cfg = load_config(TINY)
    df, _ = load_orbench(SAMPLE, categories=["harassment"])
    return sample_category(
        df, "harassment", cfg.data.sampling, cfg.data.seed, cfg.data.heldout_fraction
    )


def _is_readable_parquet(path) -> bool:
    try:
        pq.read_table(path)
        return True
    except Exception:
        return False


@pytest.mark.slow
def test_sigkill_while_writing_activations_leaves_no_valid_looking_file(tmp_path, tiny_model):
    model, tok = (
        tiny_model  # also builds the tiny model in the shared cache before the child loads it
    )
    paths = {
        s: tmp_path / "activations" / f"tiny-qwen2__{s.name}" / "harassment" / "activations.parquet"
        for s in SITES
    }
    # resid1 holds a complete file from an earlier run; resid2 was never written
    old_bytes = write_parquet(pa.table({"x": [1, 2, 3]}), paths[SITES[0]]).read_bytes()

    child = Child(
        ACTIVATIONS_CHILD.format(
            tiny=str(TINY), sample=str(SAMPLE), paths=[str(paths[s]) for s in SITES]
        ),
        stderr_path=tmp_path / "child.err",
    )
    try:
        child.wait_for("started", timeout=180)
        child.proc.send_signal(signal.SIGKILL)
        assert child.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
    assert "finished" not in child.lines

    # no final file appeared; the earlier complete file is untouched
    assert not paths[SITES[1]].exists()
    assert paths[SITES[0]].read_bytes() == old_bytes
    left = files_under(tmp_path / "activations")
    temps = sorted(left - {paths[SITES[0]].relative_to(tmp_path / "activations").as_posix()})
    assert len(temps) == 2, left  # one temp file per site, killed mid-write
    for rel in temps:
        name = rel.rsplit("/", 1)[-1]
        assert (
            name.startswith(".activations.parquet.")
            and name.endswith(".tmp")
            and name != "activations.parquet"
        )
        full = tmp_path / "activations" / rel
        assert full.stat().st_size > 0  # batch 1 was really being written when the process died
        assert not _is_readable_parquet(
            full
        )  # a half file: only the temp name kept it from being read
    with pytest.raises(FileNotFoundError, match="materialize the upstream asset first"):
        acts_core.read_vectors(paths[SITES[1]])

    # the rerun (in-process, unslowed) replaces both and reads back every row
    sample = _tiny_sample()
    n_rows = acts_core.collect_activations(
        model, tok, sample, SITES, paths, batch_size=4, log=lambda s: None
    )
    expected_rows = sum(
        int(encode_chat(tok, [p]).attention_mask.sum()) for p in sample["prompt"].to_list()
    )
    assert n_rows == {s: expected_rows for s in SITES}
    for site in SITES:
        vectors, meta = acts_core.read_vectors(paths[site])
        assert vectors.shape == (expected_rows, model.config.hidden_size)
        assert acts_core.non_finite_rows(vectors) == 0
        assert sorted(meta["prompt_id"].unique().to_list()) == sorted(sample["prompt_id"].to_list())
    # the killed run's temp files are still there (nothing cleans them up) but nothing reads them
    assert set(temps) <= files_under(tmp_path / "activations")


SAE_CHILD = """
import json, time, types
from pathlib import Path
import torch
import {sae_files} as S
from {sae_model} import TopKSAE

sae = TopKSAE(64, 256, k=8, generator=torch.Generator().manual_seed(0))
point = {point!r}
if point == "weights":  # the weights are in their temp file, not yet renamed
    real = S.save_file
    def slow_save_file(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        print("started", flush=True)
        time.sleep(120)
    S.save_file = slow_save_file
else:  # the weights are renamed into place, cfg.json is being written
    def slow_dumps(*args, **kwargs):
        print("started", flush=True)
        time.sleep(120)
        return json.dumps(*args, **kwargs)
    S.json = types.SimpleNamespace(dumps=slow_dumps, loads=json.loads)
S.save_sae(sae, Path({folder!r}), {{"hook_name": "resid1"}})
print("finished", flush=True)
"""

SAE_CASES = {
    # name: (kill point, a complete earlier save in the folder)
    "fresh_kill_in_weights": ("weights", False),
    "resave_kill_in_weights": ("weights", True),
    "resave_kill_in_cfg": ("cfg", True),
}


@pytest.mark.slow
def test_sigkill_while_saving_an_sae_leaves_no_loadable_folder(tmp_path):
    earlier = TopKSAE(64, 256, k=8, generator=torch.Generator().manual_seed(1))
    folders = {name: tmp_path / name / "tiny-qwen2__resid1" for name in SAE_CASES}
    earlier_weights = {}
    for name, (_, previous) in SAE_CASES.items():
        if previous:
            save_sae(earlier, folders[name], {"hook_name": "resid1"})
            assert torch.equal(load_sae(folders[name]).W_dec, earlier.W_dec)
            earlier_weights[name] = (folders[name] / WEIGHTS_FILE).read_bytes()

    # the three victims run side by side: one process start-up cost instead of three
    children = {
        name: Child(
            SAE_CHILD.format(
                point=point,
                folder=str(folders[name]),
                sae_files=sae_files.__name__,
                sae_model=sae_model.__name__,
            ),
            stderr_path=tmp_path / f"{name}.err",
        )
        for name, (point, _) in SAE_CASES.items()
    }
    try:
        for name, child in children.items():
            child.wait_for("started", timeout=180)
        for child in children.values():
            child.proc.send_signal(signal.SIGKILL)
        for child in children.values():
            assert child.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        for child in children.values():
            child.kill()

    new = TopKSAE(
        64, 256, k=8, generator=torch.Generator().manual_seed(0)
    )  # what the children were saving
    for name, (point, previous) in SAE_CASES.items():
        folder = folders[name]
        left = files_under(folder)
        assert CFG_FILE not in left, (
            name,
            left,
        )  # cfg.json marks a complete save; it is gone or never written
        with pytest.raises(ValueError, match=f"missing file {CFG_FILE}"):
            load_sae(folder)
        temps = [
            f for f in left if f not in (CFG_FILE, WEIGHTS_FILE, "history.json", "training.png")
        ]
        assert temps and all(f.startswith(".") and f.endswith(".tmp") for f in temps), (name, left)
        if point == "weights":
            # the new weights never reached their final name; an earlier file is byte-identical
            if previous:
                assert (folder / WEIGHTS_FILE).read_bytes() == earlier_weights[name]
            else:
                assert WEIGHTS_FILE not in left
        else:
            assert (folder / WEIGHTS_FILE).read_bytes() != earlier_weights[
                name
            ]  # new weights, but no cfg.json

        # rerun: a complete save that loads back exactly
        save_sae(new, folder, {"hook_name": "resid1"})
        loaded = load_sae(folder)
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(loaded, key), getattr(new, key)), (name, key)
        assert json.loads((folder / CFG_FILE).read_text())["d_sae"] == 256
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
        np.testing.assert_array_equal(
            loaded(x)[0].detach().numpy(), new.eval()(x)[0].detach().numpy()
        )
