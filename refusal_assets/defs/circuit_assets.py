"""Stage 4: a sparse feature circuit per (model, category), with held-out faithfulness."""

import json
import time

import numpy as np
import polars as pl
import torch
import dagster as dg
from safetensors.torch import save_file

from refusal_assets import circuits as circ
from refusal_assets import activations as acts_core
from refusal_assets.behaviour import refusal_token_ids
from refusal_assets.comparison import select_circuit
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.automation import rebuild_condition
from refusal_assets.defs.gpu import GPU_POOL
from refusal_assets.defs.metadata import clean, multi_key, png_markdown
from refusal_assets.defs.model_assets import activations_path, load_sample
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import ComputeResource, StorageResource
from refusal_assets.defs.sae_assets import sae_folder
from refusal_assets.models import load_model
from refusal_assets.plots import plot_sweeps
from refusal_assets.report import format_ci
from refusal_assets.sae import load_sae
from refusal_assets.sites import Site
from refusal_assets.storage import atomic_path, read_parquet, write_text

GROUPS = {"toxic": ["toxic"], "benign": ["safe", "hard"], "all": ["safe", "hard", "toxic"]}


def load_behaviour(storage: StorageResource, model_key: str, category: str) -> pl.DataFrame:
    """The ``refused`` judgement and refusal score of each sampled prompt (``refusal_behaviour``)."""
    path = storage.files.path("refusal_behaviour", model_key, category, filename="behaviour.parquet")
    return pl.from_arrow(read_parquet(path, "refusal behaviour")).select("prompt_id", "refused", "refusal_score")


def refusal_direction(storage: StorageResource, site_key: str, category: str) -> torch.Tensor | None:
    """Difference of means (toxic - safe) at the last post-instruction position (Arditi et al. 2024),
    over the training prompts only (the held-out ones score its ablation)."""
    vectors, meta = acts_core.read_vectors(activations_path(storage, site_key, category), post_instruction_only=True)
    meta = meta.with_row_index("row").filter(~pl.col("heldout"))
    last = meta.group_by("prompt_id").agg(pl.col("row").max(), pl.col("split").first())
    last = last.filter(pl.col("split").is_in(["toxic", "safe"]))
    rows = {s: last.filter(pl.col("split") == s)["row"].to_numpy().astype(np.int64) for s in ("toxic", "safe")}
    if any(len(r) == 0 for r in rows.values()):
        return None
    v = vectors.float()
    return v[torch.from_numpy(rows["toxic"])].mean(0) - v[torch.from_numpy(rows["safe"])].mean(0)


def build(cfg: ProjectConfig, parts: Partitions, op_tags: dict) -> list[dg.AssetsDefinition]:
    cc = cfg.circuits

    @dg.asset(
        partitions_def=parts.model_category, pool=GPU_POOL, op_tags=op_tags, kinds={"pytorch", "safetensors"}, group_name="circuits",
        code_version=cfg.section_hash("models", "circuits"), automation_condition=rebuild_condition(),
        deps=[
            dg.AssetDep("sae", partition_mapping=parts.circuit_from_sae()),
            dg.AssetDep("activations", partition_mapping=parts.circuit_from_activations()),
            dg.AssetDep("prompt_sample", partition_mapping=parts.by_category()),
            dg.AssetDep("refusal_behaviour"),  # same model x category partitions: identity
        ],
        description="Per-prompt node effects on the refusal score (attribution patching), the selected circuit with edges, "
                    "held-out faithfulness/completeness sweeps with a random control, and refusal directions.",
    )
    def circuit(context: dg.AssetExecutionContext, compute: ComputeResource, storage: StorageResource) -> dg.MaterializeResult:
        keys = multi_key(parts.model_category, context.partition_key)
        model_cfg, category = cfg.model(keys["model"]), keys["category"]
        with compute.claim() as device:
            t0 = time.perf_counter()
            model, tok = load_model(model_cfg, cfg.resolve, device, context.log.info)
            saes = {site: load_sae(sae_folder(storage, key)).to(device).eval() for site, key in zip(model_cfg.sites, model_cfg.site_keys)}
            sites = sorted(saes)
            refusal_ids = torch.tensor(refusal_token_ids(tok, model_cfg.refusal.phrases, model_cfg.refusal.refusal_tokens), device=device)
            sample = load_sample(storage, category).join(load_behaviour(storage, model_cfg.model_key, category), on="prompt_id", how="left")
            if n_missing := sample["refused"].null_count():
                raise ValueError(f"refusal_behaviour {context.partition_key} lacks {n_missing} of the {sample.height} sampled prompts: "
                                 "it predates the current prompt_sample; materialize refusal_behaviour again")
            kw = dict(batch_size=model_cfg.batch_size, system_prompt=model_cfg.chat_template.system_prompt, device=device)
            baseline_texts, baseline_set = circ.baseline_prompts(sample, cc.prompt_filter)
            baseline = circ.compute_baseline(model, tok, baseline_texts, saes, **kw)
            index = circ.NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])
            folder = storage.files.path("circuit", model_cfg.model_key, category)
            groups = {"toxic": GROUPS["toxic"], "benign": GROUPS["benign"]} if cc.separate_safe_toxic else {"all": GROUPS["all"]}

            def select(mean_effect: np.ndarray, k: int) -> np.ndarray:
                return select_circuit(mean_effect, index.site_of_node, mode=cc.selection, k_per_site=k, threshold=cc.threshold)

            summary: dict = {"category": category, "model": model_cfg.model_key, "sites": [s.name for s in sites], "n_nodes_total": index.n_nodes,
                             "prompt_filter": cc.prompt_filter, "baseline": {"prompts": baseline_set, "n_prompts": len(baseline_texts)}, "groups": {}}
            tensors: dict[str, torch.Tensor] = {"site_of_node": torch.from_numpy(index.site_of_node.astype(np.int32))}
            for group, splits in groups.items():
                group_rows = sample.filter(pl.col("split").is_in(splits))
                rows, prompt_set = circ.select_prompts(group_rows, cc.prompt_filter, cc.min_prompts)
                if rows.height < 2:
                    context.log.warning(f"{category}/{group}: {rows.height} prompt(s); a cross-fitted circuit needs two, skipped")
                    continue
                if prompt_set != cc.prompt_filter:
                    context.log.warning(f"{category}/{group}: prompt set {prompt_set}")
                prompts = rows["prompt"].to_list()
                effects, scores = circ.node_effects(model, tok, prompts, saes, baseline, refusal_ids, method=cc.method,
                                                    ig_steps=cc.ig_steps, log=context.log.info, **kw)
                mean_effect = effects.mean(0)
                chosen = select(mean_effect, cc.k_per_site)
                suffixes = circ.prepare_suffixes(model, tok, prompts, **kw)
                folds = circ.crossfit_folds(len(prompts), cc.n_folds, cc.seed)

                def score_fn(keep: np.ndarray) -> np.ndarray:
                    return circ.ablated_scores(model, suffixes, saes, baseline, keep, refusal_ids)

                sweep = circ.evaluate_sizes(score_fn, effects, index.site_of_node, sorted(set(cc.eval_sizes) | {cc.k_per_site}), select, folds,
                                            seed=cc.seed, n_bootstrap=cc.n_bootstrap)
                at_k = next(r for r in sweep["sweep"] if r["size_per_site"] == cc.k_per_site)
                edges = []
                if cc.edges and (group == "toxic" or not cc.separate_safe_toxic):
                    edges = circ.edge_effects(model, tok, prompts, saes, baseline, refusal_ids, chosen, max_edges=cc.max_edges,
                                              targets_per_site=cc.edge_targets_per_site, mean_effect=mean_effect, **kw)
                nodes = [{**index.describe(int(i)), "effect": float(mean_effect[i])} for i in np.flatnonzero(chosen)]
                nodes.sort(key=lambda n: -n["effect"])
                summary["groups"][group] = {
                    "n_prompts": rows.height, "n_prompts_in_group": group_rows.height, "prompt_set": prompt_set,
                    "n_nodes": int(chosen.sum()), "nodes": nodes, "edges": edges,
                    **{key: at_k[key] for key in ("faithfulness", "faithfulness_ci", "completeness", "completeness_ci",
                                                  "random_faithfulness", "random_faithfulness_ci", "advantage_ci")},
                    "sweep": sweep, "mean_refusal_score": float(scores.mean()), "prompt_ids": rows["prompt_id"].to_list(),
                    "folds": folds.tolist(),
                }
                tensors[f"effects_{group}"] = torch.from_numpy(effects.astype(np.float32))
                tensors[f"scores_{group}"] = torch.from_numpy(scores.astype(np.float32))
                lo, hi = at_k["faithfulness_ci"]
                context.log.info(f"{category}/{group} ({rows.height} {prompt_set} prompts): {int(chosen.sum())} nodes, faithfulness "
                                 f"{at_k['faithfulness']:.3f} [{lo:.2f}, {hi:.2f}], completeness {at_k['completeness']:.3f}, "
                                 f"random {at_k['random_faithfulness']:.3f}, m(M) - m(∅) {sweep['m_full'] - sweep['m_empty']:.3f}")
            if not summary["groups"]:
                raise ValueError(f"circuit {context.partition_key}: no prompt group has two prompts to cross-fit; "
                                 f"raise data.sampling.max_per_cell or set circuits.prompt_filter: all")

            # Refusal-direction baseline: one direction per site from the training prompts, scored on the held-out toxic prompts.
            toxic_heldout = sample.filter((pl.col("split") == "toxic") & pl.col("heldout"))["prompt"].to_list()
            score_clean = None  # the held-out toxic prompts' score without any ablation: one pass serves every site
            if toxic_heldout:
                heldout_suffixes = circ.prepare_suffixes(model, tok, toxic_heldout, **kw)
                score_clean = circ.ablated_score(model, heldout_suffixes, saes, baseline, np.ones(index.n_nodes, bool), refusal_ids)
            directions = {}
            for site, key in zip(model_cfg.sites, model_cfg.site_keys):
                r = refusal_direction(storage, key, category)
                if r is None:
                    continue
                tensors[f"direction_{site.name}"] = r
                entry = {"norm": float(r.norm())}
                if toxic_heldout:
                    entry["score_clean"] = score_clean
                    entry["score_ablated"] = circ.direction_ablation_score(model, tok, toxic_heldout, site, r.to(device), refusal_ids, **kw)
                directions[site.name] = entry
            summary["directions"] = directions
            with atomic_path(folder / "effects.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            png = plot_sweeps({g: v["sweep"] for g, v in summary["groups"].items()}, f"{model_cfg.model_key} / {category}", folder / "faithfulness.png")
            summary["seconds"] = time.perf_counter() - t0
            write_text(json.dumps(summary, indent=1, default=float), folder / "circuit.json")  # written last: marks a complete partition
            main = summary["groups"].get("toxic") or next(iter(summary["groups"].values()))
            md = {
                "n_nodes": main["n_nodes"], "faithfulness": main["faithfulness"], "completeness": main["completeness"],
                "random_faithfulness": main["random_faithfulness"],
                "faithfulness_ci": format_ci(main["faithfulness_ci"], 3), "random_faithfulness_ci": format_ci(main["random_faithfulness_ci"], 3),
                "faithfulness_minus_random_ci": format_ci(main["advantage_ci"], 3),
                # the ratios' denominator: near zero, faithfulness and completeness are ill-conditioned
                "m_full_minus_m_empty": main["sweep"]["m_full"] - main["sweep"]["m_empty"],
                "n_prompts": main["n_prompts"], "prompt_set": main["prompt_set"], "baseline_prompts": f"{baseline_set} ({len(baseline_texts)})",
                "n_edges": len(main["edges"]), "seconds": round(summary["seconds"], 1),
                "top_nodes": dg.MetadataValue.md("\n".join(f"- {n['site']} {'error' if n['is_error'] else 'latent ' + str(n['latent'])}: {n['effect']:.3f}" for n in main["nodes"][:10])),
                "faithfulness_plot": png_markdown(png, "faithfulness and completeness"),
            }
            for g, v in summary["groups"].items():
                md[f"faithfulness_{g}"], md[f"completeness_{g}"], md[f"n_nodes_{g}"] = v["faithfulness"], v["completeness"], v["n_nodes"]
            return dg.MaterializeResult(metadata={k: clean(v) for k, v in md.items()})

    return [circuit]
