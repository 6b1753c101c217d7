"""The report's sections as typed inputs, one per section template (see :mod:`refusal_assets.report.render`),
and the functions that build each from the stored files.

The templates hold the layout and the prose; here are the numbers, already in the tables' cells.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from dataclasses import dataclass
from typing import Any

import polars as pl

from refusal_assets.config import ProjectConfig
from refusal_assets.layout import Layout
from refusal_assets.prompts import orbench as data
from refusal_assets.report.render import Figure, FigureStore

PACKAGES = [
    "refusal_assets",
    "torch",
    "transformers",
    "dagster",
    "numpy",
    "scipy",
    "polars",
    "pyarrow",
    "safetensors",
]

SAE_COLUMNS = (  # (header, part of history.json, key): the report's SAE table
    ("held-out FVU", "metrics", "fvu"),
    ("post-instruction FVU", "metrics", "fvu_post_instruction"),
    ("train FVU", "metrics", "fvu_train"),
    ("L0", "metrics", "l0"),
    ("dead fraction", "metrics", "dead_fraction"),
    ("loss recovered", "splice", "loss_recovered"),
    ("ΔCE", "splice", "delta_ce"),
    ("KL spliced", "splice", "kl_spliced"),
    ("refusal score change", "splice", "refusal_score_change"),
    ("training rows", "metrics", "n_train_rows"),
    ("of them corpus", "metrics", "n_corpus_train_rows"),
)


@dataclass(frozen=True, kw_only=True)
class Table:
    header: list[str]
    rows: list[list[Any]]
    """Cells as the ``cell`` filter shows them (floats with three decimals)."""


def format_ci(ci: tuple[float, float], digits: int = 2) -> str:
    """``[lo, hi]`` for display, or ``n/a`` where no CI exists (too few prompts, no resamples)."""
    lo, hi = ci
    return (
        f"[{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else "n/a"
    )


def ci_json(ci) -> tuple[float, float]:
    """A CI read from JSON, where a missing bound is null."""
    return tuple(math.nan if v is None else float(v) for v in (ci or (None, None)))  # type: ignore[return-value]


def _with_ci(value: float, ci) -> str:
    text = format_ci(ci)
    return f"{value:.3f}" if text == "n/a" else f"{value:.3f} {text}"


# ------------------------------------------------------------------------------- behaviour


@dataclass(frozen=True, kw_only=True)
class ModelTable:
    model_key: str
    table: Table


def behaviour_section(
    cfg: ProjectConfig, layout: Layout, categories: list[str]
) -> list[ModelTable]:
    """Per model with behaviour: refusal rates per category and split, and the mean refusal score."""
    out = []
    for m in cfg.models:
        rows = []
        for c in categories:
            path = layout.behaviour(m.model_key, c)
            if not path.is_file():
                continue
            df = pl.read_parquet(path)

            def rate(s: str, df: pl.DataFrame = df) -> float:
                if (df["split"] == s).any():
                    return float(df.filter(pl.col("split") == s)["refused"].mean() or 0.0)
                return float("nan")

            rows.append(
                [
                    c,
                    df.height,
                    rate("safe"),
                    rate("hard"),
                    rate("toxic"),
                    float(df["refusal_score"].mean()),
                ]
            )
        if rows:
            header = [
                "category",
                "prompts",
                "refusal safe",
                "refusal hard",
                "refusal toxic",
                "mean refusal score",
            ]
            out.append(ModelTable(model_key=m.model_key, table=Table(header=header, rows=rows)))
    return out


# ------------------------------------------------------------------------------------ SAEs


@dataclass(frozen=True, kw_only=True)
class SaeSection:
    table: Table
    figures: list[Figure]


def sae_section(cfg: ProjectConfig, layout: Layout, store: FigureStore) -> SaeSection:
    """Every site's SAE: held-out, post-instruction and training FVU, sparsity, splice quality."""
    rows = []
    for m in cfg.models:
        for key in m.site_keys:
            path = layout.sae_history(key)
            if path.is_file():
                h = json.loads(path.read_text())
                rows.append(
                    [
                        key,
                        *(h.get(part, {}).get(name, float("nan")) for _, part, name in SAE_COLUMNS),
                    ]
                )
    figures = [
        store.figure(layout.sae_plot(key), f"SAE training {key}")
        for m in cfg.models
        for key in m.site_keys
    ]
    return SaeSection(
        table=Table(header=["site", *(h for h, _, _ in SAE_COLUMNS)], rows=rows), figures=figures
    )


# -------------------------------------------------------------------------------- circuits


@dataclass(frozen=True, kw_only=True)
class ModelCircuits:
    model_key: str
    table: Table
    figures: list[Figure]


CIRCUIT_HEADER = [
    "category",
    "group",
    "prompts",
    "nodes",
    "faithfulness",
    "completeness",
    "random control",
    "m(M) - m(∅)",
    "edges",
]


def _circuit_row(category: str, group: str, v: dict) -> list[Any]:
    nan2 = (float("nan"), float("nan"))  # circuit files written before CIs existed
    return [
        category,
        group,
        f"{v['n_prompts']} {v.get('prompt_set', 'all')}",
        v["n_nodes"],
        _with_ci(v["faithfulness"], v.get("faithfulness_ci", nan2)),
        _with_ci(v["completeness"], v.get("completeness_ci", nan2)),
        _with_ci(v["random_faithfulness"], v.get("random_faithfulness_ci", nan2)),
        _with_ci(
            v["sweep"]["m_full"] - v["sweep"]["m_empty"], v["sweep"].get("denominator_ci", nan2)
        ),
        len(v["edges"]),
    ]


def circuit_section(
    cfg: ProjectConfig, layout: Layout, categories: list[str], store: FigureStore
) -> list[ModelCircuits]:
    """Per model with circuits: one row per category and prompt group, and the faithfulness sweeps."""
    out = []
    for m in cfg.models:
        rows = []
        for c in categories:
            path = layout.circuit_summary(m.model_key, c)
            if path.is_file():
                summary = json.loads(path.read_text())
                rows += [_circuit_row(c, g, v) for g, v in summary["groups"].items()]
        if rows:
            figures = [
                store.figure(
                    layout.circuit_plot(m.model_key, c), f"faithfulness sweep {m.model_key}/{c}"
                )
                for c in categories
            ]
            out.append(
                ModelCircuits(
                    model_key=m.model_key,
                    table=Table(header=CIRCUIT_HEADER, rows=rows),
                    figures=figures,
                )
            )
    return out


# ------------------------------------------------------------------------ data and methods


@dataclass(frozen=True, kw_only=True)
class DataSection:
    pivot: Table | None
    """Prompts per category and split; None without a data profile."""
    figure: Figure | None


def data_section(layout: Layout, store: FigureStore) -> DataSection:
    prof = layout.profile_table()
    if not prof.is_file():
        return DataSection(pivot=None, figure=None)
    pivot = data.profile_pivot(pl.read_parquet(prof))
    return DataSection(
        pivot=Table(header=pivot.columns, rows=[list(r) for r in pivot.iter_rows()]),
        figure=store.figure(layout.profile_plot(), "prompts per category and split"),
    )


@dataclass(frozen=True, kw_only=True)
class MethodsSection:
    prompt_filter: str
    min_prompts: int
    versions: Table
    inputs: Table | None
    """Input assets' latest data versions, where the caller knows them."""
    config_json: str


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def methods_section(cfg: ProjectConfig, input_versions: dict[str, str] | None) -> MethodsSection:
    inputs = None
    if input_versions:
        inputs = Table(
            header=["input asset", "data version (latest)"],
            rows=[[k, v] for k, v in sorted(input_versions.items())],
        )
    return MethodsSection(
        prompt_filter=cfg.circuits.prompt_filter,
        min_prompts=cfg.circuits.min_prompts,
        versions=Table(
            header=["package", "version"], rows=[[k, v] for k, v in _versions().items()]
        ),
        inputs=inputs,
        config_json=json.dumps(cfg.model_dump(mode="json"), indent=1, default=str),
    )
