"""When assets rebuild on their own: new partitions once their inputs exist, and materialized
partitions whose config (code version) changed. Nothing else."""

from __future__ import annotations

import dagster as dg


def rebuild_condition() -> dg.AutomationCondition:
    # eager(): a partition whose parents updated, or a new partition whose parents all exist.
    # eager() alone ignores code-version changes; code_version_changed() alone would also request
    # never-built partitions, so it is restricted to partitions that exist and can run now.
    changed = (
        dg.AutomationCondition.code_version_changed().since_last_handled()
        & ~dg.AutomationCondition.missing()
        & ~dg.AutomationCondition.in_progress()
        & ~dg.AutomationCondition.any_deps_missing()
    )
    return dg.AutomationCondition.eager() | changed.with_label("config changed")


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    # Open-source Dagster starts the default automation sensor stopped; this one runs by default.
    return dg.AutomationConditionSensorDefinition(
        "refusal_assets_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
    )


def report_schedule(cron: str) -> dg.ScheduleDefinition:
    """Scheduled reruns (the seed users' cron): the report, and anything upstream that is stale.

    Staleness does not propagate over edges with 100+ upstream partitions, so the report is driven
    by a schedule rather than by automation alone.
    """
    job = dg.define_asset_job(
        "refresh_report",
        selection=dg.AssetSelection.assets("report") | dg.AssetSelection.assets("comparison"),
        description="Rebuild the comparison for every model and the report.",
    )
    return dg.ScheduleDefinition(name="refresh_report_schedule", job=job, cron_schedule=cron, default_status=dg.DefaultScheduleStatus.STOPPED)
