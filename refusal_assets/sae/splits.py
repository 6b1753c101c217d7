"""Which rows an SAE trains, stops early and is evaluated on: the massive-activation filter, row
digests for de-duplication, and splits that keep every prompt's rows in one part."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
from torch import Tensor

from refusal_assets.config import SAEConfig
from refusal_assets.sae.model import EVAL_BATCH
from refusal_assets.sae.rows import Rows, chunks


def split_by_group(
    group_ids: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val); ``val_fraction`` of the groups (prompts) go wholly to validation."""
    groups = np.unique(group_ids)
    if len(groups) < 2:
        raise ValueError(
            f"need at least 2 groups (prompts) to split train/validation, got {len(groups)}"
        )
    n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
    val_groups = np.random.default_rng(seed).permutation(groups)[:n_val]
    is_val = np.isin(group_ids, val_groups)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


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
    return torch.cat(
        [x.float().norm(dim=-1) for x in chunks(rows, torch.arange(len(rows)), batch_size)]
    ).numpy()


class PromptSplit(NamedTuple):
    """Row indices of a three-way split by prompt: every prompt's rows go wholly to one part."""

    train: np.ndarray
    val: np.ndarray
    """Early-stopping rows."""
    eval: np.ndarray
    """Held-out rows for the reported metrics."""


def split_prompts(
    group_ids: np.ndarray, val_fraction: float, eval_fraction: float, seed: int
) -> PromptSplit:
    """Rows (train, early-stopping validation, held-out evaluation); ``val_fraction`` and
    ``eval_fraction`` of the groups (prompts) go wholly to validation and evaluation, drawn from one
    permutation of the sorted group ids so the split does not depend on row order or file layout."""
    group_ids = np.asarray(group_ids)
    groups = np.unique(group_ids)
    if len(groups) < 3:
        raise ValueError(
            f"need at least 3 groups (prompts) to split train/validation/evaluation, got {len(groups)}"
        )
    n_eval = min(max(1, round(eval_fraction * len(groups))), len(groups) - 2)
    n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1 - n_eval)
    perm = np.random.default_rng(seed).permutation(groups)
    part = np.zeros(len(group_ids), np.int8)  # 0 train, 1 val, 2 eval
    part[np.isin(group_ids, perm[:n_eval])] = 2
    part[np.isin(group_ids, perm[n_eval : n_eval + n_val])] = 1
    return PromptSplit(
        np.flatnonzero(part == 0), np.flatnonzero(part == 1), np.flatnonzero(part == 2)
    )


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
            keys[start + j] = int.from_bytes(
                hashlib.blake2b(flat[j].data, digest_size=8).digest(), "little"
            )
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


def site_split(
    group_ids: np.ndarray, cfg: SAEConfig, train_only: np.ndarray | None = None
) -> PromptSplit:
    """:func:`split_prompts` over the study's rows; the ``train_only`` rows (bool [n], the SAE
    corpus's) join the training part whole: they are never held out, so the held-out prompts, and
    the numbers measured on them, are the same with or without a corpus."""
    group_ids = np.asarray(group_ids)
    if train_only is None or not np.any(train_only):
        return split_prompts(group_ids, cfg.val_fraction, cfg.eval_fraction, cfg.seed)
    train_only = np.asarray(train_only, dtype=bool)
    if len(train_only) != len(group_ids):
        raise ValueError(
            f"need one train_only flag per row: {len(group_ids)} rows, {len(train_only)} flags"
        )
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
        PromptSplit(train, first(parts.val, train), first(parts.eval, train)),
        template,
        int(len(np.unique(keys))),
    )


def training_draws(train: np.ndarray, template: np.ndarray, repeats: int) -> np.ndarray:
    """The training index with each template row (``template[row]``: its vector occurs in several
    prompts) ``repeats`` times: every row is distinct, and the few template vectors, which every
    prompt's splice and circuit pass through, keep some weight next to a large corpus."""
    if repeats <= 1:
        return train
    shared = train[template[train]]
    return np.sort(np.concatenate([train, np.repeat(shared, repeats - 1)]))
