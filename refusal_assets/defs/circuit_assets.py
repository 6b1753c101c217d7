"""Stage 4: a sparse feature circuit per (model, category), with held-out faithfulness."""

import json
import time
from collections.abc import Callable

import dagster as dg
import polars as pl
import torch

from refusal_assets.circuits.finding import CircuitRun, find_circuit, refusal_direction
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import circuit_metadata, multi_key
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.layout import Layout
from refusal_assets.lm import activations as acts_core
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.models import load_model
from refusal_assets.plots import plot_sweeps
from refusal_assets.sae.files import load_sae
from refusal_assets.storage import write_safetensors, write_text


def _joined_sample(layout: Layout, model_key: str, category: str, partition: str) -> pl.DataFrame:
    """The category's sample joined with the model's behaviour; every sampled prompt judged."""
    sample = layout.load_sample(category).join(
        layout.load_behaviour(model_key, category), on="prompt_id", how="left"
    )
    if n_missing := sample["refused"].null_count():
        raise ValueError(
            f"refusal_behaviour {partition} lacks {n_missing} of the {sample.height} sampled "
            "prompts: it predates the current prompt_sample; materialize refusal_behaviour again"
        )
    return sample


def _site_directions(layout: Layout, site_keys: dict, category: str) -> dict:
    """Each site's refusal direction from the category's post-instruction activations."""
    return {
        site: refusal_direction(
            *acts_core.read_vectors(layout.activations(key, category), post_instruction_only=True)
        )
        for site, key in site_keys.items()
    }


def _replicate_saes(
    cfg: ProjectConfig, layout: Layout, site_keys: dict, device: str
) -> dict[int, dict]:
    """seed -> the sites' SAEs of that extra training (``sae.replicates``); none where a site's SAE
    is pretrained (one dictionary, nothing retrained)."""
    if any(key in cfg.sae.pretrained for key in site_keys.values()):
        return {}
    out = {}
    for seed in cfg.sae.replicates.seeds:
        folders = {site: layout.sae_replicate(key, seed) for site, key in site_keys.items()}
        missing = [str(f) for f in folders.values() if not f.is_dir()]
        if missing:
            raise FileNotFoundError(
                f"sae.replicates.seeds has {seed}, but {missing} do not exist: the SAEs predate "
                "the replicates setting; materialize sae again"
            )
        out[seed] = {site: load_sae(f).to(device).eval() for site, f in folders.items()}
    return out


def build(
    cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]
) -> list[dg.AssetsDefinition]:
    cc = cfg.circuits

    @gpu_asset(
        partitions_def=parts.model_category,
        kinds={"pytorch", "safetensors"},
        group_name="circuits",
        code_version=cfg.section_hash("circuits"),
        # the model's settings reach a circuit through refusal_behaviour (same partition) and its SAEs
        deps=[
            dg.AssetDep("sae", partition_mapping=parts.circuit_from_sae()),
            dg.AssetDep("activations", partition_mapping=parts.circuit_from_activations()),
            dg.AssetDep("prompt_sample", partition_mapping=parts.by_category()),
            dg.AssetDep("refusal_behaviour"),  # same model x category partitions: identity
        ],
        description="Per-prompt node effects on the refusal score (attribution patching), the selected circuit "
        "with edges, held-out faithfulness/completeness sweeps with a random control, and refusal directions.",
    )
    def circuit(
        context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        keys = multi_key(parts.model_category, context.partition_key)
        model_cfg, category = cfg.model(keys["model"]), keys["category"]
        layout, site_keys = Layout(storage.files), dict(zip(model_cfg.sites, model_cfg.site_keys))
        with compute.claim() as device:
            t0 = time.perf_counter()
            model, tok = load_model(model_cfg, cfg.resolve, device, context.log.info)
            saes = {
                site: load_sae(layout.sae(key)).to(device).eval() for site, key in site_keys.items()
            }
            refusal_ids = torch.tensor(
                refusal_token_ids(tok, model_cfg.refusal.phrases, model_cfg.refusal.refusal_tokens),
                device=device,
            )
            sample = _joined_sample(layout, model_cfg.model_key, category, context.partition_key)
            directions = _site_directions(layout, site_keys, category)
            found = find_circuit(
                model,
                tok,
                sample,
                saes,
                refusal_ids,
                directions,
                cc,
                category=category,
                model_key=model_cfg.model_key,
                run=CircuitRun(
                    batch_size=model_cfg.batch_size,
                    system_prompt=model_cfg.chat_template.system_prompt,
                    device=device,
                    log=context.log.info,
                    warn=context.log.warning,
                ),
                replicate_saes=_replicate_saes(cfg, layout, site_keys, device),
            )
            write_safetensors(
                found.tensors(), layout.circuit_tensors(model_cfg.model_key, category)
            )
            summary = found.to_json()
            png = plot_sweeps(
                {g: v["sweep"] for g, v in summary["groups"].items()},
                f"{model_cfg.model_key} / {category}",
                layout.circuit_plot(model_cfg.model_key, category),
            )
            summary["seconds"] = time.perf_counter() - t0
            # written last: marks a complete partition
            write_text(
                json.dumps(summary, indent=1, default=float),
                layout.circuit_summary(model_cfg.model_key, category),
            )
            return dg.MaterializeResult(metadata=circuit_metadata(found, png, summary["seconds"]))

    return [circuit]
