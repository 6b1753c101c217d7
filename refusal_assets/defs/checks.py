"""WARN asset checks for weak results: thin wrappers that read an asset partition's files through
the :class:`Layout` and hand plain numbers to the rules of :mod:`refusal_assets.analysis.weak_results`.

They never block (a weak result is still a result); each says why in its metadata. Partitioned like
their asset, so the UI shows a check status per partition and a run of one partition checks it.
"""

import json
import math

import dagster as dg
import polars as pl

from refusal_assets.analysis import weak_results as weak
from refusal_assets.config import ProjectConfig
from refusal_assets.defs.metadata import clean, multi_key
from refusal_assets.defs.partitions import Partitions
from refusal_assets.defs.resources import StorageResource
from refusal_assets.layout import Layout
from refusal_assets.lm.behaviour import refusal_rates


def check_result(finding: weak.Finding) -> dg.AssetCheckResult:
    """A WARN-severity result whose metadata says why, with the numbers behind it."""
    metadata = {
        "why": dg.MetadataValue.md(finding.why),
        **{k: clean(v) for k, v in finding.values.items()},
    }
    return dg.AssetCheckResult(
        passed=finding.passed, severity=dg.AssetCheckSeverity.WARN, metadata=metadata
    )


def _nan_ci(ci) -> tuple[float, float]:
    """circuit.json writes a missing CI bound as null (NaN is not JSON)."""
    return tuple(math.nan if v is None else float(v) for v in (ci or (None, None)))  # type: ignore[return-value]


def _circuit_groups(
    parts: Partitions, context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dict[str, dict]:
    keys = multi_key(parts.model_category, context.partition_key)
    summary, _ = Layout(storage.files).load_circuit(keys["model"], keys["category"])
    return summary["groups"]


def build(cfg: ProjectConfig, parts: Partitions) -> list[dg.AssetChecksDefinition]:
    return [
        _denominator_ci_excludes_zero(cfg, parts),
        _faithfulness_above_random(cfg, parts),
        _enough_prompts(cfg, parts),
        _toxic_refused_more_than_safe(cfg, parts),
        _enough_categories(cfg, parts),
    ]


def _denominator_ci_excludes_zero(
    cfg: ProjectConfig, parts: Partitions
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset="circuit",
        partitions_def=parts.model_category,
        name="denominator_ci_excludes_zero",
        description="WARN when the CI of m(M) - m(∅), the faithfulness/completeness denominator, includes 0 "
        "(ratios ill-conditioned).",
    )
    def denominator_ci_excludes_zero(
        context: dg.AssetCheckExecutionContext, storage: StorageResource
    ) -> dg.AssetCheckResult:
        findings = []
        for g, v in sorted(_circuit_groups(parts, context, storage).items()):
            sweep = v["sweep"]
            findings.append(
                (
                    g,
                    weak.denominator_excludes_zero(
                        sweep["m_full"] - sweep["m_empty"], _nan_ci(sweep.get("denominator_ci"))
                    ),
                )
            )
        return check_result(weak.every_group(findings, "every group's m(M) - m(∅) CI excludes 0."))

    return denominator_ci_excludes_zero


def _faithfulness_above_random(cfg: ProjectConfig, parts: Partitions) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset="circuit",
        partitions_def=parts.model_category,
        name="faithfulness_above_random",
        description="WARN when the paired CI of faithfulness minus a same-size random circuit's is not above 0.",
    )
    def faithfulness_above_random(
        context: dg.AssetCheckExecutionContext, storage: StorageResource
    ) -> dg.AssetCheckResult:
        findings = [
            (
                g,
                weak.faithfulness_beats_random(
                    v["faithfulness"],
                    _nan_ci(v.get("faithfulness_ci")),
                    v["random_faithfulness"],
                    _nan_ci(v.get("advantage_ci")),
                ),
            )
            for g, v in sorted(_circuit_groups(parts, context, storage).items())
        ]
        return check_result(
            weak.every_group(findings, "every group's circuit beats its random control.")
        )

    return faithfulness_above_random


def _enough_prompts(cfg: ProjectConfig, parts: Partitions) -> dg.AssetChecksDefinition:
    cc = cfg.circuits

    @dg.asset_check(
        asset="circuit",
        partitions_def=parts.model_category,
        name="enough_prompts",
        description=f"WARN when a prompt group has fewer than circuits.min_prompts ({cc.min_prompts}) prompts "
        "passing the prompt filter.",
    )
    def enough_prompts(
        context: dg.AssetCheckExecutionContext, storage: StorageResource
    ) -> dg.AssetCheckResult:
        groups = {
            g: weak.GroupPrompts(
                v.get("n_prompts_in_group", v["n_prompts"]),
                v["n_prompts"],
                v.get("prompt_set", cc.prompt_filter),
            )
            for g, v in _circuit_groups(parts, context, storage).items()
        }
        return check_result(weak.enough_prompts(groups, cc.min_prompts, cc.prompt_filter))

    return enough_prompts


def _toxic_refused_more_than_safe(
    cfg: ProjectConfig, parts: Partitions
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset="refusal_behaviour",
        partitions_def=parts.model_category,
        name="toxic_refused_more_than_safe",
        description="WARN when the model refuses toxic prompts no more often than safe ones in this category.",
    )
    def toxic_refused_more_than_safe(
        context: dg.AssetCheckExecutionContext, storage: StorageResource
    ) -> dg.AssetCheckResult:
        keys = multi_key(parts.model_category, context.partition_key)
        path = Layout(storage.files).behaviour(keys["model"], keys["category"])
        # the same rates and Wilson intervals the asset's metadata shows
        rates = {
            s: weak.SplitRate(r["rate"], r["lo"], r["hi"], r["n"])
            for s, r in refusal_rates(
                pl.read_parquet(path, columns=["split", "refused", "p_refusal"])
            ).items()
        }
        return check_result(
            weak.toxic_refused_more_than_safe(rates.get("toxic"), rates.get("safe"))
        )

    return toxic_refused_more_than_safe


def _enough_categories(cfg: ProjectConfig, parts: Partitions) -> dg.AssetChecksDefinition:
    cc = cfg.circuits

    @dg.asset_check(
        asset="comparison",
        partitions_def=parts.model,
        name="enough_categories",
        description="WARN when a prompt group of the comparison has fewer than 2 categories with a circuit.",
    )
    def enough_categories(
        context: dg.AssetCheckExecutionContext, storage: StorageResource
    ) -> dg.AssetCheckResult:
        path = Layout(storage.files).comparison_summary(context.partition_key)
        comp = json.loads(path.read_text())
        by_group = {g: list(res.get("categories", [])) for g, res in comp["groups"].items()}
        expected = ["toxic", "benign"] if cc.separate_safe_toxic else ["all"]
        return check_result(weak.enough_categories(by_group, expected))

    return enough_categories
