"""Scoring and generation of prompts under whatever hooks are active, judged like
``refusal_behaviour``.

Every pass reuses the project's batched code: :func:`refusal_assets.lm.prefill.prefill` (the shared
prompt prefix computed once per batch; with an ablation active the prefix is computed under it too)
and :func:`refusal_assets.lm.behaviour.generate` (the batched cached greedy decoder, stopping a row
once the refusal judge has settled it), scored by ``refusal_score_from_logits`` and judged by
``judge_refusal`` with the model's refusal phrases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.circuits.ablation import resumed_blocks
from refusal_assets.config import ModelConfig
from refusal_assets.directions.hooks import RowInterventions, activation_addition
from refusal_assets.directions.prompts import PromptRow
from refusal_assets.lm.behaviour import (
    generate,
    judge_refusal,
    refusal_score_from_logits,
    refusal_token_ids,
    wilson_interval,
)
from refusal_assets.lm.chat import batches, encode_chat
from refusal_assets.lm.prefill import (
    cache_kwargs,
    last_logits,
    own_token_inputs,
    prefill,
    prefix_pass,
)
from refusal_assets.lm.sites import Site


@dataclass(frozen=True, kw_only=True)
class Rate:
    """k of n judged refusing, with the 95 % Wilson interval (NaN when n = 0)."""

    k: int
    n: int
    rate: float
    ci_lo: float
    ci_hi: float

    @classmethod
    def of(cls, flags: list[bool]) -> "Rate":
        k, n = int(sum(flags)), len(flags)
        lo, hi = wilson_interval(k, n)
        return cls(k=k, n=n, rate=k / n if n else math.nan, ci_lo=lo, ci_hi=hi)

    def text(self) -> str:
        if not self.n:
            return "n/a (no prompts)"
        return f"{self.rate:.2f} [{self.ci_lo:.2f}, {self.ci_hi:.2f}] ({self.k}/{self.n})"


@dataclass(frozen=True, kw_only=True)
class Judged:
    """Greedy generations of some prompts under one intervention."""

    prompt_ids: list[str]
    responses: list[str]
    refused: list[bool]
    scores: np.ndarray
    """[N] first-token refusal scores of the same passes."""

    @property
    def rate(self) -> Rate:
        return Rate.of(self.refused)

    @classmethod
    def empty(cls) -> "Judged":
        return cls(prompt_ids=[], responses=[], refused=[], scores=np.zeros(0))


@dataclass(frozen=True, kw_only=True)
class Intervened:
    """Prompts to generate from under one intervention (None: none)."""

    rows: list[PromptRow]
    ablate: torch.Tensor | None = None
    """[d]: projected out at every layer and position."""
    add: torch.Tensor | None = None
    """[d]: added to the input of the ``add_layer`` block at every position."""


@dataclass
class Scorer:
    """A model with what scoring and judging it needs; calls run under the caller's hooks."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: ModelConfig
    device: str = "cpu"

    def __post_init__(self) -> None:
        ids = refusal_token_ids(
            self.tokenizer, self.cfg.refusal.phrases, self.cfg.refusal.refusal_tokens
        )
        self.refusal_ids = torch.tensor(ids, device=self.device)

    def _batches(self, rows: list[PromptRow]):
        system = self.cfg.chat_template.system_prompt
        for chunk in batches([r.prompt for r in rows], self.cfg.batch_size):
            yield encode_chat(self.tokenizer, chunk, system).to(self.device)

    @torch.no_grad()
    def last_logits(self, rows: list[PromptRow]) -> torch.Tensor:
        """[N, vocab] float next-token logits at each prompt's last position."""
        if not rows:
            return torch.zeros(0, len(self.tokenizer))
        return torch.cat(
            [prefill(self.model, b).last_logits.float().cpu() for b in self._batches(rows)]
        )

    def scores_from_logits(self, logits: torch.Tensor) -> np.ndarray:
        """[N] refusal scores from next-token logits [N, vocab]."""
        if not len(logits):
            return np.zeros(0)
        return refusal_score_from_logits(logits, self.refusal_ids.cpu()).numpy().astype(float)

    def scores(self, rows: list[PromptRow]) -> np.ndarray:
        """[N] first-token refusal scores."""
        return self.scores_from_logits(self.last_logits(rows))

    @torch.no_grad()
    def added_scores(
        self, rows: list[PromptRow], vectors: list[torch.Tensor], layer: int
    ) -> np.ndarray:
        """[V, N] first-token refusal scores of ``rows`` with each of ``vectors`` [d] added to block
        ``layer``'s input at every position: the scores under
        :func:`refusal_assets.directions.hooks.activation_addition` (a test compares), cheaper.
        The blocks before ``layer`` never see the addition, so each batch's clean pass up to
        ``layer`` is computed once, and per vector only the shared prefix (one row, under the
        addition) and the later blocks over the rows' own tokens run
        (:func:`refusal_assets.circuits.ablation.resumed_blocks`)."""
        out = np.zeros((len(vectors), len(rows)))
        if not rows or not vectors:
            return out
        if layer < 1:  # nothing before the addition to reuse
            for v_i, v in enumerate(vectors):
                with activation_addition(self.model, v, layer):
                    out[v_i] = self.scores(rows)
            return out
        site, start = Site(layer - 1, "resid"), 0
        for batch in self._batches(rows):
            clean = prefill(self.model, batch, [site], stop_early=True)
            L, B = clean.prefix_length, len(batch.input_ids)
            # own-token layout [B, T - L, d]: each row's own tokens flush right, as the pass needs
            block_input = clean.site_outputs[site][:, L:]
            for v_i, v in enumerate(vectors):
                cache = DynamicCache(config=self.model.config)
                if L:
                    with activation_addition(self.model, v, layer):
                        prefix_pass(self.model, batch, L, cache)
                    cache.batch_repeat_interleave(B)
                added = block_input + v.to(block_input)  # [B, T - L, d]
                with resumed_blocks(self.model, layer - 1, added):
                    logits = last_logits(
                        self.model,
                        **own_token_inputs(batch, L),
                        **cache_kwargs(self.model.base_model, cache),
                    ).logits
                out[v_i, start : start + B] = self.scores_from_logits(logits.float().cpu())
            start += B
        return out

    def judge_groups(
        self, groups: list[Intervened], max_new_tokens: int, add_layer: int = 0
    ) -> list[Judged]:
        """:meth:`judge` of each group under its own intervention, in one generation: every group's
        batches are prefilled under its intervention and all rows are decoded together, each under
        its own (:class:`refusal_assets.directions.hooks.RowInterventions`), since a decode step
        costs about the same for 8 rows as for 64. The same tokens as one ``judge`` per group
        under :func:`direction_ablation` / :func:`activation_addition` (a test compares)."""
        chunks, ablate, add, owner = [], [], [], []
        for g_i, g in enumerate(groups):
            for chunk in self._batches(g.rows):
                chunks.append(chunk)
                ablate.append(g.ablate)
                add.append(g.add)
                owner.append(g_i)
        if not chunks:
            return [Judged.empty() for _ in groups]
        interventions = RowInterventions(self.model, ablate, add, add_layer)
        with interventions.registered():
            gen = generate(
                self.model,
                self.tokenizer,
                chunks,
                max_new_tokens,
                stop_phrases=self.cfg.refusal.phrases,
                row_state=interventions,
            )
        scores = self.scores_from_logits(gen.first_logits.float().cpu())
        out, start = [], 0
        for g in groups:
            end = start + len(g.rows)
            texts = gen.responses[start:end]
            out.append(
                Judged(
                    prompt_ids=[r.prompt_id for r in g.rows],
                    responses=texts,
                    refused=[judge_refusal(t, self.cfg.refusal.phrases) for t in texts],
                    scores=scores[start:end],
                )
            )
            start = end
        return out

    def judge(self, rows: list[PromptRow], max_new_tokens: int) -> Judged:
        """Greedy generation (all prefill chunks decoded together) judged by the refusal phrases."""
        if not rows:
            return Judged.empty()
        gen = generate(
            self.model,
            self.tokenizer,
            list(self._batches(rows)),
            max_new_tokens,
            stop_phrases=self.cfg.refusal.phrases,
        )
        scores = (
            refusal_score_from_logits(gen.first_logits.float(), self.refusal_ids)
            .cpu()
            .numpy()
            .astype(float)
        )
        return Judged(
            prompt_ids=[r.prompt_id for r in rows],
            responses=gen.responses,
            refused=[judge_refusal(t, self.cfg.refusal.phrases) for t in gen.responses],
            scores=scores,
        )


def kl_last_position(clean_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(clean || intervened) of the next-token distributions [N, vocab]."""
    p_log = torch.log_softmax(clean_logits.float(), -1)
    q_log = torch.log_softmax(logits.float(), -1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def random_direction(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random direction with the norm of ``like`` [d] (the control)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(like.shape, generator=g)
    return (r / r.norm() * like.float().norm()).to(like.dtype)


def bootstrap_mean_ci(x: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % CI of the mean (NaN with fewer than 2 values)."""
    x = np.asarray(x, float)
    if len(x) < 2:
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, len(x), (n, len(x)))  # [n, N]
    means = x[idx].mean(1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
