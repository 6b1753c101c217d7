"""Assemble the Definitions for one project config."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from refusal_assets import data
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.executor import select_executor
from refusal_assets.defs import automation, circuit_assets, comparison_assets, data_assets, model_assets, sae_assets
from refusal_assets.defs.gpu import gpu_op_tags
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource


def discover_categories(cfg: ProjectConfig) -> list[str]:
    """Category partition keys: the config's list, else every category found in the data."""
    if cfg.data.categories:
        from refusal_assets.storage import category_key

        return sorted({category_key(c) for c in cfg.data.categories})
    folder = data.data_folder(cfg.data, cfg.resolve)
    df, _ = data.load_orbench(folder, cfg.data.splits)
    return data.category_keys(df)


def build_defs(cfg: ProjectConfig, storage_root: Path, device: str = "auto") -> dg.Definitions:
    parts = Partitions.build(cfg, discover_categories(cfg))
    op_tags = gpu_op_tags()
    assets = [
        *data_assets.build(cfg, parts),
        *model_assets.build(cfg, parts, op_tags),
        *sae_assets.build(cfg, parts, op_tags),
        *circuit_assets.build(cfg, parts, op_tags),
        *comparison_assets.build(cfg, parts),
    ]
    return dg.Definitions(
        assets=assets,
        sensors=[automation.automation_sensor()],
        schedules=[automation.report_schedule(cfg.report.schedule)],
        resources={"compute": ComputeResource(device=device), "storage": StorageResource(root=str(storage_root))},
        executor=select_executor(cfg),  # $REFUSAL_ASSETS_EXECUTOR (k8s: one pod per step); None = Dagster's default
    )
