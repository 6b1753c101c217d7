"""Stage 3: one sparse autoencoder per site, trained on the activations of ``sae.train_categories``."""

import hashlib
import json
import shutil
import time
from collections import defaultdict
from collections.abc import Callable

import dagster as dg
import numpy as np
import polars as pl

from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import (
    clean,
    multi_key,
    parquet_metadata,
    sae_checks,
    sae_metadata,
)
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.layout import Layout
from refusal_assets.lm import activations as acts_core
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.models import load_model
from refusal_assets.lm.sites import Site
from refusal_assets.prompts import orbench as data
from refusal_assets.sae.files import sae_provenance, save_sae
from refusal_assets.sae.fit import FitOptions, fit_site
from refusal_assets.sae.rows import ParquetRows
from refusal_assets.sae.training import plot_history
from refusal_assets.storage import write_text


def corpus_code_version(cfg: ProjectConfig) -> str:
    """The activation code's version, the ``sae.corpus`` settings and the corpus files' bytes: editing
    the corpus file reruns ``sae_corpus_activations`` (and so the SAEs), as a config edit does."""
    assert cfg.sae.corpus is not None
    blob = json.dumps(cfg.sae.corpus.model_dump(mode="json"), sort_keys=True)
    blob += data.corpus_fingerprint(cfg.sae.corpus, cfg.resolve)
    return f"{acts_core.CODE_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def build_corpus(
    cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]
) -> list[dg.AssetsDefinition]:
    """``sae_corpus_activations`` (only when ``sae.corpus`` is set): the corpus prompts' activations
    at every site, the SAEs' extra training rows."""
    corpus_cfg = cfg.sae.corpus
    if corpus_cfg is None:
        return []

    @gpu_asset(
        partitions_def=parts.site,
        kinds={"pytorch", "parquet"},
        group_name="sae",
        code_version=corpus_code_version(
            cfg
        ),  # the model's settings are the site_config source's data version
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=[dg.AssetDep("site_config")],
        description=f"Activations of the SAE training corpus ({corpus_cfg.path}) at each site, every token, "
        "float16 Parquet: extra rows that only train the SAEs (never held out, never studied).",
    )
    def sae_corpus_activations(
        context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        corpus = data.load_corpus(corpus_cfg, cfg.resolve)
        by_model: dict[str, list[str]] = defaultdict(list)
        for site_key in context.partition_keys:
            by_model[parts.site_to_model[site_key]].append(site_key)
        layout = Layout(storage.files)
        with compute.claim() as device:
            for model_key, site_keys in sorted(by_model.items()):
                model_cfg = cfg.model(model_key)
                model, tokenizer = load_model(model_cfg, cfg.resolve, device, context.log.info)
                sites = {Site.parse(k.split("__", 1)[1]): k for k in site_keys}
                paths = {s: layout.sae_corpus_activations(k) for s, k in sites.items()}
                t0 = time.perf_counter()
                n_rows = acts_core.collect_activations(
                    model,
                    tokenizer,
                    corpus,
                    sorted(sites),
                    paths,
                    batch_size=model_cfg.batch_size,
                    system_prompt=model_cfg.chat_template.system_prompt,
                    all_positions=True,  # every token: the corpus is training rows, not positions to study
                    device=device,
                    log=context.log.info,
                )
                seconds = time.perf_counter() - t0
                for site, key in sites.items():
                    md = {
                        "n_prompts": corpus.height,
                        "n_rows": n_rows[site],
                        "corpus": corpus_cfg.path,
                        "seconds_for_all_sites_of_this_model": round(seconds, 2),
                        **parquet_metadata(paths[site]),
                    }
                    context.add_asset_metadata(
                        {k: clean(v) for k, v in md.items()}, partition_key=key
                    )
        return dg.MaterializeResult()

    return [sae_corpus_activations]


def build(
    cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]
) -> list[dg.AssetsDefinition]:
    thresholds = cfg.sae.thresholds
    corpus_dep = (
        [dg.AssetDep("sae_corpus_activations", partition_mapping=parts.by_site())]
        if cfg.sae.corpus
        else []
    )

    @gpu_asset(
        partitions_def=parts.sae,
        kinds={"pytorch", "safetensors"},
        group_name="sae",
        code_version=cfg.section_hash("sae"),
        deps=[
            dg.AssetDep("activations", partition_mapping=parts.sae_from_activations()),
            *corpus_dep,
        ],
        # partitioned check specs: automation's gate (automation.blocked_by_failed_check) reads each partition's result
        check_specs=[
            dg.AssetCheckSpec(
                "fvu_below_threshold",
                asset="sae",
                blocking=True,
                partitions_def=parts.sae,
                description=f"validation FVU <= {thresholds.max_fvu}",
            ),
            dg.AssetCheckSpec(
                "dead_fraction_below_threshold",
                asset="sae",
                blocking=True,
                partitions_def=parts.sae,
                description=f"dead latents <= {thresholds.max_dead_fraction}",
            ),
        ],
        description="TopK SAE per site (SAELens layout: cfg.json + sae_weights.safetensors), "
        "with FVU, L0, dead fraction and loss recovered.",
    )
    def sae(
        context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        return _materialize_sae(cfg, parts, context, compute, storage)

    return [sae]


def _materialize_sae(
    cfg: ProjectConfig,
    parts: Partitions,
    context: dg.AssetExecutionContext,
    compute: ComputeResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    """The ``sae`` asset's body: fit one site's SAE and write its files."""
    site_key, layout, categories = (
        multi_key(parts.sae, context.partition_key)["site"],
        Layout(storage.files),
        parts.sae_train_categories,
    )
    model_cfg, site = (
        cfg.model(site_key.split("__", 1)[0]),
        Site.parse(site_key.split("__", 1)[1]),
    )
    paths = [layout.activations(site_key, c) for c in categories]
    corpus_paths = [layout.sae_corpus_activations(site_key)] if cfg.sae.corpus else []
    # the small per-row columns in memory; the vectors stream from the Parquet files (ParquetRows)
    metas = [
        pl.read_parquet(p, columns=["prompt_id", "is_post_instruction"])
        for p in paths + corpus_paths
    ]
    meta = pl.concat(metas)
    n_study = sum(m.height for m in metas[: len(paths)])
    train_only = np.arange(meta.height) >= n_study  # the corpus's rows come last
    prompts = pl.concat(
        [layout.load_sample(c).select("prompt_id", "prompt", "category") for c in categories]
    )
    spec = cfg.sae.pretrained.get(site_key)
    rows = ParquetRows.from_parquet(paths + corpus_paths)
    try:
        with compute.claim() as device:
            try:
                fitted = fit_site(
                    rows,
                    meta["prompt_id"],
                    cfg.sae,
                    lambda: load_model(model_cfg, cfg.resolve, device, context.log.info),
                    site,
                    prompts,
                    post_instruction=meta["is_post_instruction"].to_numpy(),
                    train_only=train_only,
                    options=FitOptions(
                        pretrained=spec,
                        resolve=cfg.resolve,
                        refusal_ids=lambda tok: refusal_token_ids(
                            tok, model_cfg.refusal.phrases, model_cfg.refusal.refusal_tokens
                        ),
                        system_prompt=model_cfg.chat_template.system_prompt,
                        device=device,
                        log=context.log.info,
                    ),
                )
            except ValueError as e:
                raise ValueError(
                    f"sae {site_key} (activations {paths[0].parent.parent}): {e}"
                ) from e
    finally:
        rows.close()
    folder = layout.sae(site_key)
    provenance = {
        "hook_name": f"{site.name}",
        "model_name": model_cfg.id,
        "site_key": site_key,
        "dataset": "refusal_assets sample"
        + (f" + corpus {cfg.sae.corpus.path}" if cfg.sae.corpus else ""),
        **sae_provenance(model_cfg, fitted.max_norm, cfg.sae.max_norm_factor),
    }
    save_sae(fitted.sae, folder, {**provenance, "seed": cfg.sae.seed})
    shutil.rmtree(folder / "replicates", ignore_errors=True)  # a dropped seed leaves no stale SAE
    for replicate in fitted.replicates:
        save_sae(
            replicate.sae,
            layout.sae_replicate(site_key, replicate.seed),
            {**provenance, "seed": replicate.seed, "replicate_of": str(folder)},
        )
    write_text(
        json.dumps(
            {
                **fitted.history,
                "metrics": fitted.metrics,
                "splice": fitted.splice,
                "eval_prompt_ids": fitted.eval_prompt_ids,
                "replicates": [
                    {k: v for k, v in vars(r).items() if k != "sae"} for r in fitted.replicates
                ],
            },
            indent=1,
            default=float,
        ),
        layout.sae_history(site_key),
    )
    png = plot_history(fitted.history, layout.sae_plot(site_key), site_key) if not spec else None
    return dg.MaterializeResult(
        metadata=sae_metadata(fitted, folder, png),
        check_results=sae_checks(fitted, cfg.sae.thresholds),
    )
