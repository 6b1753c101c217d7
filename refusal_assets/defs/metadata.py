"""Helpers that turn science-core results into Dagster metadata and materializations."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg


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
