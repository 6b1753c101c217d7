"""Stage 5: cross-category comparison per model, and the report over all models."""

import json
import time

import dagster as dg
import numpy as np

from refusal_assets.analysis import overlap as cmp
from refusal_assets.analysis.verdict import combine, overlap_line, transfer_lines
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import ci_metadata, file_path, png_markdown, report_metadata
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import StorageResource
from refusal_assets.layout import Layout
from refusal_assets.plots import plot_heatmap
from refusal_assets.report.report import write_report
from refusal_assets.storage import write_text


def build(cfg: ProjectConfig, parts: Partitions) -> list[dg.AssetsDefinition]:
    cc, comp = cfg.circuits, cfg.comparison

    @dg.asset(
        partitions_def=parts.model,
        kinds={"scipy", "matplotlib"},
        group_name="comparison",
        code_version=cfg.section_hash("circuits", "comparison"),
        deps=["circuit", "transfer"],
        description="Category x category circuit overlaps with a label-permutation null, split-half ceilings, "
        "bootstrap CIs, Benjamini-Hochberg, the shared core vs category-specific tail, refusal-direction cosines, "
        "and the verdict.",
    )
    def comparison(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        model_key = context.partition_key
        t0 = time.perf_counter()
        categories = parts.category.get_partition_keys()
        layout = Layout(storage.files)
        circuits = {c: layout.load_circuit(model_key, c) for c in categories}
        site_of_node = next(iter(circuits.values()))[1]["site_of_node"]
        groups = sorted({g for summary, _ in circuits.values() for g in summary["groups"]})
        out: dict = {"model": model_key, "categories": categories, "groups": {}}
        md: dict = {}
        error_nodes = cmp.error_node_mask(site_of_node)
        for group in groups:
            # Categories whose circuit could not use the configured prompt filter (too few refusing
            # prompts) mix refused and complied prompts: reported, but out of the verdict.
            fallback = cmp.fallback_categories(
                {c: summary for c, (summary, _) in circuits.items()}, group, cc.prompt_filter
            )
            effects = {
                c: t[f"effects_{group}"]
                for c, (s, t) in circuits.items()
                if f"effects_{group}" in t and c not in fallback
            }
            if fallback:
                md[f"fallback_categories_{group}"] = ", ".join(fallback)
                context.log.warning(
                    f"{group}: {fallback} use all their prompts, not only '{cc.prompt_filter}' ones (too few): left out"
                )
            if len(effects) < 2:
                out["groups"][group] = {
                    "verdict": "insufficient evidence",
                    "fallback_categories": fallback,
                    "verdict_reason": f"Insufficient evidence: only {sorted(effects)} have at least {cc.min_prompts} "
                    f"'{cc.prompt_filter}' prompts; a comparison needs two categories.",
                }
                md[f"verdict_{group}"] = "insufficient evidence"
                continue
            result = cmp.compare_categories(
                effects,
                site_of_node,
                mode=cc.selection,
                k_per_site=cc.k_per_site,
                threshold=cc.threshold,
                n_permutations=comp.n_permutations,
                n_bootstrap=comp.n_bootstrap,
                n_splits=comp.n_splits,
                alpha=comp.alpha,
                seed=comp.seed,
                error_nodes=error_nodes,
                rule=VerdictRule.from_config(comp),
                min_ceiling=comp.min_ceiling,
            )
            out["groups"][group] = result.to_dict()
            out["groups"][group]["fallback_categories"] = fallback
            png = plot_heatmap(
                result.jaccard,
                result.categories,
                f"{model_key}: circuit Jaccard ({group})",
                layout.jaccard_plot(model_key, group),
                annotate_significance=result.significant,
            )
            md[f"heatmap_{group}"] = png_markdown(png, f"Jaccard {group}")
            md[f"verdict_{group}"] = result.verdict
            context.log.info(f"{group}: {result.verdict_reason}")
        if {"toxic", "benign"} <= set(groups):
            # Cross: toxic circuit of a vs benign circuit of b (the seed's safe/toxic cross heatmap).
            masks = {}
            for c, (summary, _) in circuits.items():
                for g in ("toxic", "benign"):
                    m = np.zeros(len(site_of_node), bool)
                    m[[n["node"] for n in summary["groups"][g]["nodes"]]] = True
                    masks[(c, g)] = m
            cross = np.array(
                [
                    [
                        float(
                            (masks[(a, "toxic")] & masks[(b, "benign")]).sum()
                            / max((masks[(a, "toxic")] | masks[(b, "benign")]).sum(), 1)
                        )
                        for b in categories
                    ]
                    for a in categories
                ]
            )
            out["cross_jaccard"] = cross.tolist()
            md["heatmap_cross"] = png_markdown(
                plot_heatmap(
                    cross,
                    categories,
                    f"{model_key}: Jaccard toxic (rows) vs benign (cols)",
                    layout.jaccard_plot(model_key, "cross"),
                ),
                "cross",
            )
        # Refusal directions (difference of means), cosine across categories per site.
        sites = next(iter(circuits.values()))[0]["sites"]
        out["direction_cosines"] = {}
        for site in sites:
            dirs = {c: t[f"direction_{site}"] for c, (_, t) in circuits.items() if f"direction_{site}" in t}
            if len(dirs) >= 2:
                labels, cos = cmp.refusal_direction_cosines(dirs)
                out["direction_cosines"][site] = {"labels": labels, "matrix": cos.tolist()}
                md[f"direction_cosine_{site}"] = png_markdown(
                    plot_heatmap(
                        cos,
                        labels,
                        f"{model_key}: refusal-direction cosine ({site})",
                        layout.direction_cosine_plot(model_key, site),
                    ),
                    f"refusal-direction cosine {site}",
                )
        main = out["groups"].get("toxic") or next(iter(out["groups"].values()), None)
        if main is None:
            raise ValueError(f"comparison for {model_key}: fewer than two categories have circuits")
        # One answer from every test's line; today the overlap test of the main group (transfer and
        # direction tests add their lines here).
        thresholds = {
            k: getattr(comp, k)
            for k in (
                "alpha",
                "equivalence_margin",
                "modular_max_normalised",
                "min_decided_fraction",
                "majority",
                "min_ceiling",
            )
        }
        transfer = layout.load_transfer(model_key) or {}
        out["transfer"] = transfer
        combined = combine([overlap_line(main), *transfer_lines(transfer)], thresholds)
        out["combined"] = combined.to_dict()
        out["verdict"], out["verdict_reason"] = combined.verdict, combined.reason
        out["seconds"] = time.perf_counter() - t0
        write_text(json.dumps(out, indent=1, default=float), layout.comparison_summary(model_key))
        return dg.MaterializeResult(
            metadata={
                "verdict": out["verdict"],
                "verdict_reason": out["verdict_reason"],
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
        written = write_report(cfg, Layout(storage.files), parts.category.get_partition_keys(), input_versions=versions)
        return dg.MaterializeResult(metadata=report_metadata(written))

    return [comparison, report]
