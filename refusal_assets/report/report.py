"""The report: one self-contained HTML file (PNGs embedded) and a Markdown twin (PNGs beside it).

Answer first: the first screen holds, per model, a :class:`ModelSummary` (the verdict, one line per
test, one summary figure, what the sample can and cannot show); then the combined verdict, the
execution level (refusal directions), behaviour, SAEs, circuits, features,
comparison, data profile and methods. A new test adds one function to :data:`SUMMARY_TESTS` (it
gets the model's :class:`SummaryInputs` and returns its :class:`TestLine` lines) and, if it has one,
a section of its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from refusal_assets.analysis.verdict import read_combined
from refusal_assets.config import ProjectConfig
from refusal_assets.layout import Layout
from refusal_assets.plots import new_figure, save_png
from refusal_assets.report import comparison_sections as cs
from refusal_assets.report import sections
from refusal_assets.report.execution_section import ExecutionSection, execution_section
from refusal_assets.report.features_section import ModelFeatures, features_section
from refusal_assets.report.render import Figure, FigureStore, render_html, render_markdown
from refusal_assets.report.sections import ci_json, format_ci
from refusal_assets.storage import write_text

# ------------------------------------------------------------------------- the answer, first


class TestLine(NamedTuple):
    """One test's one-line finding on the first screen."""

    test: str
    finding: str


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    """What the first screen says about one model."""

    model_key: str
    verdict: str
    """``modular`` / ``monolithic`` / ``mixed``, or ``not run`` without a comparison."""
    reason: str
    """The verdict rule with its numbers (in full in the comparison section)."""
    tests: list[TestLine]
    figure: Path | None
    """The one summary figure (cross-category matrices side by side)."""
    sample: str
    """What the sample can and cannot show: prompt counts per category, power."""

    execution: str = "not run"
    """The execution-level answer (``verdict_execution``)."""
    features: str = "not run"
    """The feature-level answer (``verdict_features``)."""
    stability: str = ""
    """How many SAE trainings the feature-level answer rests on, and whether they agree."""

    @property
    def headline(self) -> str:
        """The two answers in one line: what the first screen leads with."""
        line = f"execution level {self.execution.upper()} · feature level {self.features.upper()}"
        return f"{line} ({self.stability})" if self.stability else line

    def markdown(self) -> str:
        lines = [f"**{self.model_key}: {self.headline}**", ""]
        lines += [f"- **{t.test}**: {t.finding}" for t in self.tests]
        return "\n".join(lines + ["", f"*Sample:* {self.sample}", ""])


class SummaryInputs(NamedTuple):
    """Everything a summary test may read for one model (files already parsed)."""

    cfg: ProjectConfig
    model_key: str
    categories: list[str]
    comparison: dict | None
    """comparison.json, or None when not materialized."""
    circuits: dict[str, dict]
    """category -> circuit.json (materialized ones only)."""
    behaviour: dict[str, pl.DataFrame]
    """category -> behaviour table (materialized ones only)."""


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def overlap_tests(inp: SummaryInputs) -> list[TestLine]:
    """Circuit overlap against the label-permutation null, per prompt group."""
    out = []
    for g, res in _groups(inp.comparison, tested_only=False):
        if "pairs" not in res:  # fewer than two categories with enough refusing prompts
            out.append(TestLine(f"Circuit overlap, {g}", res.get("verdict_reason", "not testable")))
            continue
        pairs = res["pairs"]
        n_sig = sum(p["significant"] for p in pairs)
        jac = [p["jaccard"] for p in pairs if p["jaccard"] is not None]
        null = [p["null_mean"] for p in pairs if p.get("null_mean") is not None]
        norm = [p["normalised_jaccard"] for p in pairs if p.get("normalised_jaccard") is not None]
        out.append(
            TestLine(
                f"Circuit overlap, {g}",
                (
                    f"{n_sig} of {len(pairs)} category pairs overlap less than under permuted labels (BH q < "
                    f"{res['params'].get('alpha', 0.05)}); median Jaccard "
                    f"{_fmt(float(np.median(jac)) if jac else None)} vs "
                    f"{_fmt(float(np.median(null)) if null else None)} by chance, "
                    + (
                        f"{float(np.median(norm)):.2f} of its split-half ceiling"
                        if norm
                        else "no pair reproduces well enough within its categories to normalise"
                    )
                    + f" ({res['verdict']})."
                ),
            )
        )
    return out


def shared_core_tests(inp: SummaryInputs) -> list[TestLine]:
    """The nodes every category's circuit shares."""
    res = _main_group(inp.comparison)
    if res is None:
        return []
    lo, hi = ci_json(res["shared_fraction_ci"])
    return [
        TestLine(
            "Shared core",
            f"{len(res['shared_core'])} nodes in every category's circuit; shared fraction "
            f"{_fmt(res['shared_fraction'])} (95% CI {format_ci((lo, hi))}).",
        )
    ]


def direction_tests(inp: SummaryInputs) -> list[TestLine]:
    """Cosines of the per-category refusal directions at the deepest site."""
    cos = (inp.comparison or {}).get("direction_cosines", {})
    if not cos:
        return []
    site = list(cos)[-1]
    labels, m = cos[site]["labels"], np.array(cos[site]["matrix"], dtype=float)
    iu = np.triu_indices(len(labels), 1)
    if not len(iu[0]):
        return []
    off = m[iu]
    k = int(np.argmin(off))
    return [
        TestLine(
            "Refusal directions",
            f"median cosine between categories {np.median(off):.2f} at {site} "
            f"(lowest {off[k]:.2f}, {labels[iu[0][k]]} vs {labels[iu[1][k]]}).",
        )
    ]


def circuit_quality_tests(inp: SummaryInputs) -> list[TestLine]:
    """Are the circuits being compared real? Held-out faithfulness against the random control, and
    the ratios' denominator away from 0 (the same rules as the WARN checks)."""
    from refusal_assets.analysis import weak_results as weak

    main = "toxic" if any("toxic" in c["groups"] for c in inp.circuits.values()) else None
    beats, den_ok, n = [], [], 0
    for cat, c in sorted(inp.circuits.items()):
        v = c["groups"].get(main) if main else next(iter(c["groups"].values()))
        if v is None:
            continue
        n += 1
        sw = v["sweep"]
        if weak.faithfulness_beats_random(
            v["faithfulness"],
            ci_json(v.get("faithfulness_ci")),
            v["random_faithfulness"],
            ci_json(v.get("advantage_ci")),
        ).passed:
            beats.append(cat)
        if weak.denominator_excludes_zero(
            sw["m_full"] - sw["m_empty"], ci_json(sw.get("denominator_ci"))
        ).passed:
            den_ok.append(cat)
    if not n:
        return []
    return [
        TestLine(
            f"Circuit quality{', ' + main if main else ''}",
            (
                f"faithfulness beats a same-size random circuit in {len(beats)} of {n} categories; "
                f"the m(M) - m(∅) CI excludes 0 in {len(den_ok)} of {n}"
                + ("" if len(den_ok) == n else " (elsewhere the ratios are ill-conditioned)")
                + "."
            ),
        )
    ]


def functional_tests(inp: SummaryInputs) -> list[TestLine]:
    """The functional cross-category tests (circuit transfer) as the combined verdict recorded
    them (see :mod:`refusal_assets.analysis.verdict`)."""
    combined = (inp.comparison or {}).get("combined") or {}
    out = []
    for ln in combined.get("lines", []):
        if ln.get("level") != "execution":
            continue
        lo, hi = ci_json(ln.get("ci"))
        vote = "" if ln.get("role", "necessity") == "necessity" else ", reported, does not vote"
        out.append(
            TestLine(
                ln["test"],
                f"says {ln['says']}{vote}: {ln['statistic']} {_fmt(ln.get('value'))} "
                f"(95% CI {format_ci((lo, hi))}). {ln.get('reason', '')}".rstrip(),
            )
        )
    return out


def _sentence(text: str) -> str:
    """``text`` as a sentence: capital first letter, final full stop."""
    text = text.strip()
    return f"{text[:1].upper()}{text[1:]}{'' if text.endswith('.') else '.'}" if text else text


def level_answers(inp: SummaryInputs) -> list[TestLine]:
    """The two answers first: execution level (Arditi et al.'s directions, ``refusal_direction``)
    and feature level (the cross-fitted shared-core share of the SAE circuits), with stability."""
    comp = inp.comparison
    if comp is None or "verdict_execution" not in comp:
        return []
    stability = comp.get("feature_stability", "stability across SAE trainings not recorded")
    return [
        TestLine(
            "Execution level (refusal directions)",
            f"{comp['verdict_execution'].upper()}. {_sentence(comp['execution_reason'])}",
        ),
        TestLine(
            "Feature level (SAE circuits)",
            f"{comp['verdict_features'].upper()} ({stability}). {_sentence(comp['feature_reason'])}",
        ),
    ]


SUMMARY_TESTS: list[Callable[[SummaryInputs], list[TestLine]]] = [
    level_answers,
    functional_tests,
    overlap_tests,
    shared_core_tests,
    direction_tests,
    circuit_quality_tests,
]
"""The tests the first screen lists, in order; each returns its lines (none when it did not run)."""


def _groups(comp: dict | None, tested_only: bool = True) -> list[tuple[str, dict]]:
    """The comparison's prompt groups, the one the verdict rests on (toxic) first; by default only
    those with category pairs (a group with fewer than two categories that have enough refusing
    prompts carries just its verdict and reason)."""
    groups = (comp or {}).get("groups", {})
    return sorted(
        ((g, r) for g, r in groups.items() if "pairs" in r or not tested_only),
        key=lambda kv: (kv[0] != "toxic", kv[0]),
    )


def _main_group(comp: dict | None) -> dict | None:
    groups = dict(_groups(comp))
    return groups.get("toxic") or next(iter(groups.values()), None)


def _n_passing(df: pl.DataFrame, prompt_filter: str) -> int:
    """Prompts that pass the circuits' prompt filter (see :func:`refusal_assets.circuits.finding.select_prompts`)."""
    if prompt_filter == "all":
        return df.height
    return (
        int(df["refused"].sum())
        if prompt_filter == "refused"
        else int((df["refusal_score"] > 0).sum())
    )


def sample_sentence(inp: SummaryInputs) -> str:
    """Prompt counts per category and what they leave testable."""
    cc, parts = inp.cfg.circuits, []
    toxic = {c: df.filter(pl.col("split") == "toxic") for c, df in sorted(inp.behaviour.items())}
    if toxic:
        sizes = sorted({d.height for d in toxic.values()})
        passing = {c: _n_passing(d, cc.prompt_filter) for c, d in toxic.items()}
        size_text = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        parts.append(
            f"{size_text} toxic prompts per category in {len(toxic)} categories; "
            f"'{cc.prompt_filter}' ones: " + ", ".join(f"{c} {n}" for c, n in passing.items())
        )
        short = [c for c, n in passing.items() if n < cc.min_prompts]
        if short:
            parts.append(
                f"{len(short)} of {len(toxic)} categories have fewer than min_prompts = {cc.min_prompts}, so their "
                "circuits use every toxic prompt, refusing or not, and say little about refusal"
            )
    else:
        parts.append("no behaviour materialized")
    groups = _groups(inp.comparison)
    if groups:
        params = groups[0][1]["params"]
        # a pair whose circuits do not reproduce within their own categories cannot be told apart from noise
        untestable = {
            g: sum(p.get("normalised_jaccard") is None for p in res["pairs"]) for g, res in groups
        }
        parts.append(
            f"pairs too unreliable to normalise (split-half ceiling below {params.get('min_ceiling')}): "
            + ", ".join(f"{g} {untestable[g]} of {len(res['pairs'])}" for g, res in groups)
        )
        if n_perm := params.get("n_permutations"):
            parts.append(
                f"with {n_perm} permutations the smallest p-value is {1 / (n_perm + 1):.3f}"
            )
    return "; ".join(parts) + "."


def plot_summary(comp: dict, title: str, path: Path) -> Path:
    """The one summary figure: each prompt group's circuit Jaccard (``*`` = significant after BH,
    95% bootstrap CI under the value where it fits, the split-half ceiling on the diagonal) and the
    refusal-direction cosines at the deepest site, side by side on one colour scale."""
    panels: list[tuple[str, list[str], np.ndarray, dict]] = []
    for g, res in _groups(comp):
        cats = res["categories"]
        m = np.array(
            [[math.nan if v is None else v for v in row] for row in res["jaccard"]], dtype=float
        )
        ci = {(p["a"], p["b"]): ci_json(p.get("jaccard_ci")) for p in res["pairs"]}
        sig = {(p["a"], p["b"]): p["significant"] for p in res["pairs"]}
        panels.append(
            (
                f"circuit Jaccard, {g}",
                cats,
                m,
                {"ci": ci, "sig": sig, "ceiling": res.get("ceiling", {})},
            )
        )
    cos = comp.get("direction_cosines", {})
    if cos:
        site = list(cos)[-1]
        panels.append(
            (
                f"refusal-direction cosine, {site}",
                cos[site]["labels"],
                np.array(cos[site]["matrix"], dtype=float),
                {},
            )
        )
    if not panels:
        raise ValueError(f"{title}: the comparison has no group and no direction to plot")
    n = max(len(p[1]) for p in panels)
    side = max(2.6, 0.42 * n + 1.2)
    fig = new_figure((side * len(panels) + 0.8, side + 0.2), constrained=True)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    show_ci = n <= 6  # more categories: the CIs are in the comparison tables
    image = None
    for ax, (name, labels, m, extra) in zip(axes, panels, strict=True):
        k = len(labels)
        shown = m.copy()
        shown[np.triu_indices(k, 0)] = (
            np.nan
        )  # symmetric: the lower triangle carries everything; the diagonal is not a pair
        image = ax.imshow(
            np.ma.masked_invalid(shown),
            cmap="viridis",
            vmin=min(0.0, float(np.nanmin(m))),
            vmax=1.0,
        )
        ax.set_xticks(range(k), labels, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        ax.set_title(name, fontsize=9)
        for i in range(k):
            for j in range(i + 1):
                if i == j:
                    c = extra.get("ceiling", {}).get(labels[i])
                    text = f"r={c:.2f}" if c is not None else ""
                else:
                    v, key = m[i, j], tuple(sorted((labels[i], labels[j])))
                    if not math.isfinite(v):
                        continue
                    text = f"{v:.2f}{'*' if extra.get('sig', {}).get(key) else ''}"
                    if (
                        show_ci
                        and key in extra.get("ci", {})
                        and all(math.isfinite(x) for x in extra["ci"][key])
                    ):
                        text += "\n[{:.2f},{:.2f}]".format(*extra["ci"][key])
                if text:
                    dark = i != j and not (
                        math.isfinite(m[i, j]) and m[i, j] > 0.5
                    )  # white on viridis' dark end, black elsewhere
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=6 if show_ci else 6.5,
                        color="white" if dark else "black",
                    )
    fig.colorbar(image, ax=list(axes), shrink=0.8, pad=0.01)
    ci_note = "[95% bootstrap CI]" if show_ci else "CIs in the comparison tables"
    fig.suptitle(f"{title}   (* q < alpha after BH; {ci_note}; r = split-half ceiling)", fontsize=9)
    return save_png(fig, path, dpi=110)


def summarize_model(
    cfg: ProjectConfig, layout: Layout, model_key: str, categories: list[str], figure_path: Path
) -> ModelSummary:
    """Read one model's comparison, circuits and behaviour, and build its first-screen summary."""
    comp_path = layout.comparison_summary(model_key)
    comp = json.loads(comp_path.read_text()) if comp_path.is_file() else None
    circuits = {
        c: json.loads(layout.circuit_summary(model_key, c).read_text())
        for c in categories
        if layout.circuit_summary(model_key, c).is_file()
    }
    behaviour = {
        c: pl.read_parquet(layout.behaviour(model_key, c))
        for c in categories
        if layout.behaviour(model_key, c).is_file()
    }
    inp = SummaryInputs(cfg, model_key, categories, comp, circuits, behaviour)
    tests = [line for test in SUMMARY_TESTS for line in test(inp)]
    figure = plot_summary(comp, model_key, figure_path) if comp else None
    if comp is None:
        return ModelSummary(
            model_key=model_key,
            verdict="not run",
            reason="no comparison materialized",
            tests=tests,
            figure=None,
            sample=sample_sentence(inp),
        )
    return ModelSummary(
        model_key=model_key,
        verdict=comp["verdict"],
        reason=comp["verdict_reason"],
        tests=tests,
        figure=figure,
        sample=sample_sentence(inp),
        execution=comp.get("verdict_execution", "not run"),
        features=comp.get("verdict_features", "not run"),
        stability=comp.get("feature_stability", ""),
    )


def summaries_markdown(summaries: list[ModelSummary]) -> str:
    """The first screen as Markdown (the report's twin and the ``report`` asset's metadata)."""
    return "\n".join(s.markdown() for s in summaries)


class ReportFiles(NamedTuple):
    """What :func:`write_report` wrote."""

    html: Path
    markdown: Path
    summaries: list[ModelSummary]
    """The first screen's summaries, one per model."""


@dataclass(frozen=True, kw_only=True)
class Header:
    name: str
    """The config's name."""
    models: list[str]
    """Model ids."""
    categories: list[str]


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """One model's answer on the first screen, with its summary figure embedded."""

    summary: ModelSummary
    figure: Figure | None


@dataclass(frozen=True, kw_only=True)
class VerdictSection:
    cards: list[ModelCard]
    columns: int
    """Cards side by side, so every model's answer is on the first screen."""


@dataclass(frozen=True, kw_only=True)
class ReportInputs:
    """Every section's typed input, in page order; each field feeds the template of its name
    (``templates/<field>.html`` and ``.md``)."""

    header: Header
    verdict: VerdictSection
    combined: list[cs.CombinedSection]
    execution: list[ExecutionSection]
    """Per model, the refusal_direction asset's result (one line where there is none)."""
    behaviour: list[sections.ModelTable]
    saes: sections.SaeSection
    circuits: list[sections.ModelCircuits]
    features: list[ModelFeatures]
    comparison: list[cs.ModelComparisonSection]
    data: sections.DataSection
    methods: sections.MethodsSection


def _verdict_section(summaries: list[ModelSummary], store: FigureStore) -> VerdictSection:
    cards = []
    for s in summaries:
        figure = None
        if s.figure is not None and s.figure.is_file():
            uri, rel = store.embed(s.figure)
            figure = Figure(alt=f"summary figure {s.model_key}", uri=uri, rel=rel)
        cards.append(ModelCard(summary=s, figure=figure))
    return VerdictSection(cards=cards, columns=min(max(len(summaries), 1), 3))


def report_inputs(
    cfg: ProjectConfig,
    layout: Layout,
    categories: list[str],
    input_versions: dict[str, str] | None = None,
) -> ReportInputs:
    """Read every stored result the report shows (figures copied beside the Markdown)."""
    figures = layout.report_figures()
    figures.mkdir(parents=True, exist_ok=True)
    store = FigureStore(figures)
    summaries = [
        summarize_model(
            cfg, layout, m.model_key, categories, figures / f"summary_{m.model_key}.png"
        )
        for m in cfg.models
    ]
    verdict = _verdict_section(summaries, store)
    comparisons = {
        m.model_key: json.loads(layout.comparison_summary(m.model_key).read_text())
        for m in cfg.models
        if layout.comparison_summary(m.model_key).is_file()
    }
    return ReportInputs(
        header=Header(name=cfg.name, models=[m.id for m in cfg.models], categories=categories),
        verdict=verdict,
        combined=[
            cs.combined_section(k, read_combined(comp["combined"]))
            for k, comp in comparisons.items()
            if "combined" in comp
        ],
        execution=[execution_section(m.model_key, layout, store) for m in cfg.models],
        behaviour=sections.behaviour_section(cfg, layout, categories),
        saes=sections.sae_section(cfg, layout, store),
        circuits=sections.circuit_section(cfg, layout, categories, store),
        features=features_section(cfg, layout, categories),
        comparison=[
            cs.comparison_section(k, comp, layout, store) for k, comp in comparisons.items()
        ],
        data=sections.data_section(layout, store),
        methods=sections.methods_section(cfg, input_versions),
    )


def write_report(
    cfg: ProjectConfig,
    layout: Layout,
    categories: list[str],
    input_versions: dict[str, str] | None = None,
) -> ReportFiles:
    """The report from the templates ``report.html`` and ``report.md``, fed :func:`report_inputs`."""
    inputs = report_inputs(cfg, layout, categories, input_versions)
    context = {f.name: getattr(inputs, f.name) for f in fields(inputs)}
    html_path = write_text(render_html("report.html", **context), layout.report_html())
    md_path = write_text(render_markdown("report.md", **context), layout.report_markdown())
    return ReportFiles(html_path, md_path, [card.summary for card in inputs.verdict.cards])
