"""One site's SAE: filter and split its rows, train (or load) the SAE, measure it on held-out prompts
and splice it into the language model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from refusal_assets.sae.splits import distinct_split, row_keys, row_norms, site_split, training_draws, typical_norms
from refusal_assets.sae.training import train_sae


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
