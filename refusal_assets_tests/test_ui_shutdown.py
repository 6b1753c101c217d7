"""`refusal-assets ui` stops its whole process tree (dagster dev, webserver, daemon, code servers)
when it gets SIGTERM, as a service manager or `kill <pid>` sends it."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from refusal_assets_tests.conftest import ROOT
from refusal_assets_tests.test_ui_browser import _free_port, _wait_http


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Processes still running; a zombie has exited (only its exit status waits to be read)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_sigterm_stops_the_whole_ui_tree(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REFUSAL_ASSETS_DATA_DIR", "REFUSAL_ASSETS_CONFIG")
    }
    env.update(
        DAGSTER_HOME=str(tmp_path / "home"), REFUSAL_ASSETS_STORAGE=str(tmp_path / "storage")
    )
    port = _free_port()
    log_path = tmp_path / "ui.log"
    with open(log_path, "w") as log:
        # Not in a new session: the CLI itself must take care of its children, nothing else does.
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refusal_assets.app.cli",
                "ui",
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    tree: list[psutil.Process] = []
    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", 180)
        root = psutil.Process(cli.pid)
        # The daemon starts a moment after the webserver answers: wait until both are in the tree.
        deadline = time.time() + 60
        while time.time() < deadline:
            tree = root.children(recursive=True)
            cmdlines = [" ".join(p.cmdline()) for p in _alive(tree)]
            if any("dagster_webserver" in c for c in cmdlines) and any(
                "dagster._daemon" in c for c in cmdlines
            ):
                break
            time.sleep(1)
        cmdlines = [" ".join(p.cmdline()) for p in _alive(tree)]
        assert any("dagster dev" in c for c in cmdlines), cmdlines
        assert any("dagster_webserver" in c for c in cmdlines), cmdlines
        assert any("dagster._daemon" in c for c in cmdlines), cmdlines

        t0 = time.time()
        cli.send_signal(signal.SIGTERM)
        rc = cli.wait(60)
        _, still = psutil.wait_procs(_alive(tree), timeout=10)
        survivors = [(p.pid, " ".join(p.cmdline())[:100]) for p in _alive(still)]
        assert not survivors, (
            f"still running {time.time() - t0:.0f} s after SIGTERM: {survivors}\n{log_path.read_text()[-3000:]}"
        )
        assert rc == 128 + signal.SIGTERM
    finally:
        for p in _alive(tree):
            p.kill()
        if cli.poll() is None:
            cli.kill()


STUBBORN = """
import signal, subprocess, sys, time
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
code = "import signal as s, time; s.signal(s.SIGINT, s.SIG_IGN); s.signal(s.SIGTERM, s.SIG_IGN); time.sleep(600)"
grandchild = subprocess.Popen([sys.executable, "-c", code])
print(grandchild.pid, flush=True)
time.sleep(600)
"""


def test_a_tree_that_ignores_sigint_and_sigterm_is_killed_after_the_grace_periods(tmp_path):
    """The escalation path: SIGINT, then SIGTERM to the group, then SIGKILL, within the grace periods."""
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    runner = (
        "import sys; from refusal_assets.app.cli import run_process_tree; "
        f"sys.exit(run_process_tree([sys.executable, {str(script)!r}], grace_s=1.0, term_grace_s=1.0))"
    )
    cli = subprocess.Popen(
        [sys.executable, "-c", runner],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tree: list[psutil.Process] = []
    try:
        grandchild_pid = int(cli.stdout.readline())
        tree = psutil.Process(cli.pid).children(recursive=True)
        assert grandchild_pid in {p.pid for p in tree} and len(tree) == 2
        t0 = time.time()
        cli.send_signal(signal.SIGTERM)
        rc = cli.wait(30)
        elapsed = time.time() - t0
        assert rc == 128 + signal.SIGTERM
        assert _alive(tree) == []
        assert 1.5 <= elapsed < 10  # it waited out both grace periods, then killed
        assert "SIGTERM received" in cli.stderr.read()
    finally:
        for p in _alive(tree):
            p.kill()
        if cli.poll() is None:
            cli.kill()


def test_a_child_that_exits_by_itself_gives_its_exit_code():
    from refusal_assets.app.cli import run_process_tree

    assert run_process_tree([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
