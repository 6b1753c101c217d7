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

from refusal_assets_tests.conftest import ROOT, copy_tiny_run
from refusal_assets_tests.test_report import CATS, two_model_storage

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
            [
                sys.executable,
                "-m",
                "refusal_assets.app.cli",
                "ui",
                "--config",
                str(config),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_http(f"http://127.0.0.1:{port}/server_info", 300)  # minutes on 2 busy cores
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
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REFUSAL_ASSETS_DATA_DIR", "REFUSAL_ASSETS_CONFIG")
    }
    env.update(DAGSTER_HOME=str(home), REFUSAL_ASSETS_STORAGE=str(tmp_path / "storage"))
    with serve_ui(ROOT / "configs" / "tiny.yaml", env, tmp_path / "ui.log") as url:
        yield (
            url,
            home / "tiny",
            tmp_path,
        )  # the CLI keeps one instance per config name under $DAGSTER_HOME


def _materialized(instance: dg.DagsterInstance) -> set[str]:
    """Partitions with a materialization event (read from the event log, not the status cache)."""
    records = instance.fetch_materializations(dg.AssetKey("orbench_prompts"), limit=100).records
    return {r.asset_materialization.partition for r in records}


def _wait_for_partitions(
    instance: dg.DagsterInstance, wanted: set[str], tmp: Path, timeout: float = 420
) -> None:
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
    runs = [
        (r.run_id[:8], r.status.value, r.tags.get("dagster/partition")) for r in instance.get_runs()
    ]
    log_tail = (tmp / "ui.log").read_text(errors="replace")[-3000:]
    pytest.fail(
        f"partitions {sorted(wanted)} not materialized; runs: {runs}\n--- ui.log tail ---\n{log_tail}"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it",
)
def test_materialize_a_partition_from_the_ui(ui_server):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright (test extra) not installed"
    )
    url, home, tmp = ui_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
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
        dialog.get_by_text(
            "Launch runs to materialize orbench_prompts"
        ).click()  # close the partition picker
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
    from refusal_assets.app.backfill import launch_backfill

    backfill_id = launch_backfill(url, "orbench_prompts", ["harassment", "violence"])
    assert instance.get_backfill(backfill_id) is not None
    _wait_for_partitions(instance, {"privacy", "harassment", "violence"}, tmp)
    assert _materialized(instance) == {"privacy", "harassment", "violence"}


# ------------------------------------------------------------------ the science in the UI and the report

BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


_PAGES_WITH_SKIP_HANDLER: set[int] = set()


def _skip_dialog(page) -> None:
    """The first-visit newsletter dialog, whenever it opens: it can open after the page looks
    loaded (a loaded machine), and its backdrop then swallows the next click, so a locator handler
    clicks its Skip button before any action it would block (registered once per page)."""
    skip = page.get_by_role("button", name="Skip")
    if id(page) not in _PAGES_WITH_SKIP_HANDLER:
        page.add_locator_handler(skip, lambda button: button.click())
        _PAGES_WITH_SKIP_HANDLER.add(id(page))


def assert_first_screen(page, html: Path, model_keys: list[str], shot: Path) -> None:
    """``html`` at 1400 x 900: every model's verdict and summary figure lie inside the first screen."""
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(html.as_uri(), wait_until="load")
    page.screenshot(path=str(shot))
    for key in model_keys:
        card = page.locator(f'article.model[data-model="{key}"]')
        answers = card.locator(".verdict")  # the execution- and the feature-level answer
        assert answers.count() == 2, key
        for part in (answers.nth(0), answers.nth(1), card.locator("img.summary")):
            box = part.bounding_box()
            assert box is not None, f"{key}: {part} not rendered"
            assert (
                box["x"] >= 0
                and box["y"] >= 0
                and box["x"] + box["width"] <= 1400
                and box["y"] + box["height"] <= 900
            ), (key, box)
        figure = card.locator("img.summary").bounding_box()
        assert figure["width"] >= 300 and figure["height"] >= 100, (
            key,
            figure,
        )  # legible, not a thumbnail
        assert page.evaluate(
            "img => img.complete && img.naturalWidth > 0",
            card.locator("img.summary").element_handle(),
        )


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it",
)
def test_report_answer_is_on_the_first_screen(tiny_cfg, tmp_path):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright (test extra) not installed"
    )
    from refusal_assets.report.report import write_report

    cfg, layout = two_model_storage(tiny_cfg, tmp_path)
    written = write_report(cfg, layout, CATS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        assert_first_screen(
            browser.new_page(),
            written.html,
            [m.model_key for m in cfg.models],
            ARTIFACTS / "report_first_screen_two_models.png",
        )
        browser.close()


@pytest.fixture(scope="module")
def tiny_ui(shared_tiny_run, tmp_path_factory):
    """The whole tiny graph materialized by `refusal-assets run` (a copy of the session's shared
    run: ``tmp/home``, ``tmp/storage``), then the UI over that instance."""
    tmp = tmp_path_factory.mktemp("tiny_ui")
    home, storage = copy_tiny_run(shared_tiny_run, tmp)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REFUSAL_ASSETS_DATA_DIR", "REFUSAL_ASSETS_CONFIG")
    }
    env.update(DAGSTER_HOME=str(home), REFUSAL_ASSETS_STORAGE=str(storage))
    config = ROOT / "configs" / "tiny.yaml"
    with serve_ui(config, env, tmp / "ui.log") as url:
        yield url, tmp


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it",
)
def test_report_and_circuit_in_the_ui(tiny_ui):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright (test extra) not installed"
    )
    url, tmp = tiny_ui
    instance = dg.DagsterInstance.from_config(
        str(tmp / "home" / "tiny")
    )  # one instance per config name
    latest = instance.get_latest_materialization_event(dg.AssetKey("report")).asset_materialization
    verdict = latest.metadata["verdict_tiny-qwen2"].value
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})

        # the report asset: its verdict as Markdown, the owners and stage tag
        page.goto(f"{url}/assets/report", wait_until="networkidle")
        _skip_dialog(page)
        page.get_by_text("summary_figure_tiny-qwen2").first.wait_for(timeout=60_000)
        assert (
            page.get_by_text("refusal-assets", exact=True).count()
            and page.get_by_text("stage: report").count()
        )
        # the UI renders a Markdown value inline, or behind "Show Markdown" when it is long
        row = page.locator("tr", has=page.get_by_text("verdict", exact=True))
        button = row.get_by_text("Show Markdown")
        shown = page.get_by_role("dialog") if button.count() else row
        if button.count():
            button.click()
        shown.get_by_text(f"tiny-qwen2: {verdict}").first.wait_for(timeout=30_000)
        text = shown.first.inner_text()
        assert "Circuit overlap" in text and "Sample:" in text, text[:2000]
        page.wait_for_timeout(800)  # let a dialog finish fading in
        page.screenshot(path=str(ARTIFACTS / "ui_report_verdict.png"))
        page.keyboard.press("Escape")

        # one circuit partition: CI bounds as floats, the top nodes as a table with its column schema
        page.goto(
            f"{url}/assets/circuit?view=partitions&partition=harassment|tiny-qwen2",
            wait_until="networkidle",
        )
        _skip_dialog(page)
        page.get_by_text("faithfulness_ci_lo").first.wait_for(timeout=60_000)
        page.locator("tr", has=page.get_by_text("top_nodes", exact=True)).get_by_text(
            "Show schema"
        ).click()
        page.get_by_text("mean attribution-patching effect on the refusal score").first.wait_for(
            timeout=30_000
        )
        page.wait_for_timeout(800)  # let the dialog finish fading in
        page.screenshot(path=str(ARTIFACTS / "ui_circuit_partition.png"))
        page.keyboard.press("Escape")

        # a Parquet partition: dagster/column_schema from the file's schema, and its row count
        page.goto(
            f"{url}/assets/refusal_behaviour?view=partitions&partition=harassment|tiny-qwen2",
            wait_until="networkidle",
        )
        _skip_dialog(page)
        page.get_by_text("dagster/row_count").first.wait_for(timeout=60_000)
        page.get_by_text("Show Table Schema").first.click()
        page.get_by_role("dialog").get_by_text("refusal_score").first.wait_for(timeout=30_000)
        page.wait_for_timeout(800)  # let the dialog finish fading in
        page.screenshot(path=str(ARTIFACTS / "ui_behaviour_column_schema.png"))

        # the report the run wrote, answer first
        assert_first_screen(
            page,
            tmp / "storage" / "report" / "report.html",
            ["tiny-qwen2"],
            ARTIFACTS / "report_first_screen_tiny.png",
        )
        browser.close()
    for name in (
        "ui_report_verdict.png",
        "ui_circuit_partition.png",
        "ui_behaviour_column_schema.png",
        "report_first_screen_tiny.png",
    ):
        assert (ARTIFACTS / name).stat().st_size > 10_000, name


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it",
)
def test_report_features_section_and_a_card_open(shared_tiny_run, tmp_path):
    """A reader jumps to the report's Features section of a real tiny run, sees a feature card
    (its title names a site latent, its examples are there) and opens its per-category rates."""
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright (test extra) not installed"
    )
    from refusal_assets.config import load_config
    from refusal_assets.layout import Layout
    from refusal_assets.report.report import write_report

    _, storage = copy_tiny_run(shared_tiny_run, tmp_path)
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    written = write_report(cfg, Layout(storage), sorted(cfg.data.categories))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(written.html.as_uri() + "#features")
        section = page.locator("section#features")
        assert section.locator("h2").inner_text().strip() == "Features"
        card = section.locator(".fcard").first
        card.scroll_into_view_if_needed()
        assert card.is_visible()
        assert "latent" in card.locator("h4").inner_text()
        assert card.locator(".ex").count() >= 1, "a card without examples"
        rates = card.locator("details")
        assert rates.get_attribute("open") is None
        rates.locator("summary").click()
        assert rates.get_attribute("open") is not None
        assert rates.locator("table").is_visible()
        page.screenshot(path=str(ARTIFACTS / "report_features_card.png"))
        browser.close()
