"""The report's Features section: a card for every latent of each model's shared core (latents in
the toxic circuits of at least half the categories) and for each category's top specific latents
(in that category's toxic circuit only), read from the ``features`` asset's ``cards.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass

from markupsafe import Markup

from refusal_assets.config import ProjectConfig
from refusal_assets.features.cards import SiteFeatures, read_cards
from refusal_assets.features.render import card_html, card_markdown
from refusal_assets.layout import Layout

N_SPECIFIC = 5
"""Specific latents shown per category."""


@dataclass(frozen=True, kw_only=True)
class CardView:
    role: str
    """"shared core (k of n categories)" or "specific to <category>"."""
    html: Markup
    markdown: str


@dataclass(frozen=True, kw_only=True)
class ModelFeatures:
    model_key: str
    cards: list[CardView]
    note: str
    """What is shown, or why nothing is."""


def _toxic_nodes(layout: Layout, model_key: str, categories: list[str]) -> dict[str, list[dict]]:
    """category -> its toxic circuit's latent nodes (error nodes left out), largest effect first."""
    out = {}
    for c in categories:
        path = layout.circuit_summary(model_key, c)
        if not path.is_file():
            continue
        group = json.loads(path.read_text()).get("groups", {}).get("toxic", {})
        nodes = [n for n in group.get("nodes", []) if not n.get("is_error")]
        out[c] = sorted(nodes, key=lambda n: -abs(n.get("effect", 0.0)))
    return out


def _card(cards: dict[str, SiteFeatures], site_key: str, latent: int, role: str) -> CardView:
    card = cards[site_key].card(latent)
    return CardView(role=role, html=Markup(card_html(card)), markdown=card_markdown(card))


def model_features(layout: Layout, model_key: str, categories: list[str]) -> ModelFeatures:
    nodes = _toxic_nodes(layout, model_key, categories)
    members: dict[tuple[str, int], set[str]] = {}
    for c, ns in nodes.items():
        for n in ns:
            members.setdefault((n["site"], int(n["latent"])), set()).add(c)
    cards: dict[str, SiteFeatures] = {}
    for site in sorted({s for s, _ in members}):
        path = layout.feature_cards(f"{model_key}__{site}")
        if path.is_file():
            cards[f"{model_key}__{site}"] = read_cards(path)
    if not nodes or not cards:
        return ModelFeatures(
            model_key=model_key, cards=[], note="no circuits or no feature cards materialized"
        )
    n_cat = len(nodes)
    views = []
    core = sorted(
        (k for k, cs in members.items() if len(cs) >= max(2, (n_cat + 1) // 2)),
        key=lambda k: (-len(members[k]), k),
    )
    for site, latent in core:
        if f"{model_key}__{site}" in cards:
            role = f"shared core ({len(members[(site, latent)])} of {n_cat} categories)"
            views.append(_card(cards, f"{model_key}__{site}", latent, role))
    for c, ns in sorted(nodes.items()):
        specific = [n for n in ns if members[(n["site"], int(n["latent"]))] == {c}]
        for n in specific[:N_SPECIFIC]:
            if f"{model_key}__{n['site']}" in cards:
                views.append(
                    _card(cards, f"{model_key}__{n['site']}", int(n["latent"]), f"specific to {c}")
                )
    note = (
        f"{len(core)} shared-core latents (in the toxic circuits of at least half of the {n_cat} "
        f"categories) and up to {N_SPECIFIC} specific latents per category, largest effect first."
    )
    return ModelFeatures(model_key=model_key, cards=views, note=note)


def features_section(
    cfg: ProjectConfig, layout: Layout, categories: list[str]
) -> list[ModelFeatures]:
    return [model_features(layout, m.model_key, categories) for m in cfg.models]
