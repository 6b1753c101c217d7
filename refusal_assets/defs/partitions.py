"""Partition definitions, built from the configs (and the data's categories) at load time.

Static partitions rebuilt on every code-location reload, rather than dynamic partitions added
by a sensor: the config files and the data folder *are* the source of truth, so a reload shows
exactly the models, sites and categories they define, and removing one from a config removes its
partitions too (a dynamic set would keep stale keys until someone deletes them by hand).
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from refusal_assets.config import ProjectConfig


@dataclass(frozen=True)
class Partitions:
    category: dg.StaticPartitionsDefinition
    model: dg.StaticPartitionsDefinition
    site: dg.StaticPartitionsDefinition
    model_category: dg.MultiPartitionsDefinition
    site_category: dg.MultiPartitionsDefinition
    site_to_model: dict[str, str]

    @classmethod
    def build(cls, cfg: ProjectConfig, categories: list[str]) -> "Partitions":
        category = dg.StaticPartitionsDefinition(categories)
        model = dg.StaticPartitionsDefinition([m.model_key for m in cfg.models])
        site = dg.StaticPartitionsDefinition(cfg.site_keys())
        return cls(
            category=category,
            model=model,
            site=site,
            model_category=dg.MultiPartitionsDefinition({"model": model, "category": category}),
            site_category=dg.MultiPartitionsDefinition({"site": site, "category": category}),
            site_to_model={s: m.model_key for m in cfg.models for s in m.site_keys},
        )

    # ---- built-in mappings only: custom PartitionMappings break automation and backfills
    def by_category(self) -> dg.MultiToSingleDimensionPartitionMapping:
        return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="category")

    def sae_from_site_category(self) -> dg.MultiToSingleDimensionPartitionMapping:
        return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="site")

    def circuit_from_sae(self) -> dg.AllPartitionMapping:
        """Every circuit reads every SAE partition.

        The precise mapping (site -> that model's ``category|model`` keys) would be a
        StaticPartitionMapping, but dagster 1.13 refuses one whose downstream is a
        MultiPartitionsDefinition, and custom mappings break automation and backfills. Reading all
        sites is exact for one model and only over-broad (extra staleness) for several.
        """
        return dg.AllPartitionMapping()

    def circuit_from_activations(self) -> dg.MultiPartitionMapping:
        return dg.MultiPartitionMapping({
            "site": dg.DimensionPartitionMapping("model", dg.StaticPartitionMapping(self.site_to_model)),
            "category": dg.DimensionPartitionMapping("category", dg.IdentityPartitionMapping()),
        })

