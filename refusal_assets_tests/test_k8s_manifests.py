"""The Kubernetes deployment, checked with dagster-k8s's own code: ``$REFUSAL_ASSETS_EXECUTOR=k8s``
puts ``k8s_job_executor`` (configured from ``dagster_home/k8s/executor.yaml``) on the definitions;
its step handler, built against a ``K8sRunLauncher`` configured from ``dagster_home/k8s/dagster.yaml``,
merges the launcher's, the executor's and the op tags' container contexts exactly as it does before
launching a step, and ``construct_dagster_k8s_job`` turns that into the Job manifest that would be
sent to the cluster. No cluster is contacted (a kubeconfig pointing nowhere is loaded)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip(
    "dagster_k8s", reason="dagster-k8s is the optional 'k8s' extra: pip install -e '.[k8s]'"
)

import dagster as dg
from dagster._config import process_config
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.executor.init import InitExecutorContext
from dagster_k8s import k8s_job_executor
from dagster_k8s.job import construct_dagster_k8s_job
from kubernetes.client import ApiClient

from refusal_assets.defs.executor import (
    ExecutorConfigError,
    load_k8s_settings,
    select_executor,
)
from refusal_assets_tests.conftest import ROOT

K8S = ROOT / "dagster_home" / "k8s"
SECRET = "dagster-postgresql-secret"
FAKE_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


@pytest.fixture
def k8s_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_ASSETS_EXECUTOR", "k8s")
    monkeypatch.setenv("REFUSAL_ASSETS_IMAGE", "registry.example/refusal-assets:0.1.0")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(FAKE_KUBECONFIG)
    return kubeconfig


def _instance_with_launcher(tmp_path: Path, kubeconfig: Path) -> dg.DagsterInstance:
    """The repo's Kubernetes instance with its run launcher as written, except the kubeconfig (no
    cluster here) and the storage (SQLite in a temp folder: the manifests do not touch it)."""
    config = yaml.safe_load((K8S / "dagster.yaml").read_text())
    launcher = config["run_launcher"]
    launcher["config"]["load_incluster_config"] = False
    launcher["config"]["kubeconfig_file"] = str(kubeconfig)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        yaml.safe_dump({"run_launcher": launcher, "telemetry": {"enabled": False}})
    )
    return dg.DagsterInstance.from_config(str(home))


def _step_manifests(tiny_cfg, tmp_path: Path, kubeconfig: Path) -> dict[str, dict]:
    from dagster_k8s import K8sRunLauncher

    from refusal_assets.defs.build import build_defs

    defs = build_defs(tiny_cfg, tmp_path / "storage")
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s", "the switch did not reach the asset job"
    instance = _instance_with_launcher(tmp_path, kubeconfig)
    assert isinstance(instance.run_launcher, K8sRunLauncher)

    # the executor as Dagster builds it for a run: the configured executor's config (the repo's
    # executor.yaml through the switch, with the schema's defaults), pointed at no cluster
    mapped = job.executor_def.apply_config_mapping({})
    assert mapped.success, mapped.errors
    assert {
        k: mapped.value["config"][k] for k in load_k8s_settings().executor
    } == load_k8s_settings().executor
    raw = {
        **mapped.value["config"],
        "load_incluster_config": False,
        "kubeconfig_file": str(kubeconfig),
    }
    processed = process_config(k8s_job_executor.config_schema.config_type, raw)
    assert processed.success, processed.errors
    executor = k8s_job_executor.executor_creation_fn(
        InitExecutorContext(
            job=InMemoryJob(job),
            executor_def=k8s_job_executor,
            executor_config=processed.value,
            instance=instance,
        )
    )
    handler = executor._step_handler
    run = dg.DagsterRun(job_name=job.name, run_id=str(uuid.uuid4()))
    assets = {a.key.to_user_string(): a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}
    out = {}
    for name in ("refusal_behaviour", "prompt_sample"):  # one GPU step, one CPU step
        tags = dict(
            job.graph.node_named(assets[name].op.name).definition.tags
        )  # the op as it sits in the asset job
        # what launch_step hands _get_container_context (a StepHandlerContext, reduced to what it reads)
        context = SimpleNamespace(
            execute_step_args=SimpleNamespace(step_keys_to_execute=[name]),
            dagster_run=run,
            instance=instance,
            step_tags={name: tags},
            get_step_context=lambda key: SimpleNamespace(step=SimpleNamespace(op_name=key)),
        )
        container_context = handler._get_container_context(context)
        job_config = container_context.get_k8s_job_config(
            handler._executor_image, instance.run_launcher
        )
        manifest = construct_dagster_k8s_job(
            job_config=job_config,
            args=["dagster", "api", "execute_step"],
            job_name=f"dagster-step-{name}",
            pod_name=f"dagster-step-{name}",
            component="step_worker",
            user_defined_k8s_config=container_context.run_k8s_config,
            labels={"dagster/op": name},
        )
        out[name] = ApiClient().sanitize_for_serialization(
            manifest
        )  # the JSON the API server would get
    return out


def test_gpu_step_and_cpu_step_manifests(tiny_cfg, tmp_path, k8s_env):
    manifests = _step_manifests(tiny_cfg, tmp_path, k8s_env)
    settings = load_k8s_settings()
    for name, manifest in manifests.items():
        pod = manifest["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "registry.example/refusal-assets:0.1.0"
        limits = (container.get("resources") or {}).get("limits") or {}
        gpu_step = name == "refusal_behaviour"
        if gpu_step:
            assert (
                limits.get("nvidia.com/gpu") == "1"
                and container["resources"]["requests"]["nvidia.com/gpu"] == "1"
            )
            assert (
                pod["nodeSelector"]
                == {"nvidia.com/gpu.present": "true"}
                == settings.gpu.node_selector
            )
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]
        else:
            assert "nvidia.com/gpu" not in limits, (
                f"CPU step {name} asks for a GPU: {container.get('resources')}"
            )
            assert not pod.get("nodeSelector") and not any(
                "nvidia" in str(t) for t in pod.get("tolerations") or []
            )
        # the shared volume, mounted at the folder holding the storage root and the model cache
        (volume,) = [v for v in pod["volumes"] if v["name"] == "refusal-assets-data"]
        assert volume["persistentVolumeClaim"] == {"claimName": "refusal-assets-data"}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "refusal-assets-data"]
        env = {e["name"]: e for e in container["env"]}
        for var in ("REFUSAL_ASSETS_STORAGE", "REFUSAL_ASSETS_CACHE"):
            assert Path(env[var]["value"]).is_relative_to(mount["mountPath"]), (
                var,
                env[var],
                mount,
            )
        assert (
            env["REFUSAL_ASSETS_STORAGE"]["value"] == "/data/storage"
            and mount["mountPath"] == "/data"
        )
        assert env["REFUSAL_ASSETS_EXECUTOR"]["value"] == "k8s"
        # PostgreSQL: the password from the secret, the other DAGSTER_PG_* from the same secret's keys
        assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": SECRET,
            "key": "postgresql-password",
        }
        assert {"secretRef": {"name": SECRET}} in container["envFrom"]
        assert "DAGSTER_PG_PASSWORD" not in {
            e["name"] for e in container["env"] if "value" in e
        }  # never a literal
        # the instance (sent along with each step's arguments) reads its credentials from that environment
        assert env["DAGSTER_HOME"]["value"] == "/opt/dagster/dagster_home"


def test_executor_switch_and_its_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("REFUSAL_ASSETS_EXECUTOR", raising=False)
    assert select_executor() is None
    monkeypatch.setenv("REFUSAL_ASSETS_EXECUTOR", "multiprocess")
    assert select_executor() is dg.multiprocess_executor
    monkeypatch.setenv("REFUSAL_ASSETS_EXECUTOR", "celery")
    with pytest.raises(ExecutorConfigError, match=r"REFUSAL_ASSETS_EXECUTOR='celery'.*k8s"):
        select_executor()
    monkeypatch.setenv("REFUSAL_ASSETS_EXECUTOR", "k8s")
    bad = tmp_path / "executor.yaml"
    monkeypatch.setenv("REFUSAL_ASSETS_K8S_CONFIG", str(bad))
    with pytest.raises(ExecutorConfigError, match="not found"):
        select_executor()
    bad.write_text("executor: {max_concurrent: many}\n")
    with pytest.raises(
        ExecutorConfigError, match=rf"{re.escape(str(bad))}.*not valid k8s_job_executor config"
    ):
        select_executor()
    bad.write_text("executor: {}\ngpu_step: {gpus: 0}\n")
    with pytest.raises(ExecutorConfigError, match=r"gpu_step.gpus must be an integer >= 1, got 0"):
        load_k8s_settings()
    bad.write_text("executors: {}\n")
    with pytest.raises(ExecutorConfigError, match="'executor' and 'gpu_step'"):
        load_k8s_settings()


def test_helm_values_instance_and_executor_agree():
    """One volume, one mount path, one secret everywhere: the chart's values, the instance YAML's
    run launcher, the executor settings and the PVC."""
    values = yaml.safe_load((K8S / "values.yaml").read_text())
    instance = yaml.safe_load((K8S / "dagster.yaml").read_text())
    executor = load_k8s_settings(K8S / "executor.yaml").executor
    pvc = yaml.safe_load((K8S / "pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    claim = pvc["metadata"]["name"]
    launcher_values = values["runLauncher"]["config"]["k8sRunLauncher"]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    launcher = instance["run_launcher"]["config"]
    for volumes in (launcher_values["volumes"], deployment["volumes"]):
        assert volumes == [
            {"name": "refusal-assets-data", "persistentVolumeClaim": {"claimName": claim}}
        ]
    for volumes in (launcher["volumes"], executor["volumes"]):
        assert volumes == [
            {"name": "refusal-assets-data", "persistent_volume_claim": {"claim_name": claim}}
        ]
    for mounts in (launcher_values["volumeMounts"], deployment["volumeMounts"]):
        assert mounts == [{"name": "refusal-assets-data", "mountPath": "/data"}]
    for mounts in (launcher["volume_mounts"], executor["volume_mounts"]):
        assert mounts == [{"name": "refusal-assets-data", "mount_path": "/data"}]
    assert (
        values["global"]["postgresqlSecretName"] == launcher["postgres_password_secret"] == SECRET
    )
    assert launcher_values["envSecrets"] == deployment["envSecrets"] == [{"name": SECRET}]
    assert launcher["env_secrets"] == executor["env_secrets"] == [SECRET]
    assert (
        values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
        and instance["run_monitoring"]["enabled"] is True
    )
    assert {"name": "REFUSAL_ASSETS_EXECUTOR", "value": "k8s"} in deployment["env"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "refusal_assets.definitions"]
    storage = {e["name"]: e["value"] for e in deployment["env"]}
    assert (
        storage["REFUSAL_ASSETS_STORAGE"] == "/data/storage"
        and "REFUSAL_ASSETS_STORAGE=/data/storage" in launcher_values["envVars"]
    )
    assert (ROOT / storage["REFUSAL_ASSETS_CONFIG"].removeprefix("/opt/refusal_assets/")).is_file()


def test_readme_kubernetes_section_names_only_files_that_exist():
    text = (ROOT / "dagster_home" / "README.md").read_text()  # the instances' reference doc
    section = text.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    named = set(
        re.findall(
            r"(?<![\w/.-])((?:dagster_home|configs|refusal_assets|\.ci)/[\w./-]+\.(?:ya?ml|py|txt)|dagster_home/k8s/Dockerfile)",
            section,
        )
    )
    assert {
        "dagster_home/k8s/values.yaml",
        "dagster_home/k8s/Dockerfile",
        "dagster_home/k8s/pvc.yaml",
    } <= named
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, (
        f"dagster_home/README.md 'Kubernetes' names files that do not exist: {missing}"
    )
