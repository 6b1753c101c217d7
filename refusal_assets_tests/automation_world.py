"""Drive Dagster's own automation evaluation over the project's real asset graph.

``wiring_replica`` rebuilds each asset of the real Definitions from its own specs (keys,
partitions, dependencies with their mappings, code versions, automation conditions, check specs)
with a body that only records a materialization. Executing the replica writes exactly the events a
real run writes (Dagster derives data versions from the code version and the inputs' versions, the
bodies do not set them), in milliseconds instead of minutes of model compute, so a scenario can
run many automation ticks. The real bodies are exercised by the real `refusal-assets run` the
scenarios start from, the schedule, UI and daemon tests.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from refusal_assets.config import ProjectConfig
from refusal_assets.defs.sources import record_config_versions

SOURCES = {"model_config", "site_config"}


def wiring_replica(defs: dg.Definitions, failing_checks: dict[str, set[str]] | None = None) -> list:
    """The real graph's assets with recording bodies; ``failing_checks`` maps an asset key to the
    partitions whose checks fail (as a bad SAE's FVU check would)."""
    failing_checks = failing_checks or {}
    out = []
    for a in defs.assets:
        if not isinstance(a, dg.AssetsDefinition) or not a.is_materializable:
            out.append(a)
            continue
        out.append(
            dg.multi_asset(
                specs=list(a.specs),
                check_specs=list(a.check_specs),
                partitions_def=a.partitions_def,
                backfill_policy=a.backfill_policy,
                name=a.key.to_python_identifier(),
            )(
                _recording_body(
                    a.key.to_user_string(),
                    list(a.check_specs),
                    failing_checks.get(a.key.to_user_string(), set()),
                )
            )
        )
    return out


def _recording_body(key: str, checks: list, failing: set[str]):
    def body(context):
        keys = context.partition_keys if context.has_partition_key else [None]
        failed = bool(set(map(str, keys)) & failing)
        return dg.MaterializeResult(
            check_results=[
                dg.AssetCheckResult(check_name=c.name, asset_key=c.asset_key, passed=not failed)
                for c in checks
            ]
        )

    return body


def requested(result) -> dict[str, set]:
    """Requested asset partitions of one evaluation, by asset key (``{None}`` for unpartitioned)."""
    out: dict[str, set] = {}
    for r in result.results:
        if r.true_subset.size and isinstance(r.key, dg.AssetKey):
            key = r.key.to_user_string()
            out[key] = (
                {str(k) for k in r.true_subset.expensively_compute_partition_keys()}
                if r.true_subset.is_partitioned
                else {None}
            )
    return out


def stale(instance: dg.DagsterInstance, assets: list) -> dict[str, dict]:
    """Partitions that are not FRESH, as the UI computes them (the GraphQL layer uses this resolver)."""
    graph = AssetGraph.from_assets(assets)
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    out: dict[str, dict] = {}
    for key in graph.materializable_asset_keys:
        pdef = graph.get(key).partitions_def
        for p in pdef.get_partition_keys() if pdef else [None]:
            if (status := resolver.get_status(key, p)) != StaleStatus.FRESH:
                causes = [c.reason for c in resolver.get_stale_causes(key, p)][:2]
                out.setdefault(key.to_user_string(), {})[str(p)] = (status.value, causes)
    return out


def execute(assets: list, instance: dg.DagsterInstance, req: dict[str, set]) -> None:
    """Run the requested partitions, one run per partition, parents first (as the daemon's backfill would)."""
    graph = AssetGraph.from_assets(assets)
    by_key = {k.to_user_string() for k in graph.materializable_asset_keys}
    for level in graph.toposorted_asset_keys_by_level:
        for key in sorted(level):
            name = key.to_user_string()
            if name not in req or name not in by_key:
                continue
            for p in sorted(req[name], key=str):
                result = dg.materialize(
                    assets,
                    instance=instance,
                    selection=[key],
                    partition_key=p,
                    raise_on_error=False,
                )
                assert result.success, f"{name} {p} failed"


def tick_until_quiet(
    cfg: ProjectConfig,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    cursor,
    max_ticks: int = 10,
    assets: list | None = None,
) -> tuple[list[dict[str, set]], object]:
    """As the daemon does: record the config's source versions (the config sensor), evaluate,
    run what was requested, repeat until nothing is requested. Returns the requests per tick."""
    assets = assets or wiring_replica(defs)
    replica = dg.Definitions(assets=assets)
    history = []
    for _ in range(max_ticks):
        record_config_versions(instance, cfg)
        result = dg.evaluate_automation_conditions(defs=replica, instance=instance, cursor=cursor)
        cursor = result.cursor
        req = {k: v for k, v in requested(result).items() if k not in SOURCES}
        if not req:
            return history, cursor
        history.append(req)
        execute(assets, instance, req)
    raise AssertionError(f"automation still requesting after {max_ticks} ticks: {history[-3:]}")


def union(history: list[dict[str, set]]) -> dict[str, set]:
    out: dict[str, set] = {}
    for tick in history:
        for k, v in tick.items():
            out.setdefault(k, set()).update(v)
    return out


def variant(cfg: ProjectConfig, **changes) -> ProjectConfig:
    """The config with dotted (``__``-separated) keys replaced, e.g. ``sae__k=7``, ``models__0__generation={...}``."""
    raw = cfg.model_dump()
    for dotted, value in changes.items():
        node = raw
        *path, leaf = dotted.split("__")
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    return ProjectConfig.model_validate(raw)
