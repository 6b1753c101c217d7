"""A site's feature cards: the streaming scan, the logit lens and the refusal cosine, assembled.

:func:`site_features` is the one call the ``features`` asset makes per site. Example tokens come
from re-tokenising the prompts with the chat template (no model pass): ``token_index`` counts the
rendered chat's tokens from its first one, as the activation writer stored it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from refusal_assets.features.annotations import describe_latent
from refusal_assets.features.cards import (
    Example,
    FeatureCard,
    GroupRate,
    SiteFeatures,
    TokenScore,
    WindowToken,
)
from refusal_assets.features.lens import LensInputs, LensTable, logit_lens, refusal_cosines
from refusal_assets.features.scan import (
    HISTOGRAM_EDGES,
    ActivationSource,
    ExampleSlots,
    SiteScan,
    scan_site,
)
from refusal_assets.lm.chat import encode_chat
from refusal_assets.sae.model import TopKSAE

QUANTILES = (0.1, 0.25, 0.5, 0.75)
"""Lower-quantile examples: the sampled firing rows nearest these quantiles of the activations."""


@dataclass(frozen=True, kw_only=True)
class SiteFeaturesResult:
    """The cards, the prompts their examples show (prompt_id -> (text, category, split, tokens))
    for the export, and the time the pass and the lens took."""

    features: SiteFeatures
    prompts: dict[str, tuple[str, str, str, list[str]]]
    scan_seconds: float
    lens_seconds: float


def chat_tokens(tokenizer, system_prompt: str | None) -> Callable[[str], list[str]]:
    """prompt -> the text of each token of its chat rendering, as ``token_index`` counts them."""
    cache: dict[int, str] = {}

    def tokens(prompt: str) -> list[str]:
        ids = encode_chat(tokenizer, [prompt], system_prompt).input_ids[0].tolist()
        for i in ids:
            if i not in cache:
                cache[i] = tokenizer.decode([i])
        return [cache[i] for i in ids]

    return tokens


def _quantile_slots(
    sample: ExampleSlots, latent: int, exclude: set[int]
) -> list[tuple[float, int]]:
    """(quantile, sample slot) pairs: per QUANTILES the sampled firing row nearest it, once each."""
    filled = np.flatnonzero(sample.row[:, latent] >= 0)
    filled = np.array(
        [s for s in filled if int(sample.row[s, latent]) not in exclude], dtype=np.int64
    )
    if filled.size == 0:
        return []
    order = filled[np.argsort(sample.activation[filled, latent], kind="stable")]
    picked: list[tuple[float, int]] = []
    for q in QUANTILES:
        slot = int(order[min(int(q * order.size), order.size - 1)])
        if all(s != slot for _, s in picked):
            picked.append((q, slot))
    return picked


class _Assembler:
    """Turns the scan's slots into typed examples, tokenising each shown prompt once."""

    def __init__(
        self, scan: SiteScan, prompt_text: Mapping[str, str], tokenize: Callable[[str], list[str]]
    ):
        self.scan, self.prompt_text, self.tokenize = scan, prompt_text, tokenize
        self.shown: dict[str, tuple[str, str, str, list[str]]] = {}

    def _prompt(self, code: int) -> tuple[str, str, str, list[str]]:
        pid = self.scan.prompt_ids[code]
        if pid not in self.shown:
            if pid not in self.prompt_text:
                raise ValueError(
                    f"prompt {pid} has stored activations but no text in the sample or corpus"
                )
            text = self.prompt_text[pid]
            self.shown[pid] = (
                text,
                self.scan.prompt_category[code],
                self.scan.prompt_split[code],
                self.tokenize(text),
            )
        return self.shown[pid]

    def example(
        self, slots: ExampleSlots, slot: int, latent: int, rank: int, quantile: float | None
    ) -> Example:
        code, t = int(slots.prompt[slot, latent]), int(slots.token_index[slot, latent])
        text, category, split, tokens = self._prompt(code)
        if t >= len(tokens):
            raise ValueError(
                f"prompt {self.scan.prompt_ids[code]}: stored token {t} but its chat rendering "
                f"has {len(tokens)} tokens; the activations predate this tokenizer or template"
            )
        r = self.scan.window_radius
        values = slots.window[
            slot, latent
        ].tolist()  # Python floats: per-item NumPy scalars are slow
        window = tuple(
            WindowToken(token_index=i, token=tokens[i], activation=None if a != a else a)  # NaN
            for i, a in zip(range(t - r, t + r + 1), values)
            if 0 <= i < len(tokens)
        )
        return Example(
            rank=rank,
            quantile=quantile,
            prompt_id=self.scan.prompt_ids[code],
            prompt=text,
            category=category,
            split=split,
            token_index=t,
            token=tokens[t],
            activation=float(slots.activation[slot, latent]),
            row=int(slots.row[slot, latent]),
            window=window,
        )


def build_cards(
    scan: SiteScan,
    *,
    site_key: str,
    prompt_text: Mapping[str, str],
    tokenize: Callable[[str], list[str]],
    lens: LensTable,
    cosines: np.ndarray | None,
    refusal_direction: str,
    annotations: Mapping[int, str],
) -> tuple[SiteFeatures, dict[str, tuple[str, str, str, list[str]]]]:
    """Every latent's card from the scan (see :class:`FeatureCard`), and the prompts they show."""
    assembler = _Assembler(scan, prompt_text, tokenize)
    n = max(scan.n_rows, 1)
    cards = []
    for j in range(scan.d_sae):
        n_fires = int(scan.n_fires[j])
        top = [
            assembler.example(scan.top, s, j, rank=s + 1, quantile=None)
            for s in range(scan.top.row.shape[0])
            if scan.top.row[s, j] >= 0
        ]
        shown = {e.row for e in top}
        quantile = [
            assembler.example(scan.sample, s, j, rank=i + 1, quantile=q)
            for i, (q, s) in enumerate(_quantile_slots(scan.sample, j, shown))
        ]
        groups = tuple(
            GroupRate(
                category=cat,
                split=split,
                n_rows=int(scan.group_rows[g]),
                firing_rate=float(scan.group_fires[g, j] / max(scan.group_rows[g], 1)),
                mean_activation=float(scan.group_sum[g, j] / max(scan.group_rows[g], 1)),
            )
            for g, (cat, split) in enumerate(scan.groups)
        )
        logit_top = tuple(
            TokenScore(token=lens.decode(int(i)), score=float(s))
            for i, s in zip(lens.top_ids[j], lens.top_scores[j])
        )
        logit_bottom = tuple(
            TokenScore(token=lens.decode(int(i)), score=float(s))
            for i, s in zip(lens.bottom_ids[j], lens.bottom_scores[j])
        )
        card = FeatureCard(
            site_key=site_key,
            latent=j,
            live=n_fires > 0,
            annotation=annotations.get(j),
            description="",
            n_fires=n_fires,
            firing_frequency=n_fires / n,
            max_activation=float(scan.max_activation[j]),
            mean_activation=float(scan.activation_sum[j] / n),
            mean_when_firing=float(scan.activation_sum[j] / n_fires) if n_fires else 0.0,
            histogram=tuple(int(c) for c in scan.histogram[j]),
            refusal_cosine=None if cosines is None else float(cosines[j]),
            logit_top=logit_top,
            logit_bottom=logit_bottom,
            groups=groups,
            top_examples=tuple(top),
            quantile_examples=tuple(quantile),
        )
        lens_tokens = [t.token for t in logit_top]
        description = describe_latent(
            card.annotation, card.live, card.top_context_tokens(), lens_tokens
        )
        cards.append(replace(card, description=description))
    features = SiteFeatures(
        site_key=site_key,
        d_sae=scan.d_sae,
        n_rows=scan.n_rows,
        n_distinct_rows=scan.n_distinct_rows,
        n_massive_rows=scan.n_massive_rows,
        window_radius=scan.window_radius,
        histogram_edges=tuple(float(e) for e in HISTOGRAM_EDGES),
        refusal_direction=refusal_direction,
        cards=tuple(cards),
    )
    return features, assembler.shown


def site_features(
    sources: Sequence[ActivationSource],
    sae: TopKSAE,
    *,
    site_key: str,
    prompt_text: Mapping[str, str],
    tokenize: Callable[[str], list[str]],
    lens_inputs: LensInputs,
    refusal_direction: torch.Tensor | None,
    refusal_note: str,
    annotations: Mapping[int, str] | None = None,
    max_input_norm: float = float("inf"),
) -> SiteFeaturesResult:
    """Cards for every latent of one site's SAE from its stored rows (one streaming pass), with the
    logit lens through ``lens_inputs`` and the cosine with ``refusal_direction`` (None: left null,
    ``refusal_note`` says why)."""
    t0 = time.perf_counter()
    scan = scan_site(sources, sae, max_input_norm=max_input_norm)
    t1 = time.perf_counter()
    lens = logit_lens(sae.W_dec, lens_inputs)
    cosines = refusal_cosines(sae.W_dec, refusal_direction)
    t2 = time.perf_counter()
    features, shown = build_cards(
        scan,
        site_key=site_key,
        prompt_text=prompt_text,
        tokenize=tokenize,
        lens=lens,
        cosines=cosines,
        refusal_direction=refusal_note,
        annotations=annotations or {},
    )
    return SiteFeaturesResult(
        features=features, prompts=shown, scan_seconds=t1 - t0, lens_seconds=t2 - t1
    )
