"""Stage 4b: functional cross-category tests per model (circuit transfer and faithfulness), read by
the comparison. The refusal directions are the asset ``refusal_direction``."""

import json
import time
from collections.abc import Callable

import dagster as dg
import numpy as np
import torch

from refusal_assets.analysis.functional import FunctionalSettings, model_transfer
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.config import CircuitConfig, ComparisonConfig, ModelConfig, ProjectConfig
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.layout import Layout
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.models import load_model
from refusal_assets.plots import plot_heatmap
from refusal_assets.sae.files import load_sae
from refusal_assets.storage import write_text


def _plot_transfer(out: dict, model_key: str, layout: Layout) -> dict[str, str]:
    """The heatmap of the circuit transfer's score changes; its verdict for the asset's metadata."""
    res = out.get("circuit_transfer")
    if res is None:
        return {}
    change = np.array(
        [[np.nan if v is None else v for v in row] for row in res["change"]], dtype=float
    )
    plot_heatmap(
        change,
        res["categories"],
        f"{model_key}: {res['test']} (rows A act on columns B)",
        layout.transfer_plot(model_key, "circuit_transfer"),
    )
    return {"verdict_circuit_transfer": res["verdict"]}


def _settings(
    cc: CircuitConfig, comp: ComparisonConfig, model_cfg: ModelConfig, device: str
) -> FunctionalSettings:
    """The functional tests' settings from the config's circuits and comparison sections and the model's."""
    return FunctionalSettings(
        rule=VerdictRule.from_config(comp),
        selection=cc.selection,
        k_per_site=cc.k_per_site,
        threshold=cc.threshold,
        n_bootstrap=comp.n_bootstrap,
        seed=comp.seed,
        batch_size=model_cfg.batch_size,
        system_prompt=model_cfg.chat_template.system_prompt,
        device=device,
    )


def build(
    cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]
) -> list[dg.AssetsDefinition]:
    cc, comp = cfg.circuits, cfg.comparison

    @gpu_asset(
        partitions_def=parts.model,
        kinds={"pytorch", "scipy"},
        group_name="comparison",
        # Model settings reach it as data versions through circuit and refusal_behaviour (their
        # model_config source), so only circuits and comparison are hashed here. The SAEs and the
        # sample it also reads are not direct deps: every one it reads is an input of this model's
        # circuits (an exact mapping), while an AllPartitionMapping on them would stale every model's
        # transfer whenever any model's SAE changes.
        code_version=cfg.section_hash("circuits", "comparison"),
        deps=[
            dg.AssetDep(
                "circuit",
                partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
                    partition_dimension_name="model"
                ),
            ),
            dg.AssetDep(
                "refusal_behaviour",
                partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
                    partition_dimension_name="model"
                ),
            ),
        ],
        description="Functional cross-category tests: A's circuit ablated on B's refusing prompts vs B's own "
        "(circuit transfer) and kept alone on them (faithfulness), each a category x category matrix with "
        "bootstrap CIs and a random control. The refusal directions are the refusal_direction asset.",
    )
    def transfer(
        context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        model_key = context.partition_key
        model_cfg = cfg.model(model_key)
        layout = Layout(storage.files)
        categories = parts.category.get_partition_keys()
        if not comp.transfer:
            write_text(
                json.dumps({"model": model_key, "enabled": False}),
                layout.transfer_summary(model_key),
            )
            return dg.MaterializeResult(metadata={"enabled": False})
        with compute.claim() as device:
            t0 = time.perf_counter()
            model, tok = load_model(model_cfg, cfg.resolve, device, context.log.info)
            refusal = model_cfg.refusal
            ids = torch.tensor(
                refusal_token_ids(tok, refusal.phrases, refusal.refusal_tokens), device=device
            )
            samples = {
                c: layout.load_sample(c).join(
                    layout.load_behaviour(model_key, c), on="prompt_id", how="left"
                )
                for c in categories
            }
            site_keys = dict(zip(model_cfg.sites, model_cfg.site_keys))
            saes = {
                site: load_sae(layout.sae(key)).to(device).eval() for site, key in site_keys.items()
            }
            circuits = {c: layout.load_circuit(model_key, c) for c in categories}
            settings = _settings(cc, comp, model_cfg, device)
            tests, fallback = model_transfer(
                model, tok, ids, saes, circuits, samples, settings, cc.prompt_filter
            )
            seconds = {"circuit_transfer": tests.circuit_seconds, "total": time.perf_counter() - t0}
        if tests.circuit_transfer is not None:
            context.log.info(tests.circuit_transfer.reason)
        out = tests.to_json(model_key, fallback, seconds)
        md: dict = {
            "seconds": round(seconds["total"], 1),
            "fallback_categories": ", ".join(fallback) or "none",
        }
        md.update(_plot_transfer(out, model_key, layout))
        write_text(json.dumps(out, indent=1, default=float), layout.transfer_summary(model_key))
        return dg.MaterializeResult(metadata=md)

    return [transfer]
