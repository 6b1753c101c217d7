"""Which Dagster executor runs the steps of a run.

``$REFUSAL_ASSETS_EXECUTOR`` chooses (read when the definitions load, so set it where the code
location runs: the user-code deployment on Kubernetes):

- unset or ``default``: Dagster's default (multiprocess for launched runs; ``refusal-assets run``
  materializes in-process either way);
- ``in_process`` / ``multiprocess``: Dagster's executors of those names;
- ``k8s``: ``dagster_k8s.k8s_job_executor``, one Kubernetes Job per step, configured from
  ``dagster_home/k8s/executor.yaml`` (or ``$REFUSAL_ASSETS_K8S_CONFIG``): the shared volume, the
  PostgreSQL secret, and the placement of GPU steps (see :mod:`refusal_assets.defs.gpu`).

dagster-k8s is an optional extra (``pip install -e '.[k8s]'``): it is imported only when chosen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

EXECUTOR_ENV = "REFUSAL_ASSETS_EXECUTOR"
K8S_CONFIG_ENV = "REFUSAL_ASSETS_K8S_CONFIG"
DEFAULT_K8S_CONFIG = Path(__file__).resolve().parents[2] / "dagster_home" / "k8s" / "executor.yaml"
CHOICES = ("default", "in_process", "multiprocess", "k8s")


class ExecutorConfigError(ValueError):
    """A bad executor switch or Kubernetes settings file (the message names the file/key/value)."""


@dataclass(frozen=True)
class GpuPlacement:
    """What every GPU step's pod asks for: ``gpus`` of ``nvidia.com/gpu``, on nodes matching
    ``node_selector``, tolerating ``tolerations`` (the taints GPU node pools usually carry)."""

    gpus: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class K8sSettings:
    """``executor.yaml``: ``executor`` is the run config of ``k8s_job_executor``, verbatim;
    ``gpu_step`` the placement of GPU steps."""

    path: Path
    executor: dict[str, Any]
    gpu: GpuPlacement


def k8s_config_path() -> Path:
    return Path(os.environ.get(K8S_CONFIG_ENV) or DEFAULT_K8S_CONFIG).expanduser()


def load_k8s_settings(path: Path | None = None) -> K8sSettings:
    path = Path(path) if path is not None else k8s_config_path()
    if not path.is_file():
        raise ExecutorConfigError(
            f"Kubernetes settings {path} not found (set ${K8S_CONFIG_ENV} or restore dagster_home/k8s/executor.yaml)"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExecutorConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict) or set(raw) - {"executor", "gpu_step"}:
        raise ExecutorConfigError(
            f"{path}: expected the keys 'executor' and 'gpu_step', "
            f"found {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}"
        )
    executor = raw.get("executor") or {}
    gpu = raw.get("gpu_step") or {}
    if not isinstance(executor, dict):
        raise ExecutorConfigError(
            f"{path}: 'executor' must be a mapping (k8s_job_executor's config), got {executor!r}"
        )
    if not isinstance(gpu, dict) or set(gpu) - {"gpus", "node_selector", "tolerations"}:
        raise ExecutorConfigError(
            f"{path}: 'gpu_step' takes gpus, node_selector, tolerations; got {gpu!r}"
        )
    gpus = gpu.get("gpus", 1)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ExecutorConfigError(f"{path}: gpu_step.gpus must be an integer >= 1, got {gpus!r}")
    node_selector = gpu.get("node_selector") or {}
    tolerations = gpu.get("tolerations") or []
    if not isinstance(node_selector, dict) or not all(
        isinstance(v, str) for v in node_selector.values()
    ):
        raise ExecutorConfigError(
            f"{path}: gpu_step.node_selector must map label names to strings, got {node_selector!r}"
        )
    if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
        raise ExecutorConfigError(
            f"{path}: gpu_step.tolerations must be a list of mappings, got {tolerations!r}"
        )
    return K8sSettings(
        path=path, executor=executor, gpu=GpuPlacement(gpus, dict(node_selector), list(tolerations))
    )


def executor_choice() -> str:
    choice = (os.environ.get(EXECUTOR_ENV) or "default").strip().lower()
    if choice not in CHOICES:
        raise ExecutorConfigError(
            f"${EXECUTOR_ENV}={os.environ.get(EXECUTOR_ENV)!r}: expected one of {', '.join(CHOICES)}"
        )
    return choice


def select_executor(cfg: object | None = None) -> dg.ExecutorDefinition | None:
    """The executor for ``dg.Definitions(executor=...)``; None = Dagster's default. ``cfg`` (the
    project config) is accepted so that a config-file switch can join the environment one."""
    choice = executor_choice()
    if choice == "default":
        return None
    if choice == "in_process":
        return dg.in_process_executor
    if choice == "multiprocess":
        return dg.multiprocess_executor
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise ExecutorConfigError(
            f"${EXECUTOR_ENV}=k8s needs dagster-k8s: pip install -e '.[k8s]'"
        ) from None
    settings = load_k8s_settings()
    from dagster._config import process_config

    # .configured() checks the config only when a run starts: check now, naming the file
    checked = process_config(k8s_job_executor.config_schema.config_type, settings.executor)
    if not checked.success:
        problems = "; ".join(e.message for e in checked.errors)
        raise ExecutorConfigError(
            f"{settings.path}: 'executor' is not valid k8s_job_executor config: {problems}"
        )
    return k8s_job_executor.configured(settings.executor, name="k8s")
