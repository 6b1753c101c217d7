"""How GPU steps are declared: the ``gpu`` pool (concurrency limit in dagster.yaml) and the
Kubernetes executor's per-step pod request."""

from __future__ import annotations

GPU_POOL = "gpu"


def gpu_op_tags(gpus: int = 1, node_selector: dict[str, str] | None = None, tolerations: list[dict] | None = None) -> dict:
    """``dagster-k8s/config`` tags: the ``k8s_job_executor`` gives each tagged step its own pod
    with a GPU; ignored by the in-process and multiprocess executors."""
    pod_spec: dict = {}
    if node_selector:
        pod_spec["node_selector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "dagster-k8s/config": {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}},
            **({"pod_spec_config": pod_spec} if pod_spec else {}),
        }
    }
