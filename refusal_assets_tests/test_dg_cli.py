"""Dagster 1.13's own CLI works on the project from the repo root: `dg check defs` loads the code
location and `dg list defs` lists its assets, from pyproject's [tool.dg] (no network)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from refusal_assets_tests.conftest import ROOT

# Every asset the tiny config defines; `dg list defs` must show all of them.
TINY_ASSETS = {
    "orbench_prompts",
    "prompt_sample",
    "data_profile",
    "refusal_behaviour",
    "activations",
    "sae",
    "features",  # the SAE latents' cards, per site like sae
    "refusal_direction",  # per model
    "circuit",
    "transfer",
    "comparison",
    "report",
    # the observable sources whose data versions carry each model's settings
    "model_config",
    "site_config",
}


def _dg() -> str:
    """The `dg` of this interpreter's environment (dagster-dg-cli is in the test extra)."""
    local = Path(sys.executable).with_name("dg")
    found = str(local) if local.is_file() else shutil.which("dg")
    assert found, (
        "dg not found: install the test extra (pip install -e '.[test]'), which brings dagster-dg-cli"
    )
    return found


def _run_dg(args: list[str], tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("REFUSAL_ASSETS_DATA_DIR",)}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    shutil.copy(
        ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml"
    )  # telemetry off, as the CLI does
    env.update(
        DAGSTER_HOME=str(home),
        REFUSAL_ASSETS_CONFIG=str(config),
        REFUSAL_ASSETS_STORAGE=str(tmp_path / "storage"),
    )
    return subprocess.run(
        [_dg(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_dg_check_and_list_defs(tmp_path):
    checked = _run_dg(["check", "defs"], tmp_path, ROOT / "configs" / "tiny.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    listed = _run_dg(["list", "defs", "--json"], tmp_path, ROOT / "configs" / "tiny.yaml")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    defs = json.loads(listed.stdout)
    assert {a["asset_key"] for a in defs["assets"]} == TINY_ASSETS
    assert "sae:fvu_below_threshold" in {c["key"] for c in defs["asset_checks"]}
    assert "refresh_report_schedule" in {s["name"] for s in defs["schedules"]}


def test_dg_check_defs_fails_on_a_bad_config(tmp_path):
    bad = tmp_path / "configs" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text(
        (ROOT / "configs" / "tiny.yaml")
        .read_text()
        .replace('activation_layers: ["residuals_1-2"]', 'activation_layers: ["residuals_30"]')
    )
    checked = _run_dg(["check", "defs"], tmp_path, bad)
    assert checked.returncode != 0
    assert "layer 30" in checked.stdout + checked.stderr
