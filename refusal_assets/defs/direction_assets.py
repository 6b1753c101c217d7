"""Stage 3c: the execution level per model (refusal_assets.directions): refusal directions found,
ablated at every layer and position, and judged by generation, as Arditi et al. (2024) do it."""

import json
import time
from collections.abc import Callable

import dagster as dg
import polars as pl

from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import ci_metadata, clean, multi_key, png_markdown
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.directions import plots
from refusal_assets.directions.execution import ExecutionRun, run_execution
from refusal_assets.directions.measure import Scorer
from refusal_assets.directions.prompts import PromptRow
from refusal_assets.directions.result import ExecutionResult, category_table, write_result
from refusal_assets.directions.select import NoDirection
from refusal_assets.layout import Layout
from refusal_assets.lm.models import load_model
from refusal_assets.storage import read_parquet, write_safetensors, write_text


def prompt_rows(layout: Layout, model_key: str, categories: list[str]) -> list[PromptRow]:
    """Every sampled prompt of ``categories`` with the model's clean behaviour."""
    out = []
    for c in categories:
        behaviour = pl.from_arrow(read_parquet(layout.behaviour(model_key, c), "refusal behaviour"))
        df = layout.load_sample(c).join(
            behaviour.select("prompt_id", "refused", "refusal_score", "response"),
            on="prompt_id",
            how="inner",
        )
        cols = ("prompt_id", "prompt", "split", "heldout", "refused", "refusal_score", "response")
        out += [PromptRow(category=c, **row) for row in df.select(cols).iter_rows(named=True)]
    return out


def build(
    cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]
) -> list[dg.AssetsDefinition]:
    @gpu_asset(
        # model x scope("all") rather than per model, so that features (site x scope) can read a
        # model's direction through a built-in mapping (see Partitions.direction)
        partitions_def=parts.direction,
        kinds={"pytorch", "safetensors"},
        group_name="model",
        code_version=cfg.section_hash("directions"),
        # The model's settings reach it through refusal_behaviour (whose model_config source hashes
        # every setting the model pass reads), not as a direct dep: a direct one would request it in
        # the same tick as behaviour, and the daemon would run the two side by side, this one
        # reading the old behaviour files.
        deps=[
            dg.AssetDep("refusal_behaviour", partition_mapping=parts.direction_from_behaviour()),
        ],
        description="Refusal directions (Arditi et al. 2024): difference of means over layers x "
        "post-instruction positions, selected with the KL and induced-refusal filters, ablated at "
        "every layer and position; the share of refusing prompts still refusing (pooled, "
        "leave-one-category-out, random), induced refusal, steering trade-off and "
        "verdict_execution.",
    )
    def refusal_direction(
        context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        model_key = multi_key(parts.direction, context.partition_key)["model"]
        layout = Layout(storage.files)
        model_cfg, dcfg = cfg.model(model_key), cfg.directions
        rows = prompt_rows(layout, model_key, parts.category.get_partition_keys())
        with compute.claim() as device:
            t0 = time.perf_counter()
            model, tokenizer = load_model(model_cfg, cfg.resolve, device, context.log.info)
            try:
                run = run_execution(
                    Scorer(model, tokenizer, model_cfg, device),
                    rows,
                    dcfg,
                    model_key,
                    context.log.info,
                )
            except NoDirection as e:
                n_layers = model_cfg.architecture.n_layers
                run = ExecutionRun(
                    result=ExecutionResult.insufficient(model_key, n_layers, str(e), dcfg.margin),
                    directions={},
                )
        result = run.result
        write_safetensors(
            {k: v.float().cpu() for k, v in run.directions.items()},
            layout.direction_tensors(model_key),
        )
        examples = [vars(e) for e in result.examples]
        write_text(json.dumps(examples, indent=1), layout.direction_examples(model_key))
        pngs = {}
        if result.layer >= 0:
            for name, fn in [
                ("still_refusing", plots.plot_still_refusing),
                ("layer_scan", plots.plot_layer_scan),
                ("steering", plots.plot_steering),
            ]:
                pngs[name] = png_markdown(
                    fn(result, layout.direction_plot(model_key, name)), name.replace("_", " ")
                )
        write_result(result, layout.direction_result(model_key))  # last: marks a complete partition
        pooled = result.pooled_still_refusing
        metadata = {
            "layer": result.layer,
            "position": result.position,
            "pooled_still_refusing": pooled.rate,
            **ci_metadata("pooled_still_refusing_ci", (pooled.ci_lo, pooled.ci_hi)),
            "random_still_refusing": result.random_still_refusing.rate,
            "pooled_induced_refusal": result.pooled_induced_refusal.rate,
            "loco_still_refusing": result.loco_still_refusing,
            "verdict_execution": result.verdict_execution,
            "verdict_reason": result.verdict_reason,
            "categories": dg.MetadataValue.md(category_table(result)),
            "n_refusing_heldout": pooled.n,
            "seconds": round(time.perf_counter() - t0, 2),
            **pngs,
        }
        return dg.MaterializeResult(metadata={k: clean(v) for k, v in metadata.items()})

    return [refusal_direction]
