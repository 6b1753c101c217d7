"""Partition definitions, built from the configs (and the data's categories) at load time.

Static partitions rebuilt on every code-location reload, rather than dynamic partitions added
by a sensor: the config files and the data folder *are* the source of truth, so a reload shows
exactly the models, sites and categories they define, and removing one from a config removes its
partitions too (a dynamic set would keep stale keys until someone deletes them by hand).

Every dependency uses a built-in partition mapping (custom PartitionMappings break automation and
backfills), and each one is exact: a partition depends on precisely the partitions it reads, so
adding a model, a site or a category requests only the partitions that involve it.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from refusal_assets.config import ConfigError, ProjectConfig

SAE_SCOPE = "all"
"""The one key of the ``scope`` dimension of ``sae`` and ``refusal_direction``: an SAE is trained
on the activations of every category of ``sae.train_categories`` at once, a model's refusal
directions are found from its behaviour on every category at once."""


def sae_partition_key(site_key: str) -> str:
    """The ``sae`` partition of a site, as Dagster spells a multi-partition key (dimensions sorted
    by name: ``scope|site``), e.g. ``all|tiny-qwen2__resid1``."""
    return f"{SAE_SCOPE}|{site_key}"


def direction_partition_key(model_key: str) -> str:
    """The ``refusal_direction`` partition of a model, as Dagster spells a multi-partition key
    (dimensions sorted by name: ``model|scope``), e.g. ``tiny-qwen2|all``."""
    return str(dg.MultiPartitionKey({"model": model_key, "scope": SAE_SCOPE}))


@dataclass(frozen=True)
class Partitions:
    category: dg.StaticPartitionsDefinition
    model: dg.StaticPartitionsDefinition
    site: dg.StaticPartitionsDefinition
    model_category: dg.MultiPartitionsDefinition
    site_category: dg.MultiPartitionsDefinition
    sae: dg.MultiPartitionsDefinition
    """site x scope("all"). The single-key second dimension is what makes ``circuit <- sae`` an
    exact built-in mapping: dagster 1.13 refuses a StaticPartitionMapping whose downstream is a
    MultiPartitionsDefinition, but maps multi to multi dimension by dimension (site -> model,
    scope "all" -> every category), so a model's circuits read only that model's SAEs."""
    direction: dg.MultiPartitionsDefinition
    """model x scope("all"), for the same reason: ``features`` (site x scope) reads the direction
    of its site's model only (model -> its sites, scope -> scope), which a per-model partition
    cannot express with a built-in mapping."""
    site_to_model: dict[str, str]
    sae_train_categories: list[str]
    """Category keys whose activations train the SAEs (``sae.train_categories``, else every category)."""

    @classmethod
    def build(cls, cfg: ProjectConfig, categories: list[str]) -> "Partitions":
        from refusal_assets.storage import category_key

        category = dg.StaticPartitionsDefinition(categories)
        model = dg.StaticPartitionsDefinition([m.model_key for m in cfg.models])
        site = dg.StaticPartitionsDefinition(cfg.site_keys())
        if cfg.sae.train_categories is None:
            train = list(categories)
        else:
            train = sorted({category_key(c) for c in cfg.sae.train_categories})
            unknown = sorted(set(train) - set(categories))
            if unknown:
                raise ConfigError(
                    f"config {cfg.name!r}: key 'sae.train_categories': {unknown} are not categories of this config "
                    f"(its categories: {categories})"
                )
        return cls(
            category=category,
            model=model,
            site=site,
            model_category=dg.MultiPartitionsDefinition({"model": model, "category": category}),
            site_category=dg.MultiPartitionsDefinition({"site": site, "category": category}),
            sae=dg.MultiPartitionsDefinition(
                {"site": site, "scope": dg.StaticPartitionsDefinition([SAE_SCOPE])}
            ),
            direction=dg.MultiPartitionsDefinition(
                {"model": model, "scope": dg.StaticPartitionsDefinition([SAE_SCOPE])}
            ),
            site_to_model={s: m.model_key for m in cfg.models for s in m.site_keys},
            sae_train_categories=train,
        )

    # ---- built-in mappings only: custom PartitionMappings break automation and backfills
    def by_category(self) -> dg.MultiToSingleDimensionPartitionMapping:
        return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="category")

    def by_model(self) -> dg.MultiToSingleDimensionPartitionMapping:
        return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")

    def by_site(self) -> dg.MultiToSingleDimensionPartitionMapping:
        return dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="site")

    def sae_from_activations(self) -> dg.MultiPartitionMapping:
        """An SAE reads its site's activations of the training categories only: a category outside
        ``sae.train_categories`` maps to no SAE partition, so adding it leaves the SAEs current."""
        return dg.MultiPartitionMapping(
            {
                "site": dg.DimensionPartitionMapping("site", dg.IdentityPartitionMapping()),
                "category": dg.DimensionPartitionMapping(
                    "scope",
                    dg.StaticPartitionMapping({c: SAE_SCOPE for c in self.sae_train_categories}),
                ),
            }
        )

    def circuit_from_sae(self) -> dg.MultiPartitionMapping:
        """A (model, category) circuit reads every SAE of that model (and no other model's)."""
        return dg.MultiPartitionMapping(
            {
                "site": dg.DimensionPartitionMapping(
                    "model", dg.StaticPartitionMapping(self.site_to_model)
                ),
                "scope": dg.DimensionPartitionMapping(
                    "category",
                    dg.StaticPartitionMapping({SAE_SCOPE: self.category.get_partition_keys()}),
                ),
            }
        )

    def circuit_from_activations(self) -> dg.MultiPartitionMapping:
        return dg.MultiPartitionMapping(
            {
                "site": dg.DimensionPartitionMapping(
                    "model", dg.StaticPartitionMapping(self.site_to_model)
                ),
                "category": dg.DimensionPartitionMapping("category", dg.IdentityPartitionMapping()),
            }
        )

    def direction_from_behaviour(self) -> dg.MultiPartitionMapping:
        """A model's refusal direction reads that model's behaviour on every category."""
        return dg.MultiPartitionMapping(
            {
                "model": dg.DimensionPartitionMapping("model", dg.IdentityPartitionMapping()),
                "category": dg.DimensionPartitionMapping(
                    "scope",
                    dg.StaticPartitionMapping(
                        {c: SAE_SCOPE for c in self.category.get_partition_keys()}
                    ),
                ),
            }
        )

    def features_from_direction(self) -> dg.MultiPartitionMapping:
        """A site's feature cards read the refusal direction of that site's model (and no other
        model's): a new model's direction maps to exactly its own sites."""
        sites_of_model: dict[str, list[str]] = {}
        for site, model in self.site_to_model.items():
            sites_of_model.setdefault(model, []).append(site)
        return dg.MultiPartitionMapping(
            {
                "model": dg.DimensionPartitionMapping(
                    "site", dg.StaticPartitionMapping(sites_of_model)
                ),
                "scope": dg.DimensionPartitionMapping("scope", dg.IdentityPartitionMapping()),
            }
        )
