"""Stage 5: cross-category comparison per model, and the report over all models."""

import json
import time

import dagster as dg

from refusal_assets.analysis.comparison import compare_model, write_comparison_figures
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import ci_metadata, file_path, png_markdown, report_metadata
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import StorageResource
from refusal_assets.layout import Layout
from refusal_assets.report.report import write_report
from refusal_assets.storage import write_text


def build(cfg: ProjectConfig, parts: Partitions) -> list[dg.AssetsDefinition]:
    return [_comparison_asset(cfg, parts), _report_asset(cfg, parts)]


def _comparison_asset(cfg: ProjectConfig, parts: Partitions) -> dg.AssetsDefinition:
    cc, comp = cfg.circuits, cfg.comparison

    @dg.asset(
        partitions_def=parts.model,
        kinds={"scipy", "matplotlib"},
        group_name="comparison",
        # directions too: comparison.json carries refusal_direction's verdict, and its rebuilds
        # on that parent's updates are off (REBUILD_OPTIONS), so a directions edit needs this
        code_version=cfg.section_hash("circuits", "comparison", "directions"),
        deps=[
            "circuit",
            "transfer",
            dg.AssetDep("refusal_direction", partition_mapping=parts.by_model()),
        ],
        description="Category x category circuit overlaps with a label-permutation null, split-half ceilings, "
        "bootstrap CIs, Benjamini-Hochberg, the shared core vs category-specific tail, refusal-direction cosines, "
        "and the verdict.",
    )
    def comparison(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        model_key = context.partition_key
        t0 = time.perf_counter()
        categories = parts.category.get_partition_keys()
        layout = Layout(storage.files)
        circuits = {c: layout.load_circuit(model_key, c) for c in categories}
        transfer = layout.load_transfer(model_key) or {}
        result = compare_model(
            model_key,
            categories,
            circuits,
            transfer,
            circuits_cfg=cc,
            comparison_cfg=comp,
            execution=layout.load_execution_verdict(model_key),
            sae_seed=cfg.sae.seed,
        )
        md: dict = {}
        for group, res in result.groups.items():
            if res.fallback:
                md[f"fallback_categories_{group}"] = ", ".join(res.fallback)
                context.log.warning(
                    f"{group}: {res.fallback} use all their prompts, not only '{cc.prompt_filter}' ones "
                    "(too few): left out"
                )
            md[f"verdict_{group}"] = res.verdict
            if res.result is not None:
                context.log.info(f"{group}: {res.reason}")
        figures = write_comparison_figures(result, layout)
        md.update({name: png_markdown(png, alt) for name, (png, alt) in figures.items()})
        out = result.to_json(seconds=time.perf_counter() - t0)
        write_text(json.dumps(out, indent=1, default=float), layout.comparison_summary(model_key))
        main = result.main_group.to_json()
        return dg.MaterializeResult(
            metadata={
                # the two answers first; the older tests' combined verdict after them
                "verdict_execution": result.verdict_execution,
                "execution_reason": result.execution_reason,
                "verdict_features": result.verdict_features,
                "verdict_features_by_seed": result.verdict_features_by_seed,
                "feature_stability": result.feature_stability,
                "feature_reason": result.feature_reason,
                "verdict_combined": out["verdict"],
                "verdict_combined_reason": out["verdict_reason"],
                "shared_fraction": main.get("shared_fraction"),
                **(
                    ci_metadata("shared_fraction_ci", main["shared_fraction_ci"])
                    if main.get("shared_fraction_ci")
                    else {}
                ),
                "path": file_path(layout.comparison_summary(model_key)),
                "n_categories": len(categories),
                "seconds": round(out["seconds"], 1),
                **md,
            }
        )

    return comparison


def _report_asset(cfg: ProjectConfig, parts: Partitions) -> dg.AssetsDefinition:
    @dg.asset(
        kinds={"html", "markdown"},
        group_name="report",
        code_version=cfg.section_hash("report"),
        deps=["comparison", "data_profile", "refusal_behaviour", "sae"],
        description="One self-contained HTML report (PNGs embedded) and its Markdown twin over every model.",
    )
    def report(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        versions = {}
        for key in (
            "orbench_prompts",
            "prompt_sample",
            "refusal_behaviour",
            "activations",
            "sae",
            "circuit",
            "comparison",
            "data_profile",
        ):
            record = context.instance.get_latest_materialization_event(dg.AssetKey(key))
            if record is not None and record.asset_materialization is not None:
                versions[key] = (
                    record.asset_materialization.tags.get("dagster/data_version", "")
                    if record.asset_materialization.tags
                    else ""
                )
        written = write_report(
            cfg, Layout(storage.files), parts.category.get_partition_keys(), input_versions=versions
        )
        return dg.MaterializeResult(metadata=report_metadata(written))

    return report
