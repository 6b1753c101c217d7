"""A multi-GPU workstation, simulated: ``ComputeResource`` hands each step a free device out of N,
one lock file per device, and the ``gpu`` pool limit N lets N steps run at once. No GPU needed:
``torch.cuda`` is patched to report the devices, and nothing is ever put on them."""

from __future__ import annotations

import fcntl
import json
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import torch

from refusal_assets.defs.gpu import GPU_POOL
from refusal_assets.defs.resources import ComputeResource


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    """torch sees two CUDA devices; the locks live in a fresh folder."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = {}
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: current.__setitem__(threading.get_ident(), str(d))
    )
    monkeypatch.setenv("REFUSAL_ASSETS_DEVICE_LOCKS", str(tmp_path / "locks"))
    return current


def _held_elsewhere(path: Path) -> bool:
    """True when another open file holds the lock (a new open file description cannot take it)."""
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_auto_resolves_one_entry_per_visible_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ComputeResource().resolved_devices() == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ComputeResource().resolved_devices() == ["cuda"]  # one GPU: the same name as before
    assert ComputeResource().resolved_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert ComputeResource().resolved_devices() == ["cuda:0", "cuda:1", "cuda:2"]
    assert ComputeResource(devices=["cuda:2", "cuda:0"]).resolved_devices() == ["cuda:2", "cuda:0"]
    with pytest.raises(RuntimeError, match=r"'cuda:5'.*3 CUDA device"):
        ComputeResource(devices=["cuda:0", "cuda:5"]).resolved_devices()
    with pytest.raises(ValueError, match="twice"):
        ComputeResource(devices=["cuda:1", "cuda:1"]).resolved_devices()
    with pytest.raises(ValueError, match="serialize_device"):
        ComputeResource(serialize_device=False).resolved_devices()


def test_cuda_requested_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="'cuda:1' requested but CUDA is not available"):
        ComputeResource(device="cuda:1").resolved_devices()


def test_third_claim_waits_for_a_freed_device(two_gpus):
    compute = ComputeResource(poll_s=0.01)
    got: list[str] = []
    with compute.claim() as a, compute.claim() as b:
        assert {a, b} == {"cuda:0", "cuda:1"}

        def third():
            with compute.claim() as c:
                got.append(c)

        t = threading.Thread(target=third)
        t.start()
        time.sleep(0.3)
        assert not got, "a third step got a device while both were held"
        freed = b
    t.join(timeout=10)
    assert got and got[0] in {a, freed}
    assert not _held_elsewhere(compute.lock_path("cuda:0")) and not _held_elsewhere(
        compute.lock_path("cuda:1")
    )


CHILD = """
import json, time
from pathlib import Path
import dagster as dg
import torch
torch.cuda.is_available = lambda: True  # two simulated GPUs; nothing is ever put on them
torch.cuda.device_count = lambda: 2
current = []
torch.cuda.set_device = lambda d: current.append(str(d))
from refusal_assets.defs.gpu import GPU_POOL
from refusal_assets.defs.resources import ComputeResource
from refusal_assets_tests.test_devices import _held_elsewhere, _wait_for_both

name, folder = {name!r}, Path({folder!r})

@dg.asset(name=name, pool=GPU_POOL)
def step(compute: ComputeResource) -> None:
    with compute.claim() as device:
        t0 = time.time()
        _wait_for_both(folder, "inside", name)  # times out unless the other run's step is inside its claim too
        seen = {{"device": device, "start": t0, "current": current[-1] if current else None,
                 "own_lock_held": _held_elsewhere(compute.lock_path(device)),
                 "locks_held": {{d: _held_elsewhere(compute.lock_path(d)) for d in ("cuda:0", "cuda:1")}}}}
        _wait_for_both(folder, "looked", name)  # neither leaves before both have looked
        seen["end"] = time.time()
    (folder / ("seen-" + name)).write_text(json.dumps(seen))

result = dg.materialize([step], resources={{"compute": ComputeResource(poll_s=0.01)}},
                        instance=dg.DagsterInstance.get(), raise_on_error=False)
print("RESULT " + json.dumps({{"success": result.success, "run_id": result.run_id}}), flush=True)
"""
NAMES = ("step_a", "step_b")


def _wait_for_both(folder: Path, phase: str, name: str, timeout: float = 90) -> None:
    """A two-process barrier on files: mark ``phase`` for ``name``, wait until both have."""
    (folder / f"{phase}-{name}").touch()
    deadline = time.monotonic() + timeout
    while not all((folder / f"{phase}-{n}").exists() for n in NAMES):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: the other step never reached {phase!r}")
        time.sleep(0.01)


@pytest.mark.slow
def test_pool_limit_2_runs_two_gpu_steps_at_once_on_different_devices(tmp_path, monkeypatch):
    """Two processes (as two backfill runs on a workstation would be), each one run of one GPU-pool
    step, against an instance whose ``gpu`` pool allows two: both steps are inside their device
    claim at the same moment (a file barrier that needs both), on different devices, each holding
    its own device's lock, which the other process sees held."""
    from refusal_assets_tests.reliability.helpers import Child

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "concurrency:\n  pools:\n    default_limit: 2\n    granularity: op\ntelemetry:\n  enabled: false\n"
    )
    dg.DagsterInstance.from_config(
        str(home)
    ).get_runs()  # create the SQLite schema once, before the children
    env = {"DAGSTER_HOME": str(home), "REFUSAL_ASSETS_DEVICE_LOCKS": str(tmp_path / "locks")}
    monkeypatch.setenv("REFUSAL_ASSETS_DEVICE_LOCKS", env["REFUSAL_ASSETS_DEVICE_LOCKS"])
    children = [
        Child(
            CHILD.format(name=n, folder=str(tmp_path)), env=env, stderr_path=tmp_path / f"{n}.err"
        )
        for n in NAMES
    ]
    try:
        results = {}
        for n, child in zip(NAMES, children):
            assert child.finish(timeout=240) == 0, child.stderr_tail()
            results[n] = json.loads(
                next(line for line in child.lines if line.startswith("RESULT "))[len("RESULT ") :]
            )
    finally:
        for child in children:
            child.kill()
    assert all(r["success"] for r in results.values()), (
        results,
        [c.stderr_tail() for c in children],
    )
    a, b = (json.loads((tmp_path / f"seen-{n}").read_text()) for n in NAMES)
    assert {a["device"], b["device"]} == {"cuda:0", "cuda:1"}
    assert a["own_lock_held"] and b["own_lock_held"]
    assert a["locks_held"] == b["locks_held"] == {"cuda:0": True, "cuda:1": True}
    assert (
        a["current"] == a["device"] and b["current"] == b["device"]
    )  # torch's current device follows the claim
    assert max(a["start"], b["start"]) < min(a["end"], b["end"])  # the two steps overlapped
    instance = dg.DagsterInstance.from_config(str(home))
    (pool,) = [p for p in instance.event_log_storage.get_pool_limits() if p.name == GPU_POOL]
    assert pool.limit == 2
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 0
    for r in results.values():
        assert instance.get_run_by_id(r["run_id"]).status == dg.DagsterRunStatus.SUCCESS
    assert not any(
        _held_elsewhere(ComputeResource().lock_path(d)) for d in ("cuda:0", "cuda:1")
    )  # freed again


def test_ensure_gpu_pool_creates_the_row_once(tmp_path):
    from refusal_assets.defs.gpu import ensure_gpu_pool

    home = tmp_path / "with_pools"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "concurrency:\n  pools:\n    default_limit: 3\n    granularity: op\ntelemetry:\n  enabled: false\n"
    )
    instance = dg.DagsterInstance.from_config(str(home))
    assert not [p for p in instance.event_log_storage.get_pool_limits() if p.name == GPU_POOL]
    assert ensure_gpu_pool(instance) and ensure_gpu_pool(instance)  # idempotent
    assert [(p.name, p.limit) for p in instance.event_log_storage.get_pool_limits()] == [
        (GPU_POOL, 3)
    ]
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 3
    bare = tmp_path / "no_pools"
    bare.mkdir()
    (bare / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert (
        ensure_gpu_pool(dg.DagsterInstance.from_config(str(bare))) is False
    )  # no default limit: nothing to create
