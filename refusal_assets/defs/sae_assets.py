"""Stage 3: one sparse autoencoder per site, trained on every category's activations."""

import json
import time

import numpy as np
import polars as pl
import torch
import dagster as dg

from refusal_assets import activations as acts_core
from refusal_assets import sae as sae_core
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.automation import rebuild_condition
from refusal_assets.defs.gpu import GPU_POOL
from refusal_assets.defs.metadata import clean, png_markdown
from refusal_assets.defs.model_assets import activations_path, load_sample
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.models import load_model
from refusal_assets.sites import Site
from refusal_assets.splice import splice_metrics
from refusal_assets.storage import write_text


def sae_folder(storage: StorageResource, site_key: str):
    return storage.files.path("sae", site_key)


def build(cfg: ProjectConfig, parts: Partitions, op_tags: dict) -> list[dg.AssetsDefinition]:
    thresholds = cfg.sae.thresholds

    @dg.asset(
        partitions_def=parts.site, pool=GPU_POOL, op_tags=op_tags, kinds={"pytorch", "safetensors"}, group_name="sae",
        code_version=cfg.section_hash("sae"), automation_condition=rebuild_condition(),
        deps=[dg.AssetDep("activations", partition_mapping=parts.sae_from_site_category())],
        check_specs=[
            dg.AssetCheckSpec("fvu_below_threshold", asset="sae", blocking=True, description=f"validation FVU <= {thresholds.max_fvu}"),
            dg.AssetCheckSpec("dead_fraction_below_threshold", asset="sae", blocking=True,
                              description=f"dead latents <= {thresholds.max_dead_fraction}"),
        ],
        description="TopK SAE per site (SAELens layout: cfg.json + sae_weights.safetensors), with FVU, L0, dead fraction and loss recovered.",
    )
    def sae(context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource) -> dg.MaterializeResult:
        site_key = context.partition_key
        model_key, site_name = site_key.split("__", 1)
        model_cfg, site = cfg.model(model_key), Site.parse(site_name)
        with compute.claim() as device:
            folder = sae_folder(storage, site_key)
            t0 = time.perf_counter()
            vectors, metas = [], []
            for category in parts.category.get_partition_keys():
                v, meta = acts_core.read_vectors(activations_path(storage, site_key, category))
                vectors.append(v)
                metas.append(meta)
            x = torch.cat(vectors)  # [N, d] float16
            meta = pl.concat(metas)
            if (n_bad := acts_core.non_finite_rows(x)) > 0:
                raise ValueError(f"activations of {site_key}: {n_bad} rows with NaN/inf; refusing to train an SAE on them")
            typical = sae_core.typical_rows(x, cfg.sae.max_norm_factor)
            max_norm = float(x[typical].float().norm(dim=-1).max())
            n_outliers = int((~typical).sum())
            context.log.info(f"{site_key}: leaving out {n_outliers} massive-activation rows (norm > {cfg.sae.max_norm_factor} x median)")
            x, meta = x[typical], meta.filter(pl.Series(typical.numpy()))
            group_ids = meta["prompt_id"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
            pretrained = cfg.sae.pretrained.get(site_key)
            if pretrained:
                model = sae_core.load_sae(cfg.resolve(pretrained))
                history: dict = {"pretrained": str(cfg.resolve(pretrained))}
                val = x[:: max(1, len(x) // 20000)].float()
                context.log.info(f"{site_key}: loaded SAELens-format SAE from {pretrained}")
            else:
                context.log.info(f"{site_key}: training on {len(x)} vectors from {meta['prompt_id'].n_unique()} prompts")
                model, history = sae_core.train_sae(x, group_ids, cfg.sae, d_sae=cfg.sae.expansion_factor * x.shape[1], device=device, log=context.log.info)
                _, val_rows = sae_core.split_by_group(group_ids, cfg.sae.val_fraction, cfg.sae.seed)  # the split train_sae used
                val = x[torch.from_numpy(val_rows)].float()
            metrics = sae_core.evaluate_sae(model, val.to(device))
            # FVU and L0 on held-out prompts; a latent is dead when it fires on no vector of the whole
            # dataset (a few hundred validation vectors would call most rare latents dead).
            metrics["dead_fraction_val"] = metrics["dead_fraction"]
            metrics["dead_fraction"] = sae_core.evaluate_sae(model, x.to(device))["dead_fraction"]
            train_seconds = time.perf_counter() - t0
            lm, tok = load_model(model_cfg, cfg.resolve, device, context.log.info)
            sample_prompts = []
            for category in parts.category.get_partition_keys():
                s = load_sample(storage, category)
                sample_prompts += s.filter(pl.col("heldout"))["prompt"].to_list()[:2]
            splice = splice_metrics(lm, tok, sample_prompts, site, model, batch_size=8, system_prompt=model_cfg.chat_template.system_prompt,
                                    device=device, max_norm=max_norm)
            sae_core.save_sae(model, folder, {"hook_name": f"{site.name}", "model_name": model_cfg.id, "site_key": site_key,
                                              "dataset": "refusal_assets sample", "max_input_norm": max_norm})
            write_text(json.dumps({**history, "metrics": metrics, "splice": splice}, indent=1, default=float), folder / "history.json")
            png = sae_core.plot_history(history, folder / "training.png", site_key) if not pretrained else None
            fvu_ok = metrics["fvu"] <= thresholds.max_fvu
            dead_ok = metrics["dead_fraction"] <= thresholds.max_dead_fraction
            md = {
                "fvu": metrics["fvu"], "l0": metrics["l0"], "dead_fraction": metrics["dead_fraction"], "dead_fraction_val": metrics["dead_fraction_val"], **{k: clean(v) for k, v in splice.items()},
                "d_sae": int(model.W_dec.shape[0]), "k": int(getattr(model, "k", 0)), "n_vectors": len(x), "n_val_vectors": len(val),
                "n_massive_rows_excluded": n_outliers, "max_input_norm": max_norm,
                "seconds": round(train_seconds, 1), "path": str(folder), "stopped_early": bool(history.get("stopped_early", False)),
            }
            if png is not None:
                md["training_curve"] = png_markdown(png, "SAE training")
            return dg.MaterializeResult(
                metadata={k: clean(v) for k, v in md.items()},
                check_results=[
                    dg.AssetCheckResult(check_name="fvu_below_threshold", passed=fvu_ok, metadata={"fvu": metrics["fvu"], "max_fvu": thresholds.max_fvu}),
                    dg.AssetCheckResult(check_name="dead_fraction_below_threshold", passed=dead_ok,
                                        metadata={"dead_fraction": metrics["dead_fraction"], "max": thresholds.max_dead_fraction}),
                ],
            )

    return [sae]
