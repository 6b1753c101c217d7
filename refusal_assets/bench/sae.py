"""SAE training throughput and held-out FVU, ours against EleutherAI's ``sparsify``, plus peak memory.

Both trainers run in one process on the same rows, shapes (``d_sae``, ``k``), batches (the same
index sequence), steps and threads; their steps are timed interleaved (alternating which goes first)
so load from other processes on a shared machine hits both alike. ``sparsify``'s step is its
``Trainer`` step reproduced: ``SparseCoder.forward`` with its FVU loss and AuxK (``k_aux = d_in // 2``,
scaled by the dead share), ``b_dec`` set to the first batch's mean, decoder re-normalised before each
step and its gradient made orthogonal to the decoder rows, its default optimiser (SignSGD under a
schedule-free wrapper, ``lr = 5e-3 / sqrt(d_sae / 2**14)``; or Adam with its lr rule), and its
dead-latent bookkeeping. Where both trainers have the same knob (AuxK weight, dead threshold) they get
the same value. Rows are split as the ``sae`` asset splits them (:func:`refusal_assets.sae.splits.distinct_split`):
whole prompts held out, every distinct vector once, and a held-out row equal to a training row (the
chat template's positions) left out, so the held-out FVU is measured on vectors neither trainer saw.

Peak RSS of streaming training (``sae_data.ParquetRows``) is measured for N and 4N rows in fresh
subprocesses, so one run's peak cannot mask the other's.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from refusal_assets.bench.common import sync_device
from refusal_assets.config import SAEConfig
from refusal_assets.sae.metrics import evaluate_sae
from refusal_assets.sae.rows import as_rows
from refusal_assets.sae.splits import distinct_split, row_keys, split_prompts, typical_rows
from refusal_assets.sae.training import start_training, train_sae, train_step

TRUE_K = 8  # true features per synthetic sample
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class TrainerResult:
    name: str
    tokens_per_s: float  # batch_size / median step seconds
    step_s: float
    heldout_fvu: float
    final_train_fvu: float


def synthetic_rows(
    n: int, d_in: int, n_feat: int, seed: int, rows_per_prompt: int = 20
) -> tuple[torch.Tensor, np.ndarray]:
    """``[n, d_in]`` float16 rows with the structure of residual activations: a shared offset, sparse
    positive mixes of ``TRUE_K`` directions of a random dictionary with heavy-tailed magnitudes, and
    noise; consecutive rows share a prompt (group id)."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(n_feat, d_in, generator=gen), dim=-1)
    freq = torch.distributions.Exponential(1.0).sample((n_feat,)) ** 2  # uneven feature frequencies
    idx = torch.multinomial(freq / freq.sum(), n * TRUE_K, replacement=True, generator=gen).view(
        n, TRUE_K
    )
    mags = torch.rand(n, TRUE_K, generator=gen).pow(2) * 4 + 0.1
    x = F.embedding_bag(
        idx, dictionary, per_sample_weights=mags.view(-1).view(n, TRUE_K), mode="sum"
    )
    x += 2.0 * F.normalize(torch.randn(d_in, generator=gen), dim=0) + 0.05 * torch.randn(
        n, d_in, generator=gen
    )
    return x.half(), np.arange(n) // rows_per_prompt


class SiteActivations(NamedTuple):
    rows: torch.Tensor
    """``[n, d_in]`` float16, massive-activation rows left out."""
    groups: np.ndarray
    """``[n]`` int64: the prompt of each row, as codes of the sorted prompt ids."""
    prompt_ids: np.ndarray
    """``[n]`` str: the prompt id of each row (a hash of the prompt's text, the same in every run)."""


def site_rows(folder: Path, max_norm_factor: float = 3.0) -> SiteActivations:
    """Every category's rows of one site (``activations/<site_key>/*/activations.parquet``), without
    the massive-activation rows, as the ``sae`` asset trains on them."""
    from refusal_assets.lm.activations import read_vectors

    paths = sorted(Path(folder).glob("*/activations.parquet"))
    if not paths:
        raise ValueError(f"{folder}: no */activations.parquet files")
    parts = [read_vectors(p) for p in paths]
    x = torch.cat([v for v, _ in parts])
    pids = np.concatenate([m["prompt_id"].to_numpy().astype(str) for _, m in parts])
    keep = typical_rows(x, max_norm_factor).numpy()
    _, groups = np.unique(pids[keep], return_inverse=True)
    return SiteActivations(x[torch.from_numpy(keep)], groups.astype(np.int64), pids[keep])


class SparsifyStep:
    """One ``sparsify.Trainer`` step (loss_fn ``fvu``) on a ``SparseCoder``; see the module docstring."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        aux_coef: float,
        dead_after: int,
        steps: int,
        optimizer: str,
        seed: int,
        device: str,
    ):
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(seed)
        self.sae = SparseCoder(
            d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device, dtype=torch.float32
        )
        self.auxk_alpha, self.dead_after = aux_coef, dead_after
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.did_fire = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.first = True
        self.schedulers: list[Any] = []
        if optimizer == "signum":  # sparsify's TrainConfig default
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            self.opt = ScheduleFreeWrapper(
                SignSGD([{"params": self.sae.parameters(), "lr": 5e-3 / (d_sae / 2**14) ** 0.5}]),
                momentum=0.95,
            )
            self.opt.train()
        elif optimizer == "adam":
            from transformers import get_linear_schedule_with_warmup

            self.opt = torch.optim.Adam(
                [{"params": self.sae.parameters(), "lr": 2e-4 / (d_sae / 2**14) ** 0.5}]
            )
            # its default 1000 warm-up steps would outlast a short run: warm up over a tenth of it
            self.schedulers = [
                get_linear_schedule_with_warmup(self.opt, min(1000, steps // 10), steps)
            ]
        else:
            raise ValueError(f"unknown sparsify optimizer {optimizer!r} (signum or adam)")
        self.optimizer = optimizer

    def __call__(self, x: torch.Tensor) -> float:
        sae = self.sae
        if self.first:  # Trainer: b_dec = mean of the first batch
            sae.b_dec.data = x.mean(0).to(sae.dtype)
            self.first = False
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = self.since_fired > self.dead_after if self.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        fvu = float(out.fvu.detach())  # the Trainer's logging reads it every step
        if self.auxk_alpha > 0:
            float(out.auxk_loss.detach())
        loss = out.fvu + self.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        for s in self.schedulers:
            s.step()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[self.did_fire] = 0
            self.did_fire.zero_()
        return fvu

    @torch.no_grad()
    def heldout_fvu(self, x_val: torch.Tensor, batch_size: int = 4096) -> float:
        if self.optimizer == "signum":
            self.opt.eval()  # schedule-free: evaluate (and save) the averaged weights, as the Trainer does
        sse, sq, total = 0.0, 0.0, torch.zeros(x_val.shape[1], dtype=torch.float64)
        for chunk in x_val.split(batch_size):
            x = chunk.float()
            top_acts, top_idx, _ = self.sae.encode(x)
            x_hat = self.sae.decode(top_acts, top_idx)
            sse += float((x - x_hat).double().pow(2).sum())
            sq += float(x.double().pow(2).sum())
            total += x.double().sum(0)
        if self.optimizer == "signum":
            self.opt.train()
        return sse / (sq - float(total.pow(2).sum()) / len(x_val))


def _split_cfg(seed: int) -> SAEConfig:
    return SAEConfig(val_fraction=VAL_FRACTION / 2, eval_fraction=VAL_FRACTION / 2, seed=seed)


def _ours_cfg(recipe: SAEConfig | None, **shape: Any) -> SAEConfig:
    """Our trainer's recipe from ``recipe`` (the project's SAE config: lr, encoder tie, AuxK; None: the
    field defaults) at the bench's own shapes, steps and seed."""
    return (recipe or SAEConfig()).model_copy(update={"architecture": "topk", **shape})


def _first_of_each(keys: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``idx`` [m] reduced to the first row of each distinct vector (by ``keys``), in row order."""
    _, at = np.unique(keys[idx], return_index=True)
    return np.sort(idx[at])


def bench_split(
    rows: torch.Tensor, groups: np.ndarray, seed: int, keys: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, held out) as the ``sae`` asset splits a site: :func:`distinct_split` with
    both of its held-out parts (``VAL_FRACTION`` of the prompts) together, since neither trainer
    early-stops here, each distinct held-out vector once. ``keys``: :func:`row_keys` of ``rows``."""
    keys = row_keys(as_rows(rows)) if keys is None else keys
    parts = distinct_split(np.asarray(groups), keys, _split_cfg(seed)).split
    return parts.train, _first_of_each(keys, np.concatenate([parts.val, parts.eval]))


def _time_trainers(
    trainers: dict[str, Callable[[torch.Tensor], float]],
    batches: Callable[[int], torch.Tensor],
    steps: int,
    device: str,
    log: Callable[[str], None] | None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of every step of each trainer on the same batches (their order alternating from step
    to step, so neither always runs on a warm cache), and each one's training FVU at its last step."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    last_fvu: dict[str, float] = {}
    names = list(trainers)
    for i in range(steps):
        x = batches(i)
        for name in names if i % 2 == 0 else names[::-1]:
            sync_device(device)
            t0 = time.perf_counter()
            last_fvu[name] = trainers[name](x)
            sync_device(device)
            times[name].append(time.perf_counter() - t0)
        if log and (i + 1) % 50 == 0:
            log(
                f"step {i + 1}/{steps}: "
                + ", ".join(
                    f"{n} {statistics.median(times[n][-50:]) * 1e3:.1f} ms fvu {last_fvu[n]:.3f}"
                    for n in names
                )
            )
    return times, last_fvu


def run_sae_bench(
    rows: torch.Tensor | None = None,
    groups: np.ndarray | None = None,
    d_in: int = 896,
    d_sae: int = 1792,
    k: int = 32,
    batch_size: int = 1024,
    steps: int = 300,
    seed: int = 0,
    device: str = "cpu",
    peers: bool = True,
    sparsify_optimizer: str = "signum",
    sparsify_aux_coef: float | None = None,
    rss_rows: int | None = 40_000,
    recipe: SAEConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ours (and sparsify, when installed and ``peers``) for ``steps`` on ``rows`` (default:
    synthetic ``[24 * batch_size, d_in]``), report tokens/s, held-out FVU and ours/sparsify ratio; and
    peak RSS of streaming training at ``rss_rows`` and 4x that (skipped when None). ``recipe``: the
    SAE config whose lr, encoder tie and AuxK settings ours trains with (see :func:`_ours_cfg`)."""
    if rows is None:
        rows, groups = synthetic_rows(24 * batch_size, d_in, 4 * d_sae, seed)
        source = "synthetic"
    else:
        source = "activations"
        if groups is None or len(groups) != len(rows):
            raise ValueError("rows need one group id (prompt) each")
    d_in = rows.shape[1]
    train_np, val_np = bench_split(rows, groups, seed)
    x_train, x_val = rows[torch.from_numpy(train_np)], rows[torch.from_numpy(val_np)]
    if len(x_train) < batch_size:
        raise ValueError(f"{len(x_train)} training rows are fewer than one batch of {batch_size}")
    cfg = _ours_cfg(recipe, k=k, batch_size=batch_size, seed=seed, max_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    order = [
        torch.randperm(len(x_train), generator=gen)[:batch_size] for _ in range(steps)
    ]  # same batches for both

    def batches(i: int) -> torch.Tensor:
        return x_train[order[i]].to(device, torch.float32)

    torch.manual_seed(seed)
    sae, opt, tie = start_training(
        x_train, torch.arange(len(x_train)), d_sae, cfg, torch.Generator().manual_seed(seed), device
    )
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    trainers: dict[str, Callable[[torch.Tensor], float]] = {
        "ours": lambda x: train_step(sae, opt, x, since_fired, cfg, tie)[1]
    }
    sparsify_step = None
    if peers:
        try:
            aux = (
                cfg.aux_coef if sparsify_aux_coef is None else sparsify_aux_coef
            )  # None: the same AuxK weight as ours
            sparsify_step = SparsifyStep(
                d_in, d_sae, k, aux, cfg.dead_after_tokens, steps, sparsify_optimizer, seed, device
            )
            trainers["sparsify"] = sparsify_step
        except ImportError as e:
            if log:
                log(f"sparsify not installed ({e}); timing ours alone")
    times, last_fvu = _time_trainers(trainers, batches, steps, device, log)
    sae.eval()
    heldout_fvu = {"ours": evaluate_sae(sae, x_val.to(device)).fvu}
    if sparsify_step is not None:
        heldout_fvu["sparsify"] = sparsify_step.heldout_fvu(x_val.to(device))
    skip = min(5, steps // 10)  # first steps: allocator and thread-pool warm-up
    results = {}
    for name, fvu in heldout_fvu.items():
        step_s = statistics.median(times[name][skip:])
        results[name] = TrainerResult(name, batch_size / step_s, step_s, fvu, last_fvu[name])
    out: dict[str, Any] = {name: asdict(r) for name, r in results.items()}
    if "sparsify" in results:
        out["ratio_tokens_per_s"] = results["ours"].tokens_per_s / results["sparsify"].tokens_per_s
        out["fvu_ours_minus_sparsify"] = (
            results["ours"].heldout_fvu - results["sparsify"].heldout_fvu
        )
        out["sparsify_optimizer"] = sparsify_optimizer
        out["sparsify_aux_coef"] = sparsify_step.auxk_alpha
    out.update(
        rows=source,
        n_rows=len(rows),
        split="by prompt, de-duplicated",
        n_train=len(x_train),
        n_val=len(x_val),
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        batch_size=batch_size,
        steps=steps,
        ours_lr=cfg.lr,
        ours_tied_encoder=cfg.tied_encoder,
        threads=torch.get_num_threads(),
        device=device,
    )
    if rss_rows:
        out["rss"] = streaming_rss(rss_rows, d_in=d_in, d_sae=d_sae, k=k, batch_size=batch_size)
    return out


# ------------------------------------------------------------------------------- learning curve
def learning_curve(
    rows: torch.Tensor,
    prompt_ids: np.ndarray,
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0),
    extra: tuple[torch.Tensor, np.ndarray] | None = None,
    d_sae: int = 1792,
    k: int = 32,
    batch_size: int = 1024,
    steps: int = 300,
    seed: int = 0,
    recipe: SAEConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Held-out FVU of our SAE (trained with ``recipe``, see :func:`_ours_cfg`) against the amount of
    training data: is a site's SAE limited by its data or by its trainer? ``rows [n, d_in]`` with
    ``prompt_ids [n]`` are split once (:func:`bench_split`); each point trains on the distinct rows of
    the first ``fraction`` of the training prompts (one seeded order, so the subsets are nested) for
    ``steps`` (no early stopping: the held-out rows only measure; ``epochs`` says how often each row
    was seen) and is scored on the same held-out rows. ``extra`` (rows, prompt ids of another
    sample's activations of the same site) adds a last point: every training prompt plus the extra
    rows that are new, i.e. neither from a held-out prompt (matched by prompt id, a hash of the text)
    nor equal to a vector already there (the chat template's positions)."""
    prompt_ids = np.asarray(prompt_ids).astype(str)
    if len(prompt_ids) != len(rows):
        raise ValueError(
            f"need one prompt id per row: {len(rows)} rows, {len(prompt_ids)} prompt ids"
        )
    _, groups = np.unique(prompt_ids, return_inverse=True)
    keys = row_keys(as_rows(rows))
    train_np, held_np = bench_split(rows, groups, seed, keys)
    split_cfg = _split_cfg(seed)
    prompt_split = split_prompts(
        groups, split_cfg.val_fraction, split_cfg.eval_fraction, seed
    )  # duplicates kept
    all_train = prompt_split.train
    held_out_ids = np.unique(prompt_ids[np.concatenate([prompt_split.val, prompt_split.eval])])
    order = np.random.default_rng(seed).permutation(np.unique(groups[all_train]))
    cfg = _ours_cfg(
        recipe, k=k, batch_size=batch_size, seed=seed, max_steps=steps, eval_every=steps
    )
    subsets = _fraction_subsets(fractions, order, keys, all_train, groups)
    data, data_ids = rows, prompt_ids
    n_extra_prompts = n_extra_heldout_rows = 0
    if extra is not None:
        x_extra, extra_ids = extra[0], np.asarray(extra[1]).astype(str)
        if x_extra.shape[1] != rows.shape[1]:
            raise ValueError(
                f"extra rows have d_in {x_extra.shape[1]}, the site's rows {rows.shape[1]}"
            )
        if len(extra_ids) != len(x_extra):
            raise ValueError(
                f"need one prompt id per extra row: {len(x_extra)} rows, {len(extra_ids)} prompt ids"
            )
        from_held_out = np.isin(extra_ids, held_out_ids)
        n_extra_heldout_rows = int(from_held_out.sum())
        extra_keys = row_keys(as_rows(x_extra))
        new = _first_of_each(extra_keys, np.flatnonzero(~from_held_out))
        new = new[~np.isin(extra_keys[new], keys)]
        n_extra_prompts = len(np.unique(extra_ids[new]))
        data = torch.cat([rows, x_extra[torch.from_numpy(new)].to(rows.dtype)])
        data_ids = np.concatenate([prompt_ids, extra_ids[new]])
        subsets.append(
            ("sample + extra", 1.0, np.concatenate([train_np, len(rows) + np.arange(len(new))]))
        )
    _, data_groups = np.unique(data_ids, return_inverse=True)  # the same prompt, the same group
    points = []
    for data_name, f, train_rows in subsets:
        point = _curve_point(
            data, data_groups, cfg, d_sae, train_rows, held_np, data_name, f, steps, batch_size
        )
        points.append(point)
        if log:
            log(
                f"{data_name} {f:.2f}: {point['n_prompts']} prompts, {point['n_train_rows']} rows "
                f"({point['epochs']:.0f} epochs): held-out FVU {point['heldout_fvu']:.4f}, "
                f"train FVU {point['train_fvu']:.4f}"
            )
    return {
        "points": points,
        "n_heldout_rows": int(len(held_np)),
        "n_heldout_prompts": len(held_out_ids),
        "n_extra_prompts": n_extra_prompts,
        "n_extra_rows_from_heldout_prompts": n_extra_heldout_rows,
        "d_in": int(rows.shape[1]),
        "d_sae": d_sae,
        "k": k,
        "batch_size": batch_size,
        "steps": steps,
        "lr": cfg.lr,
        "tied_encoder": cfg.tied_encoder,
        "threads": torch.get_num_threads(),
    }


def _fraction_subsets(
    fractions: tuple[float, ...],
    order: np.ndarray,
    keys: np.ndarray,
    all_train: np.ndarray,
    groups: np.ndarray,
) -> list[tuple[str, float, np.ndarray]]:
    """The nested training subsets of :func:`learning_curve`, one per fraction."""
    subsets: list[tuple[str, float, np.ndarray]] = []
    for f in sorted(fractions):
        if not 0 < f <= 1:
            raise ValueError(f"learning-curve fractions must be in (0, 1], got {f}")
        chosen = order[: max(1, round(f * len(order)))]
        # de-duplicated within the subset: a template vector stays even if its first row is elsewhere
        subsets.append(
            ("sample", f, _first_of_each(keys, all_train[np.isin(groups[all_train], chosen)]))
        )
    return subsets


def _curve_point(
    data: torch.Tensor,
    data_groups: np.ndarray,
    cfg: SAEConfig,
    d_sae: int,
    train_rows: np.ndarray,
    held_np: np.ndarray,
    data_name: str,
    f: float,
    steps: int,
    batch_size: int,
) -> dict[str, Any]:
    """Train on ``train_rows`` and score one point of :func:`learning_curve`."""
    trained = train_sae(data, data_groups, cfg, d_sae=d_sae, split=(train_rows, held_np))
    return {
        "data": data_name,
        "fraction": f,
        "n_prompts": int(len(np.unique(data_groups[train_rows]))),
        "n_train_rows": int(len(train_rows)),
        "epochs": steps * batch_size / len(train_rows),
        "heldout_fvu": trained.history["val_fvu"][-1],
        "train_fvu": evaluate_sae(trained.sae, data[torch.from_numpy(train_rows)]).fvu,
    }


# ------------------------------------------------------------------------------------- memory
def _write_synthetic_parquet(
    path: Path, n: int, d_in: int, seed: int, group_rows: int = 2048
) -> None:
    """An activations-like file of ``n`` rows written a row group at a time (bounded memory here too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for start in range(0, n, group_rows):
            m = min(group_rows, n - start)
            x, _ = synthetic_rows(m, d_in, 64, seed + start)
            table = pa.table(
                {
                    "prompt_id": pa.array([f"p{(start + i) // 20}" for i in range(m)], pa.string()),
                    "is_post_instruction": pa.array(np.ones(m, bool)),
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(x.numpy().reshape(-1), pa.float16()), d_in
                    ),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _rss_child(
    path: str, d_sae: int, k: int, batch_size: int, steps: int, mode: str
) -> dict[str, Any]:
    """In a fresh process: train on the rows of ``path`` (streaming or all in memory), report peak RSS."""
    from refusal_assets.sae.rows import ParquetRows
    from refusal_assets.sae.training import train_sae

    with tempfile.TemporaryDirectory(prefix="sae-rss-") as tmp:
        rows = ParquetRows.from_parquet([Path(path)], scratch=Path(tmp))
        source: Any = rows
        if mode == "memory":
            source = rows.take(torch.arange(len(rows)))  # the old path: every row in one tensor
        cfg = SAEConfig(k=k, batch_size=batch_size, max_steps=steps, eval_every=steps, seed=0)
        t0 = time.perf_counter()
        train_sae(source, rows.group_ids, cfg, d_sae=d_sae)
        seconds = time.perf_counter() - t0
        n = len(rows)
        rows.close()
    return {"rows": n, "mode": mode, "peak_rss_mb": _peak_rss_mb(), "train_s": seconds}


def _peak_rss_mb() -> float:
    """This process's peak RSS. Linux's ``VmHWM`` belongs to the current address space, whereas
    ``ru_maxrss`` after fork + exec starts from the parent's RSS at the fork and would report a big
    parent's size for every child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # kB on Linux; elsewhere a fallback


def streaming_rss(
    n: int,
    d_in: int = 896,
    d_sae: int = 1792,
    k: int = 32,
    batch_size: int = 1024,
    steps: int = 20,
    modes: tuple[str, ...] = ("stream", "memory"),
) -> dict[str, Any]:
    """Peak RSS (MB) of training on N and 4N rows, each in its own subprocess, per mode; the Parquet
    files are written here first, so the children's peaks are reading and training only."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sae-rss-data-") as tmp:
        files = {}
        for rows in (n, 4 * n):
            files[rows] = Path(tmp) / f"rows{rows}.parquet"
            _write_synthetic_parquet(files[rows], rows, d_in, seed=0)
        for mode in modes:
            peaks = {}
            for rows in (n, 4 * n):
                args = json.dumps(
                    {
                        "path": str(files[rows]),
                        "d_sae": d_sae,
                        "k": k,
                        "batch_size": batch_size,
                        "steps": steps,
                        "mode": mode,
                    }
                )
                proc = subprocess.run(
                    # this module by its import name (``__spec__``: still right when it runs as ``-m``)
                    [sys.executable, "-m", __spec__.name, "--rss-child", args],
                    capture_output=True,
                    text=True,
                    env={**os.environ},
                    check=False,
                )
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"RSS child ({mode}, {rows} rows) failed: {proc.stderr[-2000:]}"
                    )
                peaks[rows] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            out[mode] = {
                "n_rows": n,
                "peak_rss_mb_n": peaks[n],
                "peak_rss_mb_4n": peaks[4 * n],
                "ratio_4n_over_n": peaks[4 * n] / peaks[n],
            }
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        print(json.dumps(_rss_child(**json.loads(sys.argv[2]))))
    else:
        print(json.dumps(run_sae_bench(log=lambda s: print(s, file=sys.stderr)), indent=2))
