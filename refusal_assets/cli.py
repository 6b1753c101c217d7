"""``refusal-assets``: run the graph, serve the UI, launch backfills, validate configs, benchmark."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from refusal_assets import settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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
    home = settings.instance_home(Path(os.environ.get("DAGSTER_HOME", "dagster_home")).resolve(), cfg)
    home.mkdir(parents=True, exist_ok=True)
    (home / settings.INSTANCE_MARKER).write_text(settings.run_name(cfg) + "\n")
    if not (home / "dagster.yaml").exists() and (PROJECT_ROOT / "dagster_home" / "dagster.yaml").is_file():
        (home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster_home" / "dagster.yaml").read_text())
    os.environ["DAGSTER_HOME"] = str(home)
    _init_instance_once(home)


def _init_instance_once(home: Path) -> None:
    """Create the SQLite instance under a file lock: two first commands at once would otherwise race
    on Dagster's schema creation ("table already exists", or two migration heads)."""
    import fcntl

    with (home / ".init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        import dagster as dg

        dg.DagsterInstance.from_config(str(home)).dispose()


def cmd_validate(args: argparse.Namespace) -> int:
    _set_env(args)
    from refusal_assets.defs.build import discover_categories

    cfg = settings.load_project()
    cats = discover_categories(cfg)
    print(f"config {settings.config_path()}: OK")
    print(f"  data: {cfg.data.source} {cfg.data.path if cfg.data.source == 'local' else cfg.data.hub_dataset}; {len(cats)} categories: {', '.join(cats)}")
    for m in cfg.models:
        print(f"  model {m.model_key} ({m.id}, {m.source}): {len(m.sites)} sites: {', '.join(s.name for s in m.sites)}")
    print(f"  storage: {settings.storage_root(cfg)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _set_env(args)
    from refusal_assets.runner import run_selection

    return run_selection(args.select, verbose=args.verbose)


def cmd_ui(args: argparse.Namespace) -> int:
    _set_env(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving the UI on {args.host}: anyone who can reach it can launch runs", file=sys.stderr)
    cmd = [sys.executable, "-m", "dagster", "dev", "-m", "refusal_assets.definitions", "-h", args.host, "-p", str(args.port)]
    print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}\n{' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def cmd_backfill(args: argparse.Namespace) -> int:
    _set_env(args)
    from refusal_assets.backfill import launch_backfill

    partitions = [p for p in args.partitions.split(",") if p] if args.partitions else None
    backfill_id = launch_backfill(args.url, args.select, partitions)
    print(f"launched backfill {backfill_id}: {args.url}/overview/backfills/{backfill_id}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _set_env(args)
    if args.what == "activations":
        from refusal_assets.bench_activations import run_activation_bench

        result = run_activation_bench(n_prompts=args.n_prompts, log=lambda s: print(s, file=sys.stderr))
    else:
        from refusal_assets.bench_sae import run_sae_bench

        result = run_sae_bench()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_plot_sae(args: argparse.Namespace) -> int:
    from refusal_assets.sae import plot_history

    histories = sorted(Path(args.sae_dir).rglob("history.json"))
    if not histories:
        print(f"no history.json under {args.sae_dir}", file=sys.stderr)
        return 1
    for h in histories:
        out = plot_history(json.loads(h.read_text()), h.with_name("training.png"), h.parent.name)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refusal-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="project config YAML (default: configs/default.yaml or $REFUSAL_ASSETS_CONFIG)")
        p.add_argument("--data-dir", help="read prompts from this local folder in OR-Bench layout")
        p.add_argument("--storage", help="folder for asset files (default: storage/<config name>)")

    p = sub.add_parser("run", help="materialize the selection for every partition of the config")
    common(p)
    p.add_argument("--select", default="*", help="Dagster asset selection, e.g. 'orbench_prompts' or 'key:sae+' (default: everything)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Dagster's own event log on the console")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ui", help="Dagster webserver + daemon for this project")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("backfill", help="launch an asset backfill on the running instance (see `ui`)")
    common(p)
    p.add_argument("--select", required=True, help="comma-separated asset keys, e.g. activations,sae")
    p.add_argument("--partitions", help="comma-separated partition keys (default: all), e.g. 'privacy|tiny-qwen2' for circuit, "
                                        "'all|tiny-qwen2__resid1' (or just the site key) for sae")
    p.add_argument("--url", default="http://127.0.0.1:3000", help="webserver URL")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("validate", help="validate the config and list models, sites and categories")
    common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("bench", help="benchmarks; print one JSON object")
    common(p)
    p.add_argument("what", choices=["activations", "sae"])
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument("--n-prompts", type=int, default=32, help="N for the activations benchmark (RSS also at 4N)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plot-sae", help="regenerate SAE training plots from saved history.json files")
    p.add_argument("--sae-dir", default="storage", help="folder searched for history.json")
    p.set_defaults(func=cmd_plot_sae)

    args = parser.parse_args(argv)
    _quiet()
    from refusal_assets.config import ConfigError
    from refusal_assets.data import DataError
    from refusal_assets.backfill import BackfillError
    from refusal_assets.models import ModelLoadError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, BackfillError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
