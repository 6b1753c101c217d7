"""Helpers that turn science-core results into Dagster metadata and materializations."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq

from refusal_assets.circuits.finding import CategoryCircuit
from refusal_assets.config import SAEQualityThresholds
from refusal_assets.report.report import ReportFiles, summaries_markdown
from refusal_assets.report.sections import format_ci
from refusal_assets.sae.fit import FittedSAE


def png_markdown(path: Path, alt: str = "plot") -> dg.MetadataValue:
    """A PNG embedded in Markdown so the UI shows it inline."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


# Who answers for the assets, shown in the UI (Dagster owners are emails or "team:<name>").
OWNERS = ["team:refusal-assets"]


def file_path(path: str | Path) -> dg.MetadataValue:
    """A file or folder as a path the UI shows (and copies) as one."""
    return dg.MetadataValue.path(str(path))


def parquet_metadata(path: str | Path) -> dict[str, Any]:
    """Column schema, row count and path of a Parquet file, read from its footer (no data read)."""
    file = pq.ParquetFile(path)
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name=f.name, type=str(f.type)) for f in file.schema_arrow]
    )
    return {
        "dagster/column_schema": schema,
        "dagster/row_count": file.metadata.num_rows,
        "path": file_path(path),
    }


def ci_metadata(name: str, ci: tuple[float, float], digits: int = 3) -> dict[str, Any]:
    """``name`` as text (``[lo, hi]`` or ``n/a``) and its bounds as floats ``name_lo``/``name_hi``,
    so the UI can plot them over materializations."""
    lo, hi = (float("nan") if v is None else float(v) for v in ci)
    return {name: format_ci((lo, hi), digits), f"{name}_lo": clean(lo), f"{name}_hi": clean(hi)}


def with_owners_and_tags(assets: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """Owners on every asset; tags ``stage`` (its group) and ``gpu`` (steps in the gpu pool), so the
    UI's catalog can filter by them. An asset without a description is an error here, not a blank
    in the UI."""
    from refusal_assets.defs.gpu import GPU_POOL

    gpu = {"gpu": ""} if assets.op.pool == GPU_POOL else {}

    def attributes(spec: dg.AssetSpec) -> dg.AssetSpec:
        if not spec.description:
            raise ValueError(f"asset {spec.key.to_user_string()} has no description")
        return spec.replace_attributes(
            owners=OWNERS, tags={**spec.tags, "stage": spec.group_name or "default", **gpu}
        )

    return assets.map_asset_specs(attributes)


def clean(value: Any) -> Any:
    """NaN/inf are not JSON: Dagster metadata gets None (shown empty) instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def multi_key(partitions_def: dg.PartitionsDefinition, key: str) -> dict[str, str]:
    if isinstance(key, dg.MultiPartitionKey):
        return dict(key.keys_by_dimension)
    assert isinstance(partitions_def, dg.MultiPartitionsDefinition)
    return dict(partitions_def.get_partition_key_from_str(key).keys_by_dimension)


def circuit_metadata(found: CategoryCircuit, png: Path, seconds: float) -> dict[str, Any]:
    """The circuit asset's metadata: the main group's scores, the ratios' denominator, top nodes, the plot."""
    main = found.main
    at_k, sweep = main.at_k, main.sweep
    md = {
        "n_nodes": int(main.chosen.sum()),
        "faithfulness": at_k.faithfulness,
        "completeness": at_k.completeness,
        "random_faithfulness": at_k.random_faithfulness,
        **ci_metadata("faithfulness_ci", at_k.faithfulness_ci),
        **ci_metadata("completeness_ci", at_k.completeness_ci),
        **ci_metadata("random_faithfulness_ci", at_k.random_faithfulness_ci),
        **ci_metadata("faithfulness_minus_random_ci", at_k.advantage_ci),
        # the ratios' denominator: near zero, faithfulness and completeness are ill-conditioned
        "m_full_minus_m_empty": sweep.m_full - sweep.m_empty,
        **ci_metadata("m_full_minus_m_empty_ci", sweep.denominator_ci),
        "n_prompts": main.n_prompts,
        "prompt_set": main.prompt_set,
        "baseline_prompts": f"{found.baseline_set} ({found.n_baseline})",
        "n_edges": len(main.edges),
        "seconds": round(seconds, 1),
        "top_nodes": top_nodes_table(main.nodes[:10]),
        "faithfulness_plot": png_markdown(png, "faithfulness and completeness"),
        "path": file_path(png.parent),
    }
    for g, v in found.groups.items():
        md[f"faithfulness_{g}"], md[f"completeness_{g}"], md[f"n_nodes_{g}"] = (
            v.at_k.faithfulness,
            v.at_k.completeness,
            int(v.chosen.sum()),
        )
    return {k: clean(v) for k, v in md.items()}


def top_nodes_table(nodes: list[dict]) -> dg.MetadataValue:
    """The circuit's strongest nodes as a table (its column schema shows in the UI)."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("site", "string", description="site of the node"),
            dg.TableColumn(
                "node", "string", description="SAE latent index, or the site's error node"
            ),
            dg.TableColumn(
                "effect",
                "float",
                description="mean attribution-patching effect on the refusal score",
            ),
        ]
    )
    records = [
        dg.TableRecord(
            {
                "site": n["site"],
                "node": "error" if n["is_error"] else f"latent {n['latent']}",
                "effect": round(float(n["effect"]), 4),
            }
        )
        for n in nodes
    ]
    return dg.MetadataValue.table(records, schema=schema)


def sae_metadata(fitted: FittedSAE, folder: Path, png: Path | None) -> dict[str, Any]:
    """The SAE asset's metadata: quality on held-out prompts, splice, size, the rows left out, the curve.

    ``fvu`` is the FVU on the distinct rows of the held-out evaluation prompts (neither trained on nor
    used for early stopping); ``dead_fraction`` counts latents that fire on no non-template row.
    """
    m, history = fitted.metrics, fitted.history
    md = {
        **{k: clean(v) for k, v in m.items()},
        **{k: clean(v) for k, v in fitted.splice.items()},
        "d_sae": int(fitted.sae.W_dec.shape[0]),
        "k": int(getattr(fitted.sae, "k", 0)),
        "n_vectors": fitted.n_vectors,
        "n_val_vectors": fitted.n_val_vectors,
        "n_massive_rows_excluded": fitted.n_outliers,
        "max_input_norm": fitted.max_norm,
        "seconds": round(fitted.fit_seconds, 1),
        "path": file_path(folder),
        "stopped_early": bool(history.get("stopped_early", False)),
    }
    if history.get("seconds") is not None:
        md["train_seconds"] = round(float(history["seconds"]), 1)
    if png is not None:
        md["training_curve"] = png_markdown(png, "SAE training")
    if fitted.replicates:
        rows = "".join(
            f"| {r.seed} | {r.best_step} | {r.fvu:.4f} | {r.l0:.1f} | {r.dead_fraction:.3f} | "
            f"{r.seconds:.0f} |\n"
            for r in fitted.replicates
        )
        header = (
            "| seed | best step | held-out FVU | L0 | dead | seconds |\n|---|---|---|---|---|---|\n"
        )
        md["replicates"] = dg.MetadataValue.md(header + rows)
        md["replicate_fvu_max"] = max(r.fvu for r in fitted.replicates)
    return {k: clean(v) for k, v in md.items()}


def sae_checks(fitted: FittedSAE, thresholds: SAEQualityThresholds) -> list[dg.AssetCheckResult]:
    """The blocking quality checks: held-out FVU (distinct rows of the evaluation prompts) and the dead
    fraction (non-template rows) under their thresholds, for the main SAE and every replicate (each
    training's circuits give a feature-level answer, so each must pass)."""
    fvus = {"fvu": fitted.metrics["fvu"]} | {f"fvu_seed{r.seed}": r.fvu for r in fitted.replicates}
    deads = {"dead_fraction": fitted.metrics["dead_fraction"]} | {
        f"dead_fraction_seed{r.seed}": r.dead_fraction for r in fitted.replicates
    }
    return [
        dg.AssetCheckResult(
            check_name="fvu_below_threshold",
            passed=all(v <= thresholds.max_fvu for v in fvus.values()),
            metadata={**fvus, "max_fvu": thresholds.max_fvu},
        ),
        dg.AssetCheckResult(
            check_name="dead_fraction_below_threshold",
            passed=all(v <= thresholds.max_dead_fraction for v in deads.values()),
            metadata={**deads, "max": thresholds.max_dead_fraction},
        ),
    ]


def report_metadata(written: ReportFiles) -> dict[str, Any]:
    """The report asset's metadata: the answer (verdict, one line per test, sample) as Markdown, each
    model's summary figure, and the two files."""
    md: dict[str, Any] = {
        "verdict": dg.MetadataValue.md(summaries_markdown(written.summaries)),
        "path": file_path(written.html),
        "markdown": file_path(written.markdown),
    }
    for s in written.summaries:
        md[f"verdict_{s.model_key}"] = s.headline
        if s.figure is not None and s.figure.is_file():
            md[f"summary_figure_{s.model_key}"] = png_markdown(s.figure, f"summary {s.model_key}")
    return md
