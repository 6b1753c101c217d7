"""The whole circuit procedure for one (model, category): prompt groups and filters, the circuit of
each group with its cross-fitted evaluation and edges, the refusal-direction baselines, and what
the asset writes (``circuit.json``, ``effects.safetensors``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.circuits.ablation import ablated_score, ablated_scores, direction_ablation_score
from refusal_assets.circuits.attribution import (
    Dictionaries,
    edge_effects,
    node_effects_per_dictionary,
)
from refusal_assets.circuits.evaluation import SizeSweep, SweepPoint, crossfit_folds, evaluate_sizes
from refusal_assets.circuits.passes import Baseline, compute_baselines, prepare_suffixes
from refusal_assets.circuits.selection import NodeIndex, select_circuit
from refusal_assets.config import CircuitConfig
from refusal_assets.layout import replicate_effects_key
from refusal_assets.lm.sites import Site


def select_prompts(
    rows: pl.DataFrame, prompt_filter: str, min_prompts: int
) -> tuple[pl.DataFrame, str]:
    """The prompts of one group that its circuit is found and evaluated on, and a label for that set.

    ``rows`` carries the behaviour columns ``refused`` and ``refusal_score``. A filter that leaves
    fewer than ``min_prompts`` falls back to every prompt, and the label says so.
    """
    if prompt_filter == "all":
        return rows, "all"
    keep = pl.col("refused") if prompt_filter == "refused" else pl.col("refusal_score") > 0
    chosen = rows.filter(keep)
    if chosen.height < min_prompts:
        return rows, f"all ({prompt_filter}: only {chosen.height} < {min_prompts})"
    return chosen, prompt_filter


def baseline_prompts(sample: pl.DataFrame, prompt_filter: str) -> tuple[list[str], str]:
    """Prompts whose mean activations are the ablation baseline: the safe prompts, and with a
    refusal filter only those the model complied with (so the baseline is the non-refusing state)."""
    safe = sample.filter(pl.col("split") == "safe")
    if prompt_filter != "all":
        complied = safe.filter(
            ~pl.col("refused") if prompt_filter == "refused" else pl.col("refusal_score") <= 0
        )
        if complied.height:
            return complied["prompt"].to_list(), "safe, complied"
    if safe.height:
        return safe["prompt"].to_list(), "safe"
    return sample.filter(pl.col("split") != "toxic")["prompt"].to_list(), "non-toxic"


# Prompt groups a circuit is found on: toxic and benign separately, or every prompt at once.
GROUPS = {"toxic": ["toxic"], "benign": ["safe", "hard"], "all": ["safe", "hard", "toxic"]}


def refusal_direction(vectors: torch.Tensor, meta: pl.DataFrame) -> torch.Tensor | None:
    """Difference of means (toxic - safe) at the last post-instruction position (Arditi et al. 2024),
    over the training prompts only (the held-out ones score its ablation). ``vectors`` [N, d] and
    ``meta`` are one activations file's post-instruction rows; None without a toxic or a safe prompt."""
    meta = meta.with_row_index("row").filter(~pl.col("heldout"))
    last = meta.group_by("prompt_id").agg(pl.col("row").max(), pl.col("split").first())
    last = last.filter(pl.col("split").is_in(["toxic", "safe"]))
    rows = {
        s: last.filter(pl.col("split") == s)["row"].to_numpy().astype(np.int64)
        for s in ("toxic", "safe")
    }
    if any(len(r) == 0 for r in rows.values()):
        return None
    v = vectors.float()
    return v[torch.from_numpy(rows["toxic"])].mean(0) - v[torch.from_numpy(rows["safe"])].mean(0)


@dataclass(frozen=True, kw_only=True)
class GroupCircuit:
    """The circuit of one prompt group, with its cross-fitted evaluation."""

    n_prompts: int
    """Prompts the circuit was found and evaluated on (after the prompt filter)."""
    n_prompts_in_group: int
    prompt_set: str
    """The prompt filter applied, or the fallback it took (see :func:`select_prompts`)."""
    chosen: np.ndarray
    """Circuit mask [n_nodes] selected on every prompt of the group."""
    nodes: list[dict]
    """The circuit's nodes (:meth:`NodeIndex.describe` + mean effect), strongest first."""
    edges: list[dict]
    sweep: SizeSweep
    at_k: SweepPoint
    """The sweep point at the configured ``k_per_site``."""
    effects: np.ndarray
    """Per-prompt node effects [n_prompts, n_nodes]."""
    scores: np.ndarray
    """Refusal score per prompt [n_prompts]."""
    prompt_ids: list[str]
    folds: np.ndarray
    replicate_effects: dict[int, np.ndarray]
    """SAE seed -> per-prompt node effects [n_prompts, n_nodes] through that extra training of
    the sites' SAEs (``sae.replicates``; the feature-level test's stability)."""

    def to_json(self) -> dict:
        """The group's entry of ``circuit.json``."""
        at_k = asdict(self.at_k)
        return {
            "n_prompts": self.n_prompts,
            "n_prompts_in_group": self.n_prompts_in_group,
            "prompt_set": self.prompt_set,
            "n_nodes": int(self.chosen.sum()),
            "nodes": self.nodes,
            "edges": self.edges,
            **{
                key: at_k[key]
                for key in (
                    "faithfulness",
                    "faithfulness_ci",
                    "completeness",
                    "completeness_ci",
                    "random_faithfulness",
                    "random_faithfulness_ci",
                    "advantage_ci",
                )
            },
            "sweep": self.sweep.to_json(),
            "mean_refusal_score": float(self.scores.mean()),
            "prompt_ids": self.prompt_ids,
            "folds": self.folds.tolist(),
        }


@dataclass(frozen=True, kw_only=True)
class DirectionBaseline:
    """A refusal direction at one site, and the held-out toxic score with it projected out."""

    direction: torch.Tensor  # [d]
    score_clean: float | None
    """Held-out toxic prompts' mean score without ablation (None without held-out toxic prompts)."""
    score_ablated: float | None

    def to_json(self) -> dict:
        entry: dict = {"norm": float(self.direction.norm())}
        if self.score_clean is not None:
            entry["score_clean"], entry["score_ablated"] = self.score_clean, self.score_ablated
        return entry


@dataclass(frozen=True, kw_only=True)
class CategoryCircuit:
    """Everything :func:`find_circuit` finds for one (model, category)."""

    category: str
    model_key: str
    index: NodeIndex
    prompt_filter: str
    baseline_set: str
    """Which prompts the mean-ablation baseline averages (see :func:`baseline_prompts`)."""
    n_baseline: int
    groups: dict[str, GroupCircuit]
    directions: dict[str, DirectionBaseline]

    @property
    def main(self) -> GroupCircuit:
        """The group the asset reports: toxic when the groups are separate."""
        return self.groups.get("toxic") or next(iter(self.groups.values()))

    def to_json(self) -> dict:
        """``circuit.json`` (the asset adds its wall time)."""
        return {
            "category": self.category,
            "model": self.model_key,
            "sites": [s.name for s in self.index.sites],
            "sae_replicate_seeds": sorted(self.main.replicate_effects),
            "n_nodes_total": self.index.n_nodes,
            "prompt_filter": self.prompt_filter,
            "baseline": {"prompts": self.baseline_set, "n_prompts": self.n_baseline},
            "groups": {g: v.to_json() for g, v in self.groups.items()},
            "directions": {s: d.to_json() for s, d in self.directions.items()},
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """``effects.safetensors``: node sites, per-prompt effects and scores per group, directions per site."""
        out = {"site_of_node": torch.from_numpy(self.index.site_of_node.astype(np.int32))}
        for g, v in self.groups.items():
            out[f"effects_{g}"] = torch.from_numpy(v.effects.astype(np.float32))
            out[f"scores_{g}"] = torch.from_numpy(v.scores.astype(np.float32))
            for seed, effects in v.replicate_effects.items():
                out[replicate_effects_key(g, seed)] = torch.from_numpy(effects.astype(np.float32))
        for s, d in self.directions.items():
            out[f"direction_{s}"] = d.direction
        return {k: v.contiguous() for k, v in out.items()}


def _quiet(message: str) -> None:
    """The default log: say nothing."""


@dataclass(frozen=True, kw_only=True)
class CircuitRun:
    """How :func:`find_circuit` runs the model and reports."""

    batch_size: int
    system_prompt: str | None = None
    device: str = "cpu"
    log: Callable[[str], None] = _quiet
    warn: Callable[[str], None] = _quiet
    """Said when a prompt group is skipped or falls back to another prompt set."""

    def batching(self) -> dict:
        """The keyword arguments every pass over prompts takes."""
        return {
            "batch_size": self.batch_size,
            "system_prompt": self.system_prompt,
            "device": self.device,
        }


class _CategorySetting(NamedTuple):
    """What every prompt group of one category shares."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    saes: dict[Site, nn.Module]
    refusal_ids: torch.Tensor
    baseline: Baseline
    index: NodeIndex
    cc: CircuitConfig
    run: CircuitRun
    replicates: dict[int, Dictionaries]
    """SAE seed -> the extra training's SAEs and their baseline (``sae.replicates``)."""

    def select(self, mean_effect: np.ndarray, k: int) -> np.ndarray:
        """The circuit of ``k`` nodes per site for ``mean_effect`` [n_nodes], as the config selects."""
        cc = self.cc
        return select_circuit(
            mean_effect,
            self.index.site_of_node,
            mode=cc.selection,
            k_per_site=k,
            threshold=cc.threshold,
        )


def _group_circuit(
    setting: _CategorySetting, category: str, group: str, group_rows: pl.DataFrame
) -> GroupCircuit | None:
    """The circuit of one prompt group with its cross-fitted size sweep and (toxic or only group) its
    edges; None, with a warning, when fewer than two prompts pass the filter."""
    model, tokenizer, saes, refusal_ids, baseline, index, cc, run, replicates = setting
    kw = run.batching()
    rows, prompt_set = select_prompts(group_rows, cc.prompt_filter, cc.min_prompts)
    if rows.height < 2:
        run.warn(
            f"{category}/{group}: {rows.height} prompt(s); a cross-fitted circuit needs two, skipped"
        )
        return None
    if prompt_set != cc.prompt_filter:
        run.warn(f"{category}/{group}: prompt set {prompt_set}")
    prompts = rows["prompt"].to_list()
    suffixes = prepare_suffixes(
        model, tokenizer, prompts, **kw
    )  # one prefill serves every pass below
    (effects, *replicate_effects), scores = node_effects_per_dictionary(
        model,
        tokenizer,
        prompts,
        [Dictionaries(saes, baseline), *replicates.values()],
        refusal_ids,
        method=cc.method,
        ig_steps=cc.ig_steps,
        log=run.log,
        suffixes=suffixes,
        **kw,
    )
    mean_effect = effects.mean(0)
    chosen = setting.select(mean_effect, cc.k_per_site)
    folds = crossfit_folds(len(prompts), cc.n_folds, cc.seed)

    def score_fn(keep: np.ndarray) -> np.ndarray:
        return ablated_scores(model, suffixes, saes, baseline, keep, refusal_ids)

    sweep = evaluate_sizes(
        score_fn,
        effects,
        index.site_of_node,
        sorted(set(cc.eval_sizes) | {cc.k_per_site}),
        setting.select,
        folds,
        seed=cc.seed,
        n_bootstrap=cc.n_bootstrap,
        log=run.log,
    )
    edges = []
    if cc.edges and (group == "toxic" or not cc.separate_safe_toxic):
        edges = edge_effects(
            model,
            tokenizer,
            prompts,
            saes,
            baseline,
            refusal_ids,
            chosen,
            max_edges=cc.max_edges,
            targets_per_site=cc.edge_targets_per_site,
            mean_effect=mean_effect,
            suffixes=suffixes,
            **kw,
        )
    nodes = sorted(
        (
            {**index.describe(int(i)), "effect": float(mean_effect[i])}
            for i in np.flatnonzero(chosen)
        ),
        key=lambda n: -n["effect"],
    )
    at_k = sweep.at(cc.k_per_site)
    lo, hi = at_k.faithfulness_ci
    run.log(
        f"{category}/{group} ({rows.height} {prompt_set} prompts): {int(chosen.sum())} nodes, faithfulness "
        f"{at_k.faithfulness:.3f} [{lo:.2f}, {hi:.2f}], completeness {at_k.completeness:.3f}, "
        f"random {at_k.random_faithfulness:.3f}, m(M) - m(∅) {sweep.m_full - sweep.m_empty:.3f}"
    )
    return GroupCircuit(
        n_prompts=rows.height,
        n_prompts_in_group=group_rows.height,
        prompt_set=prompt_set,
        chosen=chosen,
        nodes=nodes,
        edges=edges,
        sweep=sweep,
        at_k=at_k,
        effects=effects,
        scores=scores,
        prompt_ids=rows["prompt_id"].to_list(),
        folds=folds,
        replicate_effects=dict(zip(replicates, replicate_effects)),
    )


def find_circuit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: pl.DataFrame,
    saes: dict[Site, nn.Module],
    refusal_ids: torch.Tensor,
    directions: dict[Site, torch.Tensor | None],
    cc: CircuitConfig,
    *,
    category: str,
    model_key: str,
    run: CircuitRun,
    replicate_saes: dict[int, dict[Site, nn.Module]] | None = None,
) -> CategoryCircuit:
    """The circuit of one category per prompt group, cross-fitted faithfulness and completeness,
    edges, and the refusal-direction baseline.

    ``sample`` is the category's prompt sample joined with its behaviour (``refused``,
    ``refusal_score``); ``directions`` holds each site's refusal direction (:func:`refusal_direction`);
    ``replicate_saes``: seed -> other trainings of the same sites' SAEs, whose node effects are
    kept beside the main ones (``GroupCircuit.replicate_effects``).
    """
    replicate_saes = replicate_saes or {}
    baseline_texts, baseline_set = baseline_prompts(sample, cc.prompt_filter)
    baseline, *replicate_baselines = compute_baselines(
        model, tokenizer, baseline_texts, [saes, *replicate_saes.values()], **run.batching()
    )
    replicates = {
        seed: Dictionaries(r, b)
        for (seed, r), b in zip(replicate_saes.items(), replicate_baselines)
    }
    sites = sorted(saes)
    index = NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])
    setting = _CategorySetting(
        model, tokenizer, saes, refusal_ids, baseline, index, cc, run, replicates
    )
    groups = (
        {"toxic": GROUPS["toxic"], "benign": GROUPS["benign"]}
        if cc.separate_safe_toxic
        else {"all": GROUPS["all"]}
    )
    found: dict[str, GroupCircuit] = {}
    for group, splits in groups.items():
        circuit = _group_circuit(
            setting, category, group, sample.filter(pl.col("split").is_in(splits))
        )
        if circuit is not None:
            found[group] = circuit
    if not found:
        raise ValueError(
            f"circuit {category}|{model_key}: no prompt group has two prompts to cross-fit; "
            f"raise data.sampling.max_per_cell or set circuits.prompt_filter: all"
        )
    return CategoryCircuit(
        category=category,
        model_key=model_key,
        index=index,
        prompt_filter=cc.prompt_filter,
        baseline_set=baseline_set,
        n_baseline=len(baseline_texts),
        groups=found,
        directions=_direction_baselines(setting, sample, directions),
    )


def _direction_baselines(
    setting: _CategorySetting, sample: pl.DataFrame, directions: dict[Site, torch.Tensor | None]
) -> dict[str, DirectionBaseline]:
    """Each site's refusal direction, scored by ablating it on the held-out toxic prompts."""
    model, tokenizer, saes, refusal_ids, baseline, index, _, run, _ = setting
    kw = run.batching()
    toxic_heldout = sample.filter((pl.col("split") == "toxic") & pl.col("heldout"))[
        "prompt"
    ].to_list()
    score_clean = (
        None  # the held-out toxic prompts' score without any ablation: one pass serves every site
    )
    if toxic_heldout:
        heldout_suffixes = prepare_suffixes(model, tokenizer, toxic_heldout, **kw)
        score_clean = ablated_score(
            model, heldout_suffixes, saes, baseline, np.ones(index.n_nodes, bool), refusal_ids
        )
    out = {}
    for site, r in directions.items():
        if r is None:
            continue
        ablated = (
            direction_ablation_score(
                model, tokenizer, toxic_heldout, site, r.to(run.device), refusal_ids, **kw
            )
            if toxic_heldout
            else None
        )
        out[site.name] = DirectionBaseline(
            direction=r, score_clean=score_clean, score_ablated=ablated
        )
    return out
