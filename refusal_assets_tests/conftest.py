import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """With ``--dist loadfile`` xdist's scheduler by default hands out the modules with the most
    tests first, which leaves the daemon's end-to-end module (one test, the longest) to the end,
    alone on one worker; keep the collection order instead, which puts it first (below)."""
    if getattr(config.option, "dist", "no") in ("loadfile", "loadscope"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the mark must already be there
def pytest_collection_modifyitems(config, items):
    """A test that needs the shared whole-graph run (:func:`shared_tiny_run`, directly or through
    a fixture) is slow: that run alone takes minutes on 2 shared cores, so the development loop
    (``-m "not slow"``) leaves it out; CI runs it."""
    for item in items:
        if "shared_tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        # under pytest-xdist the longest module starts first, so the other worker takes the rest
        # meanwhile instead of the suite ending on it alone (the same order on every worker)
        items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONGEST_FIRST)


# the slowest module (minutes of waiting on the daemon's ticks and its runs): first under xdist
LONGEST_FIRST = ("refusal_assets_tests/test_daemon_e2e.py",)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_xdist_worker():
    """Under pytest-xdist (``-n 2`` on 2 cores) each worker keeps torch to one thread: two workers
    with torch's default thread per core would spin against each other at every barrier of the tiny
    model's many small ops (see reliability/conftest.py). Serial runs keep torch's default."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tiny models and converted weights go to a per-session cache, never the user's."""
    if "REFUSAL_ASSETS_CACHE" not in os.environ or os.environ.get("CI") == "true":
        os.environ["REFUSAL_ASSETS_CACHE"] = str(tmp_path_factory.mktemp("model_cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True)
def _restore_cli_environment():
    """`refusal-assets` commands export their flags (config, data dir, storage, DAGSTER_HOME) to the
    environment on purpose; tests that call them in-process must not leak those into later tests
    (or into the servers those tests start)."""
    names = [
        n for n in os.environ if n.startswith("REFUSAL_ASSETS_") and n != "REFUSAL_ASSETS_CACHE"
    ] + ["DAGSTER_HOME"]
    saved = {n: os.environ.get(n) for n in names}
    yield
    for n in [
        n for n in os.environ if n.startswith("REFUSAL_ASSETS_") and n != "REFUSAL_ASSETS_CACHE"
    ] + ["DAGSTER_HOME"]:
        if saved.get(n) is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = saved[n]


@pytest.fixture(scope="session")
def tiny_cfg():
    from refusal_assets.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from refusal_assets.lm.models import load_model

    return load_model(tiny_cfg.models[0], tiny_cfg.resolve, "cpu", log=lambda s: None)


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "prompt,category") -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header.split(","))
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def shared_tiny_run(tmp_path_factory):
    """One real `refusal-assets run` of the tiny config, shared by the tests that need a fully
    materialized instance: each copies it (:func:`copy_tiny_run`) instead of running again.
    Returns ``(base, storage)``: ``base`` is the $DAGSTER_HOME the CLI was given (the instance is
    ``base/tiny``, one instance per config name).

    Under pytest-xdist (``-n 2``) the workers share one run: the first to need it builds it in the
    session's common temp folder under a file lock, the others wait for it and reuse it."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        tmp = tmp_path_factory.mktemp("shared_tiny_run")
        base, storage = tmp / "home", tmp / "storage"
        cli_run(ROOT / "configs" / "tiny.yaml", base, storage)
        return base, storage
    import fcntl

    tmp = tmp_path_factory.getbasetemp().parent / "shared_tiny_run"  # common to all workers
    tmp.mkdir(exist_ok=True)
    base, storage, done = tmp / "home", tmp / "storage", tmp / "done"
    with (tmp / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            import shutil

            shutil.rmtree(base, ignore_errors=True)  # a failed attempt's leftovers
            shutil.rmtree(storage, ignore_errors=True)
            cli_run(ROOT / "configs" / "tiny.yaml", base, storage)
            done.touch()
    return base, storage


def cli_run(config: Path, base: Path, storage: Path) -> None:
    """``refusal-assets run --config config --storage storage`` in a fresh process with
    $DAGSTER_HOME=base, as a user would type it; fails the caller with the output's tail."""
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REFUSAL_ASSETS_DATA_DIR", "REFUSAL_ASSETS_CONFIG", "REFUSAL_ASSETS_STORAGE")
    }
    env["DAGSTER_HOME"] = str(base)
    # one torch thread: on 2 shared cores, torch's second thread spins at every barrier of the
    # tiny model's many small ops (reliability/conftest.py measured 5-10x under load)
    env["OMP_NUM_THREADS"] = "1"
    command = ["run", "--config", str(config), "--storage", str(storage)]
    proc = subprocess.run(
        [sys.executable, "-m", "refusal_assets.app.cli", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def copy_tiny_run(shared_tiny_run, dst: Path) -> tuple[Path, Path]:
    """A private copy of the shared materialized instance and its storage under ``dst``."""
    import shutil

    base, storage = shared_tiny_run
    shutil.copytree(base, dst / "home")
    shutil.copytree(storage, dst / "storage")
    return dst / "home", dst / "storage"
