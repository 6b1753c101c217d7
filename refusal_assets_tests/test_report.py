"""The answer-first report on synthetic storage for two models: the first-screen summary per model
(verdict, one line per test, one figure, the sample sentence), the section order, the Markdown twin,
the profile pivot and its plot's legend, and the report asset's metadata."""

import json

import numpy as np
import polars as pl
import pytest

from refusal_assets.analysis import overlap as cmp
from refusal_assets.layout import Layout
from refusal_assets.prompts import orbench as data
from refusal_assets.report import report
from refusal_assets.storage import write_parquet, write_text

CATS = ["harassment", "illegal", "privacy", "violence"]
SITE_OF_NODE = np.repeat(np.arange(2), 12)  # 2 sites x 12 nodes


def _effects(rng, n_shared: int) -> dict[str, np.ndarray]:
    out = {}
    for i, c in enumerate(CATS):
        mean = np.zeros(SITE_OF_NODE.size)
        mean[:n_shared] = 1.0
        mean[n_shared + 2 * i : n_shared + 2 * i + 2] = 1.0  # two nodes of the category's own
        out[c] = mean + rng.normal(0, 0.2, (10, mean.size))
    return out


def _behaviour(rng, refuse_toxic: float) -> pl.DataFrame:
    split = ["toxic"] * 8 + ["safe"] * 8 + ["hard"] * 8
    score = np.where(
        np.array(split) == "toxic", np.where(rng.random(24) < refuse_toxic, 1.0, -1.0), -1.0
    )
    return pl.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(24)],
            "split": split,
            "refused": score > 0,
            "refusal_score": score,
            "p_refusal": (score > 0) * 0.9,
        }
    )


def _circuit_group(n_used: int, prompt_set: str, advantage_lo: float) -> dict:
    sweep = {
        "m_full": 1.0,
        "m_empty": -1.0,
        "denominator_ci": [1.5, 2.5],
        "n_prompts": n_used,
        "n_folds": n_used,
        "sweep": [
            {"n_nodes": n, "faithfulness": 0.8, "completeness": 0.3, "random_faithfulness": 0.1}
            for n in (2, 4)
        ],
    }
    return {
        "n_prompts": n_used,
        "n_prompts_in_group": 8,
        "prompt_set": prompt_set,
        "n_nodes": 4,
        "nodes": [],
        "edges": [],
        "faithfulness": 0.8,
        "faithfulness_ci": [0.6, 0.9],
        "completeness": 0.3,
        "completeness_ci": [0.1, 0.5],
        "random_faithfulness": 0.1,
        "random_faithfulness_ci": [0.0, 0.2],
        "advantage_ci": [advantage_lo, 0.8],
        "sweep": sweep,
    }


def two_model_storage(tiny_cfg, root):
    """Storage under ``root`` with every file the report reads, for the tiny model and a copy of it
    (``second``): one with a shared circuit core, one without. Returns (config, layout)."""
    cfg = tiny_cfg.model_copy(
        update={
            "models": [tiny_cfg.models[0], tiny_cfg.models[0].model_copy(update={"key": "second"})]
        }
    )
    layout, rng = Layout(root), np.random.default_rng(0)
    counts = pl.DataFrame(
        {
            "category_key": [c for c in CATS for _ in range(3)],
            "split": ["safe", "hard", "toxic"] * 4,
            "n": [14] * 12,
            "n_sampled": [8] * 12,
        }
    ).with_columns(pl.col("n", "n_sampled").cast(pl.UInt32))
    write_parquet(counts.to_arrow(), layout.profile_table())
    data.plot_profile(counts, layout.profile_plot())
    for m, n_shared in zip(cfg.models, (8, 0), strict=True):
        key = m.model_key
        for i, c in enumerate(CATS):
            write_parquet(
                _behaviour(rng, 0.6 if key == "second" else 0.0).to_arrow(),
                layout.behaviour(key, c),
            )
            fallback = "all (score_positive: only 0 < 2)"
            group = (
                _circuit_group(8, fallback, -0.1)
                if key != "second"
                else _circuit_group(5, "score_positive", 0.2 if i else -0.1)
            )
            write_text(
                json.dumps({"category": c, "groups": {"toxic": group}}),
                layout.circuit_summary(key, c),
            )
        result = cmp.compare_categories(
            _effects(rng, n_shared), SITE_OF_NODE, k_per_site=6, n_permutations=50, n_bootstrap=50
        )
        directions = {c: rng.normal(size=16) + 3.0 for c in CATS}
        labels, cos = cmp.refusal_direction_cosines(directions)
        comp = {
            "model": key,
            "categories": CATS,
            "groups": {"toxic": result.to_dict()},
            "verdict": result.verdict,
            "verdict_reason": result.verdict_reason,
            "direction_cosines": {"resid2": {"labels": labels, "matrix": cos.tolist()}},
        }
        write_text(json.dumps(comp), layout.comparison_summary(key))
    return cfg, layout


@pytest.fixture()
def two_models(tiny_cfg, tmp_path):
    return two_model_storage(tiny_cfg, tmp_path)


def test_first_screen_summary_per_model(two_models):
    cfg, layout = two_models
    written = report.write_report(cfg, layout, CATS)
    assert [s.model_key for s in written.summaries] == ["tiny-qwen2", "second"]
    comps = {
        m.model_key: json.loads(layout.comparison_summary(m.model_key).read_text())
        for m in cfg.models
    }
    for s in written.summaries:
        assert (
            s.verdict == comps[s.model_key]["verdict"]
            and s.reason == comps[s.model_key]["verdict_reason"]
        )
        assert [t.test for t in s.tests] == [
            "Circuit overlap, toxic",
            "Shared core",
            "Refusal directions",
            "Circuit quality, toxic",
        ]
        assert all("\n" not in t.finding for t in s.tests)  # one line each
        assert s.figure.is_file() and s.figure.read_bytes()[:4] == b"\x89PNG"
        assert "8 toxic prompts per category in 4 categories" in s.sample
        assert "smallest p-value is 0.020" in s.sample  # 50 permutations
    first, second = written.summaries
    assert (
        "harassment 0, illegal 0, privacy 0, violence 0" in first.sample
        and "4 of 4 categories have fewer than min_prompts = 2" in first.sample
    )
    assert "fewer than min_prompts" not in second.sample
    assert first.tests[3].finding.startswith(
        "faithfulness beats a same-size random circuit in 0 of 4"
    )
    assert second.tests[3].finding.startswith(
        "faithfulness beats a same-size random circuit in 3 of 4"
    )
    shared = json.loads(layout.comparison_summary("tiny-qwen2").read_text())["groups"]["toxic"][
        "shared_core"
    ]
    assert first.tests[1].finding.startswith(f"{len(shared)} nodes in every category's circuit")

    page = written.html.read_text()
    # the answer first, then the sections in order
    order = [
        page.index(t)
        for t in (
            'id="verdict"',
            "Behaviour: refusal",
            "Sparse autoencoders",
            "<h2>Circuits",
            "Cross-category comparison",
            "Data profile",
            "<h2>Methods",
            "Reproducibility",
        )
    ]
    assert order == sorted(order)
    answer = page[page.index('id="verdict"') : page.index("Behaviour: refusal")]
    for s in written.summaries:
        assert (
            f'data-model="{s.model_key}"' in answer
            and s.execution.upper() in answer
            and s.features.upper() in answer
            and f'alt="summary figure {s.model_key}"' in answer
        )
    assert page.count('class="summary"') == 2 and "data:image/png;base64" in answer
    md = written.markdown.read_text()
    assert md.index("## Verdict") < md.index("## Behaviour")
    assert f"**tiny-qwen2: {first.headline}**" in md and "(figures/summary_second.png)" in md
    assert (layout.report_figures() / "summary_second.png").is_file()


def test_data_profile_is_a_category_by_split_pivot(two_models):
    cfg, layout = two_models
    page = report.write_report(cfg, layout, CATS).html.read_text()
    section = page[page.index("Data profile") : page.index("<h2>Methods")]
    assert section.count("<tr>") == 1 + len(CATS)  # header + one row per category, not one per cell
    assert "<td>14 (8)</td>" in section
    pivot = data.profile_pivot(pl.read_parquet(layout.profile_table()))
    assert pivot.columns == ["category", "safe", "hard", "toxic", "total", "sampled"]
    assert pivot.row(0) == ("harassment", "14 (8)", "14 (8)", "14 (8)", 42, 24)


def test_profile_legend_covers_no_bar(two_models):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    _, layout = two_models
    fig = data.profile_figure(pl.read_parquet(layout.profile_table()))
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax.patches]
    assert len(bars) == 2 * 3 * len(CATS)  # all + sampled, per split and category
    assert not any(legend.overlaps(b) for b in bars)


def test_more_tests_extend_the_first_screen(two_models, monkeypatch):
    cfg, layout = two_models

    def extra(inp):
        return [
            report.TestLine(
                "Induced refusal", f"{len(inp.circuits)} circuits steer {inp.model_key}"
            )
        ]  # noqa: E731

    monkeypatch.setattr(report, "SUMMARY_TESTS", [*report.SUMMARY_TESTS, extra])
    written = report.write_report(cfg, layout, CATS)
    assert written.summaries[1].tests[-1] == report.TestLine(
        "Induced refusal", "4 circuits steer second"
    )
    page = written.html.read_text()
    assert page.index("<b>Induced refusal</b>: 4 circuits steer second") < page.index(
        "Behaviour: refusal"
    )


def test_a_model_without_comparison_says_so(two_models):
    cfg, layout = two_models
    layout.comparison_summary("second").unlink()
    written = report.write_report(cfg, layout, CATS)
    missing = written.summaries[1]
    assert (
        missing.verdict == "not run"
        and missing.figure is None
        and missing.tests[-1].test == "Circuit quality, toxic"
    )
    assert "NOT RUN" in written.html.read_text()


def test_first_screen_leads_with_both_answers_and_their_stability(two_models):
    """The headline of each model: the execution- and feature-level answers, and how many SAE
    trainings the feature answer rests on (unstable ones listed per seed)."""
    cfg, layout = two_models
    path = layout.comparison_summary("tiny-qwen2")
    comp = json.loads(path.read_text())
    stability = (
        "unstable across SAE trainings: seed 0 monolithic; seed 1 modular; seed 2 monolithic"
    )
    comp |= {
        "verdict_execution": "monolithic",
        "execution_reason": "the pooled direction removes refusal",
        "verdict_features": "unstable across SAE trainings",
        "verdict_features_by_seed": ["monolithic", "modular", "monolithic"],
        "feature_stability": stability,
        "feature_reason": f"{stability}. Main SAEs: core share high",
    }
    write_text(json.dumps(comp), path)
    written = report.write_report(cfg, layout, CATS)
    first = written.summaries[0]
    assert first.headline == (
        f"execution level MONOLITHIC · feature level UNSTABLE ACROSS SAE TRAININGS ({stability})"
    )
    assert [t.test for t in first.tests[:2]] == [
        "Execution level (refusal directions)",
        "Feature level (SAE circuits)",
    ]
    assert stability in first.tests[1].finding
    md = written.markdown.read_text()
    assert f"**tiny-qwen2: {first.headline}**" in md
    page = written.html.read_text()
    answer = page[page.index('id="verdict"') : page.index("Behaviour: refusal")]
    assert "UNSTABLE ACROSS SAE TRAININGS</span>" in answer and stability in answer


def test_report_metadata_carries_the_verdict_markdown_and_figures(two_models):
    from refusal_assets.defs.metadata import report_metadata

    cfg, layout = two_models
    written = report.write_report(cfg, layout, CATS)
    md = report_metadata(written)
    assert md["verdict"].value == report.summaries_markdown(written.summaries)
    assert (
        f"**second: {written.summaries[1].headline}**" in md["verdict"].value
        and "- **Shared core**:" in md["verdict"].value
    )
    assert md["path"].value == str(written.html) and md["markdown"].value == str(written.markdown)
    assert md["summary_figure_second"].value.startswith("![summary second](data:image/png;base64,")


def test_sae_table_shows_held_out_train_and_splice_quality(two_models):
    cfg, layout = two_models
    key = cfg.models[0].site_keys[0]
    metrics = {
        "fvu": 0.169,
        "fvu_post_instruction": 0.027,
        "fvu_train": 0.041,
        "l0": 32.0,
        "dead_fraction": 0.006,
    }
    metrics |= {"n_train_rows": 15234, "n_corpus_train_rows": 9800}
    splice = {
        "loss_recovered": 0.996,
        "delta_ce": 0.023,
        "kl_spliced": 0.157,
        "refusal_score_change": 0.789,
    }
    write_text(json.dumps({"metrics": metrics, "splice": splice}), layout.sae_history(key))
    old = cfg.models[1].site_keys[
        0
    ]  # a history from before fvu_train: the cell says nan, the row stays
    write_text(
        json.dumps({"metrics": {"fvu": 0.2, "l0": 32.0}, "splice": {}}), layout.sae_history(old)
    )
    md = report.write_report(cfg, layout, CATS).markdown.read_text()
    table = md[md.index("## Sparse autoencoders") :].split("\n\n")[2]
    header, _, *rows = table.strip().splitlines()
    assert header == (
        "| site | held-out FVU | post-instruction FVU | train FVU | L0 | dead fraction | loss recovered | ΔCE "
        "| KL spliced | refusal score change | training rows | of them corpus |"
    )
    assert rows[0] == (
        f"| {key} | 0.169 | 0.027 | 0.041 | 32.000 | 0.006 | 0.996 | 0.023 | 0.157 | 0.789 | 15234 | 9800 |"
    )
    assert (
        rows[1]
        == f"| {old} | 0.200 | nan | nan | 32.000 | nan | nan | nan | nan | nan | nan | nan |"
    )
    assert "bench sae --learning-curve" in md


def test_templates_are_package_files_and_html_escapes_every_value(two_models):
    """The page comes from the packaged templates; a value with markup in it is escaped in the HTML
    (as html.escape does) and verbatim in the Markdown; the HTML is one line, the Markdown ends in one
    newline."""
    from importlib.resources import files

    from refusal_assets.report.render import render_html, render_markdown

    templates = files("refusal_assets.report") / "templates"
    assert (templates / "report.html").is_file() and (templates / "report.md").is_file()
    cfg, layout = two_models
    cfg = cfg.model_copy(update={"name": "<b>x</b> & 'y'"})
    written = report.write_report(cfg, layout, CATS)
    page, md = written.html.read_text(), written.markdown.read_text()
    assert "(&lt;b&gt;x&lt;/b&gt; &amp; &#x27;y&#x27;)</h1>" in page and "<b>x</b>" not in page
    assert "# Refusal circuits: monolithic or modular? (<b>x</b> & 'y')\n" in md
    assert "\n" not in page.split("<pre>")[0] and md.endswith("```\n")
    inputs = report.report_inputs(cfg, layout, CATS)
    section = {"verdict": inputs.verdict, "header": inputs.header}
    assert render_html("verdict.html", **section).startswith(
        '<section id="verdict"><h2>Verdict</h2>'
    )
    assert render_markdown("verdict.md", **section).startswith("\n## Verdict\n\n**tiny-qwen2: ")


def test_features_section_shows_a_card_for_every_shared_core_latent(shared_tiny_run, tmp_path):
    """Every latent in the toxic circuits of at least half the categories gets its card (from the
    features asset's cards.json) in the HTML and the Markdown report."""
    from refusal_assets.config import load_config
    from refusal_assets.layout import Layout
    from refusal_assets.report.features_section import features_section
    from refusal_assets.report.report import write_report
    from refusal_assets_tests.conftest import ROOT, copy_tiny_run

    _, storage = copy_tiny_run(shared_tiny_run, tmp_path)
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    layout = Layout(storage)
    categories = sorted(cfg.data.categories)
    members: dict[tuple[str, int], int] = {}
    model_key = cfg.models[0].model_key
    for c in categories:
        summary = json.loads(layout.circuit_summary(model_key, c).read_text())
        for n in summary["groups"]["toxic"]["nodes"]:
            if not n["is_error"]:
                key = (n["site"], n["latent"])
                members[key] = members.get(key, 0) + 1
    core = {k for k, v in members.items() if v >= max(2, (len(categories) + 1) // 2)}
    assert core, "the tiny run's circuits share no latent: the test would check nothing"
    (section,) = features_section(cfg, layout, categories)
    shown = {(c.role, c.markdown.split(":")[0]) for c in section.cards}
    for site, latent in core:
        assert any(f"{model_key}__{site} latent {latent}" in md for _, md in shown)
    written = write_report(cfg, layout, categories)
    page = written.html.read_text()
    assert page.count('class="fcard"') == len(section.cards)
    assert "## Features" in written.markdown.read_text()


def _section_text(page: str, md: str) -> tuple[str, str]:
    """The execution-level section of the HTML page and of the Markdown twin."""
    html_part = page[page.index('<section id="execution">') :]
    md_part = md[md.index("\n## Execution level: refusal directions\n") :]
    return html_part[: html_part.index("</section>")], md_part[: md_part.index("\n## ", 5)]


def test_execution_section_says_so_in_one_line_without_a_direction(two_models):
    """No refusal_direction files, or a result with no direction (too few refusing prompts): one
    line per model, and the report still builds, the section between the verdict and behaviour."""
    from refusal_assets.directions.result import ExecutionResult, write_result
    from refusal_assets.report.execution_section import execution_section
    from refusal_assets.report.render import FigureStore

    cfg, layout = two_models
    why = "refusal directions: no refused toxic training prompts; widen the sample"
    second = cfg.models[1].model_key
    write_result(
        ExecutionResult.insufficient(second, 4, why, 0.25), layout.direction_result(second)
    )
    store = FigureStore(layout.report_figures())
    first = execution_section(cfg.models[0].model_key, layout, store)
    assert first.missing == (
        f"{cfg.models[0].model_key}: execution level not shown, refusal_direction not materialized."
    )
    assert first.table is None and not first.figures and not first.examples
    insufficient = execution_section(second, layout, store)
    assert insufficient.missing == (
        f"{second}: execution level not shown, insufficient evidence, {why}."
    )
    write_text("{}", layout.direction_result("unreadable"))
    unreadable = execution_section("unreadable", layout, store)
    assert unreadable.missing.startswith("unreadable: execution level not shown, unreadable result")
    written = report.write_report(cfg, layout, CATS)
    page, md = written.html.read_text(), written.markdown.read_text()
    html_part, md_part = _section_text(page, md)
    for s in (first, insufficient):
        assert f"<p>{s.missing}</p>" in html_part and f"\n{s.missing}\n" in md_part
    assert "<table" not in html_part and "<img" not in html_part and "|" not in md_part
    order = [page.index(x) for x in ('id="verdict"', 'id="execution"', "<h2>Behaviour")]
    assert order == sorted(order)
    order = [md.index(x) for x in ("## Verdict", "## Execution level", "## Behaviour")]
    assert order == sorted(order)


def test_execution_section_from_a_tiny_run_shows_figures_table_and_examples(
    shared_tiny_run, tiny_model, tiny_cfg, tmp_path
):
    """The tiny run's report with refusal_direction files written as the asset writes them. The
    tiny model refuses nothing, so its own result has no direction: the files come from the
    planted shared world on the same model (refusal_assets.directions.planted), run by the asset's
    run_execution. The section shows the headline, the three figures (embedded in the HTML, beside
    the Markdown), one row per category and the examples with their prompts escaped."""
    import dataclasses
    import html

    from refusal_assets.directions import plots
    from refusal_assets.directions.planted import recover_execution_verdict
    from refusal_assets.directions.result import write_result
    from refusal_assets.report.execution_section import NO_RATIO_REASON, execution_section
    from refusal_assets.report.render import FigureStore
    from refusal_assets_tests.conftest import copy_tiny_run

    _, storage = copy_tiny_run(shared_tiny_run, tmp_path)
    layout, cfg = Layout(storage), tiny_cfg
    key, categories = cfg.models[0].model_key, sorted(cfg.data.categories)
    before = execution_section(key, layout, FigureStore(layout.report_figures()))
    assert before.missing.startswith(f"{key}: execution level not shown, insufficient evidence")

    model, tok = tiny_model
    result = recover_execution_verdict(model, tok, cfg.models[0], "shared", n_per_split=12).result
    assert result.layer >= 0 and result.examples, result.verdict_reason
    write_text(json.dumps([vars(e) for e in result.examples]), layout.direction_examples(key))
    for name, fn in [
        ("still_refusing", plots.plot_still_refusing),
        ("layer_scan", plots.plot_layer_scan),
        ("steering", plots.plot_steering),
    ]:
        fn(result, layout.direction_plot(key, name))
    write_result(result, layout.direction_result(key))

    layout.report_figures().mkdir(parents=True, exist_ok=True)
    section = execution_section(key, layout, FigureStore(layout.report_figures()))
    assert not section.missing
    assert f"block {result.layer} input, post-instruction position {result.position}" in (
        section.headline
    )
    assert result.pooled_still_refusing.text() in section.headline
    assert result.verdict_execution.upper() in section.headline and result.verdict_reason in (
        section.headline
    )
    assert [row[0] for row in section.table.rows] == [c.category for c in result.categories]
    for row, c in zip(section.table.rows, result.categories, strict=True):
        assert row[5] == ("—" if c.loco_to_own is None else f"{c.loco_to_own:.2f}")
    assert (NO_RATIO_REASON in section.ratio_note) == any(
        c.loco_to_own is None for c in result.categories
    )

    written = report.write_report(cfg, layout, categories)
    page, md = written.html.read_text(), written.markdown.read_text()
    html_part, md_part = _section_text(page, md)
    for name in ("still_refusing", "layer_scan", "steering"):
        assert "![" in md_part and f"](figures/{key}_{name}.png)" in md_part
        assert (layout.report_figures() / f"{key}_{name}.png").is_file()
    assert html_part.count('<img alt="') == 3
    assert html_part.count('src="data:image/png;base64,') == 3
    for c in result.categories:
        assert f"<tr><td>{c.category}</td><td>{c.n_refusing}</td>" in html_part
        assert f"\n| {c.category} | {c.n_refusing} | " in md_part
    example = result.examples[0]
    assert "<" in example.prompt  # the planted prompts open with their marker token, <catC>
    assert f"<td>{html.escape(example.prompt)} <small>" in html_part
    assert example.prompt not in html_part
    assert f"\n| {example.prompt} ({example.category}, {example.prompt_id}) | " in md_part
    assert "\n" not in page.split("<pre>")[0]

    # a ratio result.py gives no number for (its denominator's CI includes 0) reads "—", with why
    first = dataclasses.replace(result.categories[0], loco_to_own=None)
    write_result(
        dataclasses.replace(result, categories=[first, *result.categories[1:]]),
        layout.direction_result(key),
    )
    written = report.write_report(cfg, layout, categories)
    html_part, md_part = _section_text(written.html.read_text(), written.markdown.read_text())
    assert f"<td>{first.own_score_drop:.3f} " in html_part
    assert "</td><td>—</td><td>" in html_part and " | — | " in md_part
    assert NO_RATIO_REASON in html_part and NO_RATIO_REASON in md_part
