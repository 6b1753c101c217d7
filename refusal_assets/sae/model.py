"""Top-K / BatchTopK sparse autoencoder: the module, the sparse autograd function its training step
uses, and the training-time encoder tie.

Shapes: ``B`` batch rows, ``d_in`` model width, ``d_sae`` latents, ``nnz`` active (row, latent) pairs.
Training follows Gao et al. 2024 (TopK, AuxK, unit-norm decoder, E||x||^2 = d_in input scaling) and
EleutherAI's ``sparsify`` (decoder-gradient projection, sparse decoder via ``embedding_bag``); small samples
may tie the encoder to the decoder while training (:class:`TiedEncoder`); BatchTopK
follows Bussmann et al. 2024 and is saved, as SAELens does, as a JumpReLU SAE with a uniform threshold.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Architecture = Literal["topk", "batchtopk", "jumprelu"]
EVAL_BATCH = 4096


class TopKSAE(nn.Module):
    """``x -> z = select(relu((x*s - b_dec) @ W_enc + b_enc)) -> x_hat = (z @ W_dec + b_dec) / s``.

    ``select`` is per-row top-k (``topk``), the top ``k*B`` of the whole batch while training and a
    threshold at inference (``batchtopk``), or a per-latent threshold only (``jumprelu``, loaded SAEs).
    ``s = norm_scale`` makes the training inputs' mean squared norm ``d_in``; ``decode`` undoes it.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        architecture: Architecture = "topk",
        apply_b_dec_to_input: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        if architecture not in ("topk", "batchtopk", "jumprelu"):
            raise ValueError(f"unknown architecture {architecture!r}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.architecture: Architecture = architecture
        self.apply_b_dec_to_input = apply_b_dec_to_input
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [d_sae, d_in], unit rows
        self.W_enc = nn.Parameter(
            W_dec.T.clone()
        )  # [d_in, d_sae]; Gao et al.: start as the transpose
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.tensor(1.0))
        self.register_buffer(
            "threshold", torch.zeros(d_sae)
        )  # [d_sae] inference cut for batchtopk/jumprelu

    def normalise(self, x: Tensor) -> Tensor:
        return x.to(self.W_enc.dtype) * self.norm_scale

    def pre_acts(self, x_n: Tensor) -> Tensor:
        """Normalised input ``[.., d_in]`` -> ReLU pre-activations ``[.., d_sae]``."""
        if self.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        # in-place ReLU is safe: addmm's backward does not read its output
        pre = torch.addmm(self.b_enc, x_n.reshape(-1, self.d_in), self.W_enc).relu_()
        return pre.view(*x_n.shape[:-1], self.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """``x [.., d_in]`` in model units -> latents ``[.., d_sae]``."""
        pre = self.pre_acts(self.normalise(x))
        if self.architecture == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        if self.architecture == "batchtopk" and self.training:
            flat = pre.reshape(-1)  # every row of the batch competes for k * rows slots
            vals, idx = flat.topk(self.k * (flat.numel() // self.d_sae), sorted=False)
            return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
        return pre * (pre > self.threshold)

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[.., d_sae]`` -> reconstruction ``[.., d_in]`` in model (un-normalised) units."""
        return (z @ self.W_dec + self.b_dec) / self.norm_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        return self.decode(z), z


class PreActsAt(torch.autograd.Function):
    """``pre[rows, cols]``, where ``pre = relu((x_n - b_dec) @ W_enc + b_enc)`` is passed in, computed without grad.

    The dense product runs once, for the selection; the backward touches only the ``nnz`` selected
    entries (sparse products) instead of two dense ``[B, d_sae]`` matmuls. ``b_dec`` may be None.
    """

    @staticmethod
    def forward(ctx, pre, x_n, b_dec, W_enc, b_enc, rows, cols):  # type: ignore[override]
        vals = pre[rows, cols]  # [nnz]
        x_c = x_n if b_dec is None else x_n - b_dec
        ctx.save_for_backward(x_c, W_enc, rows, cols, vals)
        return vals

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x_c, W_enc, rows, cols, vals = ctx.saved_tensors
        g = g * (vals > 0)  # ReLU
        (B, _), d_sae = x_c.shape, W_enc.shape[1]
        S_T = torch.sparse_coo_tensor(
            torch.stack([cols, rows]), g, (d_sae, B), check_invariants=False
        )
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        grad_W = torch.sparse.mm(S_T, x_c).T if ctx.needs_input_grad[3] else None  # [d_in, d_sae]
        # d pre / d b_dec = -W_enc^T for every row, so its batch sum only needs the column sums of S
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[2] else None
        grad_x = torch.sparse.mm(S_T.t(), W_enc.T.contiguous()) if ctx.needs_input_grad[1] else None
        return None, grad_x, grad_b_dec, grad_W, grad_b_enc, None, None


def select_active(pre: Tensor, k: int, batch_topk: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Active set of ``pre [B, d_sae]`` as row-sorted ``rows, cols [nnz]`` and bag ``offsets [B]``."""
    B, d_sae = pre.shape
    if batch_topk:
        flat = pre.reshape(-1).topk(k * B, sorted=False).indices.sort().values
        rows, cols = flat // d_sae, flat % d_sae
        offsets = torch.searchsorted(rows, torch.arange(B, device=pre.device))
        return rows, cols, offsets
    cols = pre.topk(k, dim=-1, sorted=False).indices.reshape(-1)
    rows = torch.arange(B, device=pre.device).repeat_interleave(k)
    return rows, cols, torch.arange(0, B * k, k, device=pre.device)


def sparse_decode(W_dec: Tensor, acts: Tensor, cols: Tensor, offsets: Tensor) -> Tensor:
    """``sum_i acts_i * W_dec[cols_i]`` per bag -> ``[B, d_in]`` without the dense ``[B, d_sae]`` matmul."""
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=acts)


class TiedEncoder(nn.Module):
    """Training-time tie of the encoder to the decoder: ``W_enc = W_dec^T diag(exp(log_scale))``.

    On a few thousand distinct rows a free ``[d_in, d_sae]`` encoder memorises its training rows: on
    the default model's resid12 it fits them to FVU 0.047 but held-out rows only to 0.169, while
    matching pursuit with the same decoder reaches 0.114 there, so the encoder, not the dictionary,
    is what fails to generalise. Tying leaves the encoder one scale per latent (Gao et al. 2024 use
    the transpose as the initialisation only; with data to spare a free encoder is better). The SAE
    itself keeps a plain ``W_enc`` (re-synced after every step), so files, SAELens and inference are
    unchanged.
    """

    def __init__(self, sae: TopKSAE):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(sae.d_sae, device=sae.W_dec.device))  # [d_sae]
        self.sync(sae)  # train_step needs sae.W_enc to hold the tied weight from the first step

    def weight(self, sae: TopKSAE) -> Tensor:
        return sae.W_dec.T * self.log_scale.exp()  # [d_in, d_sae]

    @torch.no_grad()
    def sync(self, sae: TopKSAE) -> None:
        sae.W_enc.copy_(self.weight(sae))
