"""``refusal-assets run``: materialize a selection, asset by asset in dependency order, the
partitions of the config that are missing, stale or failed (:mod:`refusal_assets.app.plan`), in
the instance at ``$DAGSTER_HOME`` (so the UI shows it afterwards). A killed or failed run resumes:
the next ``run`` builds what was not materialized.

Assets with a single-run backfill policy (activations) take their partitions in one run per
contiguous range, so one forward pass per (model, category) serves every site; the rest take one
run per partition, exactly what a backfill from the UI launches.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from refusal_assets import progress
from refusal_assets.app import settings
from refusal_assets.app.plan import (
    RUNNER_TAG,
    AssetPlan,
    BuildPlan,
    contiguous_ranges,
    fail_orphaned_runs,
    plan_build,
    runner_tag_value,
)
from refusal_assets.defs.build import build_defs
from refusal_assets.defs.sources import record_config_versions
from refusal_assets.layout import Layout


class _RunBar:
    """The runner's live line in a terminal: runs done of all, the running step and its time so
    far (refreshed every second by a thread, since a step may report nothing for minutes). The
    step's own loops (generation, activation collection) draw their bars under it. Result lines
    are written through tqdm so they scroll above the bars instead of tearing them."""

    def __init__(self, n_runs: int):
        from tqdm import tqdm

        self._tqdm = tqdm
        stream = progress.bar_stream()
        self.bar = tqdm(
            total=n_runs,
            unit=" runs",
            position=0,
            file=stream,
            bar_format="{n_fmt}/{total_fmt} runs |{bar:20}| {elapsed}{postfix}",
            **progress.bar_width_kwargs(stream),
        )
        self._step = ""
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._tick, name="refusal-assets-run-bar", daemon=True
        )
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._show()

    def _show(self) -> None:
        if self._step:
            self.bar.set_postfix_str(f"{self._step} ({time.perf_counter() - self._t0:.0f} s)")

    def start_step(self, label: str) -> None:
        self._step, self._t0 = label, time.perf_counter()
        self._show()

    def end_step(self, line: str) -> None:
        self._step = ""
        self._tqdm.write(line, file=sys.stdout)
        self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.bar.close()


def _console_bar_wanted() -> bool:
    """A live bar when someone watches: stderr is a terminal, unless $REFUSAL_ASSETS_PROGRESS_BAR
    says otherwise (1 forces it, 0 turns it off)."""
    if progress.BAR_ENV in os.environ:
        return progress.bars_enabled()
    return sys.stderr.isatty()


def _batches(step: AssetPlan) -> list[tuple[str, dict]]:
    """The runs of one asset's share of the plan: one per partition, or (single-run backfill
    policy) one per contiguous range of the partitions to build."""
    if step.partitions is None:
        return [("", {})]
    if not step.single_run:
        return [(k, {"partition_key": k}) for k in step.partitions]
    all_keys = step.assets_def.partitions_def.get_partition_keys()
    batches = []
    for first, last in contiguous_ranges(all_keys, step.partitions):
        if first == last:
            batches.append((first, {"partition_key": first}))
            continue
        n = all_keys.index(last) - all_keys.index(first) + 1
        tags = {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}
        batches.append((f"{n} partitions", {"tags": tags}))
    return batches


def _print_plan(build_plan: BuildPlan, verbose: bool) -> None:
    print(build_plan.summary(), flush=True)
    if verbose:
        for d in build_plan.decisions:
            if d.reason is not None:
                print(f"  build {d.label}: {d.reason}", flush=True)


def run_selection(
    select: str = "*", verbose: bool = False, force: bool = False, dry_run: bool = False
) -> int:
    """Materialize what the plan (:func:`plan.plan_build`) says is missing, stale or failed, in
    graph order; ``force`` rebuilds the whole selection; ``dry_run`` prints the plan only."""
    t_start = time.perf_counter()
    cfg = settings.load_project()
    root = settings.storage_root(cfg)
    defs = build_defs(cfg, root)
    instance = dg.DagsterInstance.get()
    orphaned = fail_orphaned_runs(
        instance
    )  # runs a killed `run` left started: their partitions failed
    # the models' settings as the data versions of model_config / site_config, before planning, so
    # that a config edit is seen by the stale status
    record_config_versions(instance, cfg)
    build_plan = plan_build(defs, instance, select, force=force)
    plan_seconds = time.perf_counter() - t_start
    steps = build_plan.assets
    n_runs = sum(len(_batches(s)) for s in steps)
    print(
        f"config {settings.config_path()} -> storage {root}; instance {instance.root_directory}; {n_runs} runs",
        flush=True,
    )
    if orphaned:
        print(
            f"marked {len(orphaned)} run(s) of a killed `refusal-assets run` as failed: {', '.join(orphaned)}"
        )
    _print_plan(build_plan, verbose)
    print(f"planned in {plan_seconds:.1f} s", flush=True)
    if dry_run:
        return 0
    resources = defs.resources
    checks_of = _checks_of(defs)
    run_config = {} if verbose else {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    run_bar: _RunBar | None = None
    bar_env_before = os.environ.get(progress.BAR_ENV)
    if _console_bar_wanted() and n_runs:
        os.environ[progress.BAR_ENV] = (
            "1"  # the steps' loops run in this process: they draw theirs too
        )
        run_bar = _RunBar(n_runs)

    def say(line: str) -> None:
        if run_bar is not None:
            run_bar.end_step(line)
        else:
            print(line, flush=True)

    step_seconds, i = 0.0, 0
    tags = {RUNNER_TAG: runner_tag_value()}
    try:
        for step in steps:
            name = step.assets_def.key.to_user_string()
            for label, kwargs in _batches(step):
                i += 1
                if run_bar is not None:
                    run_bar.start_step(f"[{i}/{n_runs}] {name} {label}".rstrip())
                t0 = time.perf_counter()
                kwargs = {**kwargs, "tags": {**tags, **kwargs.get("tags", {})}}
                result = dg.materialize(
                    [step.assets_def, *checks_of.get(step.assets_def.key, [])],
                    instance=instance,
                    resources=resources,
                    run_config=run_config,
                    raise_on_error=False,
                    **kwargs,
                )
                seconds = time.perf_counter() - t0
                step_seconds += _step_seconds(result)
                status = "ok" if result.success else "FAILED"
                say(f"[{i}/{n_runs}] {name} {label} {status} ({seconds:.1f} s)")
                if not result.success:
                    if run_bar is not None:
                        run_bar.close()
                        run_bar = None
                    _print_failure(result, verbose)
                    print(
                        f"stopped: {name} {label} failed; see run {result.run_id} in the UI (refusal-assets ui); "
                        "the next `refusal-assets run` resumes from it"
                    )
                    return 1
    finally:
        if run_bar is not None:
            run_bar.close()
        if bar_env_before is None:
            os.environ.pop(progress.BAR_ENV, None)
        else:
            os.environ[progress.BAR_ENV] = bar_env_before
    _print_done(i, time.perf_counter() - t_start, step_seconds, root, build_plan)
    return 0


def _checks_of(defs: dg.Definitions) -> dict[dg.AssetKey, list]:
    """The asset checks of each asset key."""
    # the WARN checks of weak results (defs/checks.py) run in the same run as the asset they check
    checks_of: dict[dg.AssetKey, list] = {}
    for c in defs.asset_checks or []:
        for key in {k.asset_key for k in c.check_keys}:
            checks_of.setdefault(key, []).append(c)
    return checks_of


def _print_done(i: int, wall: float, step_seconds: float, root, build_plan) -> None:
    """The closing summary: runs, time split, and where the report or outputs are."""
    print(
        f"done: {i} runs in {wall:.1f} s; steps' compute {step_seconds:.1f} s; "
        f"Dagster overhead {wall - step_seconds:.1f} s ({100 * (wall - step_seconds) / max(wall, 1e-9):.0f} %)"
    )
    report = Layout(root).report_html()
    print(
        f"report: {report}"
        if report.is_file()
        and any(d.key.to_user_string() == "report" for d in build_plan.decisions)
        else f"outputs: {root}"
    )


def _print_failure(result: dg.ExecuteInProcessResult, verbose: bool) -> None:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            # the user-code exception, not Dagster's wrappers
            while err.cause is not None and err.cls_name.startswith("Dagster"):
                err = err.cause
            print(err.to_string() if verbose else f"{err.cls_name}: {err.message.strip()}")


def _step_seconds(result: dg.ExecuteInProcessResult) -> float:
    """Time spent inside asset steps (from the step events' durations)."""
    total = 0.0
    for event in result.all_events:
        if event.is_step_success and event.event_specific_data is not None:
            total += event.event_specific_data.duration_ms / 1000
    return total
