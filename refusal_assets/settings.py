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
    (a local OR-Bench-layout folder) applied on top."""
    overrides = {}
    if data_dir := os.environ.get(DATA_DIR_ENV):
        overrides = {"data.source": "local", "data.path": str(Path(data_dir).expanduser().resolve())}
    return load_config(config_path(), overrides)


def storage_root(cfg: ProjectConfig) -> Path:
    """``$REFUSAL_ASSETS_STORAGE``, else ``storage/<config name>`` in the project root
    (``storage/<config name>--<data folder name>`` with ``--data-dir``, so another dataset never
    overwrites the config's own outputs)."""
    if env := os.environ.get(STORAGE_ENV):
        return Path(env).expanduser().resolve()
    if data_dir := os.environ.get(DATA_DIR_ENV):
        from refusal_assets.storage import safe_part

        return cfg.root / "storage" / f"{cfg.name}--{safe_part(Path(data_dir).resolve().name, 'data folder name')}"
    return cfg.root / "storage" / cfg.name


INSTANCE_MARKER = ".refusal_assets_config"


def instance_home(base: Path, cfg: ProjectConfig) -> Path:
    """The Dagster instance of one config: ``<base>/<config name>/``, where ``base`` is
    ``$DAGSTER_HOME`` (default ``./dagster_home``).

    An instance per config name, not a key prefix per config: the asset keys stay the fixed
    interface other tools read (``sae``, ``circuit`` ...), and two configs that share category or
    site keys (tiny and default share four categories) never see each other's materializations,
    so switching configs never marks the other's partitions as changed. A ``base`` that already is
    this config's instance (marked by the CLI, e.g. a ``dagster dev`` child) is used as it is.
    """
    marker = base / INSTANCE_MARKER
    if marker.is_file() and marker.read_text().strip() == cfg.name:
        return base
    return base / cfg.name
