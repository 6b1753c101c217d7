"""Config change -> exactly the affected partitions are requested by the automation conditions."""

import dagster as dg
import pytest

from refusal_assets.config import ProjectConfig
from refusal_assets.defs.build import build_defs
from refusal_assets.defs.sources import record_config_versions


def _variant(cfg: ProjectConfig, **changes) -> ProjectConfig:
    raw = cfg.model_dump()
    for dotted, value in changes.items():
        node = raw
        *path, leaf = dotted.split("__")
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    return ProjectConfig.model_validate(raw)


def _materialize_all(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    """Record a materialization of every partition with the asset's current code version, as a run would."""
    graph = defs.resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        code_version = node.assets_def.code_versions_by_key[key]
        partitions = node.partitions_def.get_partition_keys() if node.partitions_def else [None]
        for p in partitions:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    key, partition=p, tags={"dagster/code_version": code_version}
                )
            )


def _requested(result) -> dict[str, set]:
    out = {}
    for r in result.results:
        if r.true_subset.size:
            key = r.key.to_user_string() if hasattr(r.key, "to_user_string") else str(r.key)
            out[key] = (
                set(r.true_subset.expensively_compute_partition_keys())
                if r.true_subset.is_partitioned
                else {None}
            )
    return out


@pytest.fixture()
def world(tiny_cfg, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    defs = build_defs(tiny_cfg, tmp_path)
    record_config_versions(
        instance, tiny_cfg
    )  # what the config sensor / `refusal-assets run` record
    _materialize_all(defs, instance)
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    return instance, first


def test_nothing_requested_when_everything_is_current(tiny_cfg, tmp_path, world):
    instance, first = world
    again = dg.evaluate_automation_conditions(
        defs=build_defs(tiny_cfg, tmp_path), instance=instance, cursor=first.cursor
    )
    assert _requested(again) == {}


def test_sae_config_edit_requests_exactly_the_sae_partitions(tiny_cfg, tmp_path, world):
    instance, first = world
    edited = _variant(tiny_cfg, sae__k=7)
    defs = build_defs(edited, tmp_path)
    record_config_versions(instance, edited)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    saes = {"all|tiny-qwen2__resid1", "all|tiny-qwen2__resid2"}
    # the feature cards read their SAE only: requested with it, in the same run
    assert _requested(result) == {"sae": saes, "features": saes}
    # once the SAEs (and their cards) are rebuilt, their downstream (and only that) follows
    _record(defs, instance, "sae", saes)
    _record(defs, instance, "features", saes)
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    requested = _requested(after)
    assert set(requested) == {"circuit"}
    assert len(requested["circuit"]) == 4


def test_adding_a_site_requests_exactly_the_new_partitions(tiny_cfg, tmp_path, world):
    instance, first = world
    grown = _variant(tiny_cfg, models__0__activation_layers=["residuals_1-3"])
    defs = build_defs(grown, tmp_path)
    record_config_versions(instance, grown)  # the new site's site_config partition
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    requested = _requested(result)
    assert set(requested) == {"activations"}
    assert {dict(k.keys_by_dimension)["site"] for k in requested["activations"]} == {
        "tiny-qwen2__resid3"
    }
    assert len(requested["activations"]) == 4


def _record(defs: dg.Definitions, instance: dg.DagsterInstance, key: str, partitions: set) -> None:
    cv = (
        defs.resolve_asset_graph()
        .get(dg.AssetKey(key))
        .assets_def.code_versions_by_key[dg.AssetKey(key)]
    )
    for p in partitions:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(key, partition=p, tags={"dagster/code_version": cv})
        )


def test_editing_the_sae_corpus_file_rebuilds_it_then_the_saes(tiny_cfg, tmp_path):
    from refusal_assets.config import SAECorpusConfig

    corpus = tmp_path / "corpus.csv"
    corpus.write_text("prompt\nHow do I repot a cactus?\n")
    cfg = tiny_cfg.model_copy(
        update={
            "sae": tiny_cfg.sae.model_copy(update={"corpus": SAECorpusConfig(path=str(corpus))})
        }
    )
    instance = dg.DagsterInstance.ephemeral()
    defs = build_defs(cfg, tmp_path)
    record_config_versions(instance, cfg)
    _materialize_all(defs, instance)
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert _requested(first) == {}
    corpus.write_text("prompt\nHow do I repot a cactus?\nWhen should I prune roses?\n")
    defs = build_defs(cfg, tmp_path)  # a code-location reload reads the edited file
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    sites = {"tiny-qwen2__resid1", "tiny-qwen2__resid2"}
    assert _requested(result) == {"sae_corpus_activations": sites}
    _record(defs, instance, "sae_corpus_activations", sites)
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    saes = {f"all|{s}" for s in sites}
    assert _requested(after) == {"sae": saes, "features": saes}  # the cards follow their SAE
