"""The comparison step of one model: every prompt group's circuit overlap across categories, the
toxic x benign cross-Jaccard, the refusal-direction cosines per site, and the combined verdict of
every test (overlap here, the functional tests from ``transfer.json``).

:func:`compare_model` is the science of the ``comparison`` asset, free of Dagster; the asset reads
the circuit files, calls it, writes :meth:`ModelComparison.to_json` and the figures of
:func:`write_comparison_figures`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refusal_assets.analysis.feature_level import CoreShareTest, core_share_test
from refusal_assets.analysis.overlap import (
    ComparisonResult,
    compare_categories,
    error_node_mask,
    fallback_categories,
    refusal_direction_cosines,
)
from refusal_assets.analysis.verdict import CombinedVerdict, combine, overlap_line, transfer_lines
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.config import CircuitConfig, ComparisonConfig
from refusal_assets.layout import Layout, replicate_effects_key
from refusal_assets.plots import plot_heatmap

CircuitFiles = dict[str, tuple[dict, dict[str, np.ndarray]]]
"""category -> (``circuit.json`` summary, ``effects.safetensors`` tensors), as ``Layout.load_circuit`` reads them."""

# The comparison config's fields that the combined verdict echoes (in this order).
_THRESHOLDS = (
    "alpha",
    "equivalence_margin",
    "modular_max_normalised",
    "min_decided_fraction",
    "majority",
    "min_ceiling",
)


@dataclass(frozen=True, kw_only=True)
class GroupComparison:
    """One prompt group's overlap test across categories."""

    fallback: list[str]
    """Categories whose circuit could not use the configured prompt filter: reported, left out."""
    result: ComparisonResult | None
    """None where fewer than two categories are left to compare."""
    reason: str
    """The verdict's reason (the result's, or why there is no result)."""

    @property
    def verdict(self) -> str:
        return self.result.verdict if self.result is not None else "insufficient evidence"

    def to_json(self) -> dict[str, Any]:
        if self.result is None:
            return {
                "verdict": self.verdict,
                "fallback_categories": self.fallback,
                "verdict_reason": self.reason,
            }
        return {**self.result.to_dict(), "fallback_categories": self.fallback}


@dataclass(frozen=True, kw_only=True)
class DirectionCosines:
    """Cosines of the per-category refusal directions at one site."""

    labels: list[str]
    matrix: np.ndarray
    """[n_cat, n_cat], rows and columns in ``labels`` order."""


@dataclass(frozen=True, kw_only=True)
class ModelComparison:
    """What the comparison step says about one model."""

    model_key: str
    categories: list[str]
    groups: dict[str, GroupComparison]
    """Prompt group -> its overlap test, groups sorted."""
    cross_jaccard: np.ndarray | None
    """[n_cat, n_cat]: Jaccard of the toxic circuit of a (rows) and the benign circuit of b (columns);
    None without both groups."""
    direction_cosines: dict[str, DirectionCosines]
    """site -> cosines, for the sites where at least two categories have a direction."""
    transfer: dict
    """``transfer.json`` as read (empty when not materialized)."""
    combined: CombinedVerdict
    verdict_execution: str
    """The execution-level answer of the ``refusal_direction`` asset (Arditi et al.'s directions,
    ablated at every layer and position); "insufficient evidence" when it is not materialized."""
    execution_reason: str
    feature_tests: dict[int, CoreShareTest | None]
    """SAE seed -> the feature-level test (cross-fitted shared-core share of the main group's
    circuits, see :mod:`refusal_assets.analysis.feature_level`) on the circuits found through that
    training of the SAEs; the main SAEs' seed first. None where fewer than two categories
    qualify."""
    feature_reasons: dict[int, str]

    @property
    def feature_test(self) -> CoreShareTest | None:
        """The feature-level test through the main SAEs (the one the report details)."""
        return next(iter(self.feature_tests.values()))

    @property
    def verdict_features_by_seed(self) -> list[str]:
        """The feature-level answer through each SAE training, main seed first."""
        return [
            t.verdict if t is not None else "insufficient evidence"
            for t in self.feature_tests.values()
        ]

    @property
    def verdict_features(self) -> str:
        """The answer every SAE training gives, or "unstable across SAE trainings" where they
        disagree (no single training's answer stands for the model)."""
        answers = set(self.verdict_features_by_seed)
        return answers.pop() if len(answers) == 1 else "unstable across SAE trainings"

    @property
    def feature_stability(self) -> str:
        """One line: how many trainings, and whether they agree."""
        by_seed = dict(zip(self.feature_tests, self.verdict_features_by_seed))
        seeds = ", ".join(str(s) for s in by_seed)
        if len(by_seed) < 2:
            return f"1 SAE training, seed {seeds}: stability across trainings not measured"
        if len(set(by_seed.values())) == 1:
            return f"stable across {len(by_seed)} SAE trainings: seeds {seeds}"
        return "unstable across SAE trainings: " + "; ".join(
            f"seed {s} {v}" for s, v in by_seed.items()
        )

    @property
    def feature_reason(self) -> str:
        """Why: the main training's reason, and the stability where the trainings disagree."""
        reason = next(iter(self.feature_reasons.values()))
        if self.verdict_features == "unstable across SAE trainings":
            return f"{self.feature_stability}. Main SAEs: {reason}"
        return reason

    @property
    def main_group(self) -> GroupComparison:
        """The group the overlap test's vote rests on: toxic, else the first."""
        return self.groups.get("toxic") or next(iter(self.groups.values()))

    def to_json(self, seconds: float) -> dict[str, Any]:
        """``comparison.json`` (``seconds``: the step's wall time)."""
        out: dict[str, Any] = {
            "model": self.model_key,
            "categories": self.categories,
            "groups": {g: r.to_json() for g, r in self.groups.items()},
        }
        if self.cross_jaccard is not None:
            out["cross_jaccard"] = self.cross_jaccard.tolist()
        out["direction_cosines"] = {
            site: {"labels": c.labels, "matrix": c.matrix.tolist()}
            for site, c in self.direction_cosines.items()
        }
        out["transfer"] = self.transfer
        out["combined"] = self.combined.to_dict()
        out["verdict"], out["verdict_reason"] = self.combined.verdict, self.combined.reason
        out["verdict_execution"], out["execution_reason"] = (
            self.verdict_execution,
            self.execution_reason,
        )
        out["verdict_features"], out["feature_reason"] = self.verdict_features, self.feature_reason
        out["verdict_features_by_seed"] = self.verdict_features_by_seed
        out["feature_stability"] = self.feature_stability
        out["feature_test"] = self.feature_test.to_dict() if self.feature_test else None
        out["feature_tests_by_seed"] = {
            str(seed): test.to_dict() if test else None for seed, test in self.feature_tests.items()
        }
        out["seconds"] = seconds
        return out


def compare_group(
    circuits: CircuitFiles,
    group: str,
    circuits_cfg: CircuitConfig,
    comparison_cfg: ComparisonConfig,
) -> GroupComparison:
    """One prompt group's overlap test (:func:`compare_categories`) over the categories whose circuit
    used the configured prompt filter; the others mix refused and complied prompts and are left out."""
    cc, comp = circuits_cfg, comparison_cfg
    fallback = fallback_categories(
        {c: summary for c, (summary, _) in circuits.items()}, group, cc.prompt_filter
    )
    effects = {
        c: t[f"effects_{group}"]
        for c, (_, t) in circuits.items()
        if f"effects_{group}" in t and c not in fallback
    }
    if len(effects) < 2:
        reason = (
            f"Insufficient evidence: only {sorted(effects)} have at least {cc.min_prompts} "
            f"'{cc.prompt_filter}' prompts; a comparison needs two categories."
        )
        return GroupComparison(fallback=fallback, result=None, reason=reason)
    site_of_node = next(iter(circuits.values()))[1]["site_of_node"]
    result = compare_categories(
        effects,
        site_of_node,
        mode=cc.selection,
        k_per_site=cc.k_per_site,
        threshold=cc.threshold,
        n_permutations=comp.n_permutations,
        n_bootstrap=comp.n_bootstrap,
        n_splits=comp.n_splits,
        alpha=comp.alpha,
        seed=comp.seed,
        error_nodes=error_node_mask(site_of_node),
        rule=VerdictRule.from_config(comp),
        min_ceiling=comp.min_ceiling,
    )
    return GroupComparison(fallback=fallback, result=result, reason=result.verdict_reason)


def cross_jaccard(circuits: CircuitFiles, categories: list[str]) -> np.ndarray:
    """[n_cat, n_cat]: Jaccard of category a's toxic circuit (rows) with category b's benign one (columns)."""
    n_nodes = len(next(iter(circuits.values()))[1]["site_of_node"])
    masks = {}
    for c, (summary, _) in circuits.items():
        for g in ("toxic", "benign"):
            mask = np.zeros(n_nodes, bool)
            mask[[n["node"] for n in summary["groups"][g]["nodes"]]] = True
            masks[(c, g)] = mask
    return np.array(
        [
            [
                float(
                    (masks[(a, "toxic")] & masks[(b, "benign")]).sum()
                    / max((masks[(a, "toxic")] | masks[(b, "benign")]).sum(), 1)
                )
                for b in categories
            ]
            for a in categories
        ]
    )


def feature_level(
    circuits: CircuitFiles,
    main: GroupComparison,
    group: str,
    circuits_cfg: CircuitConfig,
    seed: int,
    effects_key: str | None = None,
) -> tuple[CoreShareTest | None, str]:
    """The feature-level test on the main group's effects, over the categories the overlap test
    kept that have at least two prompts (the test splits each category's prompts in halves).
    ``effects_key``: the tensors' key of the effects to test (default: the main SAEs',
    ``effects_<group>``; :func:`replicate_effects_key` names another training's)."""
    key = effects_key or f"effects_{group}"
    effects = {
        c: t[key]
        for c, (_, t) in circuits.items()
        if key in t and c not in main.fallback and len(t[key]) >= 2
    }
    if len(effects) < 2:
        return None, (
            f"Insufficient evidence: only {sorted(effects)} have two or more '{group}' prompts "
            "with their own circuit; the feature-level test needs two categories."
        )
    site_of_node = next(iter(circuits.values()))[1]["site_of_node"]
    test = core_share_test(
        effects,
        site_of_node,
        error_nodes=error_node_mask(site_of_node),
        k_per_site=circuits_cfg.k_per_site,
        seed=seed,
    )
    return test, test.reason


def _trainings(circuits: CircuitFiles, group: str, sae_seed: int) -> list[tuple[int, str]]:
    """(seed, effects key) of each SAE training every category's circuit has effects through:
    the main SAEs (``sae_seed``) first, then the replicates all circuits share."""
    shared = set.intersection(
        *(set(summary.get("sae_replicate_seeds", [])) for summary, _ in circuits.values())
    )
    return [(sae_seed, f"effects_{group}")] + [
        (seed, replicate_effects_key(group, seed)) for seed in sorted(shared)
    ]


def compare_model(
    model_key: str,
    categories: list[str],
    circuits: CircuitFiles,
    transfer: dict,
    *,
    circuits_cfg: CircuitConfig,
    comparison_cfg: ComparisonConfig,
    execution: tuple[str, str] = ("insufficient evidence", "refusal_direction not materialized"),
    sae_seed: int = 0,
) -> ModelComparison:
    """The comparison step of one model (see the module docstring). ``circuits_cfg`` and
    ``comparison_cfg``: the project config's ``circuits`` and ``comparison`` sections;
    ``execution``: the ``refusal_direction`` asset's (verdict, reason)."""
    if not circuits:
        raise ValueError(f"comparison for {model_key}: no category has a circuit")
    groups = sorted({g for summary, _ in circuits.values() for g in summary["groups"]})
    by_group = {g: compare_group(circuits, g, circuits_cfg, comparison_cfg) for g in groups}
    if not by_group:
        raise ValueError(f"comparison for {model_key}: fewer than two categories have circuits")
    cosines = {}
    for site in next(iter(circuits.values()))[0]["sites"]:
        dirs = {
            c: t[f"direction_{site}"] for c, (_, t) in circuits.items() if f"direction_{site}" in t
        }
        if len(dirs) >= 2:
            labels, matrix = refusal_direction_cosines(dirs)
            cosines[site] = DirectionCosines(labels=labels, matrix=matrix)
    main = by_group.get("toxic") or next(iter(by_group.values()))
    # One answer from every test's line: the overlap test of the main group, then the functional tests.
    thresholds = {k: getattr(comparison_cfg, k) for k in _THRESHOLDS}
    combined = combine([overlap_line(main.to_json()), *transfer_lines(transfer)], thresholds)
    main_name = "toxic" if "toxic" in by_group else next(iter(by_group))
    feature_tests, feature_reasons = {}, {}
    for sae_seed, key in _trainings(circuits, main_name, sae_seed):
        feature_tests[sae_seed], feature_reasons[sae_seed] = feature_level(
            circuits, main, main_name, circuits_cfg, comparison_cfg.seed, effects_key=key
        )
    return ModelComparison(
        model_key=model_key,
        categories=categories,
        groups=by_group,
        cross_jaccard=cross_jaccard(circuits, categories)
        if {"toxic", "benign"} <= set(groups)
        else None,
        direction_cosines=cosines,
        transfer=transfer,
        combined=combined,
        verdict_execution=execution[0],
        execution_reason=execution[1],
        feature_tests=feature_tests,
        feature_reasons=feature_reasons,
    )


def write_comparison_figures(
    result: ModelComparison, layout: Layout
) -> dict[str, tuple[Path, str]]:
    """The comparison's heatmaps; returns name -> (PNG path, caption) for the asset's metadata."""
    model_key, figures = result.model_key, {}
    for group, comparison in result.groups.items():
        if comparison.result is not None:
            png = plot_heatmap(
                comparison.result.jaccard,
                comparison.result.categories,
                f"{model_key}: circuit Jaccard ({group})",
                layout.jaccard_plot(model_key, group),
                annotate_significance=comparison.result.significant,
            )
            figures[f"heatmap_{group}"] = (png, f"Jaccard {group}")
    if result.cross_jaccard is not None:
        title = f"{model_key}: Jaccard toxic (rows) vs benign (cols)"
        png = plot_heatmap(
            result.cross_jaccard, result.categories, title, layout.jaccard_plot(model_key, "cross")
        )
        figures["heatmap_cross"] = (png, "cross")
    for site, cos in result.direction_cosines.items():
        title = f"{model_key}: refusal-direction cosine ({site})"
        png = plot_heatmap(
            cos.matrix, cos.labels, title, layout.direction_cosine_plot(model_key, site)
        )
        figures[f"direction_cosine_{site}"] = (png, f"refusal-direction cosine {site}")
    return figures
