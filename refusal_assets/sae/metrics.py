"""What an SAE does on a set of rows: reconstruction (FVU, MSE), sparsity (L0) and which
latents fire."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_assets.sae.model import EVAL_BATCH, TopKSAE
from refusal_assets.sae.rows import Rows, as_rows, chunks


@dataclass(frozen=True, kw_only=True)
class SAEMetrics:
    """An SAE's reconstruction and sparsity on a set of rows (:func:`evaluate_sae`)."""

    fvu: float
    """Fraction of variance unexplained: sum||x - x_hat||^2 / sum||x - mean(x)||^2 (NaN when the
    rows have no variance)."""
    l0: float
    """Mean active latents per row."""
    dead_fraction: float
    """Share of latents that fire on none of the rows."""
    mse: float
    """Mean squared reconstruction error per element."""


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, vectors: Tensor | Rows, batch_size: int = EVAL_BATCH) -> SAEMetrics:
    """Reconstruction and sparsity of ``sae`` on ``vectors`` (:class:`SAEMetrics`), read in chunks."""
    rows = as_rows(vectors)
    n, d_in = len(rows), rows.d_in
    device = sae.W_dec.device
    sse, sq, total = 0.0, 0.0, torch.zeros(d_in, dtype=torch.float64, device=device)
    active, fired = 0, torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for chunk in chunks(rows, torch.arange(n), batch_size):
        x = chunk.to(device, torch.float32)
        x_hat, z = sae(x)
        on = z > 0
        sse += float((x - x_hat).double().pow(2).sum())
        sq += float(x.double().pow(2).sum())
        total += x.double().sum(0)
        active += int(on.sum())
        fired |= on.any(0)
    total_var = sq - float(total.pow(2).sum()) / n
    return SAEMetrics(
        fvu=sse / total_var if total_var > 0 else math.nan,
        l0=active / n,
        dead_fraction=1.0 - float(fired.float().mean()),
        mse=sse / (n * d_in),
    )


@torch.no_grad()
def fired_latents(sae: TopKSAE, vectors: Tensor | Rows, batch_size: int = EVAL_BATCH) -> Tensor:
    """Bool [d_sae]: latents that fire on at least one row."""
    rows = as_rows(vectors)
    device = sae.W_dec.device
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for x in chunks(rows, torch.arange(len(rows)), batch_size):
        fired |= (sae.encode(x.to(device, torch.float32)) > 0).any(0)
    return fired
