"""Stage 1: OR-Bench prompts per category, the seeded sample, and the data profile."""

import dagster as dg
import polars as pl

from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import file_path, parquet_metadata, png_markdown
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import StorageResource
from refusal_assets.layout import Layout
from refusal_assets.prompts import orbench as data
from refusal_assets.storage import write_parquet


def build(cfg: ProjectConfig, parts: Partitions) -> list[dg.AssetsDefinition]:
    # All three assets share the data section's hash as code version, so any change to the data
    # settings marks the whole stage stale.
    data_version = cfg.section_hash("data")
    prompts = _orbench_prompts_asset(cfg, parts, data_version)
    sample = _prompt_sample_asset(cfg, parts, data_version, prompts)
    profile = _data_profile_asset(parts, data_version, prompts, sample)
    return [prompts, sample, profile]


def _orbench_prompts_asset(
    cfg: ProjectConfig, parts: Partitions, data_version: str
) -> dg.AssetsDefinition:
    @dg.asset(
        partitions_def=parts.category,
        code_version=data_version,
        kinds={"polars", "parquet"},
        group_name="data",
        description="Every prompt of one category from the OR-Bench-layout folder (or the hub): "
        "prompt_id, prompt, category, split.",
    )
    def orbench_prompts(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        folder = data.data_folder(cfg.data, cfg.resolve)
        df, report = data.load_orbench(folder, cfg.data.splits, cfg.data.categories)
        category = context.partition_key
        cat = df.filter(pl.col("category_key") == category)
        if cat.height == 0:
            raise data.DataError(
                f"{folder}: category {category!r} has no prompts in the data any more; reload the code location"
            )
        path = write_parquet(cat.to_arrow(), Layout(storage.files).prompts(category))
        per_split = dict(cat.group_by("split").len().iter_rows())
        context.log.info(f"{category}: {cat.height} prompts {per_split} from {folder}")
        return dg.MaterializeResult(
            metadata={
                "n_prompts": cat.height,
                **{f"n_{s}": per_split.get(s, 0) for s in cfg.data.splits},
                "source": file_path(folder),
                "files": ", ".join(report.files),
                **parquet_metadata(path),
                "n_dropped_empty_all_categories": report.n_dropped_empty,
                "n_dropped_duplicate_all_categories": report.n_dropped_duplicate,
                "preview": dg.MetadataValue.md(_preview(cat)),
            }
        )

    return orbench_prompts


def _prompt_sample_asset(
    cfg: ProjectConfig,
    parts: Partitions,
    data_version: str,
    orbench_prompts: dg.AssetsDefinition,
) -> dg.AssetsDefinition:
    @dg.asset(
        partitions_def=parts.category,
        code_version=data_version,
        kinds={"polars", "parquet"},
        group_name="data",
        deps=[orbench_prompts],
        description="The seeded sample used downstream (per-split sizes from the sampling config) "
        "with a held-out flag.",
    )
    def prompt_sample(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        category = context.partition_key
        layout = Layout(storage.files)
        sample = data.sample_category(
            layout.load_prompts(category),
            category,
            cfg.data.sampling,
            cfg.data.seed,
            cfg.data.heldout_fraction,
        )
        path = write_parquet(sample.to_arrow(), layout.sample(category))
        counts = sample.group_by("split", "heldout").len().sort("split", "heldout")
        return dg.MaterializeResult(
            metadata={
                "n_prompts": sample.height,
                "n_heldout": int(sample["heldout"].sum()),
                "seed": cfg.data.seed,
                "counts": dg.MetadataValue.md(_table_md(counts)),
                **parquet_metadata(path),
            }
        )

    return prompt_sample


def _data_profile_asset(
    parts: Partitions,
    data_version: str,
    orbench_prompts: dg.AssetsDefinition,
    prompt_sample: dg.AssetsDefinition,
) -> dg.AssetsDefinition:
    @dg.asset(
        code_version=data_version,
        kinds={"polars", "matplotlib"},
        group_name="data",
        deps=[orbench_prompts, prompt_sample],
        description="Counts per category x split (all and sampled), the imbalance warnings, and a plot.",
    )
    def data_profile(
        context: dg.AssetExecutionContext, storage: StorageResource
    ) -> dg.MaterializeResult:
        layout = Layout(storage.files)
        raw = [layout.load_prompts(c) for c in parts.category.get_partition_keys()]
        sampled = [layout.load_sample(c) for c in parts.category.get_partition_keys()]
        count = lambda frames: pl.concat(frames).group_by("category_key", "split").len("n")  # noqa: E731
        prof = data.profile(count(raw), count(sampled))
        for w in prof.warnings:
            context.log.warning(w)
        table = write_parquet(prof.counts.to_arrow(), layout.profile_table())
        png = data.plot_profile(prof.counts, layout.profile_plot())
        return dg.MaterializeResult(
            metadata={
                "n_categories": len(raw),
                "n_prompts": int(prof.counts["n"].sum()),
                "n_sampled": int(prof.counts["n_sampled"].sum()),
                "warnings": dg.MetadataValue.md(
                    "\n".join(f"- {w}" for w in prof.warnings) or "none"
                ),
                "counts": dg.MetadataValue.md(_table_md(data.profile_pivot(prof.counts))),
                "plot": png_markdown(png, "prompts per category and split"),
                **parquet_metadata(table),
            }
        )

    return data_profile


def _table_md(df: pl.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "\n".join("| " + " | ".join(str(v) for v in row) + " |" for row in df.iter_rows())


def _preview(df: pl.DataFrame) -> str:
    return _table_md(df.select("split", pl.col("prompt").str.slice(0, 80)).head(5))
