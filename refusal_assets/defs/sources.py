"""Per-model provenance: each model's output-relevant settings as the data version of a partition
of an observable source asset, so that editing or adding model X stales and requests only X's
partitions.

Why sources and not code versions: a ``code_version`` is per asset, so hashing the models there
makes one model's edit (or a new model) change the version of every model's partitions. A
partitioned source carries one version per model (``model_config[model]``, read by
``refusal_behaviour``) and per site (``site_config[site]``, the model's activation-relevant
settings, read by ``activations``: a MultiToSingleDimension mapping needs a dimension the
downstream has, and activations are partitioned by site, not model).

How they are observed: not by a cron on the sources (the daemon would launch an observation run
per partition per tick, hundreds of runs a day that record nothing new), but by
:func:`config_observations`, which compares the loaded config with the latest recorded versions
and records only the partitions that changed, as run-less observations. The
``refusal_assets_config`` sensor calls it every 30 s in the code location (so a reload with an
edited config is seen within a tick), and ``refusal-assets run`` calls it before its first step.
The sources stay observable from the UI too (their observe function returns the same versions).
"""

from __future__ import annotations

import dagster as dg

from refusal_assets.config import ProjectConfig
from refusal_assets.defs.automation import sensor_interval_seconds
from refusal_assets.defs.partitions import Partitions

MODEL_CONFIG = dg.AssetKey("model_config")
SITE_CONFIG = dg.AssetKey("site_config")


def config_versions(cfg: ProjectConfig) -> dict[dg.AssetKey, dict[str, str]]:
    """Data version per source partition, from the config alone."""
    return {
        MODEL_CONFIG: {m.model_key: cfg.model_hash(m.model_key, "behaviour") for m in cfg.models},
        SITE_CONFIG: {
            s: cfg.model_hash(m.model_key, "activations") for m in cfg.models for s in m.site_keys
        },
    }


def _latest_version(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> str | None:
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    if not records or records[0].asset_observation is None:
        return None
    return (records[0].asset_observation.tags or {}).get("dagster/data_version")


def config_observations(
    instance: dg.DagsterInstance, cfg: ProjectConfig
) -> list[dg.AssetObservation]:
    """Observations for exactly the source partitions whose recorded version differs from the config's."""
    out = []
    for key, versions in config_versions(cfg).items():
        for partition, version in sorted(versions.items()):
            if _latest_version(instance, key, partition) != version:
                out.append(
                    dg.AssetObservation(
                        key,
                        partition=partition,
                        tags={"dagster/data_version": version},
                        metadata={"config": cfg.name},
                    )
                )
    return out


def record_config_versions(instance: dg.DagsterInstance, cfg: ProjectConfig) -> int:
    """Record the changed source versions on ``instance`` now; returns how many changed."""
    events = config_observations(instance, cfg)
    for event in events:
        instance.report_runless_asset_event(event)
    return len(events)


def build(cfg: ProjectConfig, parts: Partitions) -> list:
    versions = config_versions(cfg)

    @dg.observable_source_asset(
        key=MODEL_CONFIG,
        partitions_def=parts.model,
        group_name="config",
        tags={"stage": "config"},
        description="One model's settings that change its outputs (id, source, weights, dtype, chat template, "
        "generation, refusal phrases); the data version of each partition is their hash. Read by refusal_behaviour.",
    )
    def model_config(context):
        keys = (
            context.partition_keys
            if context.has_partition_key_range
            else parts.model.get_partition_keys()
        )
        return dg.DataVersionsByPartition({k: versions[MODEL_CONFIG][k] for k in keys})

    @dg.observable_source_asset(
        key=SITE_CONFIG,
        partitions_def=parts.site,
        group_name="config",
        tags={"stage": "config"},
        description="Per site, its model's settings that change an activation vector "
        "(generation and refusal settings left out). Read by activations.",
    )
    def site_config(context):
        keys = (
            context.partition_keys
            if context.has_partition_key_range
            else parts.site.get_partition_keys()
        )
        return dg.DataVersionsByPartition({k: versions[SITE_CONFIG][k] for k in keys})

    return [model_config, site_config]


def config_sensor(cfg: ProjectConfig) -> dg.SensorDefinition:
    @dg.sensor(
        name="refusal_assets_config",
        minimum_interval_seconds=sensor_interval_seconds(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Records a new data version of model_config / site_config for each model whose settings changed "
        "(after a code-location reload); automation then rebuilds that model's partitions only.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        events = config_observations(context.instance, cfg)
        if not events:
            return dg.SkipReason("every model's recorded settings match the config")
        return dg.SensorResult(asset_events=events)

    return _sensor
