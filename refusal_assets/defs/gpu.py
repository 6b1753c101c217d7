"""How GPU steps are declared: the ``gpu`` pool (concurrency limit in dagster.yaml) and the
Kubernetes executor's per-step pod request."""

from __future__ import annotations

GPU_POOL = "gpu"


def gpu_op_tags(
    gpus: int | None = None,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict] | None = None,
) -> dict:
    """``dagster-k8s/config`` tags: the ``k8s_job_executor`` gives each tagged step its own pod
    with a GPU; ignored by the in-process and multiprocess executors. Arguments left out come from
    ``gpu_step`` of the Kubernetes settings (``dagster_home/k8s/executor.yaml``) when that file
    exists, so the GPU node pool is chosen in one place."""
    if gpus is None or node_selector is None or tolerations is None:
        from refusal_assets.defs.executor import k8s_config_path, load_k8s_settings

        placement = load_k8s_settings().gpu if k8s_config_path().is_file() else None
        if placement is not None:
            gpus = placement.gpus if gpus is None else gpus
            node_selector = placement.node_selector if node_selector is None else node_selector
            tolerations = placement.tolerations if tolerations is None else tolerations
    gpus = 1 if gpus is None else gpus
    pod_spec: dict = {}
    if node_selector:
        pod_spec["node_selector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "dagster-k8s/config": {
            "container_config": {
                "resources": {
                    "limits": {"nvidia.com/gpu": str(gpus)},
                    "requests": {"nvidia.com/gpu": str(gpus)},
                }
            },
            **({"pod_spec_config": pod_spec} if pod_spec else {}),
        }
    }


def ensure_gpu_pool(instance) -> bool:
    """Give the ``gpu`` pool its row (the instance's ``default_limit``) before any step claims it.

    Dagster 1.13 creates that row on the first claim. On PostgreSQL, two runs making that first
    claim at the same moment (two processes, or two step pods) collide on the unique key, the
    loser's transaction is aborted, and its run fails ("current transaction is aborted"); SQLite
    lets the same code carry on. Called once per instance by every ``refusal-assets`` command
    (under its init lock); tolerant of another process doing the same at once. Returns whether
    the pool now exists (False when the instance has no pool limits at all).
    """
    import time

    from sqlalchemy.exc import DBAPIError

    storage = instance.event_log_storage
    if (
        not storage.supports_global_concurrency_limits
        or instance.global_op_concurrency_default_limit is None
    ):
        return False
    for attempt in range(5):
        if any(p.name == GPU_POOL for p in storage.get_pool_limits()):
            return True
        try:
            storage.initialize_concurrency_limit_to_default(GPU_POOL)
        except DBAPIError:  # the same collision, with another initialiser: look again
            time.sleep(0.1 * (attempt + 1))
    return any(p.name == GPU_POOL for p in storage.get_pool_limits())
