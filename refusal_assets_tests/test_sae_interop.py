"""Exact interop with the real ``sae_lens`` package: our files in SAELens, SAELens's files in ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refusal_assets.config import SAEConfig
from refusal_assets.sae.files import load_pretrained, load_sae, save_sae, tl_hook_name
from refusal_assets.sae.training import train_sae

sae_lens = pytest.importorskip("sae_lens")

D_IN, D_SAE, K = 16, 64, 4


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def rows() -> torch.Tensor:
    # a large common offset and a scale far from 1, so an unfolded norm factor or b_dec would show
    gen = torch.Generator().manual_seed(0)
    return 40.0 + 25.0 * torch.randn(600, D_IN, generator=gen)


@pytest.fixture(scope="module", params=["topk", "batchtopk"])
def ours(request, rows):
    cfg = SAEConfig(
        architecture=request.param,
        k=K,
        batch_size=64,
        max_steps=60,
        eval_every=20,
        dead_after_tokens=500,
    )
    sae = train_sae(rows, np.arange(len(rows)) // 6, cfg, d_sae=D_SAE).sae
    assert abs(float(sae.norm_scale) - 1.0) > 0.5  # the fold is exercised
    return sae


def test_hook_names_follow_transformerlens():
    assert tl_hook_name("resid12") == "blocks.12.hook_resid_post"
    assert tl_hook_name("mlp3") == "blocks.3.hook_mlp_out"
    assert tl_hook_name("attn0") == "blocks.0.hook_attn_out"
    assert tl_hook_name("blocks.1.hook_resid_pre") == "blocks.1.hook_resid_pre"


def test_our_saved_sae_is_exact_in_saelens(ours, rows, tmp_path):
    folder = save_sae(
        ours,
        tmp_path / "ours",
        {"hook_name": "resid12", "model_name": "tiny", "site_key": "tiny/resid12"},
    )
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.12.hook_resid_post"
    assert cfg["site_key"] == cfg["metadata"]["site_key"] == "tiny/resid12"
    assert cfg["normalize_activations"] == "none"
    theirs = sae_lens.SAE.load_from_disk(folder)
    assert theirs.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    x = rows[:200]
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x).to_dense()
        assert torch.equal(z_ours > 0, z_theirs > 0)
        assert max_rel_err(z_theirs, z_ours) <= 1e-4
        assert max_rel_err(theirs.decode(z_theirs), ours.decode(z_ours)) <= 1e-4
        # and our own loader gives what we had before saving
        mine = load_sae(folder)
        assert torch.equal(mine.encode(x) > 0, z_ours > 0)
        assert max_rel_err(mine.encode(x), z_ours) <= 1e-4
        assert max_rel_err(mine.decode(mine.encode(x)), ours.decode(z_ours)) <= 1e-4


def _random_saelens(sae_cls, cfg_cls, seed: int, **kw):
    torch.manual_seed(seed)
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.5, 2.0)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # decoder rows of unequal norm
    return sae


@pytest.mark.parametrize(
    "kind",
    ["topk", "topk_rescaled", "jumprelu", "standard"],
)
def test_saelens_saved_saes_load_with_their_latents(kind, rows, tmp_path):
    makers = {
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": K}),
        "topk_rescaled": (
            sae_lens.TopKSAE,
            sae_lens.TopKSAEConfig,
            {"k": K, "rescale_acts_by_decoder_norm": True},
        ),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
    }
    sae_cls, cfg_cls, kw = makers[kind]
    theirs = _random_saelens(sae_cls, cfg_cls, seed=1, **kw)
    theirs.save_model(tmp_path / kind)
    mine = load_sae(tmp_path / kind)
    x = (rows[:200] - 40.0) / 25.0
    with torch.no_grad():
        z_theirs, z_mine = theirs.encode(x).to_dense(), mine.encode(x)
        assert (z_theirs > 0).any() and not (z_theirs > 0).all()
        assert torch.equal(z_mine > 0, z_theirs > 0)
        torch.testing.assert_close(z_mine, z_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            mine.decode(z_mine), theirs.decode(z_theirs), rtol=1e-5, atol=1e-4
        )


def test_pretrained_folder_must_fit_the_site(ours, tmp_path):
    folder = save_sae(ours, tmp_path / "p", {"hook_name": "resid1", "model_name": "m"})
    assert load_pretrained(str(folder), d_in=D_IN).d_sae == D_SAE
    with pytest.raises(ValueError, match=rf"cfg\.json.*d_in {D_IN}.*width {D_IN + 1}"):
        load_pretrained(str(folder), d_in=D_IN + 1)
    # a relative spec goes through the caller's resolver (the config's root)
    assert load_pretrained("p", d_in=D_IN, resolve=lambda s: tmp_path / s).d_in == D_IN


def test_pretrained_saelens_release_resolves_through_sae_lens(monkeypatch, tmp_path, rows):
    theirs = _random_saelens(sae_lens.TopKSAE, sae_lens.TopKSAEConfig, seed=2, k=K)
    theirs.save_model(tmp_path / "hub" / "layer_3")
    asked = []

    def fake_from_pretrained(
        cls, release, sae_id, device="cpu", **kw
    ):  # stands in for the hub download
        asked.append((release, sae_id))
        return cls.load_from_disk(tmp_path / "hub" / sae_id.split("/")[0], device=device)

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", classmethod(fake_from_pretrained))
    mine = load_pretrained("saelens:my-release/layer_3/width_64", d_in=D_IN)
    assert asked == [("my-release", "layer_3/width_64")]
    x = rows[:50] / 25.0
    with torch.no_grad():
        torch.testing.assert_close(
            mine.encode(x), theirs.encode(x).to_dense(), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match=r"saelens:my-release/layer_3.*d_in 16.*width 8"):
        load_pretrained("saelens:my-release/layer_3", d_in=8)
    with pytest.raises(ValueError, match="expected saelens:<release>/<sae_id>"):
        load_pretrained("saelens:no-id", d_in=D_IN)


def test_pretrained_saelens_without_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sae_lens(name, *args, **kw):
        if name == "sae_lens" or name.startswith("sae_lens."):
            raise ImportError("No module named 'sae_lens'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_sae_lens)
    with pytest.raises(ValueError, match=r"needs the sae-lens package.*peers"):
        load_pretrained("saelens:rel/id", d_in=D_IN)
