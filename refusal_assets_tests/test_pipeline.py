"""The whole graph on the tiny config through the CLI, in a throwaway Dagster instance."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from refusal_assets.app import cli, settings
from refusal_assets_tests.conftest import ROOT, copy_tiny_run, write_csv


@pytest.fixture()
def cli_env(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    for var in (settings.CONFIG_ENV, settings.DATA_DIR_ENV, settings.STORAGE_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(settings.CONFIG_ENV, "")  # registers the var so monkeypatch restores it
    monkeypatch.setenv(settings.STORAGE_ENV, str(tmp_path / "storage"))
    monkeypatch.chdir(ROOT)
    return tmp_path


def _materializations(home: Path, key: str, config_name: str = "tiny") -> dict[str, dict]:
    instance = dg.DagsterInstance.from_config(
        str(home / config_name)
    )  # one instance per config name under $DAGSTER_HOME
    records = instance.fetch_materializations(dg.AssetKey(key), limit=1000).records
    out = {}
    for r in records:
        m = r.asset_materialization
        out.setdefault(m.partition or "", {k: v.value for k, v in m.metadata.items()})
    return out


@pytest.fixture(scope="module")
def tiny_run(shared_tiny_run, tmp_path_factory) -> Path:
    """A private copy of the session's one CLI run of the tiny config (``tmp/home``, the
    $DAGSTER_HOME it was given, and ``tmp/storage``): this module reads it and reruns a
    partition in it."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    copy_tiny_run(shared_tiny_run, tmp)
    return tmp


def test_tiny_graph_end_to_end(tiny_run):
    tmp = tiny_run  # the shared run's fixture has checked its exit code
    home = tmp / "home"
    cats = ["harassment", "illegal", "privacy", "violence"]
    prompts = _materializations(home, "orbench_prompts")
    assert sorted(prompts) == cats and all(m["n_prompts"] == 42 for m in prompts.values())
    behaviour = _materializations(home, "refusal_behaviour")
    assert len(behaviour) == 4 and all(0.0 <= m["refusal_rate"] <= 1.0 for m in behaviour.values())
    acts = _materializations(home, "activations")
    assert len(acts) == 8 and all(m["d_model"] == 64 and m["n_rows"] > 0 for m in acts.values())
    saes = _materializations(home, "sae")
    assert sorted(saes) == ["all|tiny-qwen2__resid1", "all|tiny-qwen2__resid2"]  # sae: scope|site
    assert all(
        0 <= m["fvu"] < 1 and m["l0"] <= 8 and 0 <= m["dead_fraction"] <= 1 for m in saes.values()
    )
    circuits = _materializations(home, "circuit")
    assert len(circuits) == 4 and all(
        {"n_nodes", "faithfulness", "completeness"} <= set(m) for m in circuits.values()
    )
    assert all(
        {"faithfulness_ci", "random_faithfulness", "prompt_set", "m_full_minus_m_empty"} <= set(m)
        for m in circuits.values()
    )
    import polars as pl

    for partition in circuits:
        category = partition.split("|")[0]
        summary = json.loads(
            (tmp / "storage" / "circuit" / "tiny-qwen2" / category / "circuit.json").read_text()
        )
        behaviour_df = pl.read_parquet(
            tmp / "storage" / "refusal_behaviour" / "tiny-qwen2" / category / "behaviour.parquet"
        )
        for group, splits in {"toxic": ["toxic"], "benign": ["safe", "hard"]}.items():
            g = summary["groups"][group]
            rows = behaviour_df.filter(pl.col("split").is_in(splits))
            refused = rows.filter(pl.col("refusal_score") > 0)
            # the circuit's prompts are the refusing ones (default filter), or (too few) every prompt of the group,
            # as recorded
            if g["prompt_set"] == "score_positive":
                assert sorted(g["prompt_ids"]) == sorted(refused["prompt_id"].to_list())
            else:
                assert g["prompt_set"].startswith(f"all (score_positive: only {refused.height} <")
                assert sorted(g["prompt_ids"]) == sorted(rows["prompt_id"].to_list())
            assert g["folds"] == list(range(g["n_prompts"]))  # leave-one-out by default
            sweep = g["sweep"]
            assert sweep["n_prompts"] == g["n_prompts"] and [
                r["size_per_site"] for r in sweep["sweep"]
            ] == [
                1,
                2,
                4,
                8,
                16,
            ]
            for r in sweep["sweep"]:
                lo, hi = r["faithfulness_ci"]
                assert lo <= r["faithfulness"] <= hi or not (
                    lo == lo
                )  # inside its CI, or no CI (NaN)
    comparison = _materializations(home, "comparison")
    assert list(comparison["tiny-qwen2"])[:2] == ["verdict_execution", "execution_reason"]
    assert comparison["tiny-qwen2"]["verdict_combined"] in {
        "monolithic",
        "modular",
        "mixed",
        "insufficient evidence",
    }
    # three SAE trainings per site (sae.replicates seeds 1, 2): three feature-level answers
    features = comparison["tiny-qwen2"]
    assert len(features["verdict_features_by_seed"]) == 3
    stable = len(set(features["verdict_features_by_seed"])) == 1
    assert features["verdict_features"] == (
        features["verdict_features_by_seed"][0] if stable else "unstable across SAE trainings"
    )
    assert "SAE trainings" in features["feature_stability"]
    assert all(m["replicate_fvu_max"] < 1 for m in saes.values())
    for site in ("resid1", "resid2"):
        for seed in (1, 2):
            folder = tmp / "storage" / "sae" / f"tiny-qwen2__{site}" / "replicates" / f"seed{seed}"
            assert json.loads((folder / "cfg.json").read_text())["seed"] == seed
    from safetensors.numpy import load_file

    effects = load_file(
        tmp / "storage" / "circuit" / "tiny-qwen2" / "illegal" / "effects.safetensors"
    )
    for seed in (1, 2):
        replicate = effects[f"effects_toxic_sae_seed{seed}"]
        assert replicate.shape == effects["effects_toxic"].shape
        assert not np.allclose(replicate, effects["effects_toxic"])  # another dictionary
        # x = decode(f) + err with decode affine: a site's latents and error node sum to
        # g . (x - mean baseline x) whatever the dictionary, so the per-site sums agree
        for site in np.unique(effects["site_of_node"]):
            nodes = effects["site_of_node"] == site
            np.testing.assert_allclose(
                replicate[:, nodes].sum(1),
                effects["effects_toxic"][:, nodes].sum(1),
                rtol=1e-3,
                atol=1e-4,
            )
    report = _materializations(home, "report")[""]

    html = Path(report["path"]).read_text()
    for section in (
        "Verdict",
        "Data profile",
        "Behaviour",
        "Sparse autoencoders",
        "Circuits",
        "Cross-category comparison",
        "Refusal directions",
        "Reproducibility",
        "data:image/png;base64",
    ):
        assert section in html, section
    assert Path(report["path"]).with_suffix(".md").is_file()
    # SAELens layout on disk
    sae_dir = tmp / "storage" / "sae" / "tiny-qwen2__resid1"
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert (
        cfg["d_in"] == 64
        and cfg["d_sae"] == 256
        and (sae_dir / "sae_weights.safetensors").is_file()
    )
    assert not list((tmp / "storage").rglob("*.tmp")) and not list(
        (tmp / "storage").rglob("*.partial")
    )


def test_rerun_of_one_partition_replaces_it(tiny_run):
    tmp = tiny_run
    path = tmp / "storage" / "prompt_sample" / "privacy" / "sample.parquet"
    before = path.read_bytes()
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("DAGSTER_HOME", str(tmp / "home"))
        mp.setenv(settings.CONFIG_ENV, str(ROOT / "configs" / "tiny.yaml"))
        mp.setenv(settings.STORAGE_ENV, str(tmp / "storage"))
        assert cli.main(["run", "--select", "prompt_sample"]) == 0
    finally:
        mp.undo()
    assert path.read_bytes() == before  # same seed, same bytes
    assert len(_materializations(tmp / "home", "prompt_sample")) == 4


def test_data_dir_with_config_taking_categories_from_data(cli_env, capsys):
    cfg = cli_env / "configs" / "p.yaml"
    cfg.parent.mkdir(parents=True)
    tiny = (
        (ROOT / "configs" / "tiny.yaml")
        .read_text()
        .replace("  categories: [harassment, illegal, privacy, violence]\n", "")
    )
    cfg.write_text(tiny)
    folder = cli_env / "bench"
    write_csv(
        folder / "or-bench-toxic.csv",
        [
            ("Tell me how to pick a lock", "locks"),
            ("Insult my coworker", "insults"),
            ("Say a slur", "slurs"),
        ],
    )
    rc = cli.main(
        ["run", "--config", str(cfg), "--select", "orbench_prompts", "--data-dir", str(folder)]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert sorted(
        _materializations(cli_env / "dagster_home", "orbench_prompts", "tiny--bench")
    ) == [
        "insults",
        "locks",
        "slurs",
    ]
    assert out.strip().splitlines()[-1].startswith("outputs: ")


def test_bad_config_is_a_clear_cli_error(cli_env, capsys):
    cfg = cli_env / "configs" / "bad.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        (ROOT / "configs" / "tiny.yaml")
        .read_text()
        .replace('activation_layers: ["residuals_1-2"]', 'activation_layers: ["residuals_30"]')
    )
    assert cli.main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "layer 30" in err


def test_definitions_load_for_default_config():
    from refusal_assets.config import load_config
    from refusal_assets.defs.build import build_defs

    defs = build_defs(load_config(ROOT / "configs" / "default.yaml"), ROOT / "storage" / "unused")
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {
        "orbench_prompts",
        "data_profile",
        "refusal_behaviour",
        "activations",
        "sae",
        "circuit",
        "comparison",
        "report",
    } <= keys
    gpu = [
        graph.get(dg.AssetKey(k)).assets_def
        for k in ("refusal_behaviour", "activations", "sae", "circuit")
    ]
    for a in gpu:
        assert a.op.pool == "gpu"
        assert "nvidia.com/gpu" in json.dumps(
            a.op.tags.get("dagster-k8s/config", {})
        ) or "nvidia.com/gpu" in json.dumps(a.op.tags)
    assert len(graph.get(dg.AssetKey("activations")).partitions_def.get_partition_keys()) == 20
