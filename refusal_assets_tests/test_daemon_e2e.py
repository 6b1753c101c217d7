"""Config change -> rerun, end to end with the daemon: start the UI and daemon on a materialized
instance, edit the SAE section of the config, reload the code location, and watch the
automation sensor rebuild exactly the SAE partitions, then their downstream circuits; then add a
model and watch the config sensor and automation build that model's partitions, and only those.

Each partition the daemon builds is a run of its own (a fresh process that loads torch and the
code location), so the time goes with the number of partitions: the instance is a smaller
relative of the tiny config (two categories, one site) and the sensors tick every 5 s."""

import json
import os
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
import yaml

from refusal_assets.defs.automation import SENSOR_INTERVAL_ENV
from refusal_assets.defs.gpu import GPU_POOL
from refusal_assets.defs.partitions import SAE_SCOPE
from refusal_assets_tests.conftest import ROOT, cli_run
from refusal_assets_tests.test_ui_browser import serve_ui

POLL_S = 1  # seconds between looks at the instance: a hop is noticed as soon as it ends
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
        url + "/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _code_versions(instance: dg.DagsterInstance, key: str) -> dict[str, str]:
    out = {}
    for r in instance.fetch_materializations(dg.AssetKey(key), limit=1000).records:  # newest first
        m = r.asset_materialization
        out.setdefault(m.partition, (m.tags or {}).get("dagster/code_version"))
    return out


def _built_since(instance: dg.DagsterInstance, t0: float, graph) -> dict[str, set]:
    """Asset partitions materialized after ``t0``, for every asset of the graph."""
    out: dict[str, set] = {}
    for key in graph.materializable_asset_keys:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_timestamp=t0), limit=1000
        ).records
        if records:
            out[key.to_user_string()] = {r.asset_materialization.partition for r in records}
    return out


def _asset_graph(config: Path):
    """The asset graph the code location builds from ``config`` (the expectations follow the
    graph, so an asset added to it is checked too)."""
    from refusal_assets.config import load_config
    from refusal_assets.defs.build import build_defs

    return build_defs(load_config(config), config.parent / "unused-storage").resolve_asset_graph()


def _descendants(graph, key: str) -> set[str]:
    found, todo = set(), [dg.AssetKey(key)]
    while todo:
        for child in graph.get(todo.pop()).child_keys:
            if child.to_user_string() not in found:
                found.add(child.to_user_string())
                todo.append(child)
    return found


def _model_of(partition: str) -> str:
    """``cat|model``, ``cat|model__site``, ``all|model__site``, ``model|all``, ``model`` ->
    ``model`` (the scope key ``all`` is no model)."""
    return [part for part in partition.split("|") if part != SAE_SCOPE][-1].split("__")[0]


def _what_a_new_model_builds(graph, model: str) -> dict[str, set]:
    """Every partition of the graph that belongs to ``model`` (every mapping is exact, so no
    other model's partition reads a new one); every unpartitioned asset downstream of the models'
    settings (the report). Nothing else of the other models, nothing of the data."""
    downstream = _descendants(graph, "model_config") | _descendants(graph, "site_config")
    out: dict[str, set] = {}
    for key in graph.toposorted_asset_keys:
        node, name = graph.get(key), key.to_user_string()
        if not node.is_materializable:
            continue
        if node.partitions_def is None:
            if name in downstream:
                out[name] = {None}
            continue
        mine = {p for p in node.partitions_def.get_partition_keys() if _model_of(p) == model}
        if mine:
            out[name] = mine
    return out


def _what_an_sae_edit_rebuilds(graph) -> dict[str, set]:
    """Every partition of the SAE and of what reads it, directly or not (features, circuits,
    transfer, comparison, report): each reads every SAE of its model, and there is one model."""
    affected = {"sae"} | _descendants(graph, "sae")
    out: dict[str, set] = {}
    for key in graph.materializable_asset_keys:
        if (name := key.to_user_string()) in affected:
            partitions = graph.get(key).partitions_def
            out[name] = set(partitions.get_partition_keys()) if partitions else {None}
    return out


def _latest(instance: dg.DagsterInstance, key: str) -> float:
    records = instance.fetch_materializations(dg.AssetKey(key), limit=1).records
    return records[0].timestamp if records else 0.0


def _wait_for_builds(instance: dg.DagsterInstance, t0: float, graph, expected: dict) -> None:
    """Polls until every expected partition was built after ``t0`` and the report is newer than
    the last comparison (the report also reads the SAEs, so an early report does not end the
    cascade), then until no run is queued or running."""
    deadline = time.time() + 900  # a hop is a tick, a run's start and its work: minutes under load
    while time.time() < deadline:
        built = _built_since(instance, t0, graph)
        complete = all(parts <= built.get(k, set()) for k, parts in expected.items())
        if complete and _latest(instance, "report") > _latest(instance, "comparison"):
            break
        time.sleep(POLL_S)
    _wait_idle(instance, 120)


def small_tiny_config(root: Path) -> Path:
    """``root/configs/tiny.yaml``: the tiny config with two categories and one site (fewer
    partitions, so fewer runs per hop), its data folder linked in."""
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    for old, new in (
        ("[harassment, illegal, privacy, violence]", "[harassment, illegal]"),  # data and SAE
        ('activation_layers: ["residuals_1-2"]', 'activation_layers: ["residuals_1"]'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    config = root / "configs" / "tiny.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(text)
    (root / "data").symlink_to(ROOT / "data")
    return config


@pytest.mark.slow
def test_config_edit_rebuilds_exactly_the_affected_partitions_with_the_daemon(tmp_path):
    config = small_tiny_config(tmp_path)
    home, storage = tmp_path / "home", tmp_path / "storage"
    cli_run(config, home, storage)
    env = {k: v for k, v in os.environ.items() if k != "REFUSAL_ASSETS_DATA_DIR"}
    env.update(
        DAGSTER_HOME=str(home),
        REFUSAL_ASSETS_STORAGE=str(storage),
        REFUSAL_ASSETS_CONFIG=str(config),
    )
    # Speed, not semantics: the sensors tick every 5 s (the daemon's own loop) instead of 30 s,
    # each launched run executes its steps in its own process instead of one more per step, and
    # torch uses one thread (see conftest.cli_run).
    env.update({SENSOR_INTERVAL_ENV: "5", "REFUSAL_ASSETS_EXECUTOR": "in_process"})
    env["OMP_NUM_THREADS"] = "1"
    _dequeue_every_second(home / "tiny" / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(home / "tiny"))  # one instance per config name
    # two runs of a hop start (load torch and the code location) side by side; their GPU steps
    # still take turns on the device lock (ComputeResource.serialize_device)
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, 2)
    before = {k: _code_versions(instance, k) for k in ("sae", "circuit", "activations")}
    n_runs_before = len(instance.get_run_records())

    with serve_ui(config, env, tmp_path / "ui.log") as url:
        t_edit = time.time()
        config.write_text(
            config.read_text().replace("  k: 8\n", "  k: 6\n")
        )  # edit the SAE section only
        assert _graphql(url, RELOAD)["data"]["reloadWorkspace"]["__typename"] == "Workspace"
        graph = _asset_graph(config)
        _wait_for_builds(instance, t_edit, graph, _what_an_sae_edit_rebuilds(graph))
        print(f"config edit: every rebuild done after {time.time() - t_edit:.0f} s")
        after = {k: _code_versions(instance, k) for k in ("sae", "circuit", "activations")}
        assert all(after["sae"][p] != before["sae"][p] for p in before["sae"]), (
            "every SAE partition was rebuilt with the new config"
        )
        assert after["activations"] == before["activations"], (
            "activations (upstream, config unchanged) were not rebuilt"
        )
        rebuilt = _built_since(instance, t_edit, graph)
        assert rebuilt == _what_an_sae_edit_rebuilds(graph), rebuilt
        assert rebuilt["circuit"] == set(before["circuit"])  # every circuit reads an SAE
        new_runs = instance.get_run_records()[: len(instance.get_run_records()) - n_runs_before]
        built = {
            (k.to_user_string()) for r in new_runs for k in (r.dagster_run.asset_selection or [])
        }
        # only the SAE and what reads it, directly or not (circuits, transfer, comparison, report)
        assert "sae" in built and built <= {"sae"} | _descendants(graph, "sae"), built
        print(f"daemon launched {len(new_runs)} runs for {sorted(built)}")

        # add a model: the config sensor records its settings, automation builds its partitions only
        t0 = time.time()
        config.write_text(config.read_text().replace("sae:\n", MODEL_B + "sae:\n", 1))
        assert _graphql(url, RELOAD)["data"]["reloadWorkspace"]["__typename"] == "Workspace"
        graph = _asset_graph(config)
        expected = _what_a_new_model_builds(graph, "tiny-b")
        _wait_for_builds(instance, t0, graph, expected)
        print(f"new model: every build done after {time.time() - t0:.0f} s")
    built = _built_since(instance, t0, graph)
    cats = ["harassment", "illegal"]
    # the graph's expectation, spelled out for the assets this test was written against
    spelled = ("refusal_behaviour", "activations", "sae", "circuit", "report")
    assert {k: expected[k] for k in spelled} == {
        "refusal_behaviour": {f"{c}|tiny-b" for c in cats},
        "activations": {f"{c}|tiny-b__resid1" for c in cats},
        "sae": {"all|tiny-b__resid1"},
        "circuit": {f"{c}|tiny-b" for c in cats},
        "report": {None},
    }
    assert built == expected, built
    failed = [
        r.dagster_run.run_id
        for r in instance.get_run_records()
        if r.dagster_run.status == dg.DagsterRunStatus.FAILURE
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
    while time.time() < deadline and any(
        r.dagster_run.status in busy for r in instance.get_run_records(limit=50)
    ):
        time.sleep(POLL_S)


def _dequeue_every_second(instance_yaml: Path) -> None:
    """The run queue is read every second instead of every 5 s (the instance's own settings
    otherwise, pool limits included)."""
    settings = yaml.safe_load(instance_yaml.read_text())
    settings["run_coordinator"].setdefault("config", {})["dequeue_interval_seconds"] = 1
    instance_yaml.write_text(yaml.safe_dump(settings))
