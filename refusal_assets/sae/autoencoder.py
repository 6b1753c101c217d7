"""Top-K / BatchTopK sparse autoencoders: model, training, metrics and SAELens-format files.

Shapes: ``B`` batch rows, ``d_in`` model width, ``d_sae`` latents, ``nnz`` active (row, latent) pairs.
Training follows Gao et al. 2024 (TopK, AuxK, unit-norm decoder, E||x||^2 = d_in input scaling) and
EleutherAI's ``sparsify`` (decoder-gradient projection, sparse decoder via ``embedding_bag``); small samples
may tie the encoder to the decoder while training (:class:`TiedEncoder`); BatchTopK
follows Bussmann et al. 2024 and is saved, as SAELens does, as a JumpReLU SAE with a uniform threshold.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from refusal_assets.config import SAEConfig
from refusal_assets.lm.sites import Site
from refusal_assets.plots import new_figure, save_png
from refusal_assets.sae.rows import Rows, SubsetRows, as_rows, chunks
from refusal_assets.sae.splice import splice_metrics
from refusal_assets.storage import atomic_path

Architecture = Literal["topk", "batchtopk", "jumprelu"]
THRESHOLD_BATCHES = 100  # the batch minimum varies little from batch to batch; 100 pin its mean down
EVAL_BATCH = 4096
WEIGHTS_FILE, CFG_FILE = "sae_weights.safetensors", "cfg.json"
CURVES = ("step", "train_loss", "train_fvu", "aux_loss", "val_fvu", "dead_fraction")  # history lists, per evaluation


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
        self.W_enc = nn.Parameter(W_dec.T.clone())  # [d_in, d_sae]; Gao et al.: start as the transpose
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.zeros(d_sae))  # [d_sae] inference cut for batchtopk/jumprelu

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


# ------------------------------------------------------------------------------------ training
class _PreActsAt(torch.autograd.Function):
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
        S_T = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (d_sae, B), check_invariants=False)
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        grad_W = torch.sparse.mm(S_T, x_c).T if ctx.needs_input_grad[3] else None  # [d_in, d_sae]
        # d pre / d b_dec = -W_enc^T for every row, so its batch sum only needs the column sums of S
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[2] else None
        grad_x = torch.sparse.mm(S_T.t(), W_enc.T.contiguous()) if ctx.needs_input_grad[1] else None
        return None, grad_x, grad_b_dec, grad_W, grad_b_enc, None, None


def _select(pre: Tensor, k: int, batch_topk: bool) -> tuple[Tensor, Tensor, Tensor]:
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


def _sparse_decode(W_dec: Tensor, acts: Tensor, cols: Tensor, offsets: Tensor) -> Tensor:
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
    rows, cols, offsets = _select(pre, sae.k, batch_topk)
    b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
    W_enc = sae.W_enc if tie is None else tie.weight(sae)  # [d_in, d_sae]; tied: gradient flows to W_dec
    acts = _PreActsAt.apply(pre, x_n, b_dec, W_enc, sae.b_enc, rows, cols)  # [nnz]
    err = x_n - (_sparse_decode(sae.W_dec, acts, cols, offsets) + sae.b_dec)  # [B, d_in]
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
        aux_cols = dead_idx[pre.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False).indices.reshape(-1)]
        aux_rows = torch.arange(B, device=x.device).repeat_interleave(k_aux)
        aux_acts = _PreActsAt.apply(pre, x_n, b_dec, W_enc, sae.b_enc, aux_rows, aux_cols)
        e = err.detach()
        e_hat = _sparse_decode(sae.W_dec, aux_acts, aux_cols, torch.arange(0, B * k_aux, k_aux, device=x.device))
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


def split_by_group(group_ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val); ``val_fraction`` of the groups (prompts) go wholly to validation."""
    groups = np.unique(group_ids)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 groups (prompts) to split train/validation, got {len(groups)}")
    n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
    val_groups = np.random.default_rng(seed).permutation(groups)[:n_val]
    is_val = np.isin(group_ids, val_groups)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _batches(index: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless epochs of ``index`` reshuffled by ``gen``; the short tail of an epoch is dropped."""
    n = len(index)
    while True:
        perm = index[torch.randperm(n, generator=gen)]
        for start in range(0, max(n - batch_size, 0) + 1, batch_size):
            yield perm[start : start + batch_size]


def init_sae(
    vectors: Tensor | Rows, index: Tensor, d_sae: int, cfg: SAEConfig, generator: torch.Generator, device: str = "cpu"
) -> TopKSAE:
    """A fresh SAE whose input scale and ``b_dec`` come from ``vectors[index]`` (the training rows)."""
    rows = as_rows(vectors)
    d_in = rows.d_in
    sq_norm, total = 0.0, torch.zeros(d_in, dtype=torch.float64)
    for x in chunks(rows, index, EVAL_BATCH):  # float64 sums so millions of rows do not lose precision
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
        raise ValueError("no latent fires on the training vectors; cannot estimate a BatchTopK threshold")
    sae.threshold.fill_(torch.stack(mins).mean())
    sae.train(was_training)
    return float(sae.threshold[0])


def make_optimizer(sae: TopKSAE, lr: float, tie: TiedEncoder | None = None) -> torch.optim.Adam:
    """Adam over the SAE's parameters; with ``tie``, its scales instead of the (derived) ``W_enc``."""
    params = list(sae.parameters()) if tie is None else [p for p in sae.parameters() if p is not sae.W_enc]
    params += list(tie.parameters()) if tie is not None else []
    # the fused kernel is ~20x faster than the per-tensor loop on CPU and has the same update rule
    return torch.optim.Adam(params, lr=lr, fused=sae.W_dec.device.type in ("cpu", "cuda"))


def start_training(
    vectors: Tensor | Rows, index: Tensor, d_sae: int, cfg: SAEConfig, generator: torch.Generator, device: str = "cpu"
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
        raise ValueError(f"need vectors [n, d_in] and group_ids [n]; got {len(rows)} rows, {len(group_ids)} group ids")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if split is None:
        train_np, val_np = split_by_group(np.asarray(group_ids), cfg.val_fraction, cfg.seed)
    else:
        train_np, val_np = (np.asarray(a, dtype=np.int64) for a in split)
        if len(train_np) == 0 or len(val_np) == 0:
            raise ValueError(f"need training and validation rows; got {len(train_np)} and {len(val_np)}")
        shared = set(np.asarray(group_ids)[train_np].tolist()) & set(np.asarray(group_ids)[val_np].tolist())
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
        val_fvu = evaluate_sae(sae, val_rows)["fvu"]  # training-mode sparsity: BatchTopK has no threshold yet
        loss, fvu, aux = np.mean(window, axis=0).tolist()
        dead = float((since_fired >= cfg.dead_after_tokens).float().mean())
        window.clear()
        for key, value in zip(CURVES, (step, loss, fvu, aux, val_fvu, dead)):
            hist[key].append(value)
        if log:
            log(f"step {step}: loss {loss:.4f} train fvu {fvu:.4f} aux {aux:.4f} val fvu {val_fvu:.4f} dead {dead:.3f}")
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
    hist.update(n_train=len(train_np), n_val=len(val_np), stopped_early=stopped_early, best_step=best_step)
    hist["seconds"] = time.perf_counter() - t0
    return TrainedSAE(sae.eval(), hist, train_np, val_np)


# ------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate_sae(sae: TopKSAE, vectors: Tensor | Rows, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """fvu = sum||x - x_hat||^2 / sum||x - mean(x)||^2; l0 = mean active latents per row;
    dead_fraction = latents that never fire on ``vectors``; mse = mean squared error per element."""
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
    return {
        "fvu": sse / total_var if total_var > 0 else math.nan,
        "l0": active / n,
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "mse": sse / (n * d_in),
    }


def plot_history(history: dict[str, Any], path: Path, title: str) -> Path:
    """PNG of training loss, validation FVU and dead-latent fraction against step."""
    fig = new_figure((12, 3.5), constrained=True)
    panels = (("train_loss", "train loss"), ("val_fvu", "validation FVU"), ("dead_fraction", "dead fraction"))
    for ax, (key, label) in zip(fig.subplots(1, 3), panels):
        ax.plot(history["step"], history[key], marker=".")
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
    if history.get("best_step"):
        for ax in fig.axes:
            ax.axvline(history["best_step"], color="grey", linestyle="--", linewidth=1)
    fig.suptitle(title)
    return save_png(fig, path)


# ------------------------------------------------------------------------------ SAELens format
SAELENS_FORMAT = "6.0.0"  # the cfg.json layout we write (flat fields + ``metadata``) is SAELens 6's
TL_HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def tl_hook_name(name: str) -> str:
    """TransformerLens hook name of a site (``resid12`` -> ``blocks.12.hook_resid_post``); any other
    name (already a hook name) is returned unchanged."""
    try:
        site = Site.parse(name)
    except ValueError:
        return name
    return f"blocks.{site.layer}.{TL_HOOKS[site.kind]}"


def save_sae(sae: TopKSAE, folder: Path, cfg_extra: dict[str, Any]) -> Path:
    """Write ``sae_weights.safetensors`` then ``cfg.json`` (last: its presence marks a complete save).

    The input-norm scale is folded into the weights exactly as SAELens 6's trainer does before saving
    (``fold_activation_norm_scaling_factor``: ``W_enc * s``, ``W_dec / s``, ``b_dec / s``), so the file
    takes model-unit inputs with ``normalize_activations: none``; ``(x s - b) W = (x - b/s)(s W)`` and
    ``(z W_dec + b) / s = z (W_dec/s) + b/s`` make latents and reconstructions the same up to rounding.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CFG_FILE).unlink(missing_ok=True)  # a crash below must not leave old cfg + new weights
    thresholded = sae.architecture != "topk"
    s = float(sae.norm_scale)
    with torch.no_grad():
        tensors = {
            "W_enc": sae.W_enc * s,
            "W_dec": sae.W_dec / s,
            "b_enc": sae.b_enc,
            "b_dec": sae.b_dec / s,
        }
        if thresholded:
            tensors["threshold"] = sae.threshold  # compares pre-activations, which the fold leaves unchanged
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    core = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        # SAELens saves BatchTopK as JumpReLU: at inference both are relu(pre) * (pre > threshold)
        "architecture": "jumprelu" if thresholded else "topk",
        "k": sae.k,
        "normalize_activations": "none",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "dtype": "float32",
        "device": "cpu",
        "reshape_activations": "none",
    }
    clash = {key for key in core if key in cfg_extra and cfg_extra[key] != core[key]}
    if clash:
        raise ValueError(f"cfg_extra contradicts the SAE on {sorted(clash)}")
    extra = dict(cfg_extra)
    if extra.get("hook_name"):
        extra["hook_name"] = tl_hook_name(str(extra["hook_name"]))
    # "folded_norm_scaling_factor" records the fold (informational; the weights already include it)
    metadata = {
        "sae_lens_version": SAELENS_FORMAT,
        "sae_lens_training_version": SAELENS_FORMAT,
        "hook_name": None,
        "model_name": None,
        **extra,
        "folded_norm_scaling_factor": s,
    }
    cfg = {"hook_name": None, "model_name": None, **extra, **core, "metadata": metadata}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    return folder


def load_sae(folder: Path, d_in: int | None = None) -> TopKSAE:
    """Read a SAELens-format folder (ours or others'): architectures topk, standard (ReLU or a v5
    ``activation_fn_str: topk``), jumprelu / batchtopk, with SAELens's own latents (TopK's
    ``rescale_acts_by_decoder_norm`` is folded into the weights). ``d_in``: the site's width, checked
    before any tensor is read. Never unpickles."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{folder}: missing file {path.name}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ValueError(f"{cfg_path}: missing key {key!r}")
        return cfg[key]

    file_d_in, d_sae = int(need("d_in")), int(need("d_sae"))
    if d_in is not None and file_d_in != d_in:
        raise ValueError(f"{cfg_path}: SAE has d_in {file_d_in} but the site's activations have width {d_in}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: truncated or corrupt safetensors file ({e})") from e
    d_in = file_d_in
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    act_fn = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if arch == "topk" or (arch == "standard" and act_fn == "topk"):
        if k is None:
            raise ValueError(f"{cfg_path}: missing key 'k' (or activation_fn_kwargs.k) for a topk SAE")
        architecture, k = "topk", int(k)
    elif arch == "standard" and act_fn == "relu":
        architecture, k = "topk", d_sae  # plain ReLU: every positive latent is kept
    elif arch in ("jumprelu", "batchtopk"):
        architecture, k = "jumprelu", int(k or d_sae)
    else:
        raise ValueError(f"{cfg_path}: unsupported architecture {arch!r} (activation {act_fn!r})")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: unsupported normalize_activations {norm!r}")
    # SAELens's trainer folds the scale before saving, so a SAELens file means identity here; a file that
    # states its factor (pre-fold releases, our files before the fold) gets it applied, as from_pretrained does
    scale = float(cfg.get("norm_scaling_factor") or 1.0) if norm == "expected_average_only_in" else 1.0

    sae = TopKSAE(d_in, d_sae, k, architecture, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    with torch.no_grad():
        for name, shape in shapes.items():
            if name not in tensors:
                raise ValueError(f"{weights_path}: missing tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape)
                raise ValueError(f"{weights_path}: tensor {name!r} has shape {got}, expected {shape}")
            getattr(sae, name).copy_(tensors[name].float())
        if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens ranks pre * ||W_dec_i|| and decodes z / ||W_dec_i||: fold both into the weights
            n = sae.W_dec.norm(dim=-1)
            sae.W_enc.mul_(n)
            sae.b_enc.mul_(n)
            sae.W_dec.div_(n[:, None])
        sae.norm_scale.fill_(scale)
    return sae.eval()


def load_pretrained(spec: str, d_in: int, resolve: Callable[[str], Path] = Path) -> TopKSAE:
    """A pretrained SAE for a site of width ``d_in``: a SAELens-format folder (``resolve`` turns the
    config's string into a path), or ``saelens:<release>/<sae_id>`` fetched through ``sae_lens``
    (optional extra ``peers``), which folds a release's norm scale as ``from_pretrained`` does."""
    if not spec.startswith("saelens:"):
        return load_sae(resolve(spec), d_in=d_in)
    release, _, sae_id = spec.removeprefix("saelens:").partition("/")
    if not release or not sae_id:
        raise ValueError(f"pretrained {spec!r}: expected saelens:<release>/<sae_id>")
    try:
        from sae_lens import SAE
    except ImportError as e:
        raise ValueError(
            f"pretrained {spec!r} needs the sae-lens package: pip install 'refusal-assets[peers]' ({e})"
        ) from e
    import tempfile

    loaded = SAE.from_pretrained(release, sae_id, device="cpu")
    sae_obj = loaded[0] if isinstance(loaded, tuple) else loaded  # pre-6 versions returned (sae, cfg, sparsity)
    with tempfile.TemporaryDirectory(prefix="saelens-") as tmp:
        sae_obj.save_model(tmp)  # its own file layout, read back by the same loader as any folder
        try:
            return load_sae(Path(tmp), d_in=d_in)
        except ValueError as e:
            raise ValueError(f"pretrained {spec!r}: {e}") from e


def typical_rows(vectors: Tensor, max_norm_factor: float) -> Tensor:
    """Bool mask [n] of rows whose L2 norm is at most ``max_norm_factor`` x the median norm."""
    return typical_norms(vectors.float().norm(dim=-1), max_norm_factor)


def typical_norms(norms: Tensor, max_norm_factor: float) -> Tensor:
    """:func:`typical_rows` from the rows' norms ``[n]`` (e.g. ``ParquetRows.norms``, read once from disk)."""
    norms = torch.as_tensor(norms, dtype=torch.float32)
    return norms <= max_norm_factor * norms.median()


def row_norms(rows: Rows, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """L2 norm of every row [n] (float32); a ``ParquetRows`` already holds them."""
    norms = getattr(rows, "norms", None)
    if norms is not None and len(norms) == len(rows):
        return np.asarray(norms, dtype=np.float32)
    return torch.cat([x.float().norm(dim=-1) for x in chunks(rows, torch.arange(len(rows)), batch_size)]).numpy()


# -------------------------------------------------------------- de-duplication and the split
class PromptSplit(NamedTuple):
    """Row indices of a three-way split by prompt: every prompt's rows go wholly to one part."""

    train: np.ndarray
    val: np.ndarray
    """Early-stopping rows."""
    eval: np.ndarray
    """Held-out rows for the reported metrics."""


def split_prompts(group_ids: np.ndarray, val_fraction: float, eval_fraction: float, seed: int) -> PromptSplit:
    """Rows (train, early-stopping validation, held-out evaluation); ``val_fraction`` and
    ``eval_fraction`` of the groups (prompts) go wholly to validation and evaluation, drawn from one
    permutation of the sorted group ids so the split does not depend on row order or file layout."""
    group_ids = np.asarray(group_ids)
    groups = np.unique(group_ids)
    if len(groups) < 3:
        raise ValueError(f"need at least 3 groups (prompts) to split train/validation/evaluation, got {len(groups)}")
    n_eval = min(max(1, round(eval_fraction * len(groups))), len(groups) - 2)
    n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1 - n_eval)
    perm = np.random.default_rng(seed).permutation(groups)
    part = np.zeros(len(group_ids), np.int8)  # 0 train, 1 val, 2 eval
    part[np.isin(group_ids, perm[:n_eval])] = 2
    part[np.isin(group_ids, perm[n_eval : n_eval + n_val])] = 1
    return PromptSplit(np.flatnonzero(part == 0), np.flatnonzero(part == 1), np.flatnonzero(part == 2))


def row_keys(rows: Rows, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """A 64-bit digest of each row's bytes [n] (uint64): equal rows, equal keys. One sequential pass;
    8 bytes per row stay in memory, so de-duplication works on rows that do not fit in RAM. (Two
    different rows share a key with probability ~n^2 / 2^65: about 1e-6 at 5M rows.)"""
    keys = np.empty(len(rows), np.uint64)
    start = 0
    for x in chunks(rows, torch.arange(len(rows)), batch_size):
        a = np.ascontiguousarray(x.cpu().numpy())
        flat = a.view(np.uint8).reshape(len(a), -1)
        for j in range(len(a)):
            keys[start + j] = int.from_bytes(hashlib.blake2b(flat[j].data, digest_size=8).digest(), "little")
        start += len(a)
    return keys


class SiteRows(NamedTuple):
    """What :func:`distinct_split` decided about a site's rows (indices into the rows it was given)."""

    split: PromptSplit
    """Distinct rows of each part; a val/eval row equal to a training row is left out (it is not held out)."""
    template: np.ndarray
    """Bool [n]: the row's vector occurs in more than one prompt (the fixed system prompt and chat
    header before the user's text; causal attention makes those positions identical in every prompt)."""
    n_distinct: int


def site_split(group_ids: np.ndarray, cfg: SAEConfig, train_only: np.ndarray | None = None) -> PromptSplit:
    """:func:`split_prompts` over the study's rows; the ``train_only`` rows (bool [n], the SAE
    corpus's) join the training part whole: they are never held out, so the held-out prompts, and
    the numbers measured on them, are the same with or without a corpus."""
    group_ids = np.asarray(group_ids)
    if train_only is None or not np.any(train_only):
        return split_prompts(group_ids, cfg.val_fraction, cfg.eval_fraction, cfg.seed)
    train_only = np.asarray(train_only, dtype=bool)
    if len(train_only) != len(group_ids):
        raise ValueError(f"need one train_only flag per row: {len(group_ids)} rows, {len(train_only)} flags")
    study = np.flatnonzero(~train_only)
    parts = split_prompts(group_ids[study], cfg.val_fraction, cfg.eval_fraction, cfg.seed)
    train = np.sort(np.concatenate([study[parts.train], np.flatnonzero(train_only)]))
    return PromptSplit(train, study[parts.val], study[parts.eval])


def distinct_split(
    group_ids: np.ndarray, keys: np.ndarray, cfg: SAEConfig, train_only: np.ndarray | None = None
) -> SiteRows:
    """The three-way prompt split (:func:`site_split`), then de-duplication of each part.

    We de-duplicate rather than down-weight the template rows: a repeated vector carries no new
    information, and counted once per prompt the chat-template prefix (about half of all rows on the
    default model) makes the SAE spend latents and loss on tokens the circuits never read, and makes a
    held-out FVU that is mostly rows seen in training. Dropping repeats keeps every distinct vector
    once, needs no weighted loss in the trainer, and keeps streaming a plain index subset.
    """
    group_ids, keys = np.asarray(group_ids), np.asarray(keys)
    parts = site_split(group_ids, cfg, train_only)
    pairs = pl.DataFrame({"key": keys, "group": group_ids}).unique()
    shared = pairs.group_by("key").len().filter(pl.col("len") > 1)["key"].to_numpy()
    template = np.isin(keys, shared)

    def first(idx: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        _, at = np.unique(keys[idx], return_index=True)
        idx = np.sort(idx[at])  # the first occurrence of each vector, in row order
        return idx if exclude is None else idx[~np.isin(keys[idx], keys[exclude])]

    train = first(parts.train)
    return SiteRows(
        PromptSplit(train, first(parts.val, train), first(parts.eval, train)), template, int(len(np.unique(keys)))
    )


def training_draws(train: np.ndarray, template: np.ndarray, repeats: int) -> np.ndarray:
    """The training index with each template row (``template[row]``: its vector occurs in several
    prompts) ``repeats`` times: every row is distinct, and the few template vectors, which every
    prompt's splice and circuit pass through, keep some weight next to a large corpus."""
    if repeats <= 1:
        return train
    shared = train[template[train]]
    return np.sort(np.concatenate([train, np.repeat(shared, repeats - 1)]))


@torch.no_grad()
def fired_latents(sae: TopKSAE, vectors: Tensor | Rows, batch_size: int = EVAL_BATCH) -> Tensor:
    """Bool [d_sae]: latents that fire on at least one row."""
    rows = as_rows(vectors)
    device = sae.W_dec.device
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for x in chunks(rows, torch.arange(len(rows)), batch_size):
        fired |= (sae.encode(x.to(device, torch.float32)) > 0).any(0)
    return fired


# ------------------------------------------------------------------------------ one site's SAE
@dataclass(frozen=True)
class FittedSAE:
    """The SAE of one site and what :func:`fit_site` measured about it."""

    sae: TopKSAE
    history: dict[str, Any]
    """Training curves (see :func:`train_sae`), or ``{"pretrained": spec}`` for a loaded SAE."""
    metrics: dict[str, float]
    """On the held-out evaluation prompts' distinct rows (never trained on, not used for early
    stopping): ``fvu`` (all of them), ``fvu_post_instruction`` (the post-instruction positions the
    circuits read), ``l0``, ``mse``; ``fvu_val`` on the early-stopping rows; ``dead_fraction``: latents
    that fire on no non-template row of the site (template rows: vectors repeated across prompts),
    ``dead_fraction_with_template`` counting template rows too, ``dead_fraction_val`` over the
    early-stopping rows' non-template rows only; and the row counts of each part."""
    splice: dict[str, float]
    """:func:`refusal_assets.sae.splice.splice_metrics` on held-out evaluation prompts only: loss recovered,
    KL, ΔCE and the refusal-score change with the SAE spliced in without its error term."""
    n_vectors: int
    """Rows the SAE saw (after leaving out the massive-activation rows)."""
    n_val_vectors: int
    """Distinct early-stopping rows."""
    n_outliers: int
    """Massive-activation rows left out (norm above ``max_norm_factor`` x the median)."""
    max_norm: float
    """Largest norm among the rows kept: splicing leaves positions above it clean."""
    pretrained: str | None
    fit_seconds: float
    """Filtering, de-duplication, training (or loading) and metrics, before the language model is loaded."""
    eval_prompt_ids: list[str]
    """The held-out evaluation prompts (metrics and splice)."""


def fit_site(
    rows: Tensor | Rows,
    prompt_ids: pl.Series | Sequence[str],
    cfg: SAEConfig,
    load_lm: Callable[[], tuple[nn.Module, Any]],
    site: Any,
    prompts: pl.DataFrame,
    *,
    post_instruction: np.ndarray | None = None,
    train_only: np.ndarray | None = None,
    pretrained: str | None = None,
    resolve: Callable[[str], Path] = Path,
    refusal_ids: Callable[[Any], list[int]] | None = None,
    system_prompt: str | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = lambda s: None,
) -> FittedSAE:
    """Train (or load) the SAE of one site, measure it on held-out prompts, and splice it into the model.

    ``rows``: the site's activations ``[N, d]`` (a float16 tensor, or a ``sae_data.Rows`` such as
    ``ParquetRows`` that stays on disk: same rows, same SAE); ``prompt_ids [N]`` the prompt of each row
    (the split is drawn over these explicit ids, so both paths split alike); ``post_instruction [N]``
    marks the post-instruction positions; ``train_only [N]`` marks the SAE corpus's rows, which only
    train (:func:`site_split`; a corpus row of a study prompt is dropped). ``prompts`` (``prompt_id``,
    ``prompt``, optional ``category``): the study's texts; the splice scores up to
    ``cfg.splice.prompts_per_category`` of each category's held-out evaluation prompts.
    ``pretrained``: a :func:`load_pretrained` spec (a folder, through ``resolve``, or
    ``saelens:<release>/<id>``). ``refusal_ids(tokenizer)``: the refusal-opening tokens, for the
    refusal-score change.

    ``load_lm`` is called only after training, so the language model and the training data need not
    share the device's memory.
    """
    t0 = time.perf_counter()
    base = as_rows(rows)
    pids = np.asarray(prompt_ids.to_list() if isinstance(prompt_ids, pl.Series) else list(prompt_ids), dtype=object)
    if len(pids) != len(base):
        raise ValueError(f"need one prompt id per row: {len(base)} rows, {len(pids)} prompt ids")
    post = np.zeros(len(base), bool) if post_instruction is None else np.asarray(post_instruction, dtype=bool)
    if len(post) != len(base):
        raise ValueError(f"need one post_instruction flag per row: {len(base)} rows, {len(post)} flags")
    corpus = np.zeros(len(base), bool) if train_only is None else np.asarray(train_only, dtype=bool)
    if len(corpus) != len(base):
        raise ValueError(f"need one train_only flag per row: {len(base)} rows, {len(corpus)} flags")
    # a corpus prompt that is also a study prompt would put a held-out prompt's rows into training
    corpus_of_study_prompt = corpus & np.isin(pids, pids[~corpus])
    norms = row_norms(base)
    if not np.isfinite(norms).all():
        raise ValueError(f"{int((~np.isfinite(norms)).sum())} rows with NaN/inf; refusing to train an SAE on them")
    typical = typical_norms(torch.from_numpy(norms), cfg.max_norm_factor).numpy()
    max_norm = float(norms[typical].max())
    n_outliers = int((~typical).sum())
    log(f"leaving out {n_outliers} massive-activation rows (norm > {cfg.max_norm_factor} x median)")
    keep = np.flatnonzero(typical & ~corpus_of_study_prompt)
    if corpus.any():
        log(
            f"SAE corpus: {int(corpus.sum())} rows from {len(np.unique(pids[corpus]))} prompts "
            f"({int(corpus_of_study_prompt.sum())} rows of study prompts left out)"
        )
    x = SubsetRows(base, torch.from_numpy(keep))  # never materialised: read in batches
    _, group_ids = np.unique(pids[keep].astype(str), return_inverse=True)  # sorted codes: independent of row order
    group_ids = group_ids.astype(np.int64)
    post, corpus = post[keep], corpus[keep]
    keys = row_keys(x)
    site_rows = distinct_split(group_ids, keys, cfg, corpus)
    sp = site_rows.split
    log(
        f"{len(x)} rows hold {site_rows.n_distinct} distinct vectors; {int(site_rows.template.sum())} rows are "
        f"template rows (a vector in more than one prompt)"
    )
    if pretrained is not None:
        sae = load_pretrained(pretrained, d_in=base.d_in, resolve=resolve)
        history: dict[str, Any] = {"pretrained": str(pretrained)}
        log(f"loaded pretrained SAE {pretrained}")
    else:
        log(
            f"training on {len(x)} vectors from {len(np.unique(group_ids))} prompts: "
            f"{len(sp.train)} distinct training rows, "
            f"{len(sp.val)} early-stopping rows, {len(sp.eval)} held-out evaluation rows"
        )
        sae, history, _, _ = train_sae(
            x,
            group_ids,
            cfg,
            d_sae=cfg.expansion_factor * base.d_in,
            device=device,
            log=log,
            split=(training_draws(sp.train, site_rows.template, cfg.template_repeats), sp.val),
        )

    def sub(idx: np.ndarray) -> SubsetRows:
        return SubsetRows(x, torch.from_numpy(np.asarray(idx, dtype=np.int64)))

    held = evaluate_sae(sae, sub(sp.eval))
    eval_post = sp.eval[post[sp.eval]]
    nan = float("nan")
    metrics: dict[str, float] = {
        "fvu": held["fvu"],
        "l0": held["l0"],
        "mse": held["mse"],
        "fvu_post_instruction": evaluate_sae(sae, sub(eval_post))["fvu"] if len(eval_post) > 1 else nan,
        "fvu_val": evaluate_sae(sae, sub(sp.val))["fvu"],
        # the generalisation gap: far below the held-out FVU, the SAE is limited by its data, not its
        # fit; a pretrained SAE never saw these rows, so it has none
        "fvu_train": evaluate_sae(sae, sub(sp.train))["fvu"] if pretrained is None else nan,
    }
    non_template = np.flatnonzero(~site_rows.template & ~corpus)  # the study's rows: what the circuits read
    fired = fired_latents(sae, sub(non_template))
    # template vectors are few once distinct: the first row of each is enough to see what fires on them
    fired_all = fired.clone()
    template_rows = np.flatnonzero(site_rows.template)
    if len(template_rows):
        _, first_at = np.unique(keys[template_rows], return_index=True)
        fired_all |= fired_latents(sae, sub(template_rows[first_at]))
    val_nt = sp.val[~site_rows.template[sp.val]]
    metrics.update(
        dead_fraction=1.0 - float(fired.float().mean()),
        dead_fraction_with_template=1.0 - float(fired_all.float().mean()),
        dead_fraction_val=1.0 - float(fired_latents(sae, sub(val_nt)).float().mean()) if len(val_nt) else nan,
        n_rows=len(x),
        n_distinct_rows=site_rows.n_distinct,
        n_template_rows=int(site_rows.template.sum()),
        n_corpus_rows=int(corpus.sum()),
        n_corpus_train_rows=int(corpus[sp.train].sum()),
        n_train_rows=len(sp.train),
        n_val_rows=len(sp.val),
        n_eval_rows=len(sp.eval),
        n_eval_post_instruction_rows=len(eval_post),
        n_eval_prompts=len(np.unique(group_ids[sp.eval])),
    )
    # every row of an evaluation prompt may be a training duplicate; the prompt is still held out
    held_out = set(np.unique(pids[keep][site_split(group_ids, cfg, corpus).eval]).astype(str))
    eval_prompt_ids = sorted(held_out)
    splice_prompts = _held_out_texts(prompts, held_out, cfg.splice.prompts_per_category)
    fit_seconds = time.perf_counter() - t0
    log(
        f"held-out FVU {metrics['fvu']:.4f} (post-instruction {metrics['fvu_post_instruction']:.4f}), "
        f"L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.3f}; "
        f"splicing into {len(splice_prompts)} held-out prompts"
    )
    lm, tok = load_lm()
    ids = torch.tensor(refusal_ids(tok), dtype=torch.long) if refusal_ids is not None else None
    splice = splice_metrics(
        lm,
        tok,
        splice_prompts,
        site,
        sae,
        batch_size=cfg.splice.batch_size,
        system_prompt=system_prompt,
        device=device,
        max_norm=max_norm,
        refusal_ids=ids,
    )
    return FittedSAE(
        sae,
        history,
        metrics,
        splice,
        len(x),
        len(sp.val),
        n_outliers,
        max_norm,
        pretrained,
        fit_seconds,
        eval_prompt_ids,
    )


def _held_out_texts(prompts: pl.DataFrame, held_out: set[str], per_category: int) -> list[str]:
    """Up to ``per_category`` texts of held-out prompts per category, in ``prompts``'s order."""
    for col in ("prompt_id", "prompt"):
        if col not in prompts.columns:
            raise ValueError(f"prompts: missing column {col!r} (have {prompts.columns})")
    df = prompts.filter(pl.col("prompt_id").cast(pl.String).is_in(sorted(held_out)))
    if "category" in df.columns:
        df = df.with_row_index("_order").filter(pl.int_range(pl.len()).over("category") < per_category).sort("_order")
    else:
        df = df.head(per_category)
    texts = df["prompt"].to_list()
    if not texts:
        raise ValueError(f"prompts: none of the {len(held_out)} held-out evaluation prompts has a text")
    return texts
