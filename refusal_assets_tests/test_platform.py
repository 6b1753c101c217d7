"""The platform on a real materialized tiny instance (one shared `refusal-assets run`, copied per
test): the schedule's runs succeed and the report follows, a failed blocking check on ``sae``
stops automation from building ``circuit``, and the UI's GraphQL shows nothing stale."""

from __future__ import annotations

import datetime
import json
import os
import urllib.error
import urllib.request

import dagster as dg
import pytest

from refusal_assets.app import settings
from refusal_assets.defs.build import build_defs
from refusal_assets.defs.partitions import sae_partition_key
from refusal_assets_tests.automation_world import requested, stale, variant
from refusal_assets_tests.conftest import ROOT, copy_tiny_run

A = "tiny-qwen2"
SAE_KEYS = [sae_partition_key(f"{A}__resid1"), sae_partition_key(f"{A}__resid2")]


@pytest.fixture()
def materialized(shared_tiny_run, tiny_cfg, tmp_path):
    base, storage = copy_tiny_run(shared_tiny_run, tmp_path)
    instance = dg.DagsterInstance.from_config(str(settings.instance_home(base, tiny_cfg)))
    yield instance, base, storage
    instance.dispose()


def _report_count(instance: dg.DagsterInstance) -> int:
    return len(instance.fetch_materializations(dg.AssetKey("report"), limit=100).records)


def test_schedule_tick_runs_succeed_and_the_report_follows(tiny_cfg, materialized):
    instance, _, storage = materialized
    defs = build_defs(tiny_cfg, storage)
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(first) == {}
    schedule = defs.get_schedule_def("refresh_report_schedule")
    assert schedule.cron_schedule == tiny_cfg.report.schedule
    context = dg.build_schedule_context(
        instance=instance,
        repository_def=defs.get_repository_def(),
        scheduled_execution_time=datetime.datetime(2030, 1, 1, 6, 0, tzinfo=datetime.timezone.utc),
    )
    run_requests = list(schedule.evaluate_tick(context).run_requests or [])
    assert [r.partition_key for r in run_requests] == [A], "one comparison run per model"
    job = defs.resolve_job_def("refresh_comparison")
    for r in run_requests:
        result = job.execute_in_process(
            instance=instance, partition_key=r.partition_key, tags=r.tags
        )
        assert result.success
    n_reports = _report_count(instance)
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert requested(after) == {"report": {None}}, "the report follows its new comparisons"
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("report")]
    )
    assert result.success and _report_count(instance) == n_reports + 1
    assert (storage / "report" / "report.html").is_file()
    assert (
        requested(
            dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
        )
        == {}
    )
    assert stale(instance, list(defs.assets)) == {}


def test_schedule_evaluates_by_hand_without_a_scheduled_time(tiny_cfg, tmp_path):
    """A script or a notebook builds the context without a time: the tick is labelled "manual"."""
    defs = build_defs(tiny_cfg, tmp_path / "storage")
    schedule = defs.get_schedule_def("refresh_report_schedule")
    called = list(schedule(dg.build_schedule_context()))  # the schedule's function, called directly
    assert [(r.run_key, r.partition_key) for r in called] == [(f"{A}-manual", A)]
    repo = defs.get_repository_def()
    manual = (
        schedule.evaluate_tick(dg.build_schedule_context(repository_def=repo)).run_requests or []
    )
    assert [(r.run_key, r.partition_key) for r in manual] == [(f"{A}-manual", A)]
    at = datetime.datetime(2030, 1, 1, 6, 0, tzinfo=datetime.timezone.utc)
    timed = schedule.evaluate_tick(
        dg.build_schedule_context(repository_def=repo, scheduled_execution_time=at)
    )
    assert [r.run_key for r in timed.run_requests or []] == [f"{A}-2030-01-01T06:00:00+00:00"]


def test_failed_blocking_check_on_sae_stops_automation_building_circuit(tiny_cfg, materialized):
    instance, _, storage = materialized
    first = dg.evaluate_automation_conditions(defs=build_defs(tiny_cfg, storage), instance=instance)
    # retrain the SAEs (k changed) against a threshold no SAE can meet
    cfg = variant(tiny_cfg, sae__k=6, sae__thresholds={"max_fvu": 1e-9, "max_dead_fraction": 0.95})
    defs = build_defs(cfg, storage)
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    req = requested(tick)
    assert req.pop("sae") == set(SAE_KEYS)
    # assets partitioned like sae and fed by it (features) are requested in the same tick
    assert all(partitions == set(SAE_KEYS) for partitions in req.values()), req
    job = defs.resolve_implicit_global_asset_job_def()
    for p in SAE_KEYS:  # the real SAE step, as the daemon's run would execute it
        result = job.execute_in_process(
            instance=instance,
            partition_key=p,
            asset_selection=[dg.AssetKey("sae")],
            raise_on_error=False,
        )
        evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert evaluations["fvu_below_threshold"] is False
    assert len(instance.fetch_materializations(dg.AssetKey("sae"), limit=100).records) >= 4, (
        "the new SAEs were written"
    )
    nxt = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert "circuit" not in requested(nxt), requested(nxt)
    assert requested(nxt) == {}
    # the circuits are stale (their SAEs changed): what is holding them is the failed check alone
    assert set(stale(instance, list(defs.assets)).get("circuit", {})) == {
        f"{c}|{A}" for c in ["harassment", "illegal", "privacy", "violence"]
    }


NODES_QUERY = "{ assetNodes { assetKey { path } isMaterializable isPartitioned } }"
PARTITIONED_QUERY = """query ($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
    staleStatusByPartition staleCausesByPartition { reason } } } }"""
UNPARTITIONED_QUERY = """query ($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
    staleStatus staleCauses { reason } } } }"""


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        url + "/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            payload = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"GraphQL {e.code}: {e.read()[:2000]!r}") from None
    assert "errors" not in payload, payload["errors"]
    return payload["data"]


@pytest.mark.slow
def test_ui_graphql_reports_nothing_stale_after_a_run(shared_tiny_run, tiny_cfg, tmp_path):
    from refusal_assets_tests.test_ui_browser import serve_ui

    base, storage = copy_tiny_run(shared_tiny_run, tmp_path)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REFUSAL_ASSETS_DATA_DIR", "REFUSAL_ASSETS_CONFIG")
    }
    env.update(DAGSTER_HOME=str(base), REFUSAL_ASSETS_STORAGE=str(storage))
    not_fresh: dict = {}
    with serve_ui(ROOT / "configs" / "tiny.yaml", env, tmp_path / "ui.log") as url:
        nodes = [n for n in _graphql(url, NODES_QUERY)["assetNodes"] if n["isMaterializable"]]
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} >= {
            "orbench_prompts",
            "data_profile",
            "refusal_behaviour",
            "activations",
            "sae",
            "circuit",
            "transfer",
            "comparison",
            "report",
        }
        for n in nodes:
            key = {"path": n["assetKey"]["path"]}
            if n["isPartitioned"]:
                node = _graphql(url, PARTITIONED_QUERY, {"key": key})["assetNodeOrError"]
                statuses, causes = node["staleStatusByPartition"], node["staleCausesByPartition"]
            else:
                node = _graphql(url, UNPARTITIONED_QUERY, {"key": key})["assetNodeOrError"]
                statuses, causes = [node["staleStatus"]], [node["staleCauses"]]
            assert statuses, n
            bad = [(s, causes[i][:1]) for i, s in enumerate(statuses) if s != "FRESH"]
            if bad:
                not_fresh["/".join(n["assetKey"]["path"])] = bad[:3]
    assert not_fresh == {}
