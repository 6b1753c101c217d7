"""Metadata a researcher uses in the UI: Parquet column schema and row count, paths, CI bounds as
floats, and owners / tags / descriptions on every asset."""

import math

import dagster as dg
import polars as pl

from refusal_assets.defs.metadata import OWNERS, ci_metadata, parquet_metadata
from refusal_assets.storage import write_parquet


def test_parquet_metadata_reads_schema_and_rows_from_the_file(tmp_path):
    df = pl.DataFrame(
        {
            "prompt_id": ["a", "b", "c"],
            "refused": [True, False, True],
            "refusal_score": [0.5, -1.0, 2.0],
        }
    )
    path = write_parquet(df.to_arrow(), tmp_path / "x" / "t.parquet")
    md = parquet_metadata(path)
    schema = md["dagster/column_schema"]
    assert isinstance(schema, dg.TableSchema)
    assert [(c.name, c.type) for c in schema.columns] == [
        ("prompt_id", "large_string"),
        ("refused", "bool"),
        ("refusal_score", "double"),
    ]
    assert md["dagster/row_count"] == 3
    assert isinstance(md["path"], dg.PathMetadataValue) and md["path"].value == str(path)


def test_ci_metadata_gives_text_and_float_bounds():
    assert ci_metadata("faithfulness_ci", (0.25, 0.75)) == {
        "faithfulness_ci": "[0.250, 0.750]",
        "faithfulness_ci_lo": 0.25,
        "faithfulness_ci_hi": 0.75,
    }
    # no CI (too few prompts): text says so, bounds are empty rather than NaN (not JSON)
    assert ci_metadata("x_ci", (math.nan, None), 2) == {
        "x_ci": "n/a",
        "x_ci_lo": None,
        "x_ci_hi": None,
    }


def test_every_asset_has_owners_tags_and_a_description(tiny_cfg, tmp_path):
    from refusal_assets.defs.build import build_defs

    graph = build_defs(tiny_cfg, tmp_path).resolve_asset_graph()
    gpu_assets = set()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        # the observable config sources (model_config, site_config) take no owners in dagster 1.13's
        # observable_source_asset; they carry their stage tag and a description like every asset
        assert node.owners == OWNERS or not node.is_materializable, key
        assert node.description, key
        assert node.tags["stage"] == node.group_name, key
        if "gpu" in node.tags:
            gpu_assets.add(key.to_user_string())
        if node.is_materializable:
            assert ("gpu" in node.tags) == (node.assets_def.op.pool == "gpu"), key
    assert gpu_assets == {
        "refusal_behaviour",
        "activations",
        "sae",
        "circuit",
        "transfer",
        "refusal_direction",
    }


def test_sae_checks_hold_every_training_to_the_thresholds():
    """A replicate SAE (sae.replicates) gives its own feature-level answer, so the blocking checks
    fail when any training misses a threshold, and name each training's value."""
    from types import SimpleNamespace

    from refusal_assets.config import SAEQualityThresholds
    from refusal_assets.defs.metadata import sae_checks

    def fitted(replicate_fvu: float):
        replicate = SimpleNamespace(seed=1, fvu=replicate_fvu, dead_fraction=0.01)
        metrics = {"fvu": 0.10, "dead_fraction": 0.02}
        return SimpleNamespace(metrics=metrics, replicates=(replicate,))

    thresholds = SAEQualityThresholds(max_fvu=0.35, max_dead_fraction=0.5)
    good = {c.check_name: c for c in sae_checks(fitted(0.20), thresholds)}
    assert good["fvu_below_threshold"].passed and good["dead_fraction_below_threshold"].passed
    bad = {c.check_name: c for c in sae_checks(fitted(0.40), thresholds)}
    assert not bad["fvu_below_threshold"].passed
    assert bad["dead_fraction_below_threshold"].passed
    assert bad["fvu_below_threshold"].metadata["fvu_seed1"].value == 0.40
    assert bad["fvu_below_threshold"].metadata["fvu"].value == 0.10
