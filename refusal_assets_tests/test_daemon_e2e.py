"""Config change -> rerun, end to end with the daemon: materialize the tiny graph, start the UI and
daemon, edit the SAE section of the config, reload the code location, and watch the automation
sensor rebuild exactly the SAE partitions, then their downstream circuits."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from refusal_assets_tests.conftest import ROOT
from refusal_assets_tests.test_ui_browser import serve_ui

RELOAD = """mutation { reloadWorkspace { __typename ... on PythonError { message } } }"""


def _graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(url + "/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _code_versions(instance: dg.DagsterInstance, key: str) -> dict[str, str]:
    out = {}
    for r in instance.fetch_materializations(dg.AssetKey(key), limit=1000).records:  # newest first
        m = r.asset_materialization
        out.setdefault(m.partition, (m.tags or {}).get("dagster/code_version"))
    return out


@pytest.mark.slow
def test_config_edit_rebuilds_exactly_the_affected_partitions_with_the_daemon(tmp_path):
    config = tmp_path / "configs" / "tiny.yaml"
    config.parent.mkdir()
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("path: data/orbench_sample", f"path: {ROOT / 'data' / 'orbench_sample'}"))
    home, storage = tmp_path / "home", tmp_path / "storage"
    env = {k: v for k, v in os.environ.items() if k != "REFUSAL_ASSETS_DATA_DIR"}
    env.update(DAGSTER_HOME=str(home), REFUSAL_ASSETS_STORAGE=str(storage), REFUSAL_ASSETS_CONFIG=str(config))
    cli = [sys.executable, "-m", "refusal_assets.cli"]
    subprocess.run([*cli, "run", "--config", str(config)], cwd=ROOT, env=env, check=True, capture_output=True)
    instance = dg.DagsterInstance.from_config(str(home))
    before = {k: _code_versions(instance, k) for k in ("sae", "circuit", "activations")}
    n_runs_before = len(instance.get_run_records())

    with serve_ui(config, env, tmp_path / "ui.log") as url:
        config.write_text(config.read_text().replace("  k: 8\n", "  k: 6\n"))  # edit the SAE section only
        assert _graphql(url, RELOAD)["data"]["reloadWorkspace"]["__typename"] == "Workspace"
        deadline = time.time() + 420
        while time.time() < deadline:
            sae_now, circuit_now = _code_versions(instance, "sae"), _code_versions(instance, "circuit")
            if all(sae_now[p] != before["sae"][p] for p in before["sae"]) and all(circuit_now[p] != before["circuit"].get(p) or
                   _newer(instance, "circuit", p, n_runs_before) for p in before["circuit"]):
                break
            time.sleep(5)
    after = {k: _code_versions(instance, k) for k in ("sae", "circuit", "activations")}
    assert all(after["sae"][p] != before["sae"][p] for p in before["sae"]), "every SAE partition was rebuilt with the new config"
    assert after["activations"] == before["activations"], "activations (upstream, config unchanged) were not rebuilt"
    new_runs = instance.get_run_records()[: len(instance.get_run_records()) - n_runs_before]
    built = {(k.to_user_string()) for r in new_runs for k in (r.dagster_run.asset_selection or [])}
    assert built <= {"sae", "circuit", "transfer", "comparison"}, built  # transfer reads sae and circuit
    assert "sae" in built and "circuit" in built
    print(f"daemon launched {len(new_runs)} runs for {sorted(built)}")


def _newer(instance: dg.DagsterInstance, key: str, partition: str, n_runs_before: int) -> bool:
    records = instance.fetch_materializations(dg.AssetKey(key), limit=1000).records
    runs = {r.dagster_run.run_id for r in instance.get_run_records()[: len(instance.get_run_records()) - n_runs_before]}
    return any(r.asset_materialization.partition == partition and r.run_id in runs for r in records)
