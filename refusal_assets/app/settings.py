"""Where the project config, data and storage come from: flags of the CLI become environment
variables so that the Dagster code location, its runs and the daemon all see the same choice."""

from __future__ import annotations

import os
from pathlib import Path

from refusal_assets.config import ProjectConfig, load_config

CONFIG_ENV = "REFUSAL_ASSETS_CONFIG"
DATA_DIR_ENV = "REFUSAL_ASSETS_DATA_DIR"
STORAGE_ENV = "REFUSAL_ASSETS_STORAGE"
DEFAULT_CONFIG = Path("configs/default.yaml")


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)).expanduser()


def load_project() -> ProjectConfig:
    """The project config named by ``$REFUSAL_ASSETS_CONFIG``, with ``$REFUSAL_ASSETS_DATA_DIR``
    (a local OR-Bench-layout folder) applied on top. Another folder is another dataset: its SAEs
    train on every category it has (a config's pinned ``sae.train_categories`` name the categories
    of the config's own data)."""
    overrides = {}
    if data_dir := os.environ.get(DATA_DIR_ENV):
        overrides = {
            "data.source": "local",
            "data.path": str(Path(data_dir).expanduser().resolve()),
            "sae.train_categories": None,
        }
    return load_config(config_path(), overrides)


def run_name(cfg: ProjectConfig) -> str:
    """``<config name>``, or ``<config name>--<data folder name>`` with ``--data-dir``: names the
    storage folder and the Dagster instance, so another dataset never mixes with the config's own."""
    if data_dir := os.environ.get(DATA_DIR_ENV):
        from refusal_assets.storage import safe_part

        return f"{cfg.name}--{safe_part(Path(data_dir).resolve().name, 'data folder name')}"
    return cfg.name


def storage_root(cfg: ProjectConfig) -> Path:
    """``$REFUSAL_ASSETS_STORAGE``, else ``storage/<config name>`` in the project root
    (``storage/<config name>--<data folder name>`` with ``--data-dir``, so another dataset never
    overwrites the config's own outputs)."""
    if env := os.environ.get(STORAGE_ENV):
        return Path(env).expanduser().resolve()
    return cfg.root / "storage" / run_name(cfg)


INSTANCE_MARKER = ".refusal_assets_config"


def instance_home(base: Path, cfg: ProjectConfig) -> Path:
    """The Dagster instance of one config: ``<base>/<config name>/`` (``<base>/<config
    name>--<data folder>/`` with ``--data-dir``, as :func:`run_name`), where ``base`` is
    ``$DAGSTER_HOME`` (default ``./dagster_home``).

    An instance per config name, not a key prefix per config: the asset keys stay the fixed
    interface other tools read (``sae``, ``circuit`` ...), and two configs that share category or
    site keys (tiny and default share four categories) never see each other's materializations,
    so switching configs never marks the other's partitions as changed. A ``base`` that already is
    this config's instance (marked by the CLI, e.g. a ``dagster dev`` child) is used as it is.
    """
    name = run_name(cfg)
    marker = base / INSTANCE_MARKER
    if marker.is_file() and marker.read_text().strip() == name:
        return base
    return base / name
