"""Sparse autoencoder: recovery of a known sparse dictionary, training invariants, metrics and file I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from refusal_assets.bench.sae import run_sae_bench
from refusal_assets.config import SAEConfig
from refusal_assets.sae.files import load_sae, save_sae
from refusal_assets.sae.metrics import evaluate_sae
from refusal_assets.sae.model import TiedEncoder, TopKSAE
from refusal_assets.sae.splits import split_by_group
from refusal_assets.sae.training import plot_history, train_sae, train_step

# 2x overcomplete truth: at d_in=32 (4x) interference between active directions alone keeps a linear
# TopK encoder's FVU above 0.1 even when every direction is recovered
D_IN, N_TRUE, TRUE_K, N_SAMPLES, D_SAE = 64, 128, 4, 20_000, 256
ROWS_PER_GROUP = 20  # "tokens" per prompt
FAST = dict(batch_size=512, eval_every=25, patience=3, dead_after_tokens=10_000, aux_k=32)


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``x [N_SAMPLES, D_IN]``: sums of ``TRUE_K`` of ``N_TRUE`` unit directions (``[N_TRUE, D_IN]``)
    with magnitudes in [1, 2], plus a constant offset and noise of sd 0.01; and the group ids."""
    gen = torch.Generator().manual_seed(seed)
    true_dirs = F.normalize(torch.randn(N_TRUE, D_IN, generator=gen), dim=-1)
    idx = (
        torch.rand(N_SAMPLES, N_TRUE, generator=gen).topk(TRUE_K).indices
    )  # distinct directions per row
    mags = 1.0 + torch.rand(N_SAMPLES, TRUE_K, generator=gen)
    x = F.embedding_bag(idx, true_dirs, per_sample_weights=mags, mode="sum")
    x = x + 0.5 + 0.01 * torch.randn(N_SAMPLES, D_IN, generator=gen)
    return x, true_dirs, np.arange(N_SAMPLES) // ROWS_PER_GROUP


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    return make_data()


@pytest.fixture(scope="module")
def trained(data) -> tuple[TopKSAE, dict]:
    x, _, groups = data
    cfg = SAEConfig(k=TRUE_K, lr=3e-3, max_steps=100, **FAST)
    return train_sae(x, groups, cfg, d_sae=D_SAE)[:2]


def test_recovers_known_dictionary(trained, data):
    sae, hist = trained
    _, true_dirs, _ = data
    cos = true_dirs @ sae.W_dec.detach().T  # [N_TRUE, D_SAE]; decoder rows are unit norm
    recovered = (cos.max(dim=1).values > 0.9).float().mean().item()
    assert recovered >= 0.8, recovered
    assert min(hist["val_fvu"]) < 0.1
    assert hist["best_step"] in hist["step"]
    assert hist["val_fvu"][hist["step"].index(hist["best_step"])] == min(hist["val_fvu"])
    n_evals = len(hist["step"])
    assert all(
        len(hist[key]) == n_evals
        for key in ("train_loss", "train_fvu", "aux_loss", "val_fvu", "dead_fraction")
    )
    assert hist["n_train"] + hist["n_val"] == N_SAMPLES and hist["seconds"] > 0


def test_best_weights_are_restored(trained, data):
    sae, hist = trained
    x, _, groups = data
    _, val_idx = split_by_group(groups, SAEConfig().val_fraction, SAEConfig().seed)
    assert evaluate_sae(sae, x[val_idx]).fvu == pytest.approx(min(hist["val_fvu"]), rel=1e-6)


def test_decoder_unit_norm_and_encoder_init(trained):
    sae, _ = trained
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    fresh = TopKSAE(D_IN, D_SAE, TRUE_K, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fresh.W_enc, fresh.W_dec.T)
    torch.testing.assert_close(fresh.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_input_normalisation(trained, data):
    sae, hist = trained
    x, _, groups = data
    train_idx, _ = split_by_group(groups, SAEConfig().val_fraction, SAEConfig().seed)
    mean_sq = (x[train_idx] * sae.norm_scale).pow(2).sum(-1).mean()
    assert mean_sq.item() == pytest.approx(D_IN, rel=1e-4)
    # decode returns model units: the reconstruction error is small relative to the raw data
    x_hat, z = sae(x[:100])
    assert (x_hat - x[:100]).pow(2).mean() < 0.1 * x[:100].var(0).sum()
    assert ((z > 0).sum(-1) <= TRUE_K).all()


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_step_gradients_match_dense_autograd(architecture):
    """The sparse encoder backward / embedding_bag decoder give the gradients of the plain dense loss
    fvu + aux_coef * aux (after the decoder's radial component is removed)."""
    d_in, d_sae, k, B, aux_k = 16, 48, 3, 32, 5
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(d_in, d_sae, k, architecture, generator=gen)
    with torch.no_grad():
        sae.norm_scale.fill_(0.7)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.W_enc.add_(torch.randn(d_in, d_sae, generator=gen) * 0.1)
    x = torch.randn(B, d_in, generator=gen) * 2
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    since_fired[::3] = 10**6  # every third latent is dead: AuxK is active
    cfg = SAEConfig(
        architecture=architecture, k=k, aux_k=aux_k, aux_coef=0.5, dead_after_tokens=1000
    )

    ref = TopKSAE(d_in, d_sae, k, architecture)
    ref.load_state_dict(sae.state_dict())
    x_n = ref.normalise(x)
    pre = ref.pre_acts(x_n)  # dense autograd all the way
    z = ref.train().encode(x)
    err = x_n - (z @ ref.W_dec + ref.b_dec)
    fvu = err.pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
    dead = since_fired >= cfg.dead_after_tokens
    aux_idx = pre.detach().masked_fill(~dead, -1).topk(aux_k, dim=-1).indices
    z_aux = torch.zeros_like(pre).scatter(-1, aux_idx, pre.gather(-1, aux_idx))
    e = err.detach()
    aux = (z_aux @ ref.W_dec - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    (fvu + cfg.aux_coef * aux).backward()

    loss, step_fvu, step_aux = train_step(
        sae, torch.optim.SGD(sae.parameters(), lr=0.0), x, since_fired, cfg
    )
    assert step_fvu == pytest.approx(fvu.item(), rel=1e-5) and step_aux == pytest.approx(
        aux.item(), rel=1e-5
    )
    g_dec = ref.W_dec.grad - (ref.W_dec.grad * ref.W_dec).sum(-1, keepdim=True) * ref.W_dec
    torch.testing.assert_close(sae.W_dec.grad, g_dec, rtol=1e-4, atol=1e-6)
    for name in ("W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(
            getattr(sae, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-6, msg=name
        )
    fired = (z > 0).any(0)
    assert (since_fired[fired] == 0).all() and (since_fired[~fired & ~dead] == B).all()


def test_tied_encoder_step_gradients_match_dense_autograd():
    """With the encoder tied (``W_enc = W_dec^T diag(exp(log_scale))``) the sparse step gives the dense
    loss's gradients for ``W_dec`` (both paths, radial part removed) and ``log_scale``, and ``W_enc``
    is re-synced to the tie after the step."""
    d_in, d_sae, k, B, aux_k = 16, 48, 3, 32, 5
    gen = torch.Generator().manual_seed(1)
    sae = TopKSAE(d_in, d_sae, k, generator=gen)
    tie = TiedEncoder(sae)
    with torch.no_grad():
        sae.norm_scale.fill_(0.7)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        tie.log_scale.copy_(torch.randn(d_sae, generator=gen) * 0.3)
    tie.sync(sae)
    x = torch.randn(B, d_in, generator=gen) * 2
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    since_fired[::3] = 10**6  # AuxK active: its gradient also reaches the decoder through the tie
    cfg = SAEConfig(k=k, aux_k=aux_k, aux_coef=0.5, dead_after_tokens=1000, tied_encoder=True)

    W_dec = sae.W_dec.detach().clone().requires_grad_()
    log_scale = tie.log_scale.detach().clone().requires_grad_()
    b_enc, b_dec = (
        sae.b_enc.detach().clone().requires_grad_(),
        sae.b_dec.detach().clone().requires_grad_(),
    )
    x_n = x * 0.7
    pre = ((x_n - b_dec) @ (W_dec.T * log_scale.exp()) + b_enc).relu()  # dense autograd all the way
    vals, idx = pre.topk(k, dim=-1)
    err = x_n - (torch.zeros_like(pre).scatter(-1, idx, vals) @ W_dec + b_dec)
    fvu = err.pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
    dead = since_fired >= cfg.dead_after_tokens
    aux_idx = pre.detach().masked_fill(~dead, -1).topk(aux_k, dim=-1).indices
    e = err.detach()
    aux = (
        (torch.zeros_like(pre).scatter(-1, aux_idx, pre.gather(-1, aux_idx)) @ W_dec - e)
        .pow(2)
        .sum()
    )
    aux = aux / (e - e.mean(0)).pow(2).sum()
    (fvu + cfg.aux_coef * aux).backward()

    opt = torch.optim.SGD(
        [p for p in sae.parameters() if p is not sae.W_enc] + [tie.log_scale], lr=0.0
    )
    _, step_fvu, step_aux = train_step(sae, opt, x, since_fired, cfg, tie)
    assert step_fvu == pytest.approx(fvu.item(), rel=1e-5) and step_aux == pytest.approx(
        aux.item(), rel=1e-5
    )
    g_dec = W_dec.grad - (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
    torch.testing.assert_close(sae.W_dec.grad, g_dec, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tie.log_scale.grad, log_scale.grad, rtol=1e-4, atol=1e-6)
    for name, ref in (("b_enc", b_enc), ("b_dec", b_dec)):
        torch.testing.assert_close(
            getattr(sae, name).grad, ref.grad, rtol=1e-4, atol=1e-6, msg=name
        )
    assert sae.W_enc.grad is None  # derived from the tie, not trained
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T * tie.log_scale.exp())


@pytest.mark.slow
def test_tied_training_saves_a_plain_sae_that_generalises_better_on_few_rows(data, tmp_path):
    """600 rows, 512 latents: a free encoder memorises its rows; the tied one does better on
    held-out rows. Its file is an ordinary SAE whose encoder columns are the decoder rows, scaled."""
    x, _, groups = data
    held_out = x[10_000:12_000]
    fvu = {}
    for tied in (False, True):
        cfg = SAEConfig(
            k=TRUE_K, lr=5e-3, max_steps=300, tied_encoder=tied, **{**FAST, "batch_size": 256}
        )
        sae = train_sae(x[:600], groups[:600], cfg, d_sae=512).sae
        fvu[tied] = evaluate_sae(sae, held_out).fvu
    assert fvu[True] < 0.95 * fvu[False], fvu
    cos = F.cosine_similarity(sae.W_enc.detach().T, sae.W_dec.detach(), dim=-1)  # [d_sae]
    torch.testing.assert_close(cos, torch.ones(512), rtol=0, atol=1e-5)
    loaded = load_sae(save_sae(sae, tmp_path / "tied", {"hook_name": "resid12"}))
    torch.testing.assert_close(loaded.encode(held_out), sae.encode(held_out), rtol=1e-4, atol=1e-5)


def test_split_by_group():
    groups = np.repeat(np.arange(50), 7)
    np.random.default_rng(1).shuffle(groups)
    train_idx, val_idx = split_by_group(groups, 0.2, seed=3)
    assert set(groups[train_idx]).isdisjoint(groups[val_idx])
    assert len(train_idx) + len(val_idx) == len(groups)
    assert len(set(groups[val_idx])) == 10
    again = split_by_group(groups, 0.2, seed=3)
    assert np.array_equal(again[1], val_idx)
    with pytest.raises(ValueError, match="at least 2 groups"):
        split_by_group(np.zeros(5, dtype=int), 0.2, seed=0)


def test_deterministic(data):
    x, _, groups = data
    x, groups = x[:4000].half(), groups[:4000]  # float16 input, as stored activations are
    cfg = SAEConfig(k=TRUE_K, max_steps=24, **{**FAST, "eval_every": 8, "dead_after_tokens": 1024})
    (a, ha), (b, hb) = (
        train_sae(x, groups, cfg, d_sae=D_SAE)[:2],
        train_sae(x, groups, cfg, d_sae=D_SAE)[:2],
    )
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].numpy().tobytes() == sb[key].numpy().tobytes(), key
    assert ha["train_loss"] == hb["train_loss"]
    assert max(ha["aux_loss"]) > 0  # AuxK was exercised (dead_after_tokens is short)


def test_lr_decay_changes_only_the_last_steps(data):
    from refusal_assets.sae.training import lr_factor

    assert [lr_factor(s, 10, 4) for s in range(6, 11)] == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_factor(10, 10, 0) == 1.0 and lr_factor(1, 10, 10) == 1.0
    x, _, groups = data
    x, groups = x[:4000], groups[:4000]
    base = dict(k=TRUE_K, max_steps=24, **{**FAST, "eval_every": 8})
    const = train_sae(x, groups, SAEConfig(**base), d_sae=D_SAE).history
    decay = train_sae(x, groups, SAEConfig(**base, lr_decay_steps=8), d_sae=D_SAE).history
    assert const["train_loss"][:2] == decay["train_loss"][:2]  # steps 1-16: the same constant lr
    assert const["train_loss"][2] != decay["train_loss"][2]  # steps 17-24: decayed


def test_save_load_round_trip(trained, data, tmp_path):
    sae, _ = trained
    x, _, _ = data
    folder = save_sae(
        sae, tmp_path / "sae", {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny"}
    )
    cfg = json.loads((folder / "cfg.json").read_text())
    # SAELens 6 semantics: the input-norm scale is folded into the weights, as its trainer does
    s = sae.norm_scale.item()
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["folded_norm_scaling_factor"] == pytest.approx(s)
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["architecture"]) == (
        D_IN,
        D_SAE,
        TRUE_K,
        "topk",
    )
    assert cfg["hook_name"] == "blocks.3.hook_resid_post" and cfg["apply_b_dec_to_input"] is True
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]  # no temp files
    loaded = load_sae(folder)
    assert loaded.norm_scale.item() == 1.0
    for name, folded in (
        ("W_enc", sae.W_enc * s),
        ("W_dec", sae.W_dec / s),
        ("b_enc", sae.b_enc),
        ("b_dec", sae.b_dec / s),
    ):
        assert torch.equal(getattr(loaded, name), folded), name
    z, z_loaded = sae.encode(x[:256]), loaded.encode(x[:256])
    assert torch.equal(z_loaded > 0, z > 0)
    torch.testing.assert_close(z_loaded, z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded.decode(z_loaded), sae.decode(z), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="contradicts"):
        save_sae(sae, tmp_path / "other", {"d_in": 7})


def write_saelens(folder, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def saelens_tensors(d_in: int, d_sae: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen),
    }


def test_load_handwritten_saelens_folders(tmp_path):
    d_in, d_sae = 8, 40
    tensors = saelens_tensors(d_in, d_sae)
    x = torch.randn(50, d_in, generator=torch.Generator().manual_seed(1)) * 10
    topk_cfg = {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "activation_fn_kwargs": {"k": 3},
        "hook_name": "blocks.0.hook_resid_post",
        "apply_b_dec_to_input": True,
        "dtype": "float32",
    }
    write_saelens(tmp_path / "topk", topk_cfg, tensors)
    sae = load_sae(tmp_path / "topk")
    z = sae.encode(x)
    assert ((z > 0).sum(-1) == 3).all()
    assert sae.norm_scale.item() == 1.0  # no normalisation key
    pre = F.relu((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"])
    torch.testing.assert_close(z.sum(-1), pre.topk(3, dim=-1).values.sum(-1))
    torch.testing.assert_close(sae.decode(z), z @ tensors["W_dec"] + tensors["b_dec"])

    std_cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": False,
        "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": 0.5,
    }
    write_saelens(tmp_path / "standard", std_cfg, {k: v.half() for k, v in tensors.items()})
    std = load_sae(tmp_path / "standard")
    half = {k: v.half().float() for k, v in tensors.items()}
    torch.testing.assert_close(std.encode(x), F.relu(0.5 * x @ half["W_enc"] + half["b_enc"]))
    torch.testing.assert_close(
        std.decode(std.encode(x)), (std.encode(x) @ half["W_dec"] + half["b_dec"]) / 0.5
    )


def test_load_errors_name_file_and_key(tmp_path):
    d_in, d_sae = 8, 40
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": 3}
    tensors = saelens_tensors(d_in, d_sae)
    write_saelens(tmp_path / "ok", cfg, tensors)
    weights = tmp_path / "ok" / "sae_weights.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors.*(truncated|corrupt)"):
        load_sae(tmp_path / "ok")

    with pytest.raises(ValueError, match="missing file cfg.json"):
        load_sae(tmp_path / "nowhere")
    write_saelens(tmp_path / "no_k", {**cfg, "k": None}, tensors)
    with pytest.raises(ValueError, match=r"cfg\.json: missing key 'k'"):
        load_sae(tmp_path / "no_k")
    write_saelens(tmp_path / "no_bdec", cfg, {k: v for k, v in tensors.items() if k != "b_dec"})
    with pytest.raises(ValueError, match="missing tensor 'b_dec'"):
        load_sae(tmp_path / "no_bdec")
    write_saelens(tmp_path / "shape", {**cfg, "d_sae": d_sae + 1}, tensors)
    with pytest.raises(ValueError, match="'W_enc' has shape"):
        load_sae(tmp_path / "shape")
    write_saelens(tmp_path / "gated", {**cfg, "architecture": "gated"}, tensors)
    with pytest.raises(ValueError, match="unsupported architecture 'gated'"):
        load_sae(tmp_path / "gated")


def test_evaluate_sae_by_hand():
    # latents [relu(x), relu(-x)] with decoder rows [I; -I] reconstruct any x exactly
    d = 6
    sae = TopKSAE(d, 2 * d, k=d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(sae.W_dec.T)
    x = torch.rand(100, d) + 0.1  # all positive: the d "negative" latents never fire
    metrics = evaluate_sae(
        sae, x, batch_size=7
    )  # odd batch size: the chunked sums must still agree
    assert metrics.fvu == pytest.approx(0.0, abs=1e-10)
    assert metrics.mse == pytest.approx(0.0, abs=1e-12)
    assert metrics.l0 == d
    assert metrics.dead_fraction == 0.5

    with torch.no_grad():
        sae.W_dec.zero_()  # x_hat = b_dec = 0: fvu = sum||x||^2 / sum||x - mean||^2
    metrics = evaluate_sae(sae, x, batch_size=32)
    x64 = x.double()
    assert metrics.fvu == pytest.approx(
        (x64.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()).item(), rel=1e-9
    )
    assert metrics.mse == pytest.approx(x64.pow(2).mean().item(), rel=1e-9)


def test_batchtopk_trains_with_mean_l0_near_k(data, tmp_path):
    x, _, groups = data
    k = 6
    cfg = SAEConfig(architecture="batchtopk", k=k, lr=3e-3, max_steps=100, **FAST)
    sae, hist = train_sae(x, groups, cfg, d_sae=D_SAE)[:2]
    assert not sae.training and sae.threshold.min() > 0
    _, val_idx = split_by_group(groups, cfg.val_fraction, cfg.seed)
    metrics = evaluate_sae(
        sae, x[val_idx]
    )  # inference: the estimated threshold, not the batch top-k
    assert 0.8 * k <= metrics.l0 <= 1.2 * k, metrics
    assert metrics.fvu < 0.2
    # saved as SAELens does, a JumpReLU SAE with the threshold; it encodes identically (up to the
    # rounding of the folded norm scale: the active set is the same, the values within float tolerance)
    loaded = load_sae(save_sae(sae, tmp_path / "btk", {"hook_name": "h", "model_name": "m"}))
    assert loaded.architecture == "jumprelu"
    z, z_loaded = sae.encode(x[:500]), loaded.encode(x[:500])
    assert torch.equal(z_loaded > 0, z > 0)
    torch.testing.assert_close(z_loaded, z, rtol=1e-5, atol=1e-6)


def test_plot_history(trained, tmp_path):
    _, hist = trained
    path = plot_history(hist, tmp_path / "sae.png", "toy SAE")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_tiny():
    # the dense-matmul "bound" is gone (it is no bound for a sparse step): ours is timed against sparsify
    pytest.importorskip("sparsify")
    result = run_sae_bench(d_in=32, d_sae=128, k=4, batch_size=64, steps=6, rss_rows=None)
    for key in ("ratio_tokens_per_s", "threads"):
        assert result[key] > 0, key
    for name in ("ours", "sparsify"):
        assert result[name]["tokens_per_s"] > 0 and 0 < result[name]["heldout_fvu"] < 2, result[
            name
        ]
    assert result["ratio_tokens_per_s"] == pytest.approx(
        result["ours"]["tokens_per_s"] / result["sparsify"]["tokens_per_s"]
    )
    assert (result["d_in"], result["d_sae"], result["device"], result["rows"]) == (
        32,
        128,
        "cpu",
        "synthetic",
    )
    alone = run_sae_bench(
        d_in=32, d_sae=128, k=4, batch_size=64, steps=3, rss_rows=None, peers=False
    )
    assert "sparsify" not in alone and "ratio_tokens_per_s" not in alone


def test_bench_split_holds_out_whole_prompts_and_unseen_vectors():
    from refusal_assets.bench.sae import bench_split, synthetic_rows

    rows, groups = synthetic_rows(2000, 16, 64, seed=0)  # 100 prompts of 20 rows
    template = torch.randn(16).half()
    rows[::20] = (
        template  # every prompt's first row is the same vector, like a chat-template position
    )
    train, held = bench_split(rows, groups, seed=0)
    assert not set(groups[train]) & set(groups[held])  # whole prompts
    assert len(set(groups[held])) == 10  # VAL_FRACTION of the prompts
    train_vectors = {bytes(rows[i].numpy().tobytes()) for i in train}
    assert len(train_vectors) == len(train)  # every training vector once
    assert not any(
        bytes(rows[i].numpy().tobytes()) in train_vectors for i in held
    )  # nothing seen in training
    assert (rows[train] == template).all(-1).sum() == 1 and len(held) == 10 * 19


def test_bench_streaming_rss_in_subprocesses():
    from refusal_assets.bench.sae import streaming_rss

    rss = streaming_rss(400, d_in=16, d_sae=32, k=4, batch_size=32, steps=3, modes=("stream",))[
        "stream"
    ]
    assert rss["n_rows"] == 400 and rss["peak_rss_mb_n"] > 10 and rss["peak_rss_mb_4n"] > 10
    assert rss["ratio_4n_over_n"] == pytest.approx(rss["peak_rss_mb_4n"] / rss["peak_rss_mb_n"])


def test_bench_json_stdout_is_the_json_alone(monkeypatch, capsys, tmp_path):
    # sparsify prints its Triton fallback to stdout on import; `bench --json | jq` must still parse
    import json

    from refusal_assets.app import cli, settings
    from refusal_assets_tests.conftest import ROOT

    monkeypatch.setenv(settings.CONFIG_ENV, str(ROOT / "configs" / "tiny.yaml"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))

    def noisy(args):
        print("Triton not installed, using eager implementation of sparse decoder.")
        return {"ratio_tokens_per_s": 1.5}

    monkeypatch.setattr(cli, "_bench_result", noisy)
    assert cli.main(["bench", "sae", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"ratio_tokens_per_s": 1.5} and out.count("\n") == 1
    assert "Triton not installed" in err


def test_learning_curve_nested_subsets_same_heldout_and_new_extra_rows():
    from refusal_assets.bench.sae import bench_split, learning_curve, synthetic_rows

    rows, groups = synthetic_rows(3000, 32, 128, seed=0)  # 150 prompts of 20 rows
    rows[::20] = torch.randn(
        32
    ).half()  # every prompt's first row is one vector, like a template position
    ids = np.array([f"p{g}" for g in groups])
    more, more_groups = synthetic_rows(1000, 32, 128, seed=1)  # another sample: 50 prompts
    more_ids = np.array([f"q{g}" for g in more_groups])
    more[:100] = rows[:100]  # 5 prompts' rows repeat the sample's vectors: not new
    _, held = bench_split(
        rows, np.unique(ids, return_inverse=True)[1], seed=0
    )  # the curve's own group codes
    held_prompt = ids[held[0]]
    more[100:120] = (
        rows[ids == held_prompt][:20] + 0.01
    )  # a held-out prompt again, values not equal
    more_ids[100:120] = held_prompt
    shape = dict(d_sae=128, k=8, batch_size=128, steps=150)
    curve = learning_curve(rows, ids, extra=(more, more_ids), fractions=(0.1, 1.0), **shape)
    points = curve["points"]
    assert [(p["data"], p["fraction"]) for p in points] == [
        ("sample", 0.1),
        ("sample", 1.0),
        ("sample + extra", 1.0),
    ]
    assert (
        curve["n_heldout_prompts"] == 16 and curve["n_heldout_rows"] == 16 * 19
    )  # 2 x round(0.05 x 150)
    assert curve["n_extra_rows_from_heldout_prompts"] == 20 and curve["n_extra_prompts"] == 44
    assert [p["n_prompts"] for p in points] == [13, 134, 134 + 44]
    # the template vector once in every subset, whichever prompt holds its first row
    assert [p["n_train_rows"] for p in points] == [
        13 * 19 + 1,
        134 * 19 + 1,
        134 * 19 + 1 + 44 * 20,
    ]
    assert points[0]["epochs"] == pytest.approx(150 * 128 / (13 * 19 + 1))
    small, full = points[0], points[1]
    # a tenth of the prompts: the SAE fits its rows and misses new ones; all of them: the gap closes
    assert (
        small["train_fvu"] < 0.5 * small["heldout_fvu"]
        and full["heldout_fvu"] < 0.8 * small["heldout_fvu"]
    )
    assert full["heldout_fvu"] - full["train_fvu"] < 0.5 * (
        small["heldout_fvu"] - small["train_fvu"]
    )
    with pytest.raises(ValueError, match="d_in 8"):
        learning_curve(rows, ids, extra=(more[:, :8], more_ids), **{**shape, "steps": 2})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sae", "--learning-curve"], "needs --activations"),
        (["sae", "--extra-activations", "x"], "goes with `bench sae --learning-curve`"),
        (["behaviour", "--learning-curve"], "is for `bench sae`"),
    ],
)
def test_bench_flag_errors_name_the_flag(argv, message, monkeypatch, tmp_path):
    from refusal_assets.app import cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", *argv, "--json"])
    assert not any(tmp_path.iterdir())  # refused before anything was set up
