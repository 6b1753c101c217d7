"""``refusal-assets run``: materialize a selection, asset by asset in dependency order, every
partition of the config, in the instance at ``$DAGSTER_HOME`` (so the UI shows it afterwards).

Assets with a single-run backfill policy (activations) take all their partitions in one run, so
one forward pass per (model, category) serves every site; the rest take one run per partition,
exactly what a backfill from the UI launches.
"""

from __future__ import annotations

import time

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from refusal_assets import settings
from refusal_assets.defs.build import build_defs
from refusal_assets.defs.sources import record_config_versions


def _plan(defs: dg.Definitions, select: str) -> list[tuple[dg.AssetsDefinition, list[str] | None, bool]]:
    graph = defs.resolve_asset_graph()
    if select == "*":
        selection = dg.AssetSelection.all()
    else:
        # Dagster's selection syntax, plus comma-separated lists: "comparison,report".
        parts = [p.strip() for p in select.split(",") if p.strip()]
        try:
            selection = dg.AssetSelection.from_string(parts[0])
            for part in parts[1:]:
                selection = selection | dg.AssetSelection.from_string(part)
        except Exception as e:
            raise SystemExit(f"error: invalid --select {select!r} ({e}); e.g. 'orbench_prompts', 'key:sae+', 'comparison,report'")
    known = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
    try:
        keys = selection.resolve(graph)
    except Exception as e:
        raise SystemExit(f"error: --select {select!r} names no known asset ({type(e).__name__}); known: {known}") from None
    if not keys:
        raise SystemExit(f"error: the selection {select!r} matches no asset; known: {sorted(k.to_user_string() for k in graph.get_all_asset_keys())}")
    order = [k for level in graph.toposorted_asset_keys_by_level for k in sorted(level) if k in keys and k in graph.materializable_asset_keys]
    unbound = {a.key: a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}  # resources not yet bound
    plan = []
    for key in order:
        assets_def = unbound[key]
        pdef = assets_def.partitions_def
        single_run = assets_def.backfill_policy is not None and assets_def.backfill_policy.max_partitions_per_run is None
        plan.append((assets_def, pdef.get_partition_keys() if pdef else None, single_run))
    return plan


def run_selection(select: str = "*", verbose: bool = False) -> int:
    cfg = settings.load_project()
    root = settings.storage_root(cfg)
    defs = build_defs(cfg, root)
    instance = dg.DagsterInstance.get()
    # the models' settings as the data versions of model_config / site_config, before any step reads them
    record_config_versions(instance, cfg)
    resources = defs.resources
    plan = _plan(defs, select)
    run_config = {} if verbose else {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    n_runs = sum(1 if (keys is None or single) else len(keys) for _, keys, single in plan)
    print(f"config {settings.config_path()} -> storage {root}; instance {instance.root_directory}; {n_runs} runs", flush=True)
    t_start, step_seconds, i = time.perf_counter(), 0.0, 0
    for assets_def, keys, single_run in plan:
        name = assets_def.key.to_user_string()
        batches: list[tuple[str, dict]] = []
        if keys is None:
            batches = [("", {})]
        elif single_run:
            batches = [(f"{len(keys)} partitions", {"tags": {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}})]
        else:
            batches = [(k, {"partition_key": k}) for k in keys]
        for label, kwargs in batches:
            i += 1
            t0 = time.perf_counter()
            result = dg.materialize(
                [assets_def], instance=instance, resources=resources, run_config=run_config, raise_on_error=False, **kwargs
            )
            seconds = time.perf_counter() - t0
            step_seconds += _step_seconds(result)
            status = "ok" if result.success else "FAILED"
            print(f"[{i}/{n_runs}] {name} {label} {status} ({seconds:.1f} s)", flush=True)
            if not result.success:
                for event in result.all_events:
                    if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
                        err = event.step_failure_data.error
                        while err.cause is not None and err.cls_name.startswith("Dagster"):  # the user-code exception, not Dagster's wrappers
                            err = err.cause
                        print(err.to_string() if verbose else f"{err.cls_name}: {err.message.strip()}")
                print(f"stopped: {name} {label} failed; see run {result.run_id} in the UI (refusal-assets ui)")
                return 1
    wall = time.perf_counter() - t_start
    print(f"done: {i} runs in {wall:.1f} s; steps' compute {step_seconds:.1f} s; Dagster overhead {wall - step_seconds:.1f} s ({100 * (wall - step_seconds) / max(wall, 1e-9):.0f} %)")
    report = root / "report" / "report.html"
    print(f"report: {report}" if report.is_file() and any(a.key.to_user_string() == "report" for a, _, _ in plan) else f"outputs: {root}")
    return 0


def _step_seconds(result: dg.ExecuteInProcessResult) -> float:
    """Time spent inside asset steps (from the step events' durations)."""
    total = 0.0
    for event in result.all_events:
        if event.is_step_success and event.event_specific_data is not None:
            total += event.event_specific_data.duration_ms / 1000
    return total
