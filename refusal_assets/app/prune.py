"""``refusal-assets prune``: delete the files of partitions the config no longer defines (a
category or a model, with its sites, removed from it), and say what becomes of their records.

Partitions are static and rebuilt from the config at load time
(:mod:`refusal_assets.defs.partitions`), so a removed model's partitions vanish from the graph
at once, but not their files under the storage root, nor their materialization records in the
instance: Dagster cannot yet wipe one partition's records (dagster-io/dagster#14749), only every
partition of an asset.

Which folders: every partitioned asset keeps a partition's files under
``<root>/<asset>/<partition parts>/`` (:class:`refusal_assets.storage.Storage`), each part one key
of one of its partition dimensions. The removed keys are read from the instance (partitions it
materialized that the config no longer defines, minus every key the config still has); a folder
at partition depth with one of those names is deleted, nothing else (so a folder that is no
partition is never touched). The graph is walked generically: new partitioned assets are covered.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from refusal_assets.storage import Storage

ISSUE_14749 = "https://github.com/dagster-io/dagster/issues/14749"


@dataclass(frozen=True, kw_only=True)
class StaleFolder:
    asset: str
    path: Path
    n_files: int
    n_bytes: int


@dataclass(frozen=True, kw_only=True)
class PrunePlan:
    folders: list[StaleFolder]
    """The removed partitions' folders, by asset."""
    removed_names: list[str]
    """Folder names that are no partition key of the config any more."""
    records: dict[str, list[str]]
    """Per asset, its materialized partitions (in the instance) the config no longer defines."""


def _dimension_keys(pdef: dg.PartitionsDefinition) -> tuple[int, set[str]]:
    """(number of dimensions, every key of every dimension)."""
    if isinstance(pdef, dg.MultiPartitionsDefinition):
        keys: set[str] = set()
        for dim in pdef.partitions_defs:
            keys |= set(dim.partitions_def.get_partition_keys())
        return len(pdef.partitions_defs), keys
    return 1, set(pdef.get_partition_keys())


def _folders_at_depth(folder: Path, depth: int) -> list[Path]:
    level = [folder] if folder.is_dir() else []
    out: list[Path] = []
    for _ in range(depth):
        level = sorted(p for parent in level for p in parent.iterdir() if p.is_dir())
        out += level
    return out


def _size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def plan_prune(defs: dg.Definitions, storage_root: Path, instance: dg.DagsterInstance) -> PrunePlan:
    graph = defs.resolve_asset_graph()
    partitioned = {
        key: graph.get(key).partitions_def
        for key in graph.materializable_asset_keys
        if graph.get(key).partitions_def is not None
    }
    current: set[str] = set()
    depth: dict[dg.AssetKey, int] = {}
    for key, pdef in partitioned.items():
        n_dims, keys = _dimension_keys(pdef)
        depth[key] = n_dims
        current |= keys
    # the partitions Dagster materialized that the config no longer defines; their key parts
    # (a multi-partition key reads "part|part") are the names of the folders to delete
    records: dict[str, list[str]] = {}
    for key, pdef in sorted(partitioned.items()):
        gone = sorted(instance.get_materialized_partitions(key) - set(pdef.get_partition_keys()))
        if gone:
            records[key.to_user_string()] = gone
    removed = {part for keys in records.values() for k in keys for part in k.split("|")} - current
    storage = Storage(storage_root)
    folders: list[StaleFolder] = []
    for key in sorted(partitioned):
        for folder in _folders_at_depth(storage.path(*key.path), depth[key]):
            if folder.name not in removed or any(f.path in folder.parents for f in folders):
                continue
            n_files, n_bytes = _size(folder)
            folders.append(
                StaleFolder(
                    asset=key.to_user_string(), path=folder, n_files=n_files, n_bytes=n_bytes
                )
            )
    return PrunePlan(folders=folders, removed_names=sorted(removed), records=records)


def describe(plan: PrunePlan, dry_run: bool) -> list[str]:
    """What prune deletes (or would), and what stays: the records, with the Dagster limitation."""
    lines = []
    if plan.removed_names:
        lines.append(f"no longer in the config: {', '.join(plan.removed_names)}")
    verb = "would delete" if dry_run else "delete"
    for f in plan.folders:
        lines.append(f"  {verb} {f.path} ({f.asset}: {f.n_files} files, {f.n_bytes / 1e6:.2f} MB)")
    if not plan.folders:
        lines.append("no files of removed partitions")
    if plan.records:
        n = sum(len(v) for v in plan.records.values())
        lines.append(
            f"records: {n} removed partitions keep their materialization records in the instance "
            f"({'; '.join(k + ': ' + ', '.join(v) for k, v in sorted(plan.records.items()))})."
        )
        lines.append(
            "  Dagster cannot yet wipe one partition's records (dagster-io/dagster#14749, "
            f"{ISSUE_14749}): they stay in the run history and the event log, but the UI shows "
            "only the config's partitions, and `run` plans only those. "
            "`dagster asset wipe <key>` would wipe every partition of an asset."
        )
    else:
        lines.append("records: no removed partition has materialization records in the instance")
    return lines


def delete(plan: PrunePlan) -> None:
    for f in plan.folders:
        shutil.rmtree(f.path)
