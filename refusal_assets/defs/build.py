"""Assemble the Definitions for one project config.

Options every asset of a kind shares are set here, once: GPU steps get the ``gpu`` pool and the
Kubernetes pod request through :func:`gpu_asset`; every asset gets the rebuild condition (see
:func:`with_shared_options`), mapped over the assembled assets. The asset modules declare only
what differs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from refusal_assets.config import ProjectConfig
from refusal_assets.defs import (
    automation,
    checks,
    circuit_assets,
    comparison_assets,
    data_assets,
    direction_assets,
    feature_assets,
    model_assets,
    sae_assets,
    sources,
    transfer_assets,
)
from refusal_assets.defs.executor import select_executor
from refusal_assets.defs.gpu import GPU_POOL, gpu_op_tags
from refusal_assets.defs.metadata import with_owners_and_tags
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.prompts import orbench as data

# circuit reads a model's settings along two paths (refusal_behaviour, one hop; sae, two hops): it
# is held while the nearer path has updated but the farther one is still building, so a change
# builds it once. The report reads refusal_behaviour and sae for its tables, but everything they
# feed reaches it through comparison (data_profile too: a data change reruns every comparison): it
# follows comparison only, so a change rebuilds it once, after the comparisons. (Automation's "will
# be requested" does not cross edges between different partitionings, so a hold cannot see a
# circuit requested in the same tick.)
REBUILD_OPTIONS: dict[dg.AssetKey, dict] = {
    dg.AssetKey("circuit"): {"hold_while_upstream_settles": True},
    # transfer reads behaviour and circuits; a behaviour change always reaches it through the
    # circuits (which read behaviour), so waiting for them builds it once instead of twice
    dg.AssetKey("transfer"): {"ignore": ("refusal_behaviour",)},
    # comparison reads refusal_direction's verdict; a model change reaches it through the circuits
    # too (both follow behaviour), so waiting for those builds it once instead of twice
    dg.AssetKey("comparison"): {"ignore": ("refusal_direction",)},
    dg.AssetKey("report"): {"ignore": ("data_profile", "refusal_behaviour", "sae")},
}


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


def with_shared_options(
    assets: list[dg.AssetsDefinition], build_missing_roots: bool = False
) -> list[dg.AssetsDefinition]:
    """The rebuild condition on every asset (with its :data:`REBUILD_OPTIONS`); root assets (no
    parents) also build when missing if ``automation.build_missing_roots`` is on; owners and tags on
    every asset."""
    out = []
    for a in assets:
        if not a.keys:
            out.append(a)
            continue
        is_root = not any(dep.asset_key not in a.keys for spec in a.specs for dep in spec.deps)
        options = next((REBUILD_OPTIONS[k] for k in a.keys if k in REBUILD_OPTIONS), {})
        condition = (
            automation.root_condition(build_missing_roots)
            if is_root
            else automation.rebuild_condition(**options)
        )
        out.append(with_owners_and_tags(a.with_attributes(automation_condition=condition)))
    return out


def build_defs(cfg: ProjectConfig, storage_root: Path, device: str = "auto") -> dg.Definitions:
    parts = Partitions.build(cfg, discover_categories(cfg))
    gpu = gpu_asset()
    assets = with_shared_options(
        [
            *data_assets.build(cfg, parts),
            *model_assets.build(cfg, parts, gpu),
            *direction_assets.build(cfg, parts, gpu),
            *sae_assets.build_corpus(cfg, parts, gpu),
            *sae_assets.build(cfg, parts, gpu),
            *feature_assets.build(cfg, parts),
            *circuit_assets.build(cfg, parts, gpu),
            *transfer_assets.build(cfg, parts, gpu),
            *comparison_assets.build(cfg, parts),
        ],
        build_missing_roots=cfg.automation.build_missing_roots,
    )
    return dg.Definitions(
        assets=[*sources.build(cfg, parts), *assets],
        asset_checks=checks.build(cfg, parts),  # WARN checks of weak results (defs/checks.py)
        sensors=[automation.automation_sensor(), sources.config_sensor(cfg)],
        schedules=[automation.comparison_schedule(cfg.report.schedule, parts.model)],
        resources={
            "compute": ComputeResource(device=device),
            "storage": StorageResource(root=str(storage_root)),
        },
        executor=select_executor(
            cfg
        ),  # $REFUSAL_ASSETS_EXECUTOR (k8s: one pod per step); None = Dagster's default
    )
