"""Stage 3: one sparse autoencoder per site, trained on the activations of ``sae.train_categories``."""

import json
from collections.abc import Callable

import dagster as dg
import polars as pl

from refusal_assets import sae as sae_core
from refusal_assets.behaviour import refusal_token_ids
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import multi_key, sae_checks, sae_metadata
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.layout import Layout
from refusal_assets.models import load_model
from refusal_assets.sae_data import ParquetRows
from refusal_assets.sites import Site
from refusal_assets.storage import write_text


def build(cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]) -> list[dg.AssetsDefinition]:
    thresholds = cfg.sae.thresholds

    @gpu_asset(
        partitions_def=parts.sae,
        kinds={"pytorch", "safetensors"},
        group_name="sae",
        code_version=cfg.section_hash("sae"),
        deps=[dg.AssetDep("activations", partition_mapping=parts.sae_from_activations())],
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
        site_key, layout, categories = (
            multi_key(parts.sae, context.partition_key)["site"],
            Layout(storage.files),
            parts.sae_train_categories,
        )
        model_cfg, site = cfg.model(site_key.split("__", 1)[0]), Site.parse(site_key.split("__", 1)[1])
        paths = [layout.activations(site_key, c) for c in categories]
        # the small per-row columns in memory; the vectors stream from the Parquet files (ParquetRows)
        meta = pl.concat([pl.read_parquet(p, columns=["prompt_id", "is_post_instruction"]) for p in paths])
        prompts = pl.concat([layout.load_sample(c).select("prompt_id", "prompt", "category") for c in categories])
        spec = cfg.sae.pretrained.get(site_key)
        rows = ParquetRows.from_parquet(paths)
        try:
            with compute.claim() as device:
                try:
                    fitted = sae_core.fit_site(
                        rows,
                        meta["prompt_id"],
                        cfg.sae,
                        lambda: load_model(model_cfg, cfg.resolve, device, context.log.info),
                        site,
                        prompts,
                        post_instruction=meta["is_post_instruction"].to_numpy(),
                        pretrained=spec,
                        resolve=cfg.resolve,
                        refusal_ids=lambda tok: refusal_token_ids(
                            tok, model_cfg.refusal.phrases, model_cfg.refusal.refusal_tokens
                        ),
                        system_prompt=model_cfg.chat_template.system_prompt,
                        device=device,
                        log=context.log.info,
                    )
                except ValueError as e:
                    raise ValueError(f"sae {site_key} (activations {paths[0].parent.parent}): {e}") from e
        finally:
            rows.close()
        folder = layout.sae(site_key)
        sae_core.save_sae(
            fitted.sae,
            folder,
            {
                "hook_name": f"{site.name}",
                "model_name": model_cfg.id,
                "site_key": site_key,
                "dataset": "refusal_assets sample",
                "max_input_norm": fitted.max_norm,
            },
        )
        write_text(
            json.dumps(
                {
                    **fitted.history,
                    "metrics": fitted.metrics,
                    "splice": fitted.splice,
                    "eval_prompt_ids": fitted.eval_prompt_ids,
                },
                indent=1,
                default=float,
            ),
            layout.sae_history(site_key),
        )
        png = sae_core.plot_history(fitted.history, layout.sae_plot(site_key), site_key) if not spec else None
        return dg.MaterializeResult(
            metadata=sae_metadata(fitted, folder, png), check_results=sae_checks(fitted, thresholds)
        )

    return [sae]
