"""``refusal-assets``: run the graph, serve the UI, launch backfills, validate configs, benchmark."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from refusal_assets.app import settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _set_env(args: argparse.Namespace) -> None:
    """Flags become environment variables so the code location, runs and daemon agree."""
    if getattr(args, "config", None):
        os.environ[settings.CONFIG_ENV] = str(Path(args.config).resolve())
    elif settings.CONFIG_ENV not in os.environ and not settings.DEFAULT_CONFIG.is_file():
        os.environ[settings.CONFIG_ENV] = str(PROJECT_ROOT / settings.DEFAULT_CONFIG)
    if getattr(args, "data_dir", None):
        os.environ[settings.DATA_DIR_ENV] = str(Path(args.data_dir).resolve())
    if getattr(args, "storage", None):
        os.environ[settings.STORAGE_ENV] = str(Path(args.storage).resolve())
    # one instance per config name under $DAGSTER_HOME (see settings.instance_home)
    cfg = settings.load_project()
    base = Path(os.environ.get("DAGSTER_HOME", "dagster_home")).resolve()
    home = settings.instance_home(base, cfg)
    home.mkdir(parents=True, exist_ok=True)
    (home / settings.INSTANCE_MARKER).write_text(settings.run_name(cfg) + "\n")
    # the config's instance takes the base instance's settings (e.g. PostgreSQL storage, pool limits)
    # when $DAGSTER_HOME has its own dagster.yaml, else the project's SQLite default
    template = (
        base / "dagster.yaml"
        if (base / "dagster.yaml").is_file()
        else PROJECT_ROOT / "dagster_home" / "dagster.yaml"
    )
    if (
        not (home / "dagster.yaml").exists()
        and template.is_file()
        and template != home / "dagster.yaml"
    ):
        (home / "dagster.yaml").write_text(template.read_text())
    os.environ["DAGSTER_HOME"] = str(home)
    _init_instance_once(home)


def _init_instance_once(home: Path) -> None:
    """Create the SQLite instance under a file lock: two first commands at once would otherwise race
    on Dagster's schema creation ("table already exists", or two migration heads)."""
    import fcntl

    with (home / ".init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        import dagster as dg

        from refusal_assets.defs.gpu import ensure_gpu_pool

        instance = dg.DagsterInstance.from_config(str(home))
        ensure_gpu_pool(
            instance
        )  # before any run claims it: Dagster's first claim races on PostgreSQL
        instance.dispose()


def cmd_calibrate(args: argparse.Namespace) -> int:
    _set_env(args)
    from refusal_assets.analysis.calibration import run_calibrate

    return run_calibrate(
        settings.load_project(),
        as_json=args.json,
        n_replicates=args.replicates,
        model_level=not args.synthetic_only,
    )


def cmd_validate(args: argparse.Namespace) -> int:
    _set_env(args)
    from refusal_assets.defs.build import discover_categories

    cfg = settings.load_project()
    cats = discover_categories(cfg)
    print(f"config {settings.config_path()}: OK")
    print(
        f"  data: {cfg.data.source} {cfg.data.path if cfg.data.source == 'local' else cfg.data.hub_dataset}; "
        f"{len(cats)} categories: {', '.join(cats)}"
    )
    for m in cfg.models:
        print(
            f"  model {m.model_key} ({m.id}, {m.source}): {len(m.sites)} sites: {', '.join(s.name for s in m.sites)}"
        )
    print(f"  storage: {settings.storage_root(cfg)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _set_env(args)
    from refusal_assets.app.runner import run_selection

    return run_selection(args.select, verbose=args.verbose, force=args.force, dry_run=args.dry_run)


def cmd_ui(args: argparse.Namespace) -> int:
    _set_env(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving the UI on {args.host}: anyone who can reach it can launch runs",
            file=sys.stderr,
        )
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-m",
        "refusal_assets.definitions",
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}\n{' '.join(cmd)}", flush=True)
    return run_process_tree(cmd)


# Seconds `dagster dev` gets to stop its webserver, daemon and code servers after SIGINT (its own
# clean shutdown), then seconds the group gets after SIGTERM before SIGKILL. Kept under 30 s in
# all so a supervisor that escalates to SIGKILL at 30 s (systemd, Kubernetes, the browser test)
# never kills this process first and orphans the tree.
GRACE_S = 20.0
TERM_GRACE_S = 5.0


def run_process_tree(
    cmd: list[str], grace_s: float = GRACE_S, term_grace_s: float = TERM_GRACE_S
) -> int:
    """Run ``cmd`` in its own process group and take the whole group down with this process.

    ``dagster dev`` starts a webserver, a daemon and code servers; a plain ``subprocess.call``
    dies on SIGTERM and leaves all of them running. Here SIGTERM, SIGINT and SIGHUP are caught
    and forwarded: SIGINT to the child first (``dagster dev`` shuts its services down cleanly on
    it), then SIGTERM and finally SIGKILL to the group for whatever is left. A second signal
    skips the grace period. Returns the child's exit code, or 128 + the signal number when a
    signal stopped it.
    """
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        received.append(signum)

    # Handlers before Popen: a signal in between is recorded, not lost. Python-level handlers are
    # reset to SIG_DFL in the child at exec, so the child sees SIGINT even where this process
    # started with SIGINT ignored (a background job of a non-interactive shell), which would
    # otherwise make `dagster dev` ignore SIGTERM as well (it maps SIGTERM onto SIGINT's handler).
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in forwarded}
    try:
        # A new session: the terminal's Ctrl-C reaches only this process, which forwards it once.
        proc = subprocess.Popen(cmd, start_new_session=True)
        while proc.poll() is None and not received:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        if not received:
            _stop_group(proc, term_grace_s, received)  # leftovers of a child that exited on its own
            return proc.returncode
        first = received[0]
        n_seen = len(received)
        name = signal.Signals(first).name
        print(
            f"refusal-assets: {name} received, stopping the UI's processes",
            file=sys.stderr,
            flush=True,
        )
        _signal_pid(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline and len(received) == n_seen:
            time.sleep(0.2)
        _stop_group(proc, term_grace_s, received)
        proc.wait()
        return 128 + first
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal (it changed user): still there
        return True


def _stop_group(proc: subprocess.Popen, term_grace_s: float, received: list[int]) -> None:
    """SIGTERM the child's process group, wait up to ``term_grace_s`` (less if another signal
    arrives), then SIGKILL whatever remains."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    proc.poll()  # reap the leader if it has exited: a zombie still counts as a group member
    if not _group_alive(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    n_seen = len(received)
    deadline = time.monotonic() + term_grace_s
    while proc.poll() is None or _group_alive(pgid):
        if time.monotonic() >= deadline or len(received) != n_seen:
            break
        time.sleep(0.1)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cmd_backfill(args: argparse.Namespace) -> int:
    _set_env(args)
    from refusal_assets.app.backfill import launch_backfill

    if args.missing:
        if args.partitions:
            raise SystemExit("backfill: --missing chooses the partitions itself; drop --partitions")
        backfill_id = _launch_missing_backfill(args.url, args.select or "*")
        if backfill_id is None:
            return 0
    else:
        if not args.select:
            raise SystemExit(
                "backfill: --select is required (or --missing, which defaults to everything)"
            )
        partitions = [p for p in args.partitions.split(",") if p] if args.partitions else None
        backfill_id = launch_backfill(args.url, args.select, partitions)
    print(f"launched backfill {backfill_id}: {args.url}/overview/backfills/{backfill_id}")
    return 0


def _launch_missing_backfill(url: str, select: str) -> str | None:
    """Plan as `run` does, on the instance the UI serves (the same $DAGSTER_HOME), and launch one
    backfill of the missing, stale or failed partitions; None when there is nothing to build."""
    import dagster as dg

    from refusal_assets.app.backfill import launch_partitions_backfill
    from refusal_assets.app.plan import contiguous_ranges, plan_build
    from refusal_assets.defs.build import build_defs
    from refusal_assets.defs.sources import record_config_versions

    cfg = settings.load_project()
    defs = build_defs(cfg, settings.storage_root(cfg))
    instance = dg.DagsterInstance.get()
    try:
        record_config_versions(
            instance, cfg
        )  # a config edit is seen before the daemon's sensor ticks
        plan = plan_build(defs, instance, select)
    finally:
        instance.dispose()
    print(plan.summary())
    if not plan.assets:
        print("nothing to backfill")
        return None
    ranges = {
        step.assets_def.key.to_user_string(): (
            None
            if step.partitions is None
            else contiguous_ranges(
                step.assets_def.partitions_def.get_partition_keys(), step.partitions
            )
        )
        for step in plan.assets
    }
    # Dagster refuses %, * and " in a backfill's title
    scope = "everything" if select == "*" else "".join(c for c in select if c not in '%*"')
    return launch_partitions_backfill(
        url, ranges, title=f"refusal-assets backfill --missing {scope}"
    )


def cmd_prune(args: argparse.Namespace) -> int:
    _set_env(args)
    import dagster as dg

    from refusal_assets.app import prune
    from refusal_assets.defs.build import build_defs

    cfg = settings.load_project()
    root = settings.storage_root(cfg)
    instance = dg.DagsterInstance.get()
    try:
        plan = prune.plan_prune(build_defs(cfg, root), root, instance)
    finally:
        instance.dispose()
    print(
        f"config {settings.config_path()} -> storage {root}; instance {os.environ['DAGSTER_HOME']}"
    )
    print("\n".join(prune.describe(plan, dry_run=args.dry_run)))
    if not args.dry_run:
        prune.delete(plan)
        print(f"deleted {len(plan.folders)} folders")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "sae" and args.learning_curve and not args.activations:
        raise SystemExit(
            "bench sae --learning-curve needs --activations storage/activations/<site_key>"
        )
    if args.extra_activations and not (args.what == "sae" and args.learning_curve):
        raise SystemExit("bench: --extra-activations goes with `bench sae --learning-curve`")
    if args.learning_curve and args.what != "sae":
        raise SystemExit(f"bench: --learning-curve is for `bench sae`, not `bench {args.what}`")
    _set_env(args)
    # stdout carries the JSON alone: what libraries print on import or at run time (sparsify announces
    # its Triton fallback there) goes to stderr with the progress lines
    with contextlib.redirect_stdout(sys.stderr):
        result = _bench_result(args)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _bench_result(args: argparse.Namespace) -> dict:
    def log(s: str) -> None:
        print(s, file=sys.stderr)

    if args.what == "activations":
        from refusal_assets.bench.activations import run_activation_bench

        return run_activation_bench(n_prompts=args.n_prompts or 32, log=log)
    if args.what == "features":
        from refusal_assets.bench.features import run_features_bench

        cfg = settings.load_project()  # the sites and SAEs of --config under --storage
        return run_features_bench(cfg, settings.storage_root(cfg), log=log)
    if args.what == "behaviour":
        from refusal_assets.bench.behaviour import run_behaviour_bench

        return run_behaviour_bench(n_prompts=args.n_prompts or 64, log=log)
    from refusal_assets.bench.sae import learning_curve, run_sae_bench, site_rows

    recipe = settings.load_project().sae  # ours trains as the config's `sae` asset does
    site = site_rows(Path(args.activations), recipe.max_norm_factor) if args.activations else None
    if args.learning_curve:
        more = (
            site_rows(Path(args.extra_activations), recipe.max_norm_factor)
            if args.extra_activations
            else None
        )
        extra = (more.rows, more.prompt_ids) if more is not None else None
        return learning_curve(
            site.rows, site.prompt_ids, extra=extra, steps=args.steps, recipe=recipe, log=log
        )
    return run_sae_bench(
        site.rows if site else None,
        site.groups if site else None,
        steps=args.steps,
        recipe=recipe,
        log=log,
    )


def cmd_plot_sae(args: argparse.Namespace) -> int:
    from refusal_assets.layout import Layout
    from refusal_assets.sae.training import plot_history

    histories = sorted(Path(args.sae_dir).rglob(Layout.SAE_HISTORY))
    if not histories:
        print(f"no {Layout.SAE_HISTORY} under {args.sae_dir}", file=sys.stderr)
        return 1
    for h in histories:
        out = plot_history(json.loads(h.read_text()), h.with_name(Layout.SAE_PLOT), h.parent.name)
        print(out)
    return 0


def _quiet() -> None:
    """Keep the console to our progress lines: Dagster's beta/preview notices and the HF progress
    bars say nothing a researcher can act on (the run logs in the UI keep everything)."""
    import warnings

    from dagster._utils.warnings import BetaWarning, PreviewWarning, SupersessionWarning

    for category in (BetaWarning, PreviewWarning, SupersessionWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="project config YAML (default: configs/default.yaml or $REFUSAL_ASSETS_CONFIG)",
    )
    p.add_argument("--data-dir", help="read prompts from this local folder in OR-Bench layout")
    p.add_argument("--storage", help="folder for asset files (default: storage/<config name>)")


def _add_run_and_instance_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="materialize the partitions of the selection that are missing, stale or failed last time",
    )
    _add_common(p)
    p.add_argument(
        "--select",
        default="*",
        help="Dagster asset selection, e.g. 'orbench_prompts' or 'key:sae+' (default: everything)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="say why each partition is rebuilt; show Dagster's event log",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild every partition of the selection, stale or not",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (what would be built, and why) and exit",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ui", help="Dagster webserver + daemon for this project")
    _add_common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser(
        "backfill", help="launch an asset backfill on the running instance (see `ui`)"
    )
    _add_common(p)
    p.add_argument(
        "--select",
        help="comma-separated asset keys, e.g. activations,sae (with --missing: a selection as `run` takes it, "
        "default everything)",
    )
    p.add_argument(
        "--missing",
        action="store_true",
        help="only the partitions that are missing, stale or failed (as `run` plans)",
    )
    p.add_argument(
        "--partitions",
        help="comma-separated partition keys (default: all), e.g. 'privacy|tiny-qwen2' for circuit, "
        "'all|tiny-qwen2__resid1' (or just the site key) for sae",
    )
    p.add_argument("--url", default="http://127.0.0.1:3000", help="webserver URL")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser(
        "prune",
        help="delete the files of partitions removed from the config (a category, a model); list them",
    )
    _add_common(p)
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted; delete nothing"
    )
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("validate", help="validate the config and list models, sites and categories")
    _add_common(p)
    p.set_defaults(func=cmd_validate)


def _add_check_and_bench_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks; print one JSON object")
    _add_common(p)
    p.add_argument("what", choices=["activations", "behaviour", "sae", "features"])
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument(
        "--n-prompts",
        type=int,
        default=None,
        help="prompts (activations: 32, RSS also at 4N; behaviour: 64)",
    )
    p.add_argument(
        "--activations",
        default=None,
        help="sae: a site's activations folder (storage/activations/<site_key>) to train on instead of synthetic rows",
    )
    p.add_argument(
        "--steps", type=int, default=300, help="sae: training steps for ours and sparsify"
    )
    p.add_argument(
        "--learning-curve",
        action="store_true",
        help="sae: held-out FVU of ours on 25 / 50 / 100 %% of the training prompts of --activations",
    )
    p.add_argument(
        "--extra-activations",
        default=None,
        help="sae --learning-curve: the same site's activations of another sample, added as a last point",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "calibrate",
        help="the tests behind both answers on planted monolithic, modular and two-level worlds at "
        "the real per-category counts: answers, power, false-answer rates, which tests vote",
    )
    _add_common(p)
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument(
        "--replicates", type=int, default=200, help="synthetic replicates per planted answer"
    )
    p.add_argument(
        "--synthetic-only", action="store_true", help="skip the planted tiny-model level"
    )
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "plot-sae", help="regenerate SAE training plots from saved history.json files"
    )
    p.add_argument("--sae-dir", default="storage", help="folder searched for history.json")
    p.set_defaults(func=cmd_plot_sae)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_and_instance_parsers(sub)
    _add_check_and_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet()
    from refusal_assets.app.backfill import BackfillError
    from refusal_assets.config import ConfigError
    from refusal_assets.lm.models import ModelLoadError
    from refusal_assets.prompts.orbench import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, BackfillError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
