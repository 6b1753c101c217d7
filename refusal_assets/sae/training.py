"""Training an SAE: one optimiser step, initialisation, the lr schedule, batch draws, and the loop
with early stopping; the plot of its history."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from refusal_assets.config import SAEConfig
from refusal_assets.plots import new_figure, save_png
from refusal_assets.sae.metrics import evaluate_sae
from refusal_assets.sae.model import (
    EVAL_BATCH,
    PreActsAt,
    TiedEncoder,
    TopKSAE,
    select_active,
    sparse_decode,
)
from refusal_assets.sae.rows import Rows, SubsetRows, as_rows, chunks
from refusal_assets.sae.splits import split_by_group

THRESHOLD_BATCHES = (
    100  # the batch minimum varies little from batch to batch; 100 pin its mean down
)
CURVES = (
    "step",
    "train_loss",
    "train_fvu",
    "aux_loss",
    "val_fvu",
    "dead_fraction",
)  # history lists, per evaluation


def train_step(
    sae: TopKSAE,
    opt: torch.optim.Optimizer,
    x: Tensor,
    since_fired: Tensor,
    cfg: SAEConfig,
    tie: TiedEncoder | None = None,
) -> tuple[float, float, float]:
    """One optimiser step on ``x [B, d_in]`` (model units, float32); updates ``since_fired [d_sae]``
    (training tokens since each latent last fired) in place. Returns (loss, fvu, aux_loss).

    ``tie``: train the encoder as ``tie.weight(sae)`` (``sae.W_enc`` must hold that value; it is
    re-synced after the step) instead of as a free parameter."""
    B = x.shape[0]
    x_n = sae.normalise(x)
    with torch.no_grad():
        pre = sae.pre_acts(x_n)  # [B, d_sae]
    batch_topk = sae.architecture == "batchtopk"
    rows, cols, offsets = select_active(pre, sae.k, batch_topk)
    b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
    W_enc = (
        sae.W_enc if tie is None else tie.weight(sae)
    )  # [d_in, d_sae]; tied: gradient flows to W_dec
    acts = PreActsAt.apply(pre, x_n, b_dec, W_enc, sae.b_enc, rows, cols)  # [nnz]
    err = x_n - (sparse_decode(sae.W_dec, acts, cols, offsets) + sae.b_dec)  # [B, d_in]
    tiny = torch.finfo(x_n.dtype).tiny  # only guards 0/0 on a batch of identical rows
    fvu = err.pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum().clamp_min(tiny)

    dead = since_fired >= cfg.dead_after_tokens  # [d_sae]
    n_dead = int(dead.sum())
    aux = torch.zeros((), device=x.device)
    if n_dead and cfg.aux_coef > 0:
        # AuxK: the top dead latents model what the live ones missed, to give them gradient again
        k_aux = min(cfg.aux_k, n_dead)
        # top-k over the dead columns only: the work shrinks with the dead share instead of a full
        # masked [B, d_sae] copy and top-k
        dead_idx = dead.nonzero().squeeze(-1)  # [n_dead]
        aux_cols = dead_idx[
            pre.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False).indices.reshape(-1)
        ]
        aux_rows = torch.arange(B, device=x.device).repeat_interleave(k_aux)
        aux_acts = PreActsAt.apply(pre, x_n, b_dec, W_enc, sae.b_enc, aux_rows, aux_cols)
        e = err.detach()
        e_hat = sparse_decode(
            sae.W_dec, aux_acts, aux_cols, torch.arange(0, B * k_aux, k_aux, device=x.device)
        )
        aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(tiny)
    loss = fvu + cfg.aux_coef * aux

    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        # decoder rows live on the unit sphere: drop the radial gradient, step, then re-project
        W, G = sae.W_dec, sae.W_dec.grad
        # row dot products without a [d_sae, d_in] temporary (3x faster than (G * W).sum(-1) on CPU)
        G.addcmul_(torch.einsum("ij,ij->i", G, W).unsqueeze(-1), W, value=-1.0)
        opt.step()
        W /= W.norm(dim=-1, keepdim=True)
        if tie is not None:
            tie.sync(sae)
        since_fired += B
        since_fired[cols[acts.detach() > 0]] = 0
    return loss.item(), fvu.item(), aux.item()


def _batches(index: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless epochs of ``index`` reshuffled by ``gen``; the short tail of an epoch is dropped."""
    n = len(index)
    while True:
        perm = index[torch.randperm(n, generator=gen)]
        for start in range(0, max(n - batch_size, 0) + 1, batch_size):
            yield perm[start : start + batch_size]


def init_sae(
    vectors: Tensor | Rows,
    index: Tensor,
    d_sae: int,
    cfg: SAEConfig,
    generator: torch.Generator,
    device: str = "cpu",
) -> TopKSAE:
    """A fresh SAE whose input scale and ``b_dec`` come from ``vectors[index]`` (the training rows)."""
    rows = as_rows(vectors)
    d_in = rows.d_in
    sq_norm, total = 0.0, torch.zeros(d_in, dtype=torch.float64)
    for x in chunks(
        rows, index, EVAL_BATCH
    ):  # float64 sums so millions of rows do not lose precision
        x = x.to(torch.float64)
        sq_norm += float(x.pow(2).sum())
        total += x.sum(0).cpu()
    if sq_norm == 0.0:
        raise ValueError("training vectors are all zero; cannot scale them")
    scale = math.sqrt(d_in * len(index) / sq_norm)
    sae = TopKSAE(d_in, d_sae, cfg.k, cfg.architecture, generator=generator)
    sae.norm_scale.fill_(scale)
    sae.b_dec.data = (total / len(index) * scale).float()  # normalised data mean
    return sae.to(device)


@torch.no_grad()
def estimate_threshold(
    sae: TopKSAE, vectors: Tensor | Rows, index: Tensor, batch_size: int, generator: torch.Generator
) -> float:
    """BatchTopK's inference cut (Bussmann et al. 2024): the mean over training batches of the smallest
    activation the batch top-k keeps, from the current weights; stored in ``sae.threshold``."""
    was_training = sae.training
    sae.train()  # encode() does the batch top-k only in training mode
    device = sae.W_dec.device
    rows = index[torch.randperm(len(index), generator=generator)][: THRESHOLD_BATCHES * batch_size]
    mins = []
    for x in chunks(as_rows(vectors), rows, batch_size):
        z = sae.encode(x.to(device, torch.float32))  # [B, d_sae]
        if (z > 0).any():
            mins.append(z[z > 0].min())
    if not mins:
        raise ValueError(
            "no latent fires on the training vectors; cannot estimate a BatchTopK threshold"
        )
    sae.threshold.fill_(torch.stack(mins).mean())
    sae.train(was_training)
    return float(sae.threshold[0])


def make_optimizer(sae: TopKSAE, lr: float, tie: TiedEncoder | None = None) -> torch.optim.Adam:
    """Adam over the SAE's parameters; with ``tie``, its scales instead of the (derived) ``W_enc``."""
    params = (
        list(sae.parameters())
        if tie is None
        else [p for p in sae.parameters() if p is not sae.W_enc]
    )
    params += list(tie.parameters()) if tie is not None else []
    # the fused kernel is ~20x faster than the per-tensor loop on CPU and has the same update rule
    return torch.optim.Adam(params, lr=lr, fused=sae.W_dec.device.type in ("cpu", "cuda"))


def start_training(
    vectors: Tensor | Rows,
    index: Tensor,
    d_sae: int,
    cfg: SAEConfig,
    generator: torch.Generator,
    device: str = "cpu",
) -> tuple[TopKSAE, torch.optim.Adam, TiedEncoder | None]:
    """:func:`init_sae` in training mode, its optimiser and (``cfg.tied_encoder``) its encoder tie."""
    sae = init_sae(vectors, index, d_sae, cfg, generator, device).train()
    tie = TiedEncoder(sae) if cfg.tied_encoder else None
    return sae, make_optimizer(sae, cfg.lr, tie), tie


def lr_factor(step: int, max_steps: int, decay_steps: int) -> float:
    """The learning-rate multiplier at ``step`` (1-based): 1, then a linear decay over the last
    ``decay_steps`` steps, reaching 1 / decay_steps at the final step (never 0: it would be wasted)."""
    remaining = max_steps - step + 1  # steps left, this one included
    return 1.0 if decay_steps <= 0 or remaining > decay_steps else remaining / decay_steps


class TrainedSAE(NamedTuple):
    sae: TopKSAE
    history: dict[str, Any]
    train_rows: np.ndarray
    """Rows of ``vectors`` trained on [n_train]."""
    val_rows: np.ndarray
    """Rows held out for validation (whole prompts, see :func:`split_by_group`) [n_val]."""


def train_sae(
    vectors: Tensor | Rows,
    group_ids: np.ndarray,
    cfg: SAEConfig,
    d_sae: int | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainedSAE:
    """Train on ``vectors [n, d_in]`` (a tensor, or a ``sae_data.Rows`` source such as ``ParquetRows``
    that reads batches from disk; both give the same weights) with ``group_ids [n]``: the prompt of each
    row. Returns the SAE with its best-validation-FVU weights, in eval mode, the history (per
    evaluation ``CURVES``: train values averaged since the previous evaluation, plus n_train, n_val,
    stopped_early, best_step, seconds) and the train/validation split of the rows.

    ``split``: explicit (train rows, early-stopping rows), e.g. from :func:`split_prompts` after
    de-duplication; None draws :func:`split_by_group` over ``group_ids``."""
    t0 = time.perf_counter()
    rows = as_rows(vectors)
    if len(group_ids) != len(rows):
        raise ValueError(
            f"need vectors [n, d_in] and group_ids [n]; got {len(rows)} rows, {len(group_ids)} group ids"
        )
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if split is None:
        train_np, val_np = split_by_group(np.asarray(group_ids), cfg.val_fraction, cfg.seed)
    else:
        train_np, val_np = (np.asarray(a, dtype=np.int64) for a in split)
        if len(train_np) == 0 or len(val_np) == 0:
            raise ValueError(
                f"need training and validation rows; got {len(train_np)} and {len(val_np)}"
            )
        shared = set(np.asarray(group_ids)[train_np].tolist()) & set(
            np.asarray(group_ids)[val_np].tolist()
        )
        if shared:
            raise ValueError(
                f"split: {len(shared)} prompts have rows in both training and validation, e.g. group {min(shared)}"
            )
    train_idx = torch.from_numpy(train_np)
    val_rows = SubsetRows(rows, torch.from_numpy(val_np))  # read in chunks, never all at once
    d_sae = d_sae or cfg.expansion_factor * rows.d_in
    sae, opt, tie = start_training(rows, train_idx, d_sae, cfg, gen, device)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    batches = _batches(train_idx, cfg.batch_size, gen)

    hist: dict[str, Any] = {key: [] for key in CURVES}
    best_fvu, best_state, best_step, bad_evals, stopped_early = math.inf, None, 0, 0, False
    window: list[tuple[float, float, float]] = []  # train stats since the last evaluation
    for step in range(1, cfg.max_steps + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.max_steps, cfg.lr_decay_steps)
        x = rows.take(next(batches)).to(device, torch.float32)
        window.append(train_step(sae, opt, x, since_fired, cfg, tie))
        if step % cfg.eval_every and step != cfg.max_steps:
            continue
        val_fvu = evaluate_sae(
            sae, val_rows
        ).fvu  # training-mode sparsity: BatchTopK has no threshold yet
        loss, fvu, aux = np.mean(window, axis=0).tolist()
        dead = float((since_fired >= cfg.dead_after_tokens).float().mean())
        window.clear()
        for key, value in zip(CURVES, (step, loss, fvu, aux, val_fvu, dead)):
            hist[key].append(value)
        if log:
            log(
                f"step {step}: loss {loss:.4f} train fvu {fvu:.4f} aux {aux:.4f} val fvu {val_fvu:.4f} dead {dead:.3f}"
            )
        if val_fvu < best_fvu:
            best_fvu, best_step, bad_evals = val_fvu, step, 0
            best_state = copy.deepcopy(sae.state_dict())
        else:
            bad_evals += 1
            if bad_evals >= cfg.patience:
                stopped_early = True
                break
    if best_state is not None:
        sae.load_state_dict(best_state)
    if sae.architecture == "batchtopk":
        estimate_threshold(sae, rows, train_idx, cfg.batch_size, gen)
    hist.update(
        n_train=len(train_np), n_val=len(val_np), stopped_early=stopped_early, best_step=best_step
    )
    hist["seconds"] = time.perf_counter() - t0
    return TrainedSAE(sae.eval(), hist, train_np, val_np)


def plot_history(history: dict[str, Any], path: Path, title: str) -> Path:
    """PNG of training loss, validation FVU and dead-latent fraction against step."""
    fig = new_figure((12, 3.5), constrained=True)
    panels = (
        ("train_loss", "train loss"),
        ("val_fvu", "validation FVU"),
        ("dead_fraction", "dead fraction"),
    )
    for ax, (key, label) in zip(fig.subplots(1, 3), panels):
        ax.plot(history["step"], history[key], marker=".")
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
    if history.get("best_step"):
        for ax in fig.axes:
            ax.axvline(history["best_step"], color="grey", linestyle="--", linewidth=1)
    fig.suptitle(title)
    return save_png(fig, path)
