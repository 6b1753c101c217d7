"""Concurrent runs on one SQLite instance (a temp DAGSTER_HOME holding a copy of
``dagster_home/dagster.yaml``: SQLite storage, queued coordinator, pool limit 1 at op granularity).

How the pool is exercised. ``dagster.materialize`` runs the in-process executor, and in dagster 1.13
``inprocess_execution_iterator`` wraps the plan in ``InstanceConcurrencyContext(instance, run)``:
before a step whose ``pool`` is set starts, ``ActiveExecution`` calls
``InstanceConcurrencyContext.claim(pool, step_key)``, which (granularity ``op``, SQLite event log
storage with the ``concurrency_limits`` table) initialises the pool to ``default_limit`` and claims
a slot row in the instance's ``index.db``, emitting "Step blocked by limit for pool gpu" while it
waits. So two *processes* running ``materialize`` against the same DAGSTER_HOME genuinely contend
for the same slot; no run coordinator or daemon is involved (the queued coordinator only gates runs
submitted through the webserver/daemon, and at op granularity it leaves pools to the executor,
which is the code path used here). A control phase with ``default_limit: 2`` shows that the same
two steps do overlap when the pool allows it, so the disjointness seen with limit 1 is the pool's
doing.

Two child processes run five phases in lock-step (a file barrier starts each phase in both):

``fresh*`` both open the same never-used instance folder at once, ten times, through the CLI's init lock;
``data``   ``orbench_prompts`` + ``prompt_sample`` for two different categories -> both succeed;
``pool1``  ``refusal_behaviour`` (``pool="gpu"``, held 2 s longer by a wrapped ``run_behaviour``),
           limit 1, the second child 0.5 s after the first -> STEP_START..STEP_SUCCESS intervals are
           disjoint and the second run logs "Step blocked by limit for pool gpu";
``race``   the same with both claims in the same instant (Dagster's two check-then-act windows of a
           claim held open 2 s each) -> Dagster gives both the one slot, the device lock still serialises the steps;
``pool2``  the same against a second instance with limit 2 -> the intervals overlap (control).
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster import DagsterEventType

from refusal_assets_tests.conftest import ROOT
from refusal_assets_tests.reliability.helpers import TINY, Child

pytestmark = pytest.mark.slow  # two child processes through fourteen lock-step phases: minutes
CATEGORIES = ["harassment", "illegal"]
HOLD_S = 2.0  # the GPU step is held this much longer than its real work
STAGGER_S = 0.5  # the second child starts its pool1 run this much later: no same-instant claim (see the race test)

CHILD = """
import json, time
from pathlib import Path
import dagster as dg
import dagster._core.storage.event_log.sql_event_log as sql_event_log
import dagster._core.storage.runs.sqlite.sqlite_run_storage as sqlite_run_storage
from refusal_assets.lm import behaviour
from refusal_assets.config import load_config
from refusal_assets.defs.build import build_defs

category, stagger, go = {category!r}, {stagger!r}, Path({go!r})
cfg = load_config({tiny!r})
defs = build_defs(cfg, Path({storage!r}), device="cpu")
assets = {{a.key.to_user_string(): a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}}
quiet = {{"loggers": {{"console": {{"config": {{"log_level": "CRITICAL"}}}}}}}}
real_behaviour = behaviour.run_behaviour

phase_now = [""]

def held(*args, **kwargs):  # keeps the GPU-pool step busy long enough to see any overlap
    t0 = time.time()
    time.sleep({hold})
    result = real_behaviour(*args, **kwargs)
    # when the model was actually in use (inside the step, under the device lock)
    (go / ("used-" + phase_now[0] + "-" + category)).write_text(json.dumps([t0, time.time()]))
    return result

behaviour.run_behaviour = held

def barrier(phase):
    phase_now[0] = phase
    print("ready " + phase, flush=True)
    while not (go / phase).exists():
        time.sleep(0.005)

def run(selection, key, instance, label):
    r = dg.materialize([assets[a] for a in selection], partition_key=key, resources=defs.resources, instance=instance,
                       run_config=quiet, raise_on_error=False, tags={{"reliability": label}})
    return {{"run_id": r.run_id, "success": r.success}}

def widened(owner, name, seconds):
    # hold a check-then-act window open so that both processes are inside it at once
    real = getattr(owner, name)
    def slow(*args, **kwargs):
        found = real(*args, **kwargs)
        time.sleep(seconds)
        return found
    setattr(owner, name, slow)
    return lambda: setattr(owner, name, real)

out = {{}}
# "fresh": both open the same never-used instance folder at once, FRESH_ROUNDS times (a new folder
# each round); the schema check is held open so that both always decide to create the schema
undo = widened(sqlite_run_storage, "check_alembic_revision", 0.3)
out["fresh"] = []
for i in range({rounds}):
    barrier("fresh" + str(i))
    try:
        from pathlib import Path as _P
        from refusal_assets.app.cli import _init_instance_once  # what every refusal-assets command does first
        _P({home0!r} + str(i)).mkdir(parents=True, exist_ok=True)
        _init_instance_once(_P({home0!r} + str(i)))
        dg.DagsterInstance.from_config({home0!r} + str(i)).get_runs()
        out["fresh"].append("ok")
    except Exception as e:
        out["fresh"].append(type(e).__name__ + ": " + str(e)[:200])
undo()

instance = dg.DagsterInstance.get()  # $DAGSTER_HOME: pool limit 1
key = next(
    k for k in assets["refusal_behaviour"].partitions_def.get_partition_keys() if str(k).startswith(category + "|")
)
barrier("data")
out["data"] = run(["orbench_prompts", "prompt_sample"], category, instance, "data")
barrier("pool1")
time.sleep(stagger)
out["pool1"] = run(["refusal_behaviour"], key, instance, "pool1")
# both windows of the claim held open: has_unassigned_slots() -> insert assigned pending step, and
# SELECT a free slot row -> UPDATE it (ConcurrencySlotsTable.update() is built between the two)
undos = [widened(sql_event_log.SqlEventLogStorage, "has_unassigned_slots", 2.0),
         widened(sql_event_log.ConcurrencySlotsTable, "update", 2.0)]
barrier("race")
out["race"] = run(["refusal_behaviour"], key, instance, "race")
for undo in undos:
    undo()
barrier("pool2")
out["pool2"] = run(["refusal_behaviour"], key, dg.DagsterInstance.from_config({home2!r}), "pool2")
print("RESULT " + json.dumps(out), flush=True)
"""
FRESH_ROUNDS = (
    10  # about half the rounds break here; all ten pass by chance about once in a thousand
)
PHASES = (*(f"fresh{i}" for i in range(FRESH_ROUNDS)), "data", "pool1", "race", "pool2")


def _home(path: Path, limit: int | None = None) -> Path:
    """No limit: an exact copy of the project's dagster.yaml (the children's $DAGSTER_HOME); otherwise
    the same with another pool limit and any ``{env: DAGSTER_HOME}`` storage folder spelled out."""
    text = (ROOT / "dagster_home" / "dagster.yaml").read_text()
    config = yaml.safe_load(text)
    assert (
        config["concurrency"]["pools"]["default_limit"] == 1
        and config["concurrency"]["pools"]["granularity"] == "op"
    )
    path.mkdir(parents=True)
    if limit is not None:
        config["concurrency"]["pools"]["default_limit"] = limit
        if "sqlite" in config.get("storage", {}):
            config["storage"]["sqlite"]["base_dir"] = str(path)
        text = yaml.safe_dump(config)
    (path / "dagster.yaml").write_text(text)
    return path


def _instance(home: Path, monkeypatch: pytest.MonkeyPatch) -> dg.DagsterInstance:
    monkeypatch.setenv(
        "DAGSTER_HOME", str(home)
    )  # a copied dagster.yaml may read its storage folder from it
    return dg.DagsterInstance.from_config(str(home))


def _initialise(home: Path) -> None:
    """Create every SQLite database of the instance once, as any earlier run would have (see the
    fresh-instance test for why two processes must not do it at the same moment)."""
    with pytest.MonkeyPatch.context() as mp:
        instance = _instance(home, mp)
        instance.get_runs()
        instance.event_log_storage.get_pool_limits()
        instance.fetch_materializations(dg.AssetKey("orbench_prompts"), limit=1)
        instance.all_instigator_state()


@pytest.fixture(scope="module")
def two_children(tmp_path_factory, request):
    request.getfixturevalue(
        "tiny_model"
    )  # the tiny model exists in the shared cache before the children start
    tmp = tmp_path_factory.mktemp("concurrency")
    home0 = tmp / "fresh"  # + round number
    for i in range(FRESH_ROUNDS):
        _home(Path(f"{home0}{i}"), 1)
    home1, home2 = _home(tmp / "home1"), _home(tmp / "home2", 2)
    _initialise(home1)
    _initialise(home2)
    go = tmp / "go"
    go.mkdir()
    storage = tmp / "storage"
    children = [
        Child(
            CHILD.format(
                category=c,
                stagger=STAGGER_S * i,
                go=str(go),
                tiny=str(TINY),
                storage=str(storage),
                hold=HOLD_S,
                home0=str(home0),
                rounds=FRESH_ROUNDS,
                home2=str(home2),
            ),
            env={"DAGSTER_HOME": str(home1)},
            stderr_path=tmp / f"{c}.err",
        )
        for i, c in enumerate(CATEGORIES)
    ]
    try:
        for phase in PHASES:
            for child in children:
                child.wait_for(f"ready {phase}", timeout=240)
            (go / phase).touch()  # both children leave the barrier together
        results = []
        for child in children:
            assert child.finish(timeout=240) == 0, child.stderr_tail()
            line = next(line for line in child.lines if line.startswith("RESULT "))
            results.append(json.loads(line[len("RESULT ") :]))
    finally:
        for child in children:
            child.kill()
    return {
        "home0": home0,
        "home1": home1,
        "home2": home2,
        "storage": storage,
        "go": go,
        "results": dict(zip(CATEGORIES, results)),
    }


def _step_window(
    instance: dg.DagsterInstance, run_id: str, step_keys: set[str] | None = None
) -> tuple[float, float]:
    """STEP_START and STEP_SUCCESS of the run's one step (of ``step_keys``: the asset's own step,
    not the asset checks that run as steps of their own beside it)."""
    records = instance.all_logs(
        run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}
    )
    if step_keys is not None:
        records = [r for r in records if r.dagster_event.step_key in step_keys]
    starts = [
        r.timestamp for r in records if r.dagster_event.event_type == DagsterEventType.STEP_START
    ]
    ends = [
        r.timestamp for r in records if r.dagster_event.event_type == DagsterEventType.STEP_SUCCESS
    ]
    assert len(starts) == 1 and len(ends) == 1, (run_id, records)
    return starts[0], ends[0]


def _run_start(instance: dg.DagsterInstance, run_id: str) -> float:
    (record,) = instance.all_logs(run_id, of_type=DagsterEventType.RUN_START)
    return record.timestamp


def _blocked_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [
        r.dagster_event.message or ""
        for r in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
        if "blocked by limit for pool" in (r.dagster_event.message or "")
    ]


def _windows(two_children, phase: str, home: str, monkeypatch):
    results = two_children["results"]
    assert all(r[phase]["success"] for r in results.values()), results
    instance = _instance(two_children[home], monkeypatch)
    run_ids = [results[c][phase]["run_id"] for c in CATEGORIES]
    return instance, run_ids, sorted(_step_window(instance, r) for r in run_ids)


def test_two_runs_on_different_partitions_at_once_both_succeed(two_children, monkeypatch):
    results, storage = two_children["results"], two_children["storage"]
    assert all(r["data"]["success"] for r in results.values()), results
    instance = _instance(two_children["home1"], monkeypatch)
    for asset, filename in (
        ("orbench_prompts", "prompts.parquet"),
        ("prompt_sample", "sample.parquet"),
    ):
        assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set(CATEGORIES)
        for category in CATEGORIES:
            assert (storage / asset / category / filename).is_file()
    runs = {r["data"]["run_id"] for r in results.values()}
    assert len(runs) == 2
    for run_id in runs:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
        assert not instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)


def test_gpu_pool_limit_1_never_overlaps_two_runs(two_children, monkeypatch):
    instance, run_ids, ((a_start, a_end), (b_start, b_end)) = _windows(
        two_children, "pool1", "home1", monkeypatch
    )
    assert a_end - a_start >= HOLD_S and b_end - b_start >= HOLD_S
    assert a_end <= b_start, (
        f"GPU steps overlapped: [{a_start:.2f}, {a_end:.2f}] and [{b_start:.2f}, {b_end:.2f}]"
    )
    # the runs themselves were concurrent: the second run had started before the first step ended, and waited
    assert max(_run_start(instance, r) for r in run_ids) < a_end
    blocked = [m for r in run_ids for m in _blocked_messages(instance, r)]
    assert blocked and all("pool gpu" in m for m in blocked)
    (pool,) = [p for p in instance.event_log_storage.get_pool_limits() if p.name == "gpu"]
    assert pool.limit == 1
    assert (
        instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0
    )  # every slot given back
    assert instance.get_materialized_partitions(dg.AssetKey("refusal_behaviour")) == {
        f"{c}|tiny-qwen2" for c in CATEGORIES
    }


def test_gpu_pool_holds_when_both_claims_come_at_the_same_instant(two_children, monkeypatch):
    """Dagster's SQLite pool claim can hand the one slot to both (a check-then-act race, forced here),
    so both steps may *start*; the per-device lock of ComputeResource still serialises the model use."""
    _windows(two_children, "race", "home1", monkeypatch)  # both runs succeeded
    (a_start, a_end), (b_start, b_end) = sorted(
        json.loads((two_children["go"] / f"used-race-{c}").read_text()) for c in CATEGORIES
    )
    assert a_end <= b_start, (
        f"model use overlapped: [{a_start:.2f}, {a_end:.2f}] and [{b_start:.2f}, {b_end:.2f}]"
    )


def test_control_with_pool_limit_2_the_same_steps_overlap(two_children, monkeypatch):
    instance, run_ids, ((a_start, a_end), (b_start, b_end)) = _windows(
        two_children, "pool2", "home2", monkeypatch
    )
    assert b_start < a_end, "with room for two, the steps should have run side by side"
    assert not [m for r in run_ids for m in _blocked_messages(instance, r)]
    (pool,) = [p for p in instance.event_log_storage.get_pool_limits() if p.name == "gpu"]
    assert pool.limit == 2


def test_fresh_instance_opened_by_two_processes_at_once(two_children, monkeypatch):
    results = two_children["results"]
    broken = []
    for i in range(FRESH_ROUNDS):
        try:
            assert _instance(Path(f"{two_children['home0']}{i}"), monkeypatch).get_runs() == []
        except Exception as e:  # e.g. alembic: 'more than one head present'
            broken.append(f"round {i}: {type(e).__name__}: {str(e)[:120]}")
    assert all(r == "ok" for c in CATEGORIES for r in results[c]["fresh"]) and not broken, (
        {c: results[c]["fresh"] for c in CATEGORIES},
        broken,
    )
