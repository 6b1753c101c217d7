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
    env = {k: v for k, v in os.environ.items() if k not in ("REFUSAL_ASSETS_DATA_DIR", "REFUSAL_ASSETS_CONFIG")}
    env.update(DAGSTER_HOME=str(tmp_path / "home"), REFUSAL_ASSETS_STORAGE=str(tmp_path / "storage"))
    port = _free_port()
    log_path = tmp_path / "ui.log"
    with open(log_path, "w") as log:
        # Not in a new session: the CLI itself must take care of its children, nothing else does.
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refusal_assets.cli",
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
            if any("dagster_webserver" in c for c in cmdlines) and any("dagster._daemon" in c for c in cmdlines):
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
