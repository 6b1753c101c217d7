"""``refusal-assets run``: materialize a selection, asset by asset in dependency order, every
partition of the config, in the instance at ``$DAGSTER_HOME`` (so the UI shows it afterwards).

Assets with a single-run backfill policy (activations) take all their partitions in one run, so
one forward pass per (model, category) serves every site; the rest take one run per partition,
exactly what a backfill from the UI launches.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from refusal_assets import progress
from refusal_assets.app import settings
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
        self._thread = threading.Thread(target=self._tick, name="refusal-assets-run-bar", daemon=True)
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
            raise SystemExit(
                f"error: invalid --select {select!r} ({e}); e.g. 'orbench_prompts', 'key:sae+', 'comparison,report'"
            )
    known = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
    try:
        keys = selection.resolve(graph)
    except Exception as e:
        raise SystemExit(
            f"error: --select {select!r} names no known asset ({type(e).__name__}); known: {known}"
        ) from None
    if not keys:
        raise SystemExit(
            f"error: the selection {select!r} matches no asset; "
            f"known: {sorted(k.to_user_string() for k in graph.get_all_asset_keys())}"
        )
    order = [
        k
        for level in graph.toposorted_asset_keys_by_level
        for k in sorted(level)
        if k in keys and k in graph.materializable_asset_keys
    ]
    unbound = {a.key: a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}  # resources not yet bound
    plan = []
    for key in order:
        assets_def = unbound[key]
        pdef = assets_def.partitions_def
        single_run = (
            assets_def.backfill_policy is not None and assets_def.backfill_policy.max_partitions_per_run is None
        )
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
    # the WARN checks of weak results (defs/checks.py) run in the same run as the asset they check
    checks_of: dict[dg.AssetKey, list] = {}
    for c in defs.asset_checks or []:
        for key in {k.asset_key for k in c.check_keys}:
            checks_of.setdefault(key, []).append(c)
    run_config = {} if verbose else {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    n_runs = sum(1 if (keys is None or single) else len(keys) for _, keys, single in plan)
    print(
        f"config {settings.config_path()} -> storage {root}; instance {instance.root_directory}; {n_runs} runs",
        flush=True,
    )
    run_bar: _RunBar | None = None
    bar_env_before = os.environ.get(progress.BAR_ENV)
    if _console_bar_wanted():
        os.environ[progress.BAR_ENV] = "1"  # the steps' loops run in this process: they draw theirs too
        run_bar = _RunBar(n_runs)

    def say(line: str) -> None:
        if run_bar is not None:
            run_bar.end_step(line)
        else:
            print(line, flush=True)

    t_start, step_seconds, i = time.perf_counter(), 0.0, 0
    try:
        for assets_def, keys, single_run in plan:
            name = assets_def.key.to_user_string()
            batches: list[tuple[str, dict]] = []
            if keys is None:
                batches = [("", {})]
            elif single_run:
                batches = [
                    (
                        f"{len(keys)} partitions",
                        {"tags": {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}},
                    )
                ]
            else:
                batches = [(k, {"partition_key": k}) for k in keys]
            for label, kwargs in batches:
                i += 1
                if run_bar is not None:
                    run_bar.start_step(f"[{i}/{n_runs}] {name} {label}".rstrip())
                t0 = time.perf_counter()
                result = dg.materialize(
                    [assets_def, *checks_of.get(assets_def.key, [])],
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
                    for event in result.all_events:
                        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
                            err = event.step_failure_data.error
                            while err.cause is not None and err.cls_name.startswith(
                                "Dagster"
                            ):  # the user-code exception, not Dagster's wrappers
                                err = err.cause
                            print(err.to_string() if verbose else f"{err.cls_name}: {err.message.strip()}")
                    print(f"stopped: {name} {label} failed; see run {result.run_id} in the UI (refusal-assets ui)")
                    return 1
    finally:
        if run_bar is not None:
            run_bar.close()
        if bar_env_before is None:
            os.environ.pop(progress.BAR_ENV, None)
        else:
            os.environ[progress.BAR_ENV] = bar_env_before
    wall = time.perf_counter() - t_start
    print(
        f"done: {i} runs in {wall:.1f} s; steps' compute {step_seconds:.1f} s; "
        f"Dagster overhead {wall - step_seconds:.1f} s ({100 * (wall - step_seconds) / max(wall, 1e-9):.0f} %)"
    )
    report = Layout(root).report_html()
    print(
        f"report: {report}"
        if report.is_file() and any(a.key.to_user_string() == "report" for a, _, _ in plan)
        else f"outputs: {root}"
    )
    return 0


def _step_seconds(result: dg.ExecuteInProcessResult) -> float:
    """Time spent inside asset steps (from the step events' durations)."""
    total = 0.0
    for event in result.all_events:
        if event.is_step_success and event.event_specific_data is not None:
            total += event.event_specific_data.duration_ms / 1000
    return total
