"""The UI end to end in headless Chromium: open the asset graph, materialize one orbench_prompts
partition from the UI, wait for success, save a screenshot."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from refusal_assets_tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("REFUSAL_ASSETS_ARTIFACTS", ROOT / "build" / "test-artifacts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def serve_ui(config: Path, env: dict, log_path: Path) -> Iterator[str]:
    """`refusal-assets ui` (webserver + daemon) in its own process group; yields its URL."""
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "refusal_assets.cli", "ui", "--config", str(config), "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            _wait_http(f"http://127.0.0.1:{port}/server_info", 120)
            yield f"http://127.0.0.1:{port}"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture()
def ui_server(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("REFUSAL_ASSETS_DATA_DIR", "REFUSAL_ASSETS_CONFIG")}
    env.update(DAGSTER_HOME=str(home), REFUSAL_ASSETS_STORAGE=str(tmp_path / "storage"))
    with serve_ui(ROOT / "configs" / "tiny.yaml", env, tmp_path / "ui.log") as url:
        yield url, home / "tiny", tmp_path  # the CLI keeps one instance per config name under $DAGSTER_HOME


def _materialized(instance: dg.DagsterInstance) -> set[str]:
    """Partitions with a materialization event (read from the event log, not the status cache)."""
    records = instance.fetch_materializations(dg.AssetKey("orbench_prompts"), limit=100).records
    return {r.asset_materialization.partition for r in records}


def _wait_for_partitions(instance: dg.DagsterInstance, wanted: set[str], tmp: Path, timeout: float = 420) -> None:
    """Wait until the partitions are materialized; fail early, with the runs' state and the server
    log, when a run fails or nothing happens."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if wanted <= _materialized(instance):
            return
        failed = [r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.FAILURE]
        if failed:
            break
        time.sleep(2)
    runs = [(r.run_id[:8], r.status.value, r.tags.get("dagster/partition")) for r in instance.get_runs()]
    log_tail = (tmp / "ui.log").read_text(errors="replace")[-3000:]
    pytest.fail(f"partitions {sorted(wanted)} not materialized; runs: {runs}\n--- ui.log tail ---\n{log_tail}")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
def test_materialize_a_partition_from_the_ui(ui_server):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) not installed")
    url, home, tmp = ui_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{url}/asset-groups", wait_until="networkidle")  # the global asset graph
        page.get_by_text("Global asset lineage").first.wait_for(timeout=30_000)
        if page.get_by_role("button", name="Skip").count():  # the first-visit newsletter dialog
            page.get_by_role("button", name="Skip").click()
        for group in ("data", "model", "sae", "circuits", "comparison", "report"):
            page.get_by_text(group, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "ui_asset_graph.png"))

        page.goto(f"{url}/assets/orbench_prompts", wait_until="networkidle")
        page.wait_for_timeout(1000)
        if page.get_by_role("button", name="Skip").count():
            page.get_by_role("button", name="Skip").click()
        page.get_by_role("button", name="Materialize…").click()
        dialog = page.locator("div.dagster-dialog")
        dialog.get_by_text("Select a partition or create one").click()
        page.keyboard.type("privacy")
        page.get_by_text("Select all (1)").click()  # the filter leaves exactly the one partition
        dialog.get_by_text("Launch runs to materialize orbench_prompts").click()  # close the partition picker
        assert "1 partition" in dialog.inner_text()
        dialog.get_by_role("button", name="Launch").last.click()

        instance = dg.DagsterInstance.from_config(str(home))
        _wait_for_partitions(instance, {"privacy"}, tmp)
        assert _materialized(instance) == {"privacy"}

        page.goto(f"{url}/assets/orbench_prompts?view=partitions", wait_until="networkidle")
        page.get_by_text("privacy").first.click()
        page.get_by_text("n_prompts").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "ui_materialized_partition.png"))
        browser.close()
    assert (tmp / "storage" / "orbench_prompts" / "privacy" / "prompts.parquet").is_file()
    assert (ARTIFACTS / "ui_materialized_partition.png").stat().st_size > 10_000

    # `refusal-assets backfill` launches a real asset backfill through the webserver's GraphQL API
    from refusal_assets.backfill import launch_backfill

    backfill_id = launch_backfill(url, "orbench_prompts", ["harassment", "violence"])
    assert instance.get_backfill(backfill_id) is not None
    _wait_for_partitions(instance, {"privacy", "harassment", "violence"}, tmp)
    assert _materialized(instance) == {"privacy", "harassment", "violence"}
