"""The tiny graph on a real PostgreSQL server (``dagster-postgres`` as the instance storage).

A module fixture starts Debian's PostgreSQL (``/usr/lib/postgresql/<version>/bin``: ``initdb``,
``pg_ctl``) on 127.0.0.1 at a free port, in a temporary data folder, with its own database user and
password (scram-sha-256 over TCP), and stops it afterwards. PostgreSQL refuses to run as root: as
root, the server runs as the ``postgres`` system user the Debian package creates (``runuser``).
The instance is ``dagster_home/dagster.postgres.yaml`` as committed, its ``DAGSTER_PG_*`` set to
that server. ``.ci/run`` installs the package; without the binaries the module skips.

- one full ``refusal-assets run`` of the tiny config;
- two ``refusal-assets run`` processes at once on different partitions (one category each), whose
  GPU steps both claim the ``gpu`` pool (limit 1) at the same moment (a file barrier before the step)
  and are held 2 s: their STEP_START..STEP_SUCCESS intervals never overlap, one waited ("blocked by
  limit for pool gpu"), and every materialization is in PostgreSQL's event log;
- run, event and schedule records read back from PostgreSQL, by Dagster and by plain SQL.

The two-process test found a Dagster 1.13 race on PostgreSQL: both runs' first claim creates the
pool's row, the loser's transaction is aborted and its run fails. ``refusal-assets`` commands now
create the row first (``gpu.ensure_gpu_pool``, from the CLI's instance initialisation), which is
what the ``pg_home`` fixture runs.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip(
    "dagster_postgres",
    reason="dagster-postgres is in the 'test' and 'k8s' extras: pip install -e '.[test]'",
)
psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 comes with dagster-postgres")

# deliberately after the importorskip calls: without dagster-postgres the module is skipped first
import dagster as dg  # noqa: E402
from dagster import DagsterEventType  # noqa: E402

from refusal_assets_tests.conftest import ROOT  # noqa: E402
from refusal_assets_tests.reliability.helpers import TINY, Child  # noqa: E402
from refusal_assets_tests.reliability.test_concurrency import (  # noqa: E402
    _blocked_messages,
    _step_window,
)

pytestmark = pytest.mark.slow  # a PostgreSQL server and whole-graph CLI runs: minutes
CATEGORIES = ["harassment", "illegal"]
HOLD_S = 2.0
GPU_STEPS = {
    "refusal_behaviour",
    "activations",
    "sae",
    "circuit",
    "transfer",
}  # the assets in the gpu pool
USER, PASSWORD, DB = "refusal", "refusal-test-pw", "dagster_test"


def _pg_bin() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` + ``pg_ctl start`` in a temp folder."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.port = _free_port()
        # not under pytest's tmp_path: that is 0700 root, and the server may run as "postgres"
        self.folder = Path(tempfile.mkdtemp(prefix="refusal-pg-"))
        self.data = self.folder / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user and shutil.which("runuser") is None:
            pytest.skip(
                "running as root and runuser is missing: PostgreSQL cannot be started as root"
            )

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*self.as_user, *cmd], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            log = (
                (self.folder / "server.log").read_text()[-2000:]
                if (self.folder / "server.log").exists()
                else ""
            )
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-2000:]} {log}"
            )

    def start(self) -> None:
        if self.as_user:
            shutil.chown(self.folder, "postgres", "postgres")
        pwfile = self.folder / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=peer",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        pwfile.unlink()
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200 -c fsync=off"
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "server.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        conn = self.connect("postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            conn.cursor().execute(f"CREATE DATABASE {DB}")
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
            )
        shutil.rmtree(self.folder, ignore_errors=True)

    def connect(self, db: str = DB):
        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname=db
        )

    @property
    def env(self) -> dict[str, str]:
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": USER,
            "DAGSTER_PG_PASSWORD": PASSWORD,
            "DAGSTER_PG_DB": DB,
        }

    def query(self, sql: str, *args) -> list[tuple]:
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(sql, args)
            return cur.fetchall()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
        )
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg_home(postgres, tmp_path_factory) -> Iterator[Path]:
    """$DAGSTER_HOME holding the committed dagster.postgres.yaml, the DAGSTER_PG_* of the server set,
    and the instance initialised once by the CLI's own first step (schema, and the gpu pool's row:
    see ``gpu.ensure_gpu_pool`` for the race without it) before any child starts."""
    home = tmp_path_factory.mktemp("pg_home")
    config = yaml.safe_load((ROOT / "dagster_home" / "dagster.postgres.yaml").read_text())
    assert config["concurrency"]["pools"] == {"default_limit": 1, "granularity": "op"}
    assert config["run_monitoring"]["enabled"] is True
    shutil.copy(ROOT / "dagster_home" / "dagster.postgres.yaml", home / "dagster.yaml")
    from refusal_assets.app.cli import (
        _init_instance_once,
    )  # what every refusal-assets command does first

    with pytest.MonkeyPatch.context() as mp:
        for k, v in postgres.env.items():
            mp.setenv(k, v)
        _init_instance_once(home)
        instance = dg.DagsterInstance.from_config(str(home))
        assert [(p.name, p.limit) for p in instance.event_log_storage.get_pool_limits()] == [
            ("gpu", 1)
        ]
        instance.dispose()
    yield home


def _instance(pg_home: Path, postgres: PostgresServer, monkeypatch) -> dg.DagsterInstance:
    for k, v in postgres.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(pg_home))
    return dg.DagsterInstance.from_config(str(pg_home))


CLI = """
import sys, time
from pathlib import Path
import dagster
from refusal_assets.lm import behaviour

go, me, hold = Path({go!r}), {me!r}, {hold!r}
real_behaviour, real_materialize = behaviour.run_behaviour, dagster.materialize

def held(*args, **kwargs):  # the GPU step stays busy long enough to see any overlap
    time.sleep(hold)
    return real_behaviour(*args, **kwargs)

def materialize(assets, **kwargs):  # both processes claim the gpu pool for their GPU step at once
    if any(a.key.to_user_string() == "refusal_behaviour" for a in assets):
        (go / ("at-gpu-" + me)).touch()
        while len(list(go.glob("at-gpu-*"))) < 2:
            time.sleep(0.01)
    return real_materialize(assets, **kwargs)

behaviour.run_behaviour, dagster.materialize = held, materialize
from refusal_assets.app.cli import main
sys.exit(main([
    "run", "--config", {config!r}, "--storage", {storage!r},
    "--select", "orbench_prompts,prompt_sample,refusal_behaviour",
]))
"""


def _one_category_config(folder: Path, category: str) -> Path:
    """The tiny config with one category: its process owns that category's partitions."""
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["categories"] = [category]
    raw["sae"]["train_categories"] = None  # the SAEs train on this config's one category
    raw["data"]["path"] = str(ROOT / raw["data"]["path"])
    path = folder / "configs" / f"tiny_{category}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def two_cli_runs(postgres, pg_home, tmp_path_factory, request):
    request.getfixturevalue(
        "tiny_model"
    )  # the tiny model is in the shared cache before the children start
    tmp = tmp_path_factory.mktemp("pg_two")
    go, storage = tmp / "go", tmp / "storage"
    go.mkdir()
    env = {**postgres.env, "DAGSTER_HOME": str(pg_home)}
    t0 = time.time()
    children = [
        Child(
            CLI.format(
                go=str(go),
                me=c,
                hold=HOLD_S,
                config=str(_one_category_config(tmp, c)),
                storage=str(storage),
            ),
            env=env,
            stderr_path=tmp / f"{c}.err",
        )
        for c in CATEGORIES
    ]
    try:
        for c, child in zip(CATEGORIES, children):
            rc = child.finish(timeout=900)
            (tmp / f"{c}.out").write_text("\n".join(child.lines))
            assert rc == 0, ("\n".join(child.lines)[-4000:], child.stderr_tail())
    finally:
        for child in children:
            child.kill()
    return {
        "storage": storage,
        "t0": t0,
        "t1": time.time(),
        "lines": {c: ch.lines for c, ch in zip(CATEGORIES, children)},
    }


def _runs_since(instance: dg.DagsterInstance, t0: float) -> list[dg.DagsterRun]:
    return [
        r.dagster_run
        for r in instance.get_run_records()
        if r.create_timestamp.timestamp() >= t0 - 1
    ]


def _gpu_windows(instance: dg.DagsterInstance, runs) -> list[tuple[float, float, str]]:
    """(STEP_START, STEP_SUCCESS, run id) of every run whose step is in the gpu pool, by start."""
    out = []
    for run in runs:
        starts = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
        if any(r.dagster_event.step_key in GPU_STEPS for r in starts):
            start, end = _step_window(instance, run.run_id, GPU_STEPS)
            out.append((start, end, run.run_id))
    return sorted(out)


def test_two_concurrent_cli_runs_share_the_gpu_pool(two_cli_runs, postgres, pg_home, monkeypatch):
    instance = _instance(pg_home, postgres, monkeypatch)
    runs = _runs_since(instance, two_cli_runs["t0"])
    assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [
        (r.run_id, r.status) for r in runs
    ]
    assert len(runs) == 2 * 3, [
        r.asset_selection for r in runs
    ]  # per process: prompts, sample, behaviour
    windows = _gpu_windows(instance, runs)
    assert len(windows) == 2
    (a_start, a_end, _), (b_start, b_end, b_run) = windows
    assert a_end - a_start >= HOLD_S and b_end - b_start >= HOLD_S
    assert a_end <= b_start, (
        f"GPU steps overlapped beyond the pool limit 1: [{a_start:.2f}, {a_end:.2f}] and [{b_start:.2f}, {b_end:.2f}]"
    )
    blocked = _blocked_messages(instance, b_run)
    assert blocked and all("pool gpu" in m for m in blocked), (
        "the second GPU step never waited for the pool"
    )
    assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0
    # every materialization of both processes, in PostgreSQL's event log
    for asset, parts in (
        ("orbench_prompts", set(CATEGORIES)),
        ("prompt_sample", set(CATEGORIES)),
        ("refusal_behaviour", {f"{c}|tiny-qwen2" for c in CATEGORIES}),
    ):
        assert instance.get_materialized_partitions(dg.AssetKey(asset)) >= parts
        rows = postgres.query(
            "SELECT DISTINCT partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
            "AND asset_key = %s AND run_id = ANY(%s)",
            dg.AssetKey(asset).to_string(),
            [r.run_id for r in runs],
        )
        assert {p for (p,) in rows} == parts, (asset, rows)
        for category in CATEGORIES:
            assert (
                two_cli_runs["storage"] / asset / category
            ).is_dir() or asset == "refusal_behaviour"


def test_full_tiny_run_on_postgres(postgres, pg_home, tmp_path, monkeypatch, request):
    request.getfixturevalue("tiny_model")
    env = {
        **os.environ,
        **postgres.env,
        "DAGSTER_HOME": str(pg_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    t0 = time.time()
    done = subprocess.run(
        ["refusal-assets", "run", "--config", str(TINY), "--storage", str(tmp_path / "storage")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "storage" / "report" / "report.html").is_file()
    instance = _instance(pg_home, postgres, monkeypatch)
    runs = _runs_since(instance, t0)
    reported = int(done.stdout.split("done: ", 1)[1].split(" runs", 1)[0])
    assert len(runs) == reported and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    # the same runs and their materializations by plain SQL
    ids = [r.run_id for r in runs]
    (n_sql,) = postgres.query(
        "SELECT count(*) FROM runs WHERE run_id = ANY(%s) AND status = 'SUCCESS'", ids
    )[0]
    assert n_sql == len(runs)
    materialized = {
        k
        for (k,) in postgres.query(
            "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = "
            "'ASSET_MATERIALIZATION' AND run_id = ANY(%s)",
            ids,
        )
    }
    assert {
        dg.AssetKey(a).to_string()
        for a in ("orbench_prompts", "refusal_behaviour", "sae", "circuit", "comparison", "report")
    } <= materialized
    # no two GPU steps of the run overlapped (pool limit 1), from the step events
    windows = _gpu_windows(instance, runs)
    assert windows and all(a[1] <= b[0] for a, b in itertools.pairwise(windows))


def test_schedule_state_and_events_read_back_from_postgres(postgres, pg_home, monkeypatch):
    """Start the report schedule through a workspace of the code location (as the UI would), then
    read it back by a fresh instance and by SQL on the instigators table."""
    from dagster._core.scheduler.instigation import InstigatorStatus
    from dagster._core.test_utils import in_process_test_workspace
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    instance = _instance(pg_home, postgres, monkeypatch)
    monkeypatch.setenv("REFUSAL_ASSETS_CONFIG", str(TINY))
    with in_process_test_workspace(
        instance,
        LoadableTargetOrigin(module_name="refusal_assets.definitions", working_directory=str(ROOT)),
    ) as ws:
        (entry,) = ws.get_code_location_entries().values()
        (repo,) = entry.code_location.get_repositories().values()
        schedule = repo.get_schedule("refresh_report_schedule")
        instance.start_schedule(schedule)
    fresh = dg.DagsterInstance.from_config(str(pg_home))
    states = [s for s in fresh.all_instigator_state() if s.name == "refresh_report_schedule"]
    assert len(states) == 1 and states[0].status == InstigatorStatus.RUNNING
    rows = postgres.query(
        "SELECT status, instigator_type FROM instigators WHERE instigator_body LIKE %s",
        "%refresh_report_schedule%",
    )
    assert rows == [("RUNNING", "SCHEDULE")]
    assert fresh.event_log_storage.__class__.__module__.startswith("dagster_postgres")
    assert fresh.run_storage.__class__.__module__.startswith("dagster_postgres")
    assert fresh.schedule_storage.__class__.__module__.startswith("dagster_postgres")
