"""Helpers that turn science-core results into Dagster metadata and materializations."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from refusal_assets.circuits import CategoryCircuit
from refusal_assets.config import SAEQualityThresholds
from refusal_assets.report import format_ci
from refusal_assets.sae import FittedSAE


def png_markdown(path: Path, alt: str = "plot") -> dg.MetadataValue:
    """A PNG embedded in Markdown so the UI shows it inline."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


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


def materialize_each(
    context: dg.AssetExecutionContext, metadata_by_key: Mapping[str, Mapping[str, Any]]
) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """Per-partition metadata, also when one run covers several partitions (single-run backfills).

    A run for one partition returns a normal ``MaterializeResult``. A run for several yields one
    ``AssetMaterialization`` per partition, tagged with the asset's code version so staleness
    tracking sees the same thing it would after single-partition runs.
    """
    if len(metadata_by_key) == 1 and len(context.partition_keys) == 1:
        (md,) = metadata_by_key.values()
        yield dg.MaterializeResult(metadata={k: clean(v) for k, v in md.items()})
        return
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    tags = {"dagster/code_version": code_version} if code_version else None
    for key, md in metadata_by_key.items():
        yield dg.AssetMaterialization(
            asset_key=context.asset_key, partition=key, metadata={k: clean(v) for k, v in md.items()}, tags=tags
        )


def circuit_metadata(found: CategoryCircuit, png: Path, seconds: float) -> dict[str, Any]:
    """The circuit asset's metadata: the main group's scores, the ratios' denominator, top nodes, the plot."""
    main = found.main
    at_k, sweep = main.at_k, main.sweep
    md = {
        "n_nodes": int(main.chosen.sum()), "faithfulness": at_k.faithfulness, "completeness": at_k.completeness,
        "random_faithfulness": at_k.random_faithfulness,
        "faithfulness_ci": format_ci(at_k.faithfulness_ci, 3), "random_faithfulness_ci": format_ci(at_k.random_faithfulness_ci, 3),
        "faithfulness_minus_random_ci": format_ci(at_k.advantage_ci, 3),
        # the ratios' denominator: near zero, faithfulness and completeness are ill-conditioned
        "m_full_minus_m_empty": sweep.m_full - sweep.m_empty,
        "n_prompts": main.n_prompts, "prompt_set": main.prompt_set, "baseline_prompts": f"{found.baseline_set} ({found.n_baseline})",
        "n_edges": len(main.edges), "seconds": round(seconds, 1),
        "top_nodes": dg.MetadataValue.md("\n".join(f"- {n['site']} {'error' if n['is_error'] else 'latent ' + str(n['latent'])}: {n['effect']:.3f}" for n in main.nodes[:10])),
        "faithfulness_plot": png_markdown(png, "faithfulness and completeness"),
    }
    for g, v in found.groups.items():
        md[f"faithfulness_{g}"], md[f"completeness_{g}"], md[f"n_nodes_{g}"] = v.at_k.faithfulness, v.at_k.completeness, int(v.chosen.sum())
    return {k: clean(v) for k, v in md.items()}


def sae_metadata(fitted: FittedSAE, folder: Path, png: Path | None) -> dict[str, Any]:
    """The SAE asset's metadata: quality on held-out prompts, splice, size, the rows left out, the curve.

    ``fvu`` is the FVU on the distinct rows of the held-out evaluation prompts (neither trained on nor
    used for early stopping); ``dead_fraction`` counts latents that fire on no non-template row.
    """
    m, history = fitted.metrics, fitted.history
    md = {
        **{k: clean(v) for k, v in m.items()},
        **{k: clean(v) for k, v in fitted.splice.items()},
        "d_sae": int(fitted.sae.W_dec.shape[0]), "k": int(getattr(fitted.sae, "k", 0)), "n_vectors": fitted.n_vectors,
        "n_val_vectors": fitted.n_val_vectors, "n_massive_rows_excluded": fitted.n_outliers, "max_input_norm": fitted.max_norm,
        "seconds": round(fitted.fit_seconds, 1), "path": str(folder), "stopped_early": bool(history.get("stopped_early", False)),
    }
    if history.get("seconds") is not None:
        md["train_seconds"] = round(float(history["seconds"]), 1)
    if png is not None:
        md["training_curve"] = png_markdown(png, "SAE training")
    return {k: clean(v) for k, v in md.items()}


def sae_checks(fitted: FittedSAE, thresholds: SAEQualityThresholds) -> list[dg.AssetCheckResult]:
    """The blocking quality checks: held-out FVU (distinct rows of the evaluation prompts) and the dead
    fraction (non-template rows) under their thresholds."""
    fvu, dead = fitted.metrics["fvu"], fitted.metrics["dead_fraction"]
    return [
        dg.AssetCheckResult(check_name="fvu_below_threshold", passed=fvu <= thresholds.max_fvu, metadata={"fvu": fvu, "max_fvu": thresholds.max_fvu}),
        dg.AssetCheckResult(check_name="dead_fraction_below_threshold", passed=dead <= thresholds.max_dead_fraction,
                            metadata={"dead_fraction": dead, "max": thresholds.max_dead_fraction}),
    ]
