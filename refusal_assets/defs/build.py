"""Assemble the Definitions for one project config.

Options every asset of a kind shares are set here, once: GPU steps get the ``gpu`` pool and the
Kubernetes pod request through :func:`gpu_asset`; every asset but the report gets the rebuild
condition, mapped over the assembled assets. The asset modules declare only what differs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from refusal_assets import data
from refusal_assets.config import ProjectConfig
from refusal_assets.defs import automation, checks, circuit_assets, comparison_assets, data_assets, model_assets, sae_assets, transfer_assets
from refusal_assets.defs.executor import select_executor
from refusal_assets.defs.gpu import GPU_POOL, gpu_op_tags
from refusal_assets.defs.metadata import with_owners_and_tags
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource

# Assets rebuilt only when asked (the report is driven by its schedule, see automation.report_schedule).
MANUAL_ASSETS = {dg.AssetKey("report")}


def discover_categories(cfg: ProjectConfig) -> list[str]:
    """Category partition keys: the config's list, else every category found in the data."""
    if cfg.data.categories:
        from refusal_assets.storage import category_key

        return sorted({category_key(c) for c in cfg.data.categories})
    folder = data.data_folder(cfg.data, cfg.resolve)
    df, _ = data.load_orbench(folder, cfg.data.splits)
    return data.category_keys(df)


def gpu_asset() -> Callable[..., Callable]:
    """``@dg.asset`` for steps that use the model or an SAE: the ``gpu`` pool (one at a time per
    device, see dagster.yaml) and the per-step GPU pod request of the Kubernetes executor."""
    return functools.partial(dg.asset, pool=GPU_POOL, op_tags=gpu_op_tags())


def with_shared_options(assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """The rebuild condition on every asset outside :data:`MANUAL_ASSETS`; owners and tags on every asset."""
    condition = automation.rebuild_condition()
    assets = [a if set(a.keys) & MANUAL_ASSETS or not a.keys else a.with_attributes(automation_condition=condition) for a in assets]
    return [with_owners_and_tags(a) for a in assets]


def build_defs(cfg: ProjectConfig, storage_root: Path, device: str = "auto") -> dg.Definitions:
    parts = Partitions.build(cfg, discover_categories(cfg))
    gpu = gpu_asset()
    assets = with_shared_options([
        *data_assets.build(cfg, parts),
        *model_assets.build(cfg, parts, gpu),
        *sae_assets.build(cfg, parts, gpu),
        *circuit_assets.build(cfg, parts, gpu),
        *transfer_assets.build(cfg, parts, gpu),
        *comparison_assets.build(cfg, parts),
    ])
    return dg.Definitions(
        assets=assets,
        asset_checks=checks.build(cfg, parts),  # WARN checks of weak results (defs/checks.py)
        sensors=[automation.automation_sensor()],
        schedules=[automation.report_schedule(cfg.report.schedule)],
        resources={"compute": ComputeResource(device=device), "storage": StorageResource(root=str(storage_root))},
        executor=select_executor(cfg),  # $REFUSAL_ASSETS_EXECUTOR (k8s: one pod per step); None = Dagster's default
    )
