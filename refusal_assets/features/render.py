"""Feature cards as HTML (token highlights, every text escaped) or compact Markdown, and the table
of the latents that circuits use: plain functions over
:class:`~refusal_assets.features.cards.FeatureCard`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from refusal_assets.features.cards import Example, FeatureCard, SiteFeatures

CARD_CSS = """
.fcard{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:10px 0;font-size:13px}
.fcard h4{margin:2px 0 6px 0}.fcard .stats{color:#555}
.fcard .ex{font-family:monospace;white-space:pre-wrap;margin:2px 0}
.fcard .tok{border-radius:2px}.fcard .hit{outline:1px solid #c00}
.fcard .meta{color:#777;font-family:sans-serif;font-size:11px}
.fcard table{border-collapse:collapse}
.fcard td,.fcard th{padding:1px 6px;border-bottom:1px solid #eee}
"""
"""Style the HTML cards need; the report includes it once."""


def card_anchor(site_key: str, latent: int) -> str:
    """The HTML id of a card, for links from the circuit tables."""
    return f"feature-{site_key}-{latent}".replace("_", "-").replace(".", "-")


def _token_html(token: str, activation: float | None, peak: float, hit: bool) -> str:
    text = html.escape(token.replace("\n", "⏎"))
    if activation is None:
        return f'<span class="tok" style="color:#aaa">{text}</span>'
    alpha = 0.0 if peak <= 0 else min(max(activation / peak, 0.0), 1.0)
    cls = "tok hit" if hit else "tok"
    title = html.escape(f"{activation:.3g}")
    style = f"background:rgba(255,120,0,{alpha:.2f})"
    return f'<span class="{cls}" style="{style}" title="{title}">{text}</span>'


def example_html(ex: Example, peak: float) -> str:
    """One example: its window, each token shaded by the latent's activation (``peak`` = full)."""
    tokens = "".join(
        _token_html(w.token, w.activation, peak, w.token_index == ex.token_index) for w in ex.window
    )
    where = f"{ex.category}/{ex.split}"
    label = f"q{ex.quantile:g}" if ex.quantile is not None else f"#{ex.rank}"
    meta = html.escape(f"{label} {ex.activation:.3g} · {where} · {ex.prompt_id}: {ex.prompt[:120]}")
    return f'<div class="ex">{tokens} <span class="meta">{meta}</span></div>'


def _rates_html(card: FeatureCard) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(g.category)}</td><td>{html.escape(g.split)}</td>"
        f"<td>{g.firing_rate:.3f}</td><td>{g.mean_activation:.3g}</td></tr>"
        for g in card.groups
    )
    head = "<tr><th>category</th><th>split</th><th>firing rate</th><th>mean act.</th></tr>"
    return f"<table>{head}{rows}</table>"


def card_html(card: FeatureCard, n_examples: int = 10) -> str:
    """A card: description, statistics, logit lens, top and quantile examples, rates by group."""
    cos = "n/a" if card.refusal_cosine is None else f"{card.refusal_cosine:+.3f}"
    stats = (
        f"fires on {card.firing_frequency:.2%} of rows · max {card.max_activation:.3g} · "
        f"mean when firing {card.mean_when_firing:.3g} · cosine with refusal direction {cos}"
    )
    promotes = ", ".join(html.escape(repr(t.token)) for t in card.logit_top)
    suppresses = ", ".join(html.escape(repr(t.token)) for t in card.logit_bottom)
    peak = card.max_activation
    examples = "".join(example_html(e, peak) for e in card.top_examples[:n_examples])
    lower = "".join(example_html(e, peak) for e in card.quantile_examples)
    title = html.escape(f"{card.site_key} latent {card.latent}: {card.description}")
    return (
        f'<div class="fcard" id="{card_anchor(card.site_key, card.latent)}"><h4>{title}</h4>'
        f'<div class="stats">{html.escape(stats)}</div>'
        f"<div>promotes: {promotes}</div><div>suppresses: {suppresses}</div>"
        f"<div><b>top examples</b>{examples or ' none'}</div>"
        + (f"<div><b>lower quantiles</b>{lower}</div>" if lower else "")
        + f"<details><summary>by category × split</summary>{_rates_html(card)}</details></div>"
    )


def _md(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", "⏎").replace("`", "'")
    # control characters (byte-level tokens such as NUL) as escapes: the file stays plain text
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def _bold(token: str) -> str:
    """``**token**`` with its surrounding spaces outside (Markdown ignores ``** x**``)."""
    core = token.strip()
    if not core:
        return f"**{_md(token)}**"
    lead, trail = token[: len(token) - len(token.lstrip())], token[len(token.rstrip()) :]
    return f"{_md(lead)}**{_md(core)}**{_md(trail)}"


def example_markdown(ex: Example) -> str:
    """The window on one line, the example's token in bold."""
    parts = [_bold(w.token) if w.token_index == ex.token_index else _md(w.token) for w in ex.window]
    return f"{ex.activation:.3g} ({ex.category}/{ex.split}): {''.join(parts)}"


def card_markdown(card: FeatureCard, n_examples: int = 5) -> str:
    """A compact card: heading, one stats line, the logit lens, the top examples."""
    cos = "n/a" if card.refusal_cosine is None else f"{card.refusal_cosine:+.3f}"
    lines = [
        f"#### {card.site_key} latent {card.latent}: {_md(card.description)}",
        "",
        f"fires on {card.firing_frequency:.2%} of rows, max {card.max_activation:.3g}, "
        f"cosine with the refusal direction {cos}; promotes "
        + ", ".join(f"`{_md(t.token)}`" for t in card.logit_top[:5]),
        "",
    ]
    lines += [f"- {example_markdown(e)}" for e in card.top_examples[:n_examples]]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class Membership:
    """The circuits (``category/group``) a latent of one site belongs to."""

    latent: int
    circuits: tuple[str, ...]


def circuit_membership(circuits: Mapping[str, dict], site: str) -> list[Membership]:
    """Latents of ``site`` (a site name, e.g. ``resid12``) in the given circuit summaries
    (category -> circuit.json), most circuits first (ties: lower index)."""
    found: dict[int, list[str]] = {}
    for category, summary in sorted(circuits.items()):
        for group, g in sorted(summary.get("groups", {}).items()):
            for node in g.get("nodes", []):
                if (
                    node.get("site") == site
                    and not node.get("is_error")
                    and node.get("latent") is not None
                ):
                    found.setdefault(int(node["latent"]), []).append(f"{category}/{group}")
    return sorted(
        (Membership(latent=j, circuits=tuple(c)) for j, c in found.items()),
        key=lambda m: (-len(m.circuits), m.latent),
    )


def membership_table(features: SiteFeatures, members: Iterable[Membership], n: int = 15) -> str:
    """Markdown: the ``n`` latents in most circuits with their description and statistics."""
    members = list(members)[:n]
    if not members:
        return "No circuit of this model has been found yet (or none uses this site's latents)."
    lines = [
        "| latent | circuits | in | description | firing | max | cos refusal |",
        "|---:|---:|---|---|---:|---:|---:|",
    ]
    for m in members:
        c = features.card(m.latent)
        cos = "n/a" if c.refusal_cosine is None else f"{c.refusal_cosine:+.2f}"
        lines.append(
            f"| {m.latent} | {len(m.circuits)} | {_md(', '.join(m.circuits[:4]))} | "
            f"{_md(c.description)} | {c.firing_frequency:.2%} | {c.max_activation:.3g} | {cos} |"
        )
    return "\n".join(lines)
