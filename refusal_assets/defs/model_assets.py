"""Stage 2: what each model does with the prompts, and its activations at every site."""

import time
from collections import defaultdict
from collections.abc import Callable

import dagster as dg

from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import (
    ci_metadata,
    clean,
    multi_key,
    parquet_metadata,
    png_markdown,
)
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.layout import Layout
from refusal_assets.lm import activations as acts_core
from refusal_assets.lm import behaviour
from refusal_assets.lm.models import load_model
from refusal_assets.lm.sites import Site
from refusal_assets.storage import write_parquet

CODE_VERSION = "3"
"""Version of the behaviour code; bump it when its outputs change for the same settings (the
activation code's version is ``activations.CODE_VERSION``)."""


def _by_model_and_category(
    parts: Partitions, partition_keys: list[str]
) -> dict[str, dict[str, dict[Site, str]]]:
    """The run's activation partitions as model -> category -> site -> partition key."""
    groups: dict[str, dict[str, dict[Site, str]]] = defaultdict(lambda: defaultdict(dict))
    for key in partition_keys:
        k = multi_key(parts.site_category, key)
        model_key, site_name = k["site"].split("__", 1)
        groups[model_key][k["category"]][Site.parse(site_name)] = key
    return groups


def build(
    cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    return [_behaviour_asset(cfg, parts, gpu_asset), _activations_asset(cfg, parts, gpu_asset)]


def _behaviour_asset(
    cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]
) -> dg.AssetsDefinition:
    @gpu_asset(
        partitions_def=parts.model_category,
        kinds={"pytorch", "parquet"},
        group_name="model",
        code_version=CODE_VERSION,  # the model's settings are the model_config source's data version
        deps=[
            dg.AssetDep("prompt_sample", partition_mapping=parts.by_category()),
            dg.AssetDep("model_config", partition_mapping=parts.by_model()),
        ],
        description="Each prompt's greedy chat generation, a refusal judgement, p_ref and the refusal score.",
    )
    def refusal_behaviour(
        context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        keys = multi_key(parts.model_category, context.partition_key)
        model_cfg, category = cfg.model(keys["model"]), keys["category"]
        with compute.claim() as device:
            t0 = time.perf_counter()
            model, tokenizer = load_model(model_cfg, cfg.resolve, device, context.log.info)
            load_s = time.perf_counter() - t0
            layout = Layout(storage.files)
            df = behaviour.run_behaviour(
                model, tokenizer, layout.load_sample(category), model_cfg, device, context.log.info
            )
            table = write_parquet(df.to_arrow(), layout.behaviour(model_cfg.model_key, category))
            rates = behaviour.refusal_rates(df)
            png = behaviour.plot_refusal_rates(
                rates,
                f"{model_cfg.model_key} / {category}",
                layout.behaviour_plot(model_cfg.model_key, category),
            )
            md = {
                "refusal_rate": rates["all"]["rate"],
                "n_prompts": df.height,
                "load_seconds": round(load_s, 2),
                "seconds": round(time.perf_counter() - t0, 2),
                "device": device,
                # why generation ended: a refusal phrase settled the judgement, EOS, or max_new_tokens
                **{
                    f"stopped_{r}": int((df["stop_reason"] == r).sum())
                    for r in ("judged", "eos", "length")
                },
                "plot": png_markdown(png, "refusal rate per split"),
                **parquet_metadata(table),
            }
            for split, r in rates.items():
                if split != "all":
                    md[f"refusal_rate_{split}"] = r["rate"]
                    md |= {
                        **ci_metadata(f"refusal_rate_{split}_ci", (r["lo"], r["hi"]), 2),
                        f"n_{split}": r["n"],
                    }
                    md[f"mean_p_refusal_{split}"] = r["mean_p_refusal"]
            return dg.MaterializeResult(metadata=md)

    return refusal_behaviour


def _activations_asset(
    cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]
) -> dg.AssetsDefinition:
    @gpu_asset(
        partitions_def=parts.site_category,
        kinds={"pytorch", "parquet"},
        group_name="model",
        code_version=acts_core.CODE_VERSION,  # the model's settings are the site_config source's data version
        backfill_policy=dg.BackfillPolicy.single_run(),
        output_required=False,
        deps=[
            dg.AssetDep("prompt_sample", partition_mapping=parts.by_category()),
            dg.AssetDep("site_config", partition_mapping=parts.by_site()),
        ],
        check_specs=[
            dg.AssetCheckSpec(
                "finite_vectors",
                asset="activations",
                blocking=True,
                description="No NaN or inf in any activation vector.",
            )
        ],
        description="Residual / MLP / attention activations at the post-instruction positions "
        "(and every prompt token), float16 Parquet.",
    )
    def activations(
        context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource
    ):
        # One forward pass per (model, category) serves every requested site of that model.
        # This prefill is not shared with refusal_behaviour's, on purpose: a multi-asset needs one
        # partitions definition, and activations stay site x category so that adding a layer runs
        # only that layer's partitions (not the model's generation again). With the shared-prefix
        # prefill and the early stop after the deepest site, this whole asset is ~35 s of the main job.
        groups = _by_model_and_category(parts, context.partition_keys)
        layout = Layout(storage.files)
        with compute.claim() as device:
            metadata: dict[str, dict] = {}
            n_bad_total = 0
            for model_key, by_category in sorted(groups.items()):
                model_cfg = cfg.model(model_key)
                model, tokenizer = load_model(model_cfg, cfg.resolve, device, context.log.info)
                for category, sites in sorted(by_category.items()):
                    paths = {
                        s: layout.activations(f"{model_key}__{s.name}", category) for s in sites
                    }
                    sample = layout.load_sample(category)
                    t0 = time.perf_counter()
                    non_finite: dict = {}
                    n_rows = acts_core.collect_activations(
                        model,
                        tokenizer,
                        sample,
                        sorted(sites),
                        paths,
                        batch_size=model_cfg.batch_size,
                        system_prompt=model_cfg.chat_template.system_prompt,
                        all_positions=model_cfg.all_token_positions,
                        device=device,
                        log=context.log.info,
                        non_finite=non_finite,
                    )
                    seconds = time.perf_counter() - t0
                    for site, key in sites.items():
                        n_bad = non_finite.get(site, 0)
                        n_bad_total += n_bad
                        metadata[key] = {
                            "n_rows": n_rows[site],
                            "d_model": model_cfg.architecture.d_model,
                            "n_prompts": sample.height,
                            "n_non_finite_rows": n_bad,
                            "seconds_for_all_sites_of_this_category": round(seconds, 2),
                            **parquet_metadata(paths[site]),
                        }
            # Per-partition metadata on the run's one materialization: Dagster then records each
            # partition with its input provenance (bare AssetMaterialization events carry none,
            # and the UI would show every partition of a single-run backfill as stale).
            for key, md in metadata.items():
                context.add_asset_metadata({k: clean(v) for k, v in md.items()}, partition_key=key)
            return dg.MaterializeResult(
                check_results=[
                    dg.AssetCheckResult(
                        check_name="finite_vectors",
                        asset_key="activations",
                        passed=n_bad_total == 0,
                        metadata={"n_non_finite_rows": n_bad_total, "partitions": len(metadata)},
                    )
                ]
            )

    return activations
