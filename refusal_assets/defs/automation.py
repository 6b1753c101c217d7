"""When assets rebuild on their own: new partitions once their inputs exist, materialized
partitions whose config (code version) or inputs (a model's settings, an upstream partition)
changed, never on a failed blocking check. Nothing else."""

from __future__ import annotations

import os

import dagster as dg
from dagster._check import CheckError

AC = dg.AutomationCondition
SENSOR_INTERVAL_ENV = "REFUSAL_ASSETS_SENSOR_INTERVAL"


def sensor_interval_seconds() -> int:
    """How often the automation and config sensors evaluate: 30 s, or
    ``$REFUSAL_ASSETS_SENSOR_INTERVAL`` (the daemon's end-to-end test shortens it; the daemon
    itself loops every 5 s)."""
    return int(os.environ.get(SENSOR_INTERVAL_ENV) or 30)


def blocked_by_failed_check() -> dg.AutomationCondition:
    """Some parent partition's latest blocking check failed.

    Blocking checks stop downstream steps only inside one run; automation builds ``sae`` and
    ``circuit`` in separate runs, so the gate has to be in the condition. (``all_deps_blocking_checks_passed``
    does not gate in 1.13; this form does, with partitioned check specs.)
    """
    return AC.any_deps_match(AC.any_checks_match(AC.check_failed(), blocking_only=True)).with_label(
        "a parent's blocking check failed"
    )


def upstream_settling() -> dg.AutomationCondition:
    """A grandparent partition just updated or is requested now. ``circuit`` reads
    ``refusal_behaviour`` (one hop from the model's settings) and ``sae`` (two hops): without
    this hold, a model edit builds each circuit twice, once per path."""
    return AC.any_deps_match(
        AC.any_deps_match(AC.newly_updated() | AC.will_be_requested())
    ).with_label("upstream still updating")


def parent_rebuilding() -> dg.AutomationCondition:
    """A parent partition's config changed and it was not requested since, or it is in progress.

    ``will_be_requested`` would not do: it is true only for a parent that can run in the same run,
    never across partitionings (comparison per model, its parent refusal_direction per model x
    scope), and such a parent runs in a run of its own, side by side with the child's."""
    return AC.any_deps_match(
        AC.code_version_changed().since_last_handled() | AC.in_progress()
    ).with_label("a parent is rebuilding")


def rebuild_condition(
    hold_while_upstream_settles: bool = False, ignore: tuple[str, ...] = ()
) -> dg.AutomationCondition:
    """``ignore``: parents whose updates alone do not trigger a rebuild (see ``build.REBUILD_OPTIONS``)."""
    # eager(): a partition whose parents updated, or a new partition whose parents all exist.
    # eager() alone ignores code-version changes; code_version_changed() alone would also request
    # never-built partitions, so it is restricted to partitions that exist and can run now. It
    # waits while a parent rebuilds (a section both hash, e.g. directions for refusal_direction and
    # comparison): it reads the parent's new output; since_last_handled() keeps it true till then.
    changed = (
        AC.code_version_changed().since_last_handled()
        & ~AC.missing()
        & ~AC.in_progress()
        & ~AC.any_deps_missing()
        & ~parent_rebuilding()
    )
    eager = AC.eager().ignore(dg.AssetSelection.assets(*ignore)) if ignore else AC.eager()
    condition = eager | changed.with_label("config changed")
    label = "rebuild"
    if ignore:
        label += f" (not on updates of {', '.join(ignore)} alone)"
    if hold_while_upstream_settles:
        condition, label = condition & ~upstream_settling(), label + " once upstream settles"
    return (condition & ~blocked_by_failed_check()).with_label(label + ", unless blocked")


def root_condition(build_missing: bool) -> dg.AutomationCondition:
    """A root asset's condition: the rebuild condition, plus (``automation.build_missing_roots``)
    building never-materialized partitions, which makes a fresh instance build itself."""
    if not build_missing:
        return rebuild_condition()
    missing = (AC.missing() & ~AC.in_progress() & ~AC.execution_failed()).with_label("missing root")
    return (rebuild_condition() | missing).with_label("rebuild, or build when missing")


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    # Open-source Dagster starts the default automation sensor stopped; this one runs by default.
    # Sources are in the target so the observations of model_config / site_config are evaluated.
    return dg.AutomationConditionSensorDefinition(
        "refusal_assets_automation",
        target=dg.AssetSelection.all(include_sources=True),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=sensor_interval_seconds(),
    )


def tick_label(context: dg.ScheduleEvaluationContext) -> str:
    """The tick's scheduled time, or "manual" when the context has none: a context built by hand
    (``dg.build_schedule_context()`` in a script or a notebook) has no time, and Dagster raises a
    CheckError on reading ``scheduled_execution_time`` there instead of returning None."""
    try:
        return context.scheduled_execution_time.isoformat()
    except CheckError:
        return "manual"


def comparison_schedule(
    cron: str, model_partitions: dg.PartitionsDefinition
) -> dg.ScheduleDefinition:
    """Scheduled reruns (the seed users' cron): one ``comparison`` run per model partition (a job
    over a partitioned asset needs a partition key per run), then the report follows by automation
    once its comparisons are new."""
    job = dg.define_asset_job(
        "refresh_comparison",
        selection=dg.AssetSelection.assets("comparison"),
        partitions_def=model_partitions,
        description="Rebuild one model's comparison; the report follows (automation).",
    )

    @dg.schedule(
        name="refresh_report_schedule",
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Rerun every model's comparison on the config's report.schedule cron; "
        "the report is rebuilt after them.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext):
        tick = tick_label(context)
        for model in model_partitions.get_partition_keys():
            yield dg.RunRequest(run_key=f"{model}-{tick}", partition_key=model)

    return _schedule
