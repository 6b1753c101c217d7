"""One site's SAE: filter and split its rows, train (or load) the SAE, measure it on held-out prompts
and splice it into the language model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from refusal_assets.config import SAEConfig
from refusal_assets.sae.files import load_pretrained
from refusal_assets.sae.metrics import evaluate_sae, fired_latents
from refusal_assets.sae.model import TopKSAE
from refusal_assets.sae.rows import Rows, SubsetRows, as_rows
from refusal_assets.sae.splice import splice_metrics
from refusal_assets.sae.splits import (
    SiteRows,
    distinct_split,
    row_keys,
    row_norms,
    site_split,
    training_draws,
    typical_norms,
)
from refusal_assets.sae.training import train_sae


def _quiet(message: str) -> None:
    """The default log: say nothing."""


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """How :func:`fit_site` gets its SAE and scores it; the defaults train one on the CPU."""

    pretrained: str | None = None
    """A :func:`load_pretrained` spec (a folder, through ``resolve``, or ``saelens:<release>/<id>``)
    to load instead of training."""
    resolve: Callable[[str], Path] = Path
    """Turns the config's ``pretrained`` string into a path."""
    refusal_ids: Callable[[Any], list[int]] | None = None
    """``refusal_ids(tokenizer)``: the refusal-opening tokens, for the splice's refusal-score change."""
    system_prompt: str | None = None
    device: str = "cpu"
    log: Callable[[str], None] = _quiet


@dataclass(frozen=True, kw_only=True)
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
    replicates: tuple[ReplicateSAE, ...] = ()
    """The extra trainings of ``sae.replicates`` (none for a pretrained SAE)."""


@dataclass(frozen=True, kw_only=True)
class ReplicateSAE:
    """One extra training of a site's SAE: same rows and split as the main one, another seed."""

    seed: int
    sae: TopKSAE
    fvu: float
    """Held-out FVU on the main SAE's evaluation rows (same rows: comparable)."""
    l0: float
    dead_fraction: float
    """Latents that fire on no non-template study row."""
    best_step: int
    seconds: float


class _KeptRows(NamedTuple):
    """A site's rows after the norm filter and the corpus check, de-duplicated and split."""

    x: SubsetRows
    """The rows kept (never materialised: read in batches)."""
    prompt_ids: np.ndarray
    """Prompt id of each kept row [n] (object)."""
    group_ids: np.ndarray
    """Integer code of each kept row's prompt [n], from the sorted prompt ids."""
    post: np.ndarray
    """Bool [n]: a post-instruction position."""
    corpus: np.ndarray
    """Bool [n]: an SAE-corpus row (trains only)."""
    keys: np.ndarray
    """Digest of each kept row [n] (:func:`row_keys`)."""
    site_rows: SiteRows
    n_outliers: int
    max_norm: float


def _row_flags(flags: np.ndarray | None, n_rows: int, name: str) -> np.ndarray:
    """Bool [n_rows] from optional per-row flags (all False when None), its length checked."""
    out = np.zeros(n_rows, bool) if flags is None else np.asarray(flags, dtype=bool)
    if len(out) != n_rows:
        raise ValueError(f"need one {name} flag per row: {n_rows} rows, {len(out)} flags")
    return out


def _keep_rows(
    base: Rows,
    prompt_ids: pl.Series | Sequence[str],
    cfg: SAEConfig,
    post_instruction: np.ndarray | None,
    train_only: np.ndarray | None,
    log: Callable[[str], None],
) -> _KeptRows:
    """Leave out the massive-activation rows and the corpus rows of study prompts, then de-duplicate
    and split what is left (:func:`distinct_split`)."""
    pids = np.asarray(
        prompt_ids.to_list() if isinstance(prompt_ids, pl.Series) else list(prompt_ids),
        dtype=object,
    )
    if len(pids) != len(base):
        raise ValueError(f"need one prompt id per row: {len(base)} rows, {len(pids)} prompt ids")
    post = _row_flags(post_instruction, len(base), "post_instruction")
    corpus = _row_flags(train_only, len(base), "train_only")
    # a corpus prompt that is also a study prompt would put a held-out prompt's rows into training
    corpus_of_study_prompt = corpus & np.isin(pids, pids[~corpus])
    norms = row_norms(base)
    if not np.isfinite(norms).all():
        raise ValueError(
            f"{int((~np.isfinite(norms)).sum())} rows with NaN/inf; refusing to train an SAE on them"
        )
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
    _, group_ids = np.unique(
        pids[keep].astype(str), return_inverse=True
    )  # sorted codes: independent of row order
    group_ids = group_ids.astype(np.int64)
    keys = row_keys(x)
    site_rows = distinct_split(group_ids, keys, cfg, corpus[keep])
    log(
        f"{len(x)} rows hold {site_rows.n_distinct} distinct vectors; {int(site_rows.template.sum())} rows are "
        f"template rows (a vector in more than one prompt)"
    )
    return _KeptRows(
        x, pids[keep], group_ids, post[keep], corpus[keep], keys, site_rows, n_outliers, max_norm
    )


def _train_or_load(
    kept: _KeptRows, cfg: SAEConfig, d_in: int, options: FitOptions
) -> tuple[TopKSAE, dict[str, Any]]:
    """The site's SAE and its history: loaded (``options.pretrained``) or trained on the training part."""
    if options.pretrained is not None:
        sae = load_pretrained(options.pretrained, d_in=d_in, resolve=options.resolve)
        options.log(f"loaded pretrained SAE {options.pretrained}")
        return sae, {"pretrained": str(options.pretrained)}
    sp = kept.site_rows.split
    options.log(
        f"training on {len(kept.x)} vectors from {len(np.unique(kept.group_ids))} prompts: "
        f"{len(sp.train)} distinct training rows, "
        f"{len(sp.val)} early-stopping rows, {len(sp.eval)} held-out evaluation rows"
    )
    return _train_on_kept(kept, cfg, d_in, options.device, options.log)


def _train_on_kept(
    kept: _KeptRows,
    cfg: SAEConfig,
    d_in: int,
    device: str,
    log: Callable[[str], None] | None = None,
) -> tuple[TopKSAE, dict[str, Any]]:
    """An SAE trained by ``cfg`` on the kept rows' training part, stopped early on their
    validation part."""
    sp = kept.site_rows.split
    sae, history, _, _ = train_sae(
        kept.x,
        kept.group_ids,
        cfg,
        d_sae=cfg.expansion_factor * d_in,
        device=device,
        log=log,
        split=(training_draws(sp.train, kept.site_rows.template, cfg.template_repeats), sp.val),
    )
    return sae, history


def _subset(kept: _KeptRows, idx: np.ndarray) -> SubsetRows:
    """The kept rows at ``idx``, read in batches."""
    return SubsetRows(kept.x, torch.from_numpy(np.asarray(idx, dtype=np.int64)))


def _fired_on_study_rows(sae: TopKSAE, kept: _KeptRows) -> Tensor:
    """[d_sae] bool: the latents that fire on a study row that is not a template vector (the rows
    the circuits read; the corpus only trains); ``1 - mean`` is the dead fraction."""
    study = np.flatnonzero(~kept.site_rows.template & ~kept.corpus)
    return fired_latents(sae, _subset(kept, study))


def _train_replicates(
    kept: _KeptRows, cfg: SAEConfig, d_in: int, options: FitOptions
) -> tuple[ReplicateSAE, ...]:
    """``cfg.replicates``: one more SAE per seed on the main training's rows and split."""
    out = []
    for seed in cfg.replicates.seeds:
        rcfg = cfg.replicate(seed)
        sae, history = _train_on_kept(kept, rcfg, d_in, options.device)
        held = evaluate_sae(sae, _subset(kept, kept.site_rows.split.eval))
        dead = 1.0 - float(_fired_on_study_rows(sae, kept).float().mean())
        options.log(
            f"replicate seed {seed}: {rcfg.max_steps} steps in {history['seconds']:.0f} s, "
            f"held-out FVU {held.fvu:.4f}, L0 {held.l0:.1f}, dead {dead:.3f}"
        )
        out.append(
            ReplicateSAE(
                seed=seed,
                sae=sae,
                fvu=held.fvu,
                l0=held.l0,
                dead_fraction=dead,
                best_step=int(history["best_step"]),
                seconds=float(history["seconds"]),
            )
        )
    return tuple(out)


def _held_out_metrics(sae: TopKSAE, kept: _KeptRows, trained: bool) -> dict[str, float]:
    """:attr:`FittedSAE.metrics` of ``sae`` on the kept rows' parts (``trained``: it saw the
    training part)."""
    sp, template = kept.site_rows.split, kept.site_rows.template

    sub = partial(_subset, kept)

    held = evaluate_sae(sae, sub(sp.eval))
    eval_post = sp.eval[kept.post[sp.eval]]
    nan = float("nan")
    metrics: dict[str, float] = {
        "fvu": held.fvu,
        "l0": held.l0,
        "mse": held.mse,
        "fvu_post_instruction": evaluate_sae(sae, sub(eval_post)).fvu
        if len(eval_post) > 1
        else nan,
        "fvu_val": evaluate_sae(sae, sub(sp.val)).fvu,
        # the generalisation gap: far below the held-out FVU, the SAE is limited by its data, not its
        # fit; a pretrained SAE never saw these rows, so it has none
        "fvu_train": evaluate_sae(sae, sub(sp.train)).fvu if trained else nan,
    }
    fired = _fired_on_study_rows(sae, kept)
    # template vectors are few once distinct: the first row of each is enough to see what fires on them
    fired_all = fired.clone()
    template_rows = np.flatnonzero(template)
    if len(template_rows):
        _, first_at = np.unique(kept.keys[template_rows], return_index=True)
        fired_all |= fired_latents(sae, sub(template_rows[first_at]))
    val_nt = sp.val[~template[sp.val]]
    metrics.update(
        dead_fraction=1.0 - float(fired.float().mean()),
        dead_fraction_with_template=1.0 - float(fired_all.float().mean()),
        dead_fraction_val=1.0 - float(fired_latents(sae, sub(val_nt)).float().mean())
        if len(val_nt)
        else nan,
        n_rows=len(kept.x),
        n_distinct_rows=kept.site_rows.n_distinct,
        n_template_rows=int(template.sum()),
        n_corpus_rows=int(kept.corpus.sum()),
        n_corpus_train_rows=int(kept.corpus[sp.train].sum()),
        n_train_rows=len(sp.train),
        n_val_rows=len(sp.val),
        n_eval_rows=len(sp.eval),
        n_eval_post_instruction_rows=len(eval_post),
        n_eval_prompts=len(np.unique(kept.group_ids[sp.eval])),
    )
    return metrics


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
    options: FitOptions = FitOptions(),
) -> FittedSAE:
    """Train (or load) the SAE of one site, measure it on held-out prompts, and splice it into the model.

    ``rows``: the site's activations ``[N, d]`` (a float16 tensor, or a ``sae_data.Rows`` such as
    ``ParquetRows`` that stays on disk: same rows, same SAE); ``prompt_ids [N]`` the prompt of each row
    (the split is drawn over these explicit ids, so both paths split alike); ``post_instruction [N]``
    marks the post-instruction positions; ``train_only [N]`` marks the SAE corpus's rows, which only
    train (:func:`site_split`; a corpus row of a study prompt is dropped). ``prompts`` (``prompt_id``,
    ``prompt``, optional ``category``): the study's texts; the splice scores up to
    ``cfg.splice.prompts_per_category`` of each category's held-out evaluation prompts.
    ``options``: a pretrained SAE to load instead, the device, the log, and what the splice needs.

    ``load_lm`` is called only after training, so the language model and the training data need not
    share the device's memory.
    """
    t0 = time.perf_counter()
    base = as_rows(rows)
    kept = _keep_rows(base, prompt_ids, cfg, post_instruction, train_only, options.log)
    sae, history = _train_or_load(kept, cfg, base.d_in, options)
    metrics = _held_out_metrics(sae, kept, trained=options.pretrained is None)
    # a pretrained SAE is one dictionary: there is nothing to retrain with another seed
    replicates = () if options.pretrained else _train_replicates(kept, cfg, base.d_in, options)
    # every row of an evaluation prompt may be a training duplicate; the prompt is still held out
    held_out = set(
        np.unique(kept.prompt_ids[site_split(kept.group_ids, cfg, kept.corpus).eval]).astype(str)
    )
    splice_prompts = _held_out_texts(prompts, held_out, cfg.splice.prompts_per_category)
    fit_seconds = time.perf_counter() - t0
    options.log(
        f"held-out FVU {metrics['fvu']:.4f} (post-instruction {metrics['fvu_post_instruction']:.4f}), "
        f"L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.3f}; "
        f"splicing into {len(splice_prompts)} held-out prompts"
    )
    lm, tok = load_lm()
    ids = (
        torch.tensor(options.refusal_ids(tok), dtype=torch.long)
        if options.refusal_ids is not None
        else None
    )
    splice = splice_metrics(
        lm,
        tok,
        splice_prompts,
        site,
        sae,
        batch_size=cfg.splice.batch_size,
        system_prompt=options.system_prompt,
        device=options.device,
        max_norm=kept.max_norm,
        refusal_ids=ids,
    )
    return FittedSAE(
        sae=sae,
        history=history,
        metrics=metrics,
        splice=splice,
        n_vectors=len(kept.x),
        n_val_vectors=len(kept.site_rows.split.val),
        n_outliers=kept.n_outliers,
        max_norm=kept.max_norm,
        pretrained=options.pretrained,
        fit_seconds=fit_seconds,
        eval_prompt_ids=sorted(held_out),
        replicates=replicates,
    )


def _held_out_texts(prompts: pl.DataFrame, held_out: set[str], per_category: int) -> list[str]:
    """Up to ``per_category`` texts of held-out prompts per category, in ``prompts``'s order."""
    for col in ("prompt_id", "prompt"):
        if col not in prompts.columns:
            raise ValueError(f"prompts: missing column {col!r} (have {prompts.columns})")
    df = prompts.filter(pl.col("prompt_id").cast(pl.String).is_in(sorted(held_out)))
    if "category" in df.columns:
        df = (
            df.with_row_index("_order")
            .filter(pl.int_range(pl.len()).over("category") < per_category)
            .sort("_order")
        )
    else:
        df = df.head(per_category)
    texts = df["prompt"].to_list()
    if not texts:
        raise ValueError(
            f"prompts: none of the {len(held_out)} held-out evaluation prompts has a text"
        )
    return texts
