"""The ``features`` asset's files: ``top_examples.parquet``, ``latents.parquet`` and ``cards.json``.

``top_examples.parquet``: one row per (latent, rank) of the top examples: ``latent`` (int32),
``rank`` (int32, 1 = highest), ``prompt_id``, ``token_index`` (int32), ``activation`` (float32, the
SAE's activation at that stored row), ``token``, ``category`` (the activation file's category, or
``corpus``), ``split``, ``row`` (int64, the row's index over the scanned files in order).

``latents.parquet``: one row per latent: ``latent``, ``live``, ``n_fires``, ``firing_frequency``,
``max_activation``, ``mean_activation`` (over every scanned row), ``mean_when_firing``,
``refusal_cosine`` (null without a refusal direction), ``context_tokens`` (the distinct tokens of
its top examples, most frequent first), ``lens_top_tokens`` / ``lens_top_scores`` and
``lens_bottom_tokens`` / ``lens_bottom_scores`` (10 each), ``annotation``, ``description``, and per
category x split ``firing_rate.<category>.<split>`` and ``mean_activation.<category>.<split>``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa

from refusal_assets.features.annotations import describe_latent
from refusal_assets.features.cards import SiteFeatures, cards_json
from refusal_assets.features.site import SiteFeaturesResult
from refusal_assets.storage import read_parquet, write_parquet, write_text


def top_examples_table(features: SiteFeatures) -> pa.Table:
    rows = [
        {
            "latent": c.latent,
            "rank": e.rank,
            "prompt_id": e.prompt_id,
            "token_index": e.token_index,
            "activation": e.activation,
            "token": e.token,
            "category": e.category,
            "split": e.split,
            "row": e.row,
        }
        for c in features.cards
        for e in c.top_examples
    ]
    schema = {
        "latent": pl.Int32,
        "rank": pl.Int32,
        "prompt_id": pl.Utf8,
        "token_index": pl.Int32,
        "activation": pl.Float32,
        "token": pl.Utf8,
        "category": pl.Utf8,
        "split": pl.Utf8,
        "row": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema).to_arrow()


def latents_table(features: SiteFeatures) -> pa.Table:
    rows = []
    for c in features.cards:
        row = {
            "latent": c.latent,
            "live": c.live,
            "n_fires": c.n_fires,
            "firing_frequency": c.firing_frequency,
            "max_activation": c.max_activation,
            "mean_activation": c.mean_activation,
            "mean_when_firing": c.mean_when_firing,
            "refusal_cosine": c.refusal_cosine,
            "context_tokens": c.top_context_tokens(10),
            "lens_top_tokens": [t.token for t in c.logit_top],
            "lens_top_scores": [t.score for t in c.logit_top],
            "lens_bottom_tokens": [t.token for t in c.logit_bottom],
            "lens_bottom_scores": [t.score for t in c.logit_bottom],
            "annotation": c.annotation,
            "description": c.description,
        }
        for g in c.groups:
            row[f"firing_rate.{g.category}.{g.split}"] = g.firing_rate
            row[f"mean_activation.{g.category}.{g.split}"] = g.mean_activation
        rows.append(row)
    frame = pl.DataFrame(rows, infer_schema_length=None)
    return frame.with_columns(
        pl.col("latent").cast(pl.Int32), pl.col("refusal_cosine").cast(pl.Float64)
    ).to_arrow()


def write_site_features(
    result: SiteFeaturesResult, top_examples: Path, latents: Path, cards: Path
) -> None:
    """The three files; the cards JSON last, so its presence marks a complete site."""
    write_parquet(top_examples_table(result.features), top_examples)
    write_parquet(latents_table(result.features), latents)
    write_text(cards_json(result.features, result.prompts), cards)


def latent_descriptions(latents: Path, labels: dict[int, str] | None = None) -> dict[int, str]:
    """latent -> one-line description from a site's ``latents.parquet``, with ``labels`` (the
    annotations, possibly newer than the file) taking precedence."""
    frame = pl.from_arrow(read_parquet(latents, "feature latents"))
    labels = labels or {}
    out = {}
    for r in frame.select(
        "latent", "live", "context_tokens", "lens_top_tokens", "annotation"
    ).iter_rows():
        latent, live, context, lens, annotation = r
        out[int(latent)] = describe_latent(
            labels.get(int(latent), annotation), live, list(context), list(lens)
        )
    return out
