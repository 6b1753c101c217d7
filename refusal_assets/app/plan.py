"""What ``refusal-assets run`` has to build: every partition of the selection that Dagster calls
missing or stale, whose last run failed, or whose upstream is rebuilt in the same run.

Staleness is Dagster's own (the notion the UI shows): :class:`CachingStaleStatusResolver` compares
each partition's recorded provenance with the current code versions, the config sources' data
versions (``model_config``/``site_config``, recorded before planning) and the upstream partitions'
latest data versions. Failures come from the instance's asset status cache (the partitions whose
latest run failed). Dagster's resolver does not propagate: a partition is not stale until its
upstream *has* a new version, so the planner adds the partitions downstream of what it rebuilds.
The planner walks the asset graph it is given; it knows no asset by name.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import dagster as dg
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.loader import LoadingContext
from dagster._utils.caching_instance_queryer import CachingInstanceQueryer

RUNNER_TAG = "refusal_assets/runner"
"""Tag of the runs ``refusal-assets run`` launches: ``<host>:<pid>`` of the process executing them
in-process, so a later ``run`` can tell a killed run (its process is gone) from a live one."""


class _PlanLoadingContext(LoadingContext):
    """A loading context of our own: one planning pass is one "request" for Dagster's batch
    loaders (the same role the webserver's per-request context plays)."""

    def __init__(self, instance: dg.DagsterInstance):
        self._instance = instance
        self._loaders: dict = {}

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._instance

    @property
    def loaders(self) -> dict:
        return self._loaders


@dataclass(frozen=True, kw_only=True)
class PartitionDecision:
    """One partition of the selection: ``reason`` is why it is rebuilt, None when up to date."""

    key: dg.AssetKey
    partition: str | None
    reason: str | None

    @property
    def label(self) -> str:
        name = self.key.to_user_string()
        return name if self.partition is None else f"{name} {self.partition}"


@dataclass(frozen=True, kw_only=True)
class AssetPlan:
    """One asset's share of the plan, in graph order: the partitions to build (None for an
    unpartitioned asset that is built) and whether they go in one run (single-run backfill
    policy)."""

    assets_def: dg.AssetsDefinition
    partitions: list[str] | None
    single_run: bool


@dataclass(frozen=True, kw_only=True)
class BuildPlan:
    decisions: list[PartitionDecision]
    """Every partition of the selection, in graph order."""
    assets: list[AssetPlan]
    """Only the assets with something to build."""

    @property
    def n_build(self) -> int:
        return sum(d.reason is not None for d in self.decisions)

    def summary(self) -> str:
        n = len(self.decisions)
        return f"{n} partitions: {self.n_build} to build, {n - self.n_build} up to date"


def resolve_selection(graph: BaseAssetGraph, select: str) -> list[dg.AssetKey]:
    """The materializable keys of ``select`` (Dagster's selection syntax, plus comma-separated
    lists such as "comparison,report"), in graph order."""
    known = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
    if select == "*":
        selection = dg.AssetSelection.all()
    else:
        parts = [p.strip() for p in select.split(",") if p.strip()]
        try:
            selection = dg.AssetSelection.from_string(parts[0])
            for part in parts[1:]:
                selection = selection | dg.AssetSelection.from_string(part)
        except Exception as e:
            raise SystemExit(
                f"error: invalid --select {select!r} ({e}); "
                "e.g. 'orbench_prompts', 'key:sae+', 'comparison,report'"
            ) from None
    try:
        keys = selection.resolve(graph)
    except Exception as e:
        raise SystemExit(
            f"error: --select {select!r} names no known asset ({type(e).__name__}); known: {known}"
        ) from None
    if not keys:
        raise SystemExit(f"error: the selection {select!r} matches no asset; known: {known}")
    return [
        k
        for level in graph.toposorted_asset_keys_by_level
        for k in sorted(level)
        if k in keys and k in graph.materializable_asset_keys
    ]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runner_tag_value() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_orphaned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark as failed the runs a killed ``refusal-assets run`` left started: it executes them
    in-process, so nothing else ever ends them, and Dagster would keep their partitions "in
    progress" forever. Only runs of this host whose process is gone are touched. Returns their
    ids."""
    host = socket.gethostname()
    orphaned = []
    started = instance.get_runs(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    )
    for run in started:
        owner = run.tags.get(RUNNER_TAG, "")
        run_host, _, pid = owner.rpartition(":")
        if run_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        instance.report_run_failed(
            run, f"the refusal-assets run process ({owner}) ended before this run finished"
        )
        orphaned.append(run.run_id)
    return orphaned


def _failed(
    queryer: CachingInstanceQueryer, graph: BaseAssetGraph, key: dg.AssetKey
) -> set[str | None]:
    """Partitions (``{None}`` for an unpartitioned asset) whose latest run failed."""
    subset = queryer.get_failed_asset_subset(asset_key=key).value
    if graph.get(key).partitions_def is None:
        return {None} if subset else set()
    return set(subset.get_partition_keys())


def _stale_reason(
    resolver: CachingStaleStatusResolver, key: dg.AssetKey, partition: str | None
) -> str | None:
    status = resolver.get_status(key, partition)
    if status == StaleStatus.MISSING:
        return "missing"
    if status == StaleStatus.FRESH:
        return None
    causes = resolver.get_stale_root_causes(key, partition) or resolver.get_stale_causes(
        key, partition
    )
    described = []
    for cause in causes[:3]:
        where = cause.key.asset_key.to_user_string()
        if cause.key.partition_key is not None:
            where += f" [{cause.key.partition_key}]"
        described.append(f"{where} {cause.reason}")
    more = f" (+{len(causes) - 3} more)" if len(causes) > 3 else ""
    return "stale: " + "; ".join(described) + more


def plan_build(
    defs: dg.Definitions, instance: dg.DagsterInstance, select: str = "*", force: bool = False
) -> BuildPlan:
    """The partitions of ``select`` to build, and why (see the module's docstring)."""
    graph = defs.resolve_asset_graph()
    keys = resolve_selection(graph, select)
    context = _PlanLoadingContext(instance)
    queryer = CachingInstanceQueryer(instance, graph, context)
    resolver = CachingStaleStatusResolver(instance, graph, context, instance_queryer=queryer)
    unbound = {a.key: a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.keys}
    selected = set(keys)
    # partition -> the first rebuilt upstream partition that reaches it
    rebuilt_upstream: dict[AssetKeyPartitionKey, AssetKeyPartitionKey] = {}
    decisions: list[PartitionDecision] = []
    assets: list[AssetPlan] = []
    for key in keys:
        pdef = graph.get(key).partitions_def
        failed = set() if force else _failed(queryer, graph, key)
        to_build: list[str | None] = []
        for partition in pdef.get_partition_keys() if pdef else [None]:
            here = AssetKeyPartitionKey(key, partition)
            reason = _reason(resolver, here, force, failed, rebuilt_upstream)
            decisions.append(PartitionDecision(key=key, partition=partition, reason=reason))
            if reason is None:
                continue
            to_build.append(partition)
            for child in graph.get_children_partitions(key, partition):
                if child.asset_key in selected:
                    rebuilt_upstream.setdefault(child, here)
        if to_build:
            assets_def = unbound[key]
            policy = assets_def.backfill_policy
            assets.append(
                AssetPlan(
                    assets_def=assets_def,
                    partitions=None if pdef is None else [p for p in to_build if p is not None],
                    single_run=policy is not None and policy.max_partitions_per_run is None,
                )
            )
    return BuildPlan(decisions=decisions, assets=assets)


def _reason(
    resolver: CachingStaleStatusResolver,
    here: AssetKeyPartitionKey,
    force: bool,
    failed: set[str | None],
    rebuilt_upstream: Mapping[AssetKeyPartitionKey, AssetKeyPartitionKey],
) -> str | None:
    if force:
        return "--force"
    if here.partition_key in failed:
        return "its last run failed"
    stale = _stale_reason(resolver, here.asset_key, here.partition_key)
    if stale is not None:
        return stale
    upstream = rebuilt_upstream.get(here)
    if upstream is not None:
        where = upstream.asset_key.to_user_string()
        if upstream.partition_key is not None:
            where += f" [{upstream.partition_key}]"
        return f"upstream {where} is rebuilt in this run"
    return None


def contiguous_ranges(all_keys: list[str], chosen: list[str]) -> list[tuple[str, str]]:
    """``chosen`` as (first, last) ranges of consecutive keys in ``all_keys``' order: a run over a
    partition range takes a contiguous range, so a gap splits it."""
    wanted = set(chosen)
    ranges: list[tuple[str, str]] = []
    start: str | None = None
    previous: str | None = None
    for k in all_keys:
        if k in wanted:
            start = k if start is None else start
            previous = k
        elif start is not None:
            ranges.append((start, previous))
            start = None
    if start is not None:
        ranges.append((start, previous))
    return ranges
