"""Typed feature cards, and the one-JSON-file-per-site export they are read back from.

Cards JSON layout (``storage/<config>/features/<site_key>/cards.json``, UTF-8)::

    {
      "format": "refusal_assets.features/1",
      "site_key": "qwen2.5-coder-0.5b__resid12",  "d_sae": 1792,
      "n_rows": 40212,            # stored rows scanned (massive-activation rows excluded)
      "n_distinct_rows": 21350,   # rows whose vector had not been seen before (example candidates)
      "n_massive_rows": 12,       # rows above the SAE's max_input_norm: skipped
      "window_radius": 6,         # tokens each side of an example's token
      "histogram_edges": [0.001, ...],   # 61 log-spaced bin edges, shared by every histogram
      "refusal_direction": "pooled.layer12 of refusal_direction" | "<why it is absent>",
      "prompts": {"<prompt_id>": {"prompt": "...", "category": "privacy", "split": "toxic",
                                   "tokens": ["<|im_start|>", "system", ...]}},  # chat tokens
      "latents": [     # every latent, index order (dead ones: "live": false, no examples)
        {"latent": 0, "live": true, "annotation": null | "label", "description": "one line",
         "n_fires": 311, "firing_frequency": 0.0077, "max_activation": 3.1,
         "mean_activation": 0.012,   # over every scanned row
         "mean_when_firing": 1.6, "histogram": [counts per bin],
         "refusal_cosine": 0.21 | null,
         "logit_lens": {"top": [["token", score], ...10], "bottom": [["token", score], ...10]},
         "groups": [{"category": "privacy", "split": "toxic", "n_rows": 812,
                     "firing_rate": 0.02, "mean_activation": 0.03}, ...],
         "top_examples": [{"rank": 1, "prompt_id": "...", "token_index": 41, "activation": 3.1,
                           "window_start": 35,        # token index of window[0]
                           "window": [0.0, null, ...]}, ...],   # null: token not stored
         "quantile_examples": [{"quantile": 0.25, ... same keys as top_examples ...}]}
      ]
    }

An example's tokens are ``prompts[prompt_id]["tokens"][window_start : window_start + len(window)]``
(the list may be shorter at a prompt's ends); its own token is ``tokens[token_index]``.
:func:`read_cards` turns the file back into :class:`SiteFeatures`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

FORMAT = "refusal_assets.features/1"

_Record = TypeVar("_Record", "FeatureCard", "SiteFeatures")


@dataclass(frozen=True, kw_only=True)
class WindowToken:
    token_index: int
    token: str
    activation: float | None
    """The latent's activation at this token; None where the token has no stored row."""


@dataclass(frozen=True, kw_only=True)
class Example:
    """One stored row where the latent fires: the prompt, the token and the tokens around it."""

    rank: int
    """1 = highest (top examples); position in the quantile list otherwise."""
    quantile: float | None
    """Lower-quantile examples: the quantile of the latent's firing activations it stands for."""
    prompt_id: str
    prompt: str
    category: str
    split: str
    token_index: int
    token: str
    activation: float
    row: int
    """Index of the stored row over the scanned files in order (every row counted)."""
    window: tuple[WindowToken, ...]


@dataclass(frozen=True, kw_only=True)
class GroupRate:
    """The latent on one category x split: firing rate and mean activation over its rows."""

    category: str
    split: str
    n_rows: int
    firing_rate: float
    mean_activation: float


@dataclass(frozen=True, kw_only=True)
class TokenScore:
    token: str
    score: float


@dataclass(frozen=True, kw_only=True)
class FeatureCard:
    site_key: str
    latent: int
    live: bool
    """Fired on at least one scanned row."""
    annotation: str | None
    description: str
    n_fires: int
    firing_frequency: float
    max_activation: float
    mean_activation: float
    mean_when_firing: float
    histogram: tuple[int, ...]
    refusal_cosine: float | None
    logit_top: tuple[TokenScore, ...]
    logit_bottom: tuple[TokenScore, ...]
    groups: tuple[GroupRate, ...]
    top_examples: tuple[Example, ...]
    quantile_examples: tuple[Example, ...]

    def top_context_tokens(self, n: int = 5) -> list[str]:
        """The distinct tokens of the top examples, most frequent first (ties: by rank)."""
        counts: dict[str, int] = {}
        for ex in self.top_examples:
            tok = ex.token.strip() or ex.token  # a whitespace token stays itself
            counts[tok] = counts.get(tok, 0) + 1
        return sorted(counts, key=lambda t: -counts[t])[:n]


@dataclass(frozen=True, kw_only=True)
class SiteFeatures:
    """All cards of one site (every latent, index order) and the scan's totals."""

    site_key: str
    d_sae: int
    n_rows: int
    n_distinct_rows: int
    n_massive_rows: int
    window_radius: int
    histogram_edges: tuple[float, ...]
    refusal_direction: str
    """Where the refusal cosines come from, or why they are absent."""
    cards: tuple[FeatureCard, ...]

    def card(self, latent: int) -> FeatureCard:
        if not 0 <= latent < len(self.cards):
            raise KeyError(f"{self.site_key}: no latent {latent} (d_sae {self.d_sae})")
        return self.cards[latent]

    @property
    def live(self) -> list[FeatureCard]:
        return [c for c in self.cards if c.live]


def _num(x: float | None, digits: int = 5) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _example_json(ex: Example) -> dict:
    out: dict = (
        {"rank": ex.rank} if ex.quantile is None else {"quantile": ex.quantile, "rank": ex.rank}
    )
    return {
        **out,
        "prompt_id": ex.prompt_id,
        "token_index": ex.token_index,
        "activation": _num(ex.activation, 7),
        "row": ex.row,
        "window_start": ex.window[0].token_index if ex.window else ex.token_index,
        # 4 decimals: a display value (the exact one is "activation")
        "window": [None if w.activation is None else round(w.activation, 4) for w in ex.window],
    }


def cards_json(features: SiteFeatures, prompts: dict[str, tuple[str, str, str, list[str]]]) -> str:
    """The export (layout in the module doc).

    ``prompts``: prompt_id -> (text, category, split, tokens).
    """
    latents = []
    for c in features.cards:
        latents.append(
            {
                "latent": c.latent,
                "live": c.live,
                "annotation": c.annotation,
                "description": c.description,
                "n_fires": c.n_fires,
                "firing_frequency": _num(c.firing_frequency),
                "max_activation": _num(c.max_activation, 7),
                "mean_activation": _num(c.mean_activation),
                "mean_when_firing": _num(c.mean_when_firing),
                "histogram": list(c.histogram),
                "refusal_cosine": _num(c.refusal_cosine),
                "logit_lens": {
                    "top": [[t.token, _num(t.score, 4)] for t in c.logit_top],
                    "bottom": [[t.token, _num(t.score, 4)] for t in c.logit_bottom],
                },
                "groups": [
                    {
                        "category": g.category,
                        "split": g.split,
                        "n_rows": g.n_rows,
                        "firing_rate": _num(g.firing_rate),
                        "mean_activation": _num(g.mean_activation),
                    }
                    for g in c.groups
                ],
                "top_examples": [_example_json(e) for e in c.top_examples],
                "quantile_examples": [_example_json(e) for e in c.quantile_examples],
            }
        )
    doc = {
        "format": FORMAT,
        "site_key": features.site_key,
        "d_sae": features.d_sae,
        "n_rows": features.n_rows,
        "n_distinct_rows": features.n_distinct_rows,
        "n_massive_rows": features.n_massive_rows,
        "window_radius": features.window_radius,
        "histogram_edges": [_num(e) for e in features.histogram_edges],
        "refusal_direction": features.refusal_direction,
        "prompts": {
            pid: {"prompt": text, "category": cat, "split": split, "tokens": tokens}
            for pid, (text, cat, split, tokens) in sorted(prompts.items())
        },
        "latents": latents,
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _example(d: dict, prompts: dict, quantile: bool) -> Example:
    p = prompts[d["prompt_id"]]
    tokens = p["tokens"]
    start = d["window_start"]
    window = tuple(
        WindowToken(token_index=start + j, token=tokens[start + j], activation=a)
        for j, a in enumerate(d["window"])
        if 0 <= start + j < len(tokens)
    )
    return Example(
        rank=d["rank"],
        quantile=d["quantile"] if quantile else None,
        prompt_id=d["prompt_id"],
        prompt=p["prompt"],
        category=p["category"],
        split=p["split"],
        token_index=d["token_index"],
        token=tokens[d["token_index"]],
        activation=d["activation"],
        row=d["row"],
        window=window,
    )


def read_cards(path: Path) -> SiteFeatures:
    """A site's cards JSON as :class:`SiteFeatures`; a missing or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature cards not found: {path} (materialize features first)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rematerialize features") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file; rematerialize features")
    prompts, site_key = doc["prompts"], doc["site_key"]
    cards = tuple(
        _from_record(
            FeatureCard,
            c,
            site_key=site_key,
            histogram=tuple(c["histogram"]),
            logit_top=tuple(TokenScore(token=t, score=s) for t, s in c["logit_lens"]["top"]),
            logit_bottom=tuple(TokenScore(token=t, score=s) for t, s in c["logit_lens"]["bottom"]),
            groups=tuple(GroupRate(**g) for g in c["groups"]),
            top_examples=tuple(_example(e, prompts, False) for e in c["top_examples"]),
            quantile_examples=tuple(_example(e, prompts, True) for e in c["quantile_examples"]),
        )
        for c in doc["latents"]
    )
    return _from_record(
        SiteFeatures, doc, histogram_edges=tuple(doc["histogram_edges"]), cards=cards
    )


def _from_record(cls: type[_Record], record: dict[str, Any], **converted: Any) -> _Record:
    """A cards dataclass from its JSON object: the fields in ``converted`` as given (the ones JSON
    cannot hold as they are), every other field read from ``record`` under its own name, so the
    field lists live in the dataclasses alone. A missing key is a ``KeyError``, as it always was."""
    plain = {f.name: record[f.name] for f in fields(cls) if f.name not in converted}
    return cls(**plain, **converted)
