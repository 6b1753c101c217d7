"""SAE provenance in ``cfg.json`` and the checks on a weights file loaded from a user."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from refusal_assets.config import load_config
from refusal_assets.sae.files import (
    CFG_FILE,
    WEIGHTS_FILE,
    load_pretrained,
    load_sae,
    sae_provenance,
    save_sae,
)
from refusal_assets.sae.model import TopKSAE
from refusal_assets_tests.conftest import ROOT


def _saved(tmp_path, name="sae"):
    sae = TopKSAE(8, 32, k=4, generator=torch.Generator().manual_seed(0))
    model_cfg = load_config(ROOT / "configs" / "tiny.yaml").models[0]
    extra = {
        "hook_name": "resid1",
        "model_name": model_cfg.id,
        **sae_provenance(model_cfg, 12.5, 3.0),
    }
    return sae, model_cfg, save_sae(sae, tmp_path / name, extra)


def test_cfg_records_the_rows_and_claims_no_saelens_training(tmp_path):
    _, model_cfg, folder = _saved(tmp_path)
    cfg = json.loads((folder / CFG_FILE).read_text())
    meta = cfg["metadata"]
    assert "sae_lens_training_version" not in meta and "sae_lens_training_version" not in cfg
    assert meta["sae_lens_version"] == "6.0.0"  # the layout written, not a trainer
    assert meta["prepend_bos"] is False and meta["context_size"] is None
    assert meta["system_prompt"] == model_cfg.chat_template.system_prompt
    assert model_cfg.id in meta["chat_template"]
    assert meta["max_input_norm"] == 12.5 and meta["max_norm_factor"] == 3.0
    assert cfg["max_input_norm"] == 12.5  # flat too, where the features step reads it


@pytest.mark.parametrize(
    "tensor, bad, message",
    [
        (
            "W_dec",
            lambda t: t.index_fill(0, torch.tensor([3]), float("nan")),
            r"tensor 'W_dec' has 8 NaN or infinite",
        ),
        (
            "b_enc",
            lambda t: torch.full_like(t, float("inf")),
            r"tensor 'b_enc' has 32 NaN or infinite",
        ),
        (
            "b_dec",
            lambda t: t.to(torch.int32),
            r"tensor 'b_dec' has dtype torch.int32, expected a floating",
        ),
    ],
)
def test_a_bad_pretrained_file_names_the_file_and_the_tensor(tmp_path, tensor, bad, message):
    _, _, folder = _saved(tmp_path, "user")
    weights = folder / WEIGHTS_FILE
    tensors = load_file(str(weights))
    tensors[tensor] = bad(tensors[tensor]).contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"{weights}: {message}"):
        load_pretrained("user", d_in=8, resolve=lambda s: tmp_path / s)
    with pytest.raises(ValueError, match=message):
        load_sae(folder)


def test_a_good_pretrained_file_loads_unchanged(tmp_path):
    sae, _, folder = _saved(tmp_path, "good")
    loaded = load_pretrained("good", d_in=8, resolve=lambda s: tmp_path / s)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(x)[0], sae.eval()(x)[0], rtol=1e-5, atol=1e-6)
