"""The report: one self-contained HTML file (PNGs embedded) and a Markdown twin (PNGs beside it)."""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
import math
import platform
import shutil
from pathlib import Path

import polars as pl

from refusal_assets.config import ProjectConfig
from refusal_assets.layout import Layout
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
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows) + "</table>")
        self.md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                       + "\n".join("| " + " | ".join(fmt(v) for v in r) + " |" for r in rows) + "\n")

    def image(self, path: Path, alt: str) -> None:
        if not path.is_file():
            self.p(f"(figure missing: {path.name})")
            return
        name = f"{path.parent.name}_{path.name}"
        shutil.copyfile(path, self.figures / name)
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>')
        self.md.append(f"![{alt}](figures/{name})\n")

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


def write_report(cfg: ProjectConfig, layout: Layout, categories: list[str], input_versions: dict[str, str] | None = None) -> tuple[Path, Path]:
    figures = layout.report_figures()
    figures.mkdir(parents=True, exist_ok=True)
    doc = _Doc(figures)
    doc.h(1, f"Refusal circuits: monolithic or modular? ({cfg.name})")
    doc.p(f"Models: {', '.join(m.id for m in cfg.models)}. Categories: {', '.join(categories)}.")

    # ---- verdicts first: the answer to the question
    doc.h(2, "Verdict")
    comparisons = {}
    for m in cfg.models:
        path = layout.comparison_summary(m.model_key)
        if path.is_file():
            comparisons[m.model_key] = json.loads(path.read_text())
            doc.p(f"{m.model_key}: {comparisons[m.model_key]['verdict'].upper()}. {comparisons[m.model_key]['verdict_reason']}")
            # ---- issue 14: the combined-verdict table (refusal_assets.verdict renders it)
            if "combined" in comparisons[m.model_key]:
                from refusal_assets.verdict import render as render_verdict

                render_verdict(doc, m.model_key, comparisons[m.model_key]["combined"])
        else:
            doc.p(f"{m.model_key}: no comparison materialized.")

    # ---- data
    doc.h(2, "Data profile")
    prof = layout.profile_table()
    if prof.is_file():
        counts = pl.read_parquet(prof)
        doc.table(counts.columns, [list(r) for r in counts.iter_rows()])
        doc.image(layout.profile_plot(), "prompts per category and split")
    doc.p("The embedded sample is an illustrative set written for this project, not OR-Bench; use --data-dir with the real OR-Bench for research claims.")

    # ---- behaviour
    doc.h(2, "Behaviour: refusal and over-refusal")
    doc.p("Refusal judged by phrase match on greedy generations; over-refusal = refusal of safe (80k) and seemingly-toxic (hard-1k) prompts.")
    for m in cfg.models:
        rows = []
        for c in categories:
            path = layout.behaviour(m.model_key, c)
            if not path.is_file():
                continue
            df = pl.read_parquet(path)
            rate = lambda s: float(df.filter(pl.col("split") == s)["refused"].mean() or 0.0) if (df["split"] == s).any() else float("nan")  # noqa: E731
            rows.append([c, df.height, rate("safe"), rate("hard"), rate("toxic"), float(df["refusal_score"].mean())])
        if rows:
            doc.h(3, m.model_key)
            doc.table(["category", "prompts", "refusal safe", "refusal hard", "refusal toxic", "mean refusal score"], rows)

    # ---- SAEs
    doc.h(2, "Sparse autoencoders")
    rows = []
    for m in cfg.models:
        for key in m.site_keys:
            path = layout.sae_history(key)
            if path.is_file():
                h = json.loads(path.read_text())
                met, sp = h.get("metrics", {}), h.get("splice", {})
                rows.append([key, met.get("fvu", float("nan")), met.get("l0", float("nan")), met.get("dead_fraction", float("nan")),
                             sp.get("loss_recovered", float("nan")), sp.get("kl_spliced", float("nan"))])
    doc.table(["site", "FVU", "L0", "dead fraction", "loss recovered", "KL spliced"], rows)
    for m in cfg.models:
        for key in m.site_keys:
            doc.image(layout.sae_plot(key), f"SAE training {key}")

    # ---- circuits
    doc.h(2, "Circuits")
    doc.p(f"Node effects by attribution patching on the refusal score, on the prompts selected by circuits.prompt_filter = "
          f"'{cfg.circuits.prompt_filter}' (a group with too few falls back to all its prompts, as its 'prompts' column says); "
          "mean ablation towards the safe prompts the model complies with; faithfulness and completeness cross-fitted, unclipped.")
    for m in cfg.models:
        rows = []
        for c in categories:
            path = layout.circuit_summary(m.model_key, c)
            if path.is_file():
                s = json.loads(path.read_text())
                for g, v in s["groups"].items():
                    nan2 = (float("nan"), float("nan"))  # circuit files written before CIs existed
                    rows.append([c, g, f"{v['n_prompts']} {v.get('prompt_set', 'all')}", v["n_nodes"],
                                 _with_ci(v["faithfulness"], v.get("faithfulness_ci", nan2)),
                                 _with_ci(v["completeness"], v.get("completeness_ci", nan2)),
                                 _with_ci(v["random_faithfulness"], v.get("random_faithfulness_ci", nan2)),
                                 v["sweep"]["m_full"] - v["sweep"]["m_empty"], len(v["edges"])])
        if rows:
            doc.h(3, m.model_key)
            doc.p("Each prompt is scored with a circuit selected on the other prompts only (cross-fitting; leave-one-out by default), "
                  "so every number is held-out. Brackets: 95% bootstrap CIs over prompts. The random control has the circuit's number "
                  "of nodes at every site. m(M) - m(∅) is the ratios' denominator: near zero, the ratios are ill-conditioned.")
            doc.table(["category", "group", "prompts", "nodes", "faithfulness", "completeness", "random control", "m(M) - m(∅)", "edges"], rows)
            for c in categories:
                doc.image(layout.circuit_plot(m.model_key, c), f"faithfulness sweep {m.model_key}/{c}")

    # ---- comparison
    doc.h(2, "Cross-category comparison")
    for model_key, comp in comparisons.items():
        doc.h(3, model_key)
        for g, res in comp["groups"].items():
            if "pairs" not in res:  # fewer than two categories with enough refusing prompts
                doc.p(f"{g} prompts: {res['verdict_reason']}")
                continue
            pairs = [[p["a"], p["b"], p["jaccard"], p.get("normalised_jaccard"), p["p_value"], p["q_value"], "yes" if p["significant"] else "no"] for p in res["pairs"]]
            doc.p(f"{g} prompts: verdict {res['verdict']}; shared core {len(res['shared_core'])} nodes, shared fraction {res['shared_fraction']:.3f} "
                  f"(95% CI {res['shared_fraction_ci'][0]:.3f} to {res['shared_fraction_ci'][1]:.3f}).")
            if res.get("fallback_categories"):
                doc.p(f"Too few refused {g} prompts, so these circuits use every {g} prompt: {', '.join(res['fallback_categories'])}.")
            doc.table(["a", "b", "Jaccard", "normalised", "p (permutation)", "q (BH)", "significant"], pairs)
            doc.image(layout.jaccard_plot(model_key, g), f"Jaccard {g} ({model_key}); * = significant after BH")
        doc.image(layout.jaccard_plot(model_key, "cross"), f"toxic vs benign circuits ({model_key})")
        # ---- issue 14: functional tests (refusal_assets.verdict renders them)
        from refusal_assets.verdict import render_transfer

        render_transfer(doc, model_key, comp.get("transfer") or {})
        doc.h(3, f"Refusal directions ({model_key})")
        doc.p("Difference of means (toxic - safe) at the last post-instruction token per category (Arditi et al. 2024); cosines across categories.")
        for site in comp.get("direction_cosines", {}):
            doc.image(layout.direction_cosine_plot(model_key, site), f"refusal-direction cosine at {site}")

    # ---- reproducibility
    doc.h(2, "Reproducibility")
    doc.table(["package", "version"], [[k, v] for k, v in _versions().items()])
    if input_versions:
        doc.table(["input asset", "data version (latest)"], [[k, v] for k, v in sorted(input_versions.items())])
    doc.pre(json.dumps(cfg.model_dump(mode="json"), indent=1, default=str))

    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>refusal_assets report</title><style>{style}</style></head><body>{''.join(doc.html)}</body></html>"
    html_path = write_text(page, layout.report_html())
    md_path = write_text("\n".join(doc.md), layout.report_markdown())
    return html_path, md_path
