"""Config change -> rerun, end to end with the daemon: start the UI and daemon on a materialized
tiny instance, edit the SAE section of the config, reload the code location, and watch the
automation sensor rebuild exactly the SAE partitions, then their downstream circuits; then add a
model and watch the config sensor and automation build that model's partitions, and only those."""

import json
import os
import time
import urllib.request

import dagster as dg
import pytest

from refusal_assets_tests.conftest import ROOT, copy_tiny_run
from refusal_assets_tests.test_ui_browser import serve_ui

RELOAD = """mutation { reloadWorkspace { __typename ... on PythonError { message } } }"""
MODEL_B = """  - id: tiny-b
    key: tiny-b
    source: tiny
    architecture: {n_layers: 4, d_model: 64}
    batch_size: 16
    generation: {max_new_tokens: 4}
    activation_layers: ["residuals_1"]
"""


def _graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(
        url + "/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _code_versions(instance: dg.DagsterInstance, key: str) -> dict[str, str]:
    out = {}
    for r in instance.fetch_materializations(dg.AssetKey(key), limit=1000).records:  # newest first
        m = r.asset_materialization
        out.setdefault(m.partition, (m.tags or {}).get("dagster/code_version"))
    return out


def _built_since(instance: dg.DagsterInstance, t0: float) -> dict[str, set]:
    """Asset partitions materialized after ``t0``."""
    out: dict[str, set] = {}
    for key in (
        "orbench_prompts",
        "prompt_sample",
        "data_profile",
        "refusal_behaviour",
        "activations",
        "sae",
        "circuit",
        "transfer",
        "comparison",
        "report",
    ):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), after_timestamp=t0), limit=1000
        ).records
        if records:
            out[key] = {r.asset_materialization.partition for r in records}
    return out


@pytest.mark.slow
def test_config_edit_rebuilds_exactly_the_affected_partitions_with_the_daemon(shared_tiny_run, tmp_path):
    home, storage = copy_tiny_run(shared_tiny_run, tmp_path)
    # the same config text as the shared run (so the same versions), read from a project folder of its own
    config = tmp_path / "configs" / "tiny.yaml"
    config.parent.mkdir()
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    (tmp_path / "data").symlink_to(ROOT / "data")
    env = {k: v for k, v in os.environ.items() if k != "REFUSAL_ASSETS_DATA_DIR"}
    env.update(DAGSTER_HOME=str(home), REFUSAL_ASSETS_STORAGE=str(storage), REFUSAL_ASSETS_CONFIG=str(config))
    instance = dg.DagsterInstance.from_config(str(home / "tiny"))  # one instance per config name
    before = {k: _code_versions(instance, k) for k in ("sae", "circuit", "activations")}
    n_runs_before = len(instance.get_run_records())

    with serve_ui(config, env, tmp_path / "ui.log") as url:
        t_edit = time.time()
        config.write_text(config.read_text().replace("  k: 8\n", "  k: 6\n"))  # edit the SAE section only
        assert _graphql(url, RELOAD)["data"]["reloadWorkspace"]["__typename"] == "Workspace"
        deadline = time.time() + 420
        while time.time() < deadline:
            sae_now, circuit_now = _code_versions(instance, "sae"), _code_versions(instance, "circuit")
            if all(sae_now[p] != before["sae"][p] for p in before["sae"]) and all(
                circuit_now[p] != before["circuit"].get(p) or _newer(instance, "circuit", p, n_runs_before)
                for p in before["circuit"]
            ):
                break
            time.sleep(5)
        after = {k: _code_versions(instance, k) for k in ("sae", "circuit", "activations")}
        assert all(after["sae"][p] != before["sae"][p] for p in before["sae"]), (
            "every SAE partition was rebuilt with the new config"
        )
        assert after["activations"] == before["activations"], (
            "activations (upstream, config unchanged) were not rebuilt"
        )
        new_runs = instance.get_run_records()[: len(instance.get_run_records()) - n_runs_before]
        built = {(k.to_user_string()) for r in new_runs for k in (r.dagster_run.asset_selection or [])}
        assert built <= {"sae", "circuit", "transfer", "comparison", "report"}, (
            built
        )  # transfer reads the circuits; the report follows its comparisons
        assert "sae" in built and "circuit" in built
        print(f"daemon launched {len(new_runs)} runs for {sorted(built)}")
        # the cascade ends with the report (it follows the comparison)
        deadline = time.time() + 300
        while time.time() < deadline and "report" not in _built_since(instance, t_edit):
            time.sleep(5)
        _wait_idle(instance, 120)

        # add a model: the config sensor records its settings, automation builds its partitions only
        t0 = time.time()
        config.write_text(config.read_text().replace("sae:\n", MODEL_B + "sae:\n", 1))
        assert _graphql(url, RELOAD)["data"]["reloadWorkspace"]["__typename"] == "Workspace"
        deadline = time.time() + 540
        while time.time() < deadline and "report" not in _built_since(instance, t0):
            time.sleep(5)
        _wait_idle(instance, 120)
    built = _built_since(instance, t0)
    cats = ["harassment", "illegal", "privacy", "violence"]
    assert built == {
        "refusal_behaviour": {f"{c}|tiny-b" for c in cats},
        "activations": {f"{c}|tiny-b__resid1" for c in cats},
        "sae": {"all|tiny-b__resid1"},
        "circuit": {f"{c}|tiny-b" for c in cats},
        "transfer": {"tiny-b"},
        "comparison": {"tiny-b"},
        "report": {None},
    }, built
    failed = [
        r.dagster_run.run_id for r in instance.get_run_records() if r.dagster_run.status == dg.DagsterRunStatus.FAILURE
    ]
    assert not failed, (tmp_path / "ui.log").read_text(errors="replace")[-3000:]


def _wait_idle(instance: dg.DagsterInstance, timeout: float) -> None:
    """Until no run is queued or in progress (the last hop's runs finish before the next change)."""
    deadline = time.time() + timeout
    busy = {
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.NOT_STARTED,
    }
    while time.time() < deadline and any(r.dagster_run.status in busy for r in instance.get_run_records(limit=50)):
        time.sleep(3)


def _newer(instance: dg.DagsterInstance, key: str, partition: str, n_runs_before: int) -> bool:
    records = instance.fetch_materializations(dg.AssetKey(key), limit=1000).records
    runs = {r.dagster_run.run_id for r in instance.get_run_records()[: len(instance.get_run_records()) - n_runs_before]}
    return any(r.asset_materialization.partition == partition and r.run_id in runs for r in records)
