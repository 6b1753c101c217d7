"""`refusal-assets run` builds only what is missing, stale or failed (Dagster's stale status), and
resumes after a kill; `--force`, `--dry-run`, `backfill --missing` and `prune`, on the tiny
config."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from refusal_assets.app import cli
from refusal_assets.app.plan import contiguous_ranges
from refusal_assets.config import load_config
from refusal_assets.defs.build import build_defs
from refusal_assets_tests.automation_world import stale
from refusal_assets_tests.conftest import ROOT, copy_tiny_run

A = "tiny-qwen2"
CATS = ["harassment", "illegal", "privacy", "violence"]
CHEAP = "orbench_prompts,prompt_sample,refusal_behaviour"  # 12 partitions, no SAE
PLAN_LINE = re.compile(r"^(\d+) partitions: (\d+) to build, (\d+) up to date$", re.M)


def _config_copy(tmp: Path, edit: tuple[str, str] | None = None, replace_all: bool = False) -> Path:
    """The tiny config at ``tmp/configs/tiny.yaml`` with one text edit. Its relative data path
    resolves through a link to the repo's data, so the data section (and its hash) is unchanged."""
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    if edit is not None:
        assert edit[0] in text, edit
        text = text.replace(edit[0], edit[1]) if replace_all else text.replace(edit[0], edit[1], 1)
    (tmp / "configs").mkdir(parents=True, exist_ok=True)
    if not (tmp / "data").exists():
        (tmp / "data").symlink_to(ROOT / "data", target_is_directory=True)
    path = tmp / "configs" / "tiny.yaml"
    path.write_text(text)
    return path


def _instance(base: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(base / "tiny"))  # one instance per config name


def _materializations(base: Path) -> Counter:
    """Materialization events per (asset, partition), read from the event log."""
    instance = _instance(base)
    try:
        out: Counter = Counter()
        for key in instance.get_asset_keys():
            for r in instance.fetch_materializations(key, limit=10_000).records:
                out[(key.to_user_string(), r.asset_materialization.partition)] += 1
        return out
    finally:
        instance.dispose()


def _cli(
    args: list[str], base: Path, config: Path, storage: Path, monkeypatch, capsys
) -> tuple[int, str]:
    monkeypatch.setenv("DAGSTER_HOME", str(base))
    capsys.readouterr()
    rc = cli.main([*args, "--config", str(config), "--storage", str(storage)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _plan_counts(out: str) -> tuple[int, int, int]:
    m = PLAN_LINE.search(out)
    assert m, out
    return int(m[1]), int(m[2]), int(m[3])


def _downstream_of(
    defs: dg.Definitions, roots: set[tuple[str, str | None]]
) -> set[tuple[str, str | None]]:
    """``roots`` and every partition downstream of them in the asset graph."""
    graph = defs.resolve_asset_graph()
    seen, todo = set(roots), list(roots)
    while todo:
        key, partition = todo.pop()
        for child in graph.get_children_partitions(dg.AssetKey(key), partition):
            item = (child.asset_key.to_user_string(), child.partition_key)
            if child.asset_key in graph.materializable_asset_keys and item not in seen:
                seen.add(item)
                todo.append(item)
    return seen


@pytest.fixture()
def materialized(shared_tiny_run, tmp_path):
    """A private copy of the shared materialized tiny run: (base, storage)."""
    return copy_tiny_run(shared_tiny_run, tmp_path)


def test_contiguous_ranges_split_at_gaps():
    keys = ["a", "b", "c", "d", "e"]
    assert contiguous_ranges(keys, ["a", "b", "c", "d", "e"]) == [("a", "e")]
    assert contiguous_ranges(keys, ["b", "d", "e"]) == [("b", "b"), ("d", "e")]
    assert contiguous_ranges(keys, []) == []


def test_no_change_rerun_records_nothing(materialized, monkeypatch, capsys):
    base, storage = materialized
    config = ROOT / "configs" / "tiny.yaml"
    before = _materializations(base)
    rc, out = _cli(["run"], base, config, storage, monkeypatch, capsys)
    assert rc == 0, out
    n, n_build, n_fresh = _plan_counts(out)
    assert n == len(before) and n_build == 0 and n_fresh == n, out
    assert "done: 0 runs in " in out
    assert _materializations(base) == before, "a no-change rerun records no materialization"
    # backfill --missing has nothing to launch either (it stops before contacting the webserver)
    rc, out = _cli(
        ["backfill", "--missing", "--url", "http://127.0.0.1:9"],
        base,
        config,
        storage,
        monkeypatch,
        capsys,
    )
    assert rc == 0 and "nothing to backfill" in out, out


def test_generation_edit_rebuilds_behaviour_and_what_follows_only(
    materialized, tmp_path, monkeypatch, capsys
):
    base, storage = materialized
    config = _config_copy(
        tmp_path, ("generation: {max_new_tokens: 4}", "generation: {max_new_tokens: 5}")
    )
    before = _materializations(base)

    rc, out = _cli(["run", "--dry-run", "-v"], base, config, storage, monkeypatch, capsys)
    assert rc == 0, out
    assert _materializations(base) == before, "--dry-run builds nothing"
    for c in CATS:
        assert (
            f"  build refusal_behaviour {c}|{A}: stale: model_config [{A}] has a new data version"
            in out
        ), out
    assert (
        f"  build circuit privacy|{A}: upstream refusal_behaviour [privacy|{A}] "
        "is rebuilt in this run" in out
    )
    assert " activations " not in out and "build sae" not in out, out
    n, n_build, _ = _plan_counts(out)

    rc, out = _cli(["run"], base, config, storage, monkeypatch, capsys)
    assert rc == 0, out
    new = _materializations(base) - before
    assert set(new.values()) == {1}, new  # each rebuilt partition once
    cfg = load_config(config)
    behaviour = {("refusal_behaviour", f"{c}|{A}") for c in CATS}
    assert set(new) == _downstream_of(build_defs(cfg, storage), behaviour), sorted(new)
    assert len(new) == n_build and _plan_counts(out)[:2] == (n, n_build)
    rebuilt = {k for k, _ in new}
    assert {"refusal_behaviour", "circuit", "transfer", "comparison", "report"} <= rebuilt
    assert {k for k in new if k[0] == "circuit"} == {("circuit", f"{c}|{A}") for c in CATS}
    assert not rebuilt & {
        "activations",
        "sae",
        "orbench_prompts",
        "prompt_sample",
        "data_profile",
    }, rebuilt
    instance = _instance(base)
    try:
        assert stale(instance, list(build_defs(cfg, storage).assets)) == {}, (
            "everything FRESH afterwards"
        )
    finally:
        instance.dispose()


def test_force_rebuilds_the_selection_only(materialized, monkeypatch, capsys):
    base, storage = materialized
    before = _materializations(base)
    config = ROOT / "configs" / "tiny.yaml"
    rc, out = _cli(
        ["run", "--force", "--select", "orbench_prompts"],
        base,
        config,
        storage,
        monkeypatch,
        capsys,
    )
    assert rc == 0, out
    assert _plan_counts(out) == (4, 4, 0)
    assert _materializations(base) - before == Counter({("orbench_prompts", c): 1 for c in CATS})


def _env(base: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REFUSAL_ASSETS_") or k == "REFUSAL_ASSETS_CACHE"
    }
    env.update(DAGSTER_HOME=str(base), REFUSAL_ASSETS_PROGRESS_BAR="0")
    return env


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_unfinished_partitions(tmp_path, monkeypatch, capsys):
    base, storage = tmp_path / "home", tmp_path / "storage"
    config = ROOT / "configs" / "tiny.yaml"
    cmd = [
        sys.executable,
        "-m",
        "refusal_assets.app.cli",
        "run",
        "--config",
        str(config),
        "--storage",
        str(storage),
    ]
    proc = subprocess.Popen(
        [*cmd, "--select", CHEAP],
        cwd=ROOT,
        env=_env(base),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[6/12] "):  # six partitions done, the seventh starting
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    first = _materializations(base)
    assert 6 <= len(first) < 12, first

    rc, out = _cli(["run", "--select", CHEAP, "-v"], base, config, storage, monkeypatch, capsys)
    assert rc == 0, out
    assert _plan_counts(out) == (12, 12 - len(first), len(first)), out
    after = _materializations(base)
    assert set(after.values()) == {1}, (
        "nothing materialized twice: only the unfinished partitions ran"
    )
    expected = {("orbench_prompts", c) for c in CATS} | {("prompt_sample", c) for c in CATS}
    expected |= {("refusal_behaviour", f"{c}|{A}") for c in CATS}
    assert set(after) == expected
    instance = _instance(base)
    try:
        started = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        assert started == [], "the killed run is no longer shown as running"
    finally:
        instance.dispose()


@pytest.mark.slow
def test_backfill_missing_launches_the_stale_partitions(
    materialized, tmp_path, monkeypatch, capsys
):
    from refusal_assets_tests.test_ui_browser import serve_ui

    base, storage = materialized
    config = _config_copy(
        tmp_path, ("generation: {max_new_tokens: 4}", "generation: {max_new_tokens: 5}")
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REFUSAL_ASSETS_DATA_DIR", "REFUSAL_ASSETS_CONFIG")
    }
    env.update(DAGSTER_HOME=str(base), REFUSAL_ASSETS_STORAGE=str(storage))
    with serve_ui(config, env, tmp_path / "ui.log") as url:
        rc, out = _cli(
            ["backfill", "--missing", "--url", url], base, config, storage, monkeypatch, capsys
        )
        assert rc == 0, out
        backfill_id = re.search(r"launched backfill (\S+):", out)[1]
        instance = _instance(base)
        try:
            backfill = instance.get_backfill(backfill_id)
            target = {
                (p.asset_key.to_user_string(), p.partition_key)
                for p in backfill.asset_backfill_data.target_subset.iterate_asset_partitions()
            }
        finally:
            instance.dispose()
    behaviour = {("refusal_behaviour", f"{c}|{A}") for c in CATS}
    assert target == _downstream_of(build_defs(load_config(config), storage), behaviour)
    assert {k for k, _ in target} >= {"refusal_behaviour", "circuit", "comparison", "report"}
    assert not {k for k, _ in target} & {"activations", "sae"}


def test_prune_deletes_a_removed_categorys_files(materialized, tmp_path, monkeypatch, capsys):
    base, storage = materialized
    config = _config_copy(
        tmp_path,
        ("[harassment, illegal, privacy, violence]", "[harassment, illegal, violence]"),
        replace_all=True,
    )
    privacy = sorted(p for p in storage.rglob("privacy") if p.is_dir())
    assert {p.relative_to(storage).parts[0] for p in privacy} >= {
        "orbench_prompts",
        "prompt_sample",
        "refusal_behaviour",
        "activations",
        "circuit",
    }
    files_before = sorted(storage.rglob("*"))

    rc, out = _cli(["prune", "--dry-run"], base, config, storage, monkeypatch, capsys)
    assert rc == 0, out
    assert sorted(storage.rglob("*")) == files_before, "--dry-run deletes nothing"
    assert {Path(p) for p in re.findall(r"would delete (\S+) ", out)} == set(privacy), out
    assert "dagster-io/dagster#14749" in out and f"refusal_behaviour: privacy|{A}" in out

    rc, out = _cli(["prune"], base, config, storage, monkeypatch, capsys)
    assert rc == 0, out
    assert not any(p.exists() for p in privacy)
    for c in ["harassment", "illegal", "violence"]:  # the categories kept keep their files
        assert (storage / "refusal_behaviour" / A / c / "behaviour.parquet").is_file()
        assert (storage / "orbench_prompts" / c / "prompts.parquet").is_file()
    assert (storage / "sae").is_dir() and any((storage / "sae").iterdir())
    rc, out = _cli(["prune", "--dry-run"], base, config, storage, monkeypatch, capsys)
    assert "no files of removed partitions" in out, out


def test_config_copy_keeps_the_data_hash(tmp_path):
    """The tests' premise: the copied config reads the same data under the same hash, so only the
    edit made to it can stale anything."""
    original = load_config(ROOT / "configs" / "tiny.yaml")
    copy = load_config(_config_copy(tmp_path))
    assert copy.resolve(copy.data.path).resolve() == original.resolve(original.data.path).resolve()
    assert copy.section_hash("data") == original.section_hash("data")
    assert copy.name == original.name  # the same instance under $DAGSTER_HOME
