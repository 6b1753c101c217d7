"""The report: one self-contained HTML file (PNGs embedded) and a Markdown twin (PNGs beside it).

Answer first: the first screen holds, per model, a :class:`ModelSummary` (the verdict, one line per
test, one summary figure, what the sample can and cannot show); then behaviour, SAEs, circuits,
comparison, data profile and methods. A new test adds one function to :data:`SUMMARY_TESTS` (it
gets the model's :class:`SummaryInputs` and returns its :class:`TestLine` lines) and, if it has one,
a section of its own.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
import math
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from refusal_assets.analysis.verdict import render as render_verdict
from refusal_assets.analysis.verdict import render_transfer
from refusal_assets.config import ProjectConfig
from refusal_assets.layout import Layout
from refusal_assets.plots import new_figure, save_png
from refusal_assets.prompts import orbench as data
from refusal_assets.storage import write_text

PACKAGES = ["refusal_assets", "torch", "transformers", "dagster", "numpy", "scipy", "polars", "pyarrow", "safetensors"]


class _Doc:
    """Builds the HTML and Markdown side by side so the two never drift apart."""

    def __init__(self, figures: Path):
        self.html: list[str] = []
        self.md: list[str] = []
        self.figures = figures

    def h(self, level: int, text: str) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def p(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def table(self, header: list[str], rows: list[list]) -> None:
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        self.html.append(
            "<table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
            + "</table>"
        )
        self.md.append(
            "| "
            + " | ".join(header)
            + " |\n|"
            + "---|" * len(header)
            + "\n"
            + "\n".join("| " + " | ".join(fmt(v) for v in r) + " |" for r in rows)
            + "\n"
        )

    def image(self, path: Path, alt: str) -> None:
        if not path.is_file():
            self.p(f"(figure missing: {path.name})")
            return
        name = f"{path.parent.name}_{path.name}"
        shutil.copyfile(path, self.figures / name)
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(
            f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}'
            "</figcaption></figure>"
        )
        self.md.append(f"![{alt}](figures/{name})\n")

    def raw(self, html_text: str, md_text: str) -> None:
        """A block built by the caller in both forms (the answer-first summary)."""
        self.html.append(html_text)
        self.md.append(md_text)

    def embed(self, path: Path) -> tuple[str, str]:
        """(data URI for HTML, relative path for Markdown) of a PNG, copied beside the Markdown."""
        if path.parent.resolve() == self.figures.resolve():  # made by the report itself
            name = path.name
        else:
            name = f"{path.parent.name}_{path.name}"
            shutil.copyfile(path, self.figures / name)
        return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}", f"figures/{name}"

    def pre(self, text: str) -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md.append(f"```\n{text}\n```\n")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def format_ci(ci: tuple[float, float], digits: int = 2) -> str:
    """``[lo, hi]`` for display, or ``n/a`` where no CI exists (too few prompts, no resamples)."""
    lo, hi = ci
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else "n/a"


def _with_ci(value: float, ci) -> str:
    text = format_ci(ci)
    return f"{value:.3f}" if text == "n/a" else f"{value:.3f} {text}"


# ------------------------------------------------------------------------- the answer, first


class TestLine(NamedTuple):
    """One test's one-line finding on the first screen."""

    test: str
    finding: str


@dataclass(frozen=True)
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

    def markdown(self) -> str:
        lines = [f"**{self.model_key}: {self.verdict.upper()}**", ""]
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


def _ci_json(ci) -> tuple[float, float]:
    """A CI read from JSON, where a missing bound is null."""
    return tuple(math.nan if v is None else float(v) for v in (ci or (None, None)))  # type: ignore[return-value]


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
    lo, hi = _ci_json(res["shared_fraction_ci"])
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
            _ci_json(v.get("faithfulness_ci")),
            v["random_faithfulness"],
            _ci_json(v.get("advantage_ci")),
        ).passed:
            beats.append(cat)
        if weak.denominator_excludes_zero(sw["m_full"] - sw["m_empty"], _ci_json(sw.get("denominator_ci"))).passed:
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
    """The functional cross-category tests (circuit transfer, direction cross-ablation, induced
    refusal, pooled direction) as the combined verdict recorded them (see :mod:`refusal_assets.analysis.verdict`)."""
    combined = (inp.comparison or {}).get("combined") or {}
    out = []
    for ln in combined.get("lines", []):
        if ln.get("level") != "execution":
            continue
        lo, hi = _ci_json(ln.get("ci"))
        vote = "" if ln.get("role", "necessity") == "necessity" else ", reported, does not vote"
        out.append(
            TestLine(
                ln["test"],
                f"says {ln['says']}{vote}: {ln['statistic']} {_fmt(ln.get('value'))} "
                f"(95% CI {format_ci((lo, hi))}). {ln.get('reason', '')}".rstrip(),
            )
        )
    return out


SUMMARY_TESTS: list[Callable[[SummaryInputs], list[TestLine]]] = [
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
        ((g, r) for g, r in groups.items() if "pairs" in r or not tested_only), key=lambda kv: (kv[0] != "toxic", kv[0])
    )


def _main_group(comp: dict | None) -> dict | None:
    groups = dict(_groups(comp))
    return groups.get("toxic") or next(iter(groups.values()), None)


def _n_passing(df: pl.DataFrame, prompt_filter: str) -> int:
    """Prompts that pass the circuits' prompt filter (see :func:`refusal_assets.circuits.finding.select_prompts`)."""
    if prompt_filter == "all":
        return df.height
    return int(df["refused"].sum()) if prompt_filter == "refused" else int((df["refusal_score"] > 0).sum())


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
        untestable = {g: sum(p.get("normalised_jaccard") is None for p in res["pairs"]) for g, res in groups}
        parts.append(
            f"pairs too unreliable to normalise (split-half ceiling below {params.get('min_ceiling')}): "
            + ", ".join(f"{g} {untestable[g]} of {len(res['pairs'])}" for g, res in groups)
        )
        if n_perm := params.get("n_permutations"):
            parts.append(f"with {n_perm} permutations the smallest p-value is {1 / (n_perm + 1):.3f}")
    return "; ".join(parts) + "."


def plot_summary(comp: dict, title: str, path: Path) -> Path:
    """The one summary figure: each prompt group's circuit Jaccard (``*`` = significant after BH,
    95% bootstrap CI under the value where it fits, the split-half ceiling on the diagonal) and the
    refusal-direction cosines at the deepest site, side by side on one colour scale."""
    panels: list[tuple[str, list[str], np.ndarray, dict]] = []
    for g, res in _groups(comp):
        cats = res["categories"]
        m = np.array([[math.nan if v is None else v for v in row] for row in res["jaccard"]], dtype=float)
        ci = {(p["a"], p["b"]): _ci_json(p.get("jaccard_ci")) for p in res["pairs"]}
        sig = {(p["a"], p["b"]): p["significant"] for p in res["pairs"]}
        panels.append((f"circuit Jaccard, {g}", cats, m, {"ci": ci, "sig": sig, "ceiling": res.get("ceiling", {})}))
    cos = comp.get("direction_cosines", {})
    if cos:
        site = list(cos)[-1]
        panels.append(
            (f"refusal-direction cosine, {site}", cos[site]["labels"], np.array(cos[site]["matrix"], dtype=float), {})
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
        image = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", vmin=min(0.0, float(np.nanmin(m))), vmax=1.0)
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
                    if show_ci and key in extra.get("ci", {}) and all(math.isfinite(x) for x in extra["ci"][key]):
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
        return ModelSummary(model_key, "not run", "no comparison materialized", tests, None, sample_sentence(inp))
    return ModelSummary(model_key, comp["verdict"], comp["verdict_reason"], tests, figure, sample_sentence(inp))


def summaries_markdown(summaries: list[ModelSummary]) -> str:
    """The first screen as Markdown (the report's twin and the ``report`` asset's metadata)."""
    return "\n".join(s.markdown() for s in summaries)


def _answer_block(doc: _Doc, summaries: list[ModelSummary]) -> None:
    cards, md = [], ["\n## Verdict\n"]
    for s in summaries:
        items = "".join(f"<li><b>{html.escape(t.test)}</b>: {html.escape(t.finding)}</li>" for t in s.tests)
        img, md_img = ("", "")
        if s.figure is not None and s.figure.is_file():
            uri, rel = doc.embed(s.figure)
            img = f'<img class="summary" alt="summary figure {html.escape(s.model_key)}" src="{uri}">'
            md_img = f"![summary figure {s.model_key}]({rel})\n"
        cards.append(
            f'<article class="model" data-model="{html.escape(s.model_key)}">'
            f'<h3>{html.escape(s.model_key)}: <span class="verdict v-{html.escape(s.verdict.replace(" ", "-"))}">'
            f"{html.escape(s.verdict.upper())}</span></h3>"
            f'<ul class="tests">{items}</ul>{img}<p class="sample"><b>Sample:</b> {html.escape(s.sample)}</p></article>'
        )
        md.append(s.markdown() + md_img)
    columns = min(max(len(summaries), 1), 3)  # side by side, so every model's answer is on the first screen
    doc.raw(
        '<section id="verdict"><h2>Verdict</h2><div class="answer" '
        f'style="grid-template-columns:repeat({columns},minmax(0,1fr))">' + "".join(cards) + "</div></section>",
        "\n".join(md),
    )


class ReportFiles(NamedTuple):
    html: Path
    markdown: Path
    summaries: list[ModelSummary]


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


def write_report(
    cfg: ProjectConfig, layout: Layout, categories: list[str], input_versions: dict[str, str] | None = None
) -> ReportFiles:
    figures = layout.report_figures()
    figures.mkdir(parents=True, exist_ok=True)
    doc = _Doc(figures)
    doc.raw(
        f"<header><h1>Refusal circuits: monolithic or modular? ({html.escape(cfg.name)})</h1>"
        f'<p class="sub">Models: {html.escape(", ".join(m.id for m in cfg.models))}. Categories: '
        f"{html.escape(', '.join(categories))}.</p></header>",
        f"# Refusal circuits: monolithic or modular? ({cfg.name})\n\nModels: {', '.join(m.id for m in cfg.models)}. "
        f"Categories: {', '.join(categories)}.\n",
    )

    # ---- the answer: verdict, one line per test, one figure, what the sample can show
    summaries = [
        summarize_model(cfg, layout, m.model_key, categories, figures / f"summary_{m.model_key}.png")
        for m in cfg.models
    ]
    _answer_block(doc, summaries)
    comparisons = {
        m.model_key: json.loads(layout.comparison_summary(m.model_key).read_text())
        for m in cfg.models
        if layout.comparison_summary(m.model_key).is_file()
    }
    # ---- the combined verdict of every test, per model (refusal_assets.analysis.verdict renders it)
    for model_key, comp in comparisons.items():
        if "combined" in comp:
            render_verdict(doc, model_key, comp["combined"])

    # ---- behaviour
    doc.h(2, "Behaviour: refusal and over-refusal")
    doc.p(
        "Refusal judged by phrase match on greedy generations; over-refusal = refusal of safe (80k) and "
        "seemingly-toxic (hard-1k) prompts."
    )
    for m in cfg.models:
        rows = []
        for c in categories:
            path = layout.behaviour(m.model_key, c)
            if not path.is_file():
                continue
            df = pl.read_parquet(path)

            def rate(s: str) -> float:
                if (df["split"] == s).any():
                    return float(df.filter(pl.col("split") == s)["refused"].mean() or 0.0)
                return float("nan")

            rows.append([c, df.height, rate("safe"), rate("hard"), rate("toxic"), float(df["refusal_score"].mean())])
        if rows:
            doc.h(3, m.model_key)
            doc.table(
                ["category", "prompts", "refusal safe", "refusal hard", "refusal toxic", "mean refusal score"], rows
            )

    # ---- SAEs
    doc.h(2, "Sparse autoencoders")
    doc.p(
        "FVU on the distinct rows of held-out prompts (whole prompts no SAE trained on; the chat template's "
        "positions once, in training), on their post-instruction rows, and on the training rows: a held-out "
        "FVU far above the training one means the SAE is limited by its data (more prompts help; "
        "`refusal-assets bench sae --learning-curve` measures it). Dead fraction over rows outside the template. "
        "Spliced in without its error term on held-out prompts: CE loss recovered, ΔCE (nats), KL, and the "
        "change in the refusal score that circuits use. Training rows are distinct; those of the SAE corpus "
        "(`sae.corpus`: extra prompts that only train the SAEs, never held out) are counted apart."
    )
    rows = []
    for m in cfg.models:
        for key in m.site_keys:
            path = layout.sae_history(key)
            if path.is_file():
                h = json.loads(path.read_text())
                rows.append([key, *(h.get(part, {}).get(name, float("nan")) for _, part, name in SAE_COLUMNS)])
    doc.table(["site", *(header for header, _, _ in SAE_COLUMNS)], rows)
    for m in cfg.models:
        for key in m.site_keys:
            doc.image(layout.sae_plot(key), f"SAE training {key}")

    # ---- circuits
    doc.h(2, "Circuits")
    doc.p(
        "Brackets: 95% bootstrap CIs over prompts, every number held-out (cross-fitted); the random control has the "
        "circuit's number of nodes at every site; m(M) - m(∅) is the ratios' denominator (near zero, they are "
        "ill-conditioned). See Methods."
    )
    for m in cfg.models:
        rows = []
        for c in categories:
            path = layout.circuit_summary(m.model_key, c)
            if path.is_file():
                s = json.loads(path.read_text())
                for g, v in s["groups"].items():
                    nan2 = (float("nan"), float("nan"))  # circuit files written before CIs existed
                    rows.append(
                        [
                            c,
                            g,
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
                    )
        if rows:
            doc.h(3, m.model_key)
            doc.table(
                [
                    "category",
                    "group",
                    "prompts",
                    "nodes",
                    "faithfulness",
                    "completeness",
                    "random control",
                    "m(M) - m(∅)",
                    "edges",
                ],
                rows,
            )
            for c in categories:
                doc.image(layout.circuit_plot(m.model_key, c), f"faithfulness sweep {m.model_key}/{c}")

    # ---- comparison
    doc.h(2, "Cross-category comparison")
    for model_key, comp in comparisons.items():
        doc.h(3, model_key)
        doc.p(f"Verdict {comp['verdict'].upper()}. {comp['verdict_reason']}")
        for g, res in comp["groups"].items():
            if "pairs" not in res:  # fewer than two categories with enough refusing prompts
                doc.p(f"{g} prompts: {res['verdict_reason']}")
                continue
            pairs = [
                [
                    p["a"],
                    p["b"],
                    p["jaccard"],
                    format_ci(_ci_json(p.get("jaccard_ci"))),
                    p.get("normalised_jaccard"),
                    p["p_value"],
                    p["q_value"],
                    "yes" if p["significant"] else "no",
                ]
                for p in res["pairs"]
            ]
            doc.p(
                f"{g} prompts: verdict {res['verdict']}; shared core {len(res['shared_core'])} nodes, shared fraction "
                f"{res['shared_fraction']:.3f} (95% CI {format_ci(_ci_json(res['shared_fraction_ci']), 3)})."
            )
            if res.get("fallback_categories"):
                doc.p(
                    f"Too few refused {g} prompts, so these circuits use every {g} prompt: "
                    f"{', '.join(res['fallback_categories'])}."
                )
            doc.table(["a", "b", "Jaccard", "95% CI", "normalised", "p (permutation)", "q (BH)", "significant"], pairs)
            doc.image(layout.jaccard_plot(model_key, g), f"Jaccard {g} ({model_key}); * = significant after BH")
        doc.image(layout.jaccard_plot(model_key, "cross"), f"toxic vs benign circuits ({model_key})")
        # ---- issue 14: functional tests (refusal_assets.analysis.verdict renders them)
        render_transfer(doc, model_key, comp.get("transfer") or {})
        doc.h(3, f"Refusal directions ({model_key})")
        doc.p(
            "Difference of means (toxic - safe) at the last post-instruction token per category (Arditi et al. 2024); "
            "cosines across categories."
        )
        for site in comp.get("direction_cosines", {}):
            doc.image(layout.direction_cosine_plot(model_key, site), f"refusal-direction cosine at {site}")

    # ---- data
    doc.h(2, "Data profile")
    prof = layout.profile_table()
    if prof.is_file():
        doc.p("Prompts per category and split: all (sampled).")
        pivot = data.profile_pivot(pl.read_parquet(prof))
        doc.table(pivot.columns, [list(r) for r in pivot.iter_rows()])
        doc.image(layout.profile_plot(), "prompts per category and split")
    doc.p(
        "The embedded sample is an illustrative set written for this project, not OR-Bench; use --data-dir with the "
        "real OR-Bench for research claims."
    )

    # ---- methods
    doc.h(2, "Methods")
    doc.p(
        "Circuits: node effects by attribution patching on the refusal score, on the prompts selected by "
        f"circuits.prompt_filter = '{cfg.circuits.prompt_filter}' (a group with fewer than min_prompts = "
        f"{cfg.circuits.min_prompts} falls back to all its prompts, as its 'prompts' column says); mean ablation "
        "towards the safe prompts the model complies with; faithfulness and completeness cross-fitted (each prompt "
        "scored with a circuit selected on the other prompts only; leave-one-out by default), unclipped, with 95% "
        "bootstrap CIs over prompts."
    )
    doc.p(
        "Comparison: per pair of categories, the Jaccard overlap of their circuits against a label-permutation null "
        "(one-sided, for lower overlap), Benjamini-Hochberg over pairs, normalised by the geometric mean of the two "
        "split-half ceilings (how well a circuit reproduces within its own category); the shared core is the nodes in "
        "every category's circuit. The verdict rule is documented in "
        "refusal_assets.analysis.verdict_rule.decide_verdict."
    )
    doc.h(3, "Reproducibility")
    doc.table(["package", "version"], [[k, v] for k, v in _versions().items()])
    if input_versions:
        doc.table(["input asset", "data version (latest)"], [[k, v] for k, v in sorted(input_versions.items())])
    doc.pre(json.dumps(cfg.model_dump(mode="json"), indent=1, default=str))

    style = (
        "body{font-family:sans-serif;font-size:14px;max-width:1360px;margin:0.4em auto;padding:0 12px}"
        "h1{font-size:20px;margin:0.2em 0}.sub{margin:0 0 0.3em;color:#555;font-size:13px}"
        "h2{font-size:17px;margin:0.5em 0 0.3em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        "img{max-width:100%}"
        ".answer{display:grid;gap:12px}.model{border:1px solid #ddd;border-radius:6px;padding:4px 10px}"
        ".model h3{margin:0.2em 0;font-size:16px}.tests{margin:0.2em 0;padding-left:1.2em;font-size:13px}"
        ".tests li{margin:1px 0}"
        "img.summary{display:block;max-width:100%;max-height:440px;margin:4px auto}"
        ".sample{font-size:12.5px;margin:0.2em 0;color:#333}"
        ".verdict{padding:0 6px;border-radius:4px;background:#eee}.v-modular{background:#d6eaff}"
        ".v-monolithic{background:#ffe3c4}.v-mixed{background:#eee}"
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>refusal_assets "
        f"report</title><style>{style}</style></head><body>{''.join(doc.html)}</body></html>"
    )
    html_path = write_text(page, layout.report_html())
    md_path = write_text("\n".join(doc.md), layout.report_markdown())
    return ReportFiles(html_path, md_path, summaries)
