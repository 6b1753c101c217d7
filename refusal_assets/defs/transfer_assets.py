"""Stage 4b: functional cross-category tests per model (circuit transfer, direction cross-ablation,
induced refusal, pooled direction), read by the comparison."""

import json
import time
from collections.abc import Callable

import dagster as dg
import numpy as np
import polars as pl
import torch

from refusal_assets.analysis import transfer as tr
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.circuits.ablation import ablated_scores
from refusal_assets.circuits.finding import baseline_prompts
from refusal_assets.circuits.passes import compute_baseline, prepare_suffixes
from refusal_assets.circuits.selection import select_circuit
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.layout import Layout
from refusal_assets.lm.behaviour import refusal_token_ids
from refusal_assets.lm.models import load_model
from refusal_assets.plots import plot_heatmap
from refusal_assets.sae.files import load_sae
from refusal_assets.storage import write_text


def _refusing(rows: pl.DataFrame, prompt_filter: str) -> pl.DataFrame:
    if prompt_filter == "all":
        return rows
    return rows.filter(pl.col("refused") if prompt_filter == "refused" else pl.col("refusal_score") > 0)


def build(cfg: ProjectConfig, parts: Partitions, gpu_asset: Callable[..., Callable]) -> list[dg.AssetsDefinition]:
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
                "circuit", partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")
            ),
            dg.AssetDep(
                "refusal_behaviour",
                partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="model"),
            ),
        ],
        description="Functional cross-category tests: A's circuit ablated on B's refusing prompts vs B's own "
        "(transfer, faithfulness), A's refusal direction ablated on B's held-out toxic prompts and added to B's "
        "harmless ones, a pooled direction, each a category x category matrix with bootstrap CIs and a random control.",
    )
    def transfer(
        context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        model_key = context.partition_key
        model_cfg = cfg.model(model_key)
        layout = Layout(storage.files)
        categories = parts.category.get_partition_keys()
        rule = VerdictRule.from_config(comp)
        kw = {"batch_size": model_cfg.batch_size, "system_prompt": model_cfg.chat_template.system_prompt}
        out: dict = {"model": model_key, "enabled": comp.transfer}
        if not comp.transfer:
            write_text(json.dumps(out), layout.transfer_summary(model_key))
            return dg.MaterializeResult(metadata={"enabled": False})
        with compute.claim() as device:
            t0 = time.perf_counter()
            model, tok = load_model(model_cfg, cfg.resolve, device, context.log.info)
            ids = torch.tensor(
                refusal_token_ids(tok, model_cfg.refusal.phrases, model_cfg.refusal.refusal_tokens), device=device
            )
            samples = {
                c: layout.load_sample(c).join(layout.load_behaviour(model_key, c), on="prompt_id", how="left")
                for c in categories
            }

            # ---- circuit transfer on each category's refusing toxic prompts (the circuits' own prompts)
            site_keys = dict(zip(model_cfg.sites, model_cfg.site_keys))
            saes = {site: load_sae(layout.sae(key)).to(device).eval() for site, key in site_keys.items()}
            score_fns, circuits, own, fallback = {}, {}, {}, []
            site_of_node = None
            for c in categories:
                summary, tensors = layout.load_circuit(model_key, c)
                group = summary["groups"].get("toxic") or summary["groups"].get("all")
                key = "toxic" if "toxic" in summary["groups"] else "all"
                if group is None or group.get("prompt_set", cc.prompt_filter) != cc.prompt_filter:
                    fallback.append(c)  # mixed refused and complied prompts: out of the test
                    continue
                site_of_node = tensors["site_of_node"]
                by_id = dict(zip(samples[c]["prompt_id"].to_list(), samples[c]["prompt"].to_list()))
                prompts = [by_id[p] for p in group["prompt_ids"]]
                baseline_texts, _ = baseline_prompts(samples[c], cc.prompt_filter)
                baseline = compute_baseline(model, tok, baseline_texts, saes, device=device, **kw)
                suffixes = prepare_suffixes(model, tok, prompts, device=device, **kw)
                score_fns[c] = lambda keep, s=suffixes, b=baseline: ablated_scores(model, s, saes, b, keep, ids)
                mask = np.zeros(len(site_of_node), bool)
                mask[[n["node"] for n in group["nodes"]]] = True
                circuits[c] = mask
                own[c] = tr.loo_masks(
                    tensors[f"effects_{key}"],
                    lambda m, son=site_of_node: select_circuit(
                        m, son, mode=cc.selection, k_per_site=cc.k_per_site, threshold=cc.threshold
                    ),
                )
            out["fallback_categories"] = fallback
            if len(score_fns) >= 2:
                loss, keep = tr.circuit_transfer(
                    score_fns, circuits, own, site_of_node, rule, n_bootstrap=comp.n_bootstrap, seed=comp.seed
                )
                out["circuit_transfer"], out["circuit_faithfulness"] = loss.to_dict(), keep.to_dict()
                context.log.info(loss.reason)
            t_circ = time.perf_counter() - t0

            # ---- directions: selected on training prompts, every reported number on held-out ones
            def prompts_of(c: str, split: str, heldout: bool, refusing: bool = False) -> list[str]:
                rows = samples[c].filter((pl.col("split") == split) & (pl.col("heldout") == heldout))
                return (_refusing(rows, cc.prompt_filter) if refusing else rows)["prompt"].to_list()

            toxic_train = {c: prompts_of(c, "toxic", False) for c in categories}
            harmless_train = {c: prompts_of(c, "safe", False) for c in categories}
            toxic_eval = {c: prompts_of(c, "toxic", True, refusing=True) for c in categories if c not in fallback}
            harmless_eval = {c: prompts_of(c, "safe", True) for c in categories}
            usable = {c: p for c, p in toxic_train.items() if p and harmless_train[c] and c not in fallback}
            if len(usable) >= 2:
                hidden: dict = {}
                selected = tr.select_directions(
                    model,
                    tok,
                    usable,
                    {c: harmless_train[c] for c in usable},
                    ids,
                    n_layer_candidates=comp.direction_layers,
                    n_position_candidates=comp.direction_positions,
                    pooled_selection_prompts=comp.pooled_selection_prompts,
                    hidden=hidden,
                    device=device,
                    **kw,
                )
                tests = tr.direction_tests(
                    model,
                    tok,
                    selected,
                    toxic_eval,
                    harmless_eval,
                    ids,
                    rule,
                    n_bootstrap=comp.n_bootstrap,
                    seed=comp.seed,
                    device=device,
                    **kw,
                )
                out["directions"] = tests.to_dict()
                # cosines at the pooled direction's layer and position, with ceiling and null
                layer, pos = selected["pooled"].layer, selected["pooled"].position
                out["directions"]["cosine_tests"] = {
                    "layer": layer,
                    "position": pos,
                    **tr.direction_cosines(
                        {c: h[:, layer, pos].numpy() for c, h in hidden["toxic"].items()},
                        {c: h[:, layer, pos].numpy() for c, h in hidden["harmless"].items()},
                        n_permutations=comp.n_permutations,
                        alpha=comp.alpha,
                        seed=comp.seed,
                    ),
                }
                context.log.info(tests.ablation.reason)
                context.log.info(tests.induced.reason)
            out["seconds"] = {"circuit_transfer": t_circ, "total": time.perf_counter() - t0}
        md: dict = {"seconds": round(out["seconds"]["total"], 1), "fallback_categories": ", ".join(fallback) or "none"}
        for name, res in (
            ("circuit_transfer", out.get("circuit_transfer")),
            ("direction_ablation", out.get("directions", {}).get("ablation")),
            ("induced_refusal", out.get("directions", {}).get("induced")),
        ):
            if res is None:
                continue
            md[f"verdict_{name}"] = res["verdict"]
            change = np.array([[np.nan if v is None else v for v in row] for row in res["change"]], dtype=float)
            plot_heatmap(
                change,
                res["categories"],
                f"{model_key}: {res['test']} (rows A act on columns B)",
                layout.transfer_plot(model_key, name),
            )
        write_text(json.dumps(out, indent=1, default=float), layout.transfer_summary(model_key))
        return dg.MaterializeResult(metadata=md)

    return [transfer]
