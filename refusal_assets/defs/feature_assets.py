"""Stage 3b: feature cards per site (what every SAE latent responds to), from the stored rows."""

import hashlib
import json

import dagster as dg

from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import file_path, multi_key
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import StorageResource
from refusal_assets.features import annotations as notes
from refusal_assets.features.files import write_site_features
from refusal_assets.features.render import circuit_membership, membership_table
from refusal_assets.features.run import compute_site_features
from refusal_assets.layout import Layout

CODE_VERSION = "1"
"""Version of the features code; bump it when a card changes for the same inputs."""


def _code_version(cfg: ProjectConfig) -> str:
    """The SAE settings, this code's version and the annotation files' bytes (cards show labels)."""
    blob = cfg.section_hash("sae") + CODE_VERSION
    for m in cfg.models:
        path = notes.annotation_path(cfg.root, m.model_key)
        blob += path.read_text(encoding="utf-8") if path.is_file() else ""
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build(cfg: ProjectConfig, parts: Partitions) -> list[dg.AssetsDefinition]:
    corpus_dep = (
        [dg.AssetDep("sae_corpus_activations", partition_mapping=parts.by_site())]
        if cfg.sae.corpus
        else []
    )

    @dg.asset(
        partitions_def=parts.sae,
        kinds={"pytorch", "parquet", "json"},
        group_name="sae",
        code_version=_code_version(cfg),
        deps=[
            dg.AssetDep("sae"),  # same site x scope partitions: identity
            dg.AssetDep("activations", partition_mapping=parts.sae_from_activations()),
            # the cosines read the pooled direction of this site's model only
            dg.AssetDep("refusal_direction", partition_mapping=parts.features_from_direction()),
            *corpus_dep,
        ],
        description="Feature cards per site: for every SAE latent its 20 highest distinct contexts "
        "with token windows, lower-quantile examples, firing statistics per category x split, "
        "logit lens and cosine with the pooled refusal direction (top_examples.parquet, "
        "latents.parquet, cards.json).",
    )
    def features(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        site_key, layout = (
            multi_key(parts.sae, context.partition_key)["site"],
            Layout(storage.files),
        )
        model_key = parts.site_to_model[site_key]
        site_name = site_key.split("__", 1)[1]
        result = compute_site_features(
            cfg,
            layout,
            site_key,
            parts.sae_train_categories,
            layout.direction_tensors(model_key),  # absent (no refusing prompts...): null cosines
            context.log.info,
        )
        note = result.features.refusal_direction
        paths = (layout.feature_top_examples(site_key), layout.feature_latents(site_key))
        write_site_features(result, *paths, layout.feature_cards(site_key))
        if result.features.cards and result.features.cards[0].refusal_cosine is None:
            context.log.warning(f"refusal-direction cosines left null: {note}")
        circuits = {
            c: json.loads(layout.circuit_summary(model_key, c).read_text())
            for c in parts.category.get_partition_keys()
            if layout.circuit_summary(model_key, c).is_file()
        }
        f = result.features
        table = membership_table(f, circuit_membership(circuits, site_name))
        return dg.MaterializeResult(
            metadata={
                "n_live": len(f.live),
                "d_sae": f.d_sae,
                "n_rows": f.n_rows,
                "n_distinct_rows": f.n_distinct_rows,
                "n_massive_rows": f.n_massive_rows,
                "refusal_direction": note,
                "scan_seconds": round(result.scan_seconds, 2),
                "circuit_latents": dg.MetadataValue.md(table),
                "path": file_path(layout.features(site_key)),
            }
        )

    return [features]
