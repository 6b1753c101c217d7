"""A site's cards from a storage root: the inputs the ``features`` asset (and its benchmark) read,
gathered in one place, then :func:`refusal_assets.features.site.site_features`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from refusal_assets.config import ProjectConfig
from refusal_assets.features import annotations as notes
from refusal_assets.features.lens import lens_inputs, pooled_direction
from refusal_assets.features.scan import CORPUS, ActivationSource
from refusal_assets.features.site import SiteFeaturesResult, chat_tokens, site_features
from refusal_assets.layout import Layout
from refusal_assets.lm.models import load_model
from refusal_assets.lm.sites import Site
from refusal_assets.prompts import orbench as data
from refusal_assets.sae.files import CFG_FILE, load_sae


def compute_site_features(
    cfg: ProjectConfig,
    layout: Layout,
    site_key: str,
    categories: Sequence[str],
    directions_path: Path | None,
    log: Callable[[str], None] = print,
) -> SiteFeaturesResult:
    """Cards of one site: its SAE, the stored rows of ``categories`` (and of the SAE corpus when
    the config has one), their prompts, the model's unembedding (loaded, never run), the labels of
    ``configs/annotations/<model_key>.yaml`` and the pooled refusal direction in
    ``directions_path`` (None or a missing file: cosines left null)."""
    model_cfg = next((m for m in cfg.models if site_key in m.site_keys), None)
    if model_cfg is None:
        raise ValueError(f"site {site_key!r} is not a site of config {cfg.name!r}")
    site = Site.parse(site_key.split("__", 1)[1])
    sources = [
        ActivationSource(path=layout.activations(site_key, c), category=c) for c in categories
    ]
    frames = [layout.load_sample(c).select("prompt_id", "prompt") for c in categories]
    if cfg.sae.corpus:
        corpus_rows = layout.sae_corpus_activations(site_key)
        sources.append(ActivationSource(path=corpus_rows, category=CORPUS))
        frames.append(data.load_corpus(cfg.sae.corpus, cfg.resolve).select("prompt_id", "prompt"))
    prompt_text = dict(pl.concat(frames).unique("prompt_id").iter_rows())
    sae = load_sae(layout.sae(site_key))
    sae_cfg = json.loads((layout.sae(site_key) / CFG_FILE).read_text(encoding="utf-8"))
    labels = notes.load_annotations(
        notes.annotation_path(cfg.root, model_cfg.model_key),
        {s.name: (sae.d_sae if s == site else None) for s in model_cfg.sites},
    )
    direction, note = pooled_direction(directions_path, site.layer)
    model, tokenizer = load_model(model_cfg, cfg.resolve, "cpu", log)  # weights only: never run
    return site_features(
        sources,
        sae,
        site_key=site_key,
        prompt_text=prompt_text,
        tokenize=chat_tokens(tokenizer, model_cfg.chat_template.system_prompt),
        lens_inputs=lens_inputs(model, tokenizer),
        refusal_direction=direction,
        refusal_note=note,
        annotations=labels.get(site.name, {}),
        max_input_norm=float(sae_cfg.get("max_input_norm") or "inf"),
    )
