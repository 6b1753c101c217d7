"""The model passes every circuit step shares: a prompt batch split at its post-instruction span
(the prefix's KV cache computed once), the refusal score of a batch, and the mean-ablation baseline."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.lm.behaviour import refusal_score_from_logits
from refusal_assets.lm.chat import ChatBatch, batches, encode_chat
from refusal_assets.lm.prefill import cache_kwargs, last_logits, prefill
from refusal_assets.lm.sites import Site


@dataclass
class Baseline:
    """Mean latents and mean error per site at each post-instruction offset (the mean ablation)."""

    f_mean: dict[Site, torch.Tensor]  # [P, d_sae]
    err_mean: dict[Site, torch.Tensor]  # [P, d]


def post_positions(batch: ChatBatch) -> torch.Tensor:
    """[B, P] indices of the post-instruction tokens; the template suffix has the same length P."""
    counts = batch.post_instruction.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(
            f"post-instruction spans differ in length across prompts: {counts.tolist()}"
        )
    return batch.post_instruction.nonzero(as_tuple=True)[1].view(len(counts), -1)


def _gather(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, T, d], pos [B, P] -> [B, P, d]."""
    return torch.gather(x, 1, pos[..., None].expand(-1, -1, x.shape[-1]))


@dataclass
class SuffixBatch:
    """A batch split at the post-instruction span, which ends every prompt: the prefix's KV cache
    is computed once without gradients; every intervention and every gradient then needs only the
    P suffix tokens. (Ablations and node effects touch post-instruction positions only, and the
    prefix does not depend on them.)"""

    cache: object  # transformers Cache for the prefix
    suffix_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, cached + P]: the cache's positions, then the suffix
    position_ids: torch.Tensor  # [B, P]

    def inputs(self, model: nn.Module) -> dict:
        cache = copy.deepcopy(
            self.cache
        )  # a forward appends to the cache: keep the prefix pristine
        return dict(
            input_ids=self.suffix_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            use_cache=True,
            **cache_kwargs(model, cache),
        )

    def run(self, model: nn.Module, **kwargs):
        """``model``'s forward on the suffix (the model, or its ``base_model`` for hidden states only)."""
        return model(**self.inputs(model), **kwargs)

    def next_logits(self, model: PreTrainedModel) -> torch.Tensor:
        """[B, vocab] next-token logits after the suffix (:func:`refusal_assets.lm.prefill.last_logits`)."""
        return last_logits(model, **self.inputs(model.base_model)).logits


@torch.no_grad()
def split_prefix(model: PreTrainedModel, batch: ChatBatch) -> SuffixBatch:
    pos = post_positions(batch)  # [B, P]
    T, P = batch.input_ids.shape[1], pos.shape[1]
    if not bool((pos == torch.arange(T - P, T, device=pos.device)).all()):
        raise ValueError(
            "the post-instruction tokens do not end the prompt; check the chat template"
        )
    head = ChatBatch(
        batch.input_ids[:, : T - P],
        batch.attention_mask[:, : T - P],
        batch.position_ids[:, : T - P],
        batch.post_instruction[:, : T - P],
    )
    pre = prefill(
        model, head, logits=False
    )  # the template head once, then each prompt's own tokens
    # the suffix follows the prefill's own layout: [shared head][padding][own tokens][suffix]
    suffix_positions = pre.next_position[:, None] + torch.arange(P, device=pos.device)  # [B, P]
    mask = torch.cat([pre.attention_mask, pre.attention_mask.new_ones(len(pos), P)], dim=1)
    return SuffixBatch(pre.cache, batch.input_ids[:, T - P :], mask, suffix_positions)


def batch_refusal_score(
    model: PreTrainedModel, batch: "ChatBatch | SuffixBatch", refusal_ids: torch.Tensor
) -> torch.Tensor:
    """Refusal score [B] at the last prompt position (differentiable)."""
    if isinstance(batch, SuffixBatch):
        logits = batch.next_logits(model).float()
    else:
        logits = last_logits(model, **batch.model_inputs(), use_cache=False).logits.float()
    return refusal_score_from_logits(logits, refusal_ids)


def prepare_suffixes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
) -> list[SuffixBatch]:
    """Prefix caches for ``prompts``, computed once and reused by every ablation of a sweep."""
    return [
        split_prefix(model, encode_chat(tokenizer, chunk, system_prompt).to(device))
        for chunk in batches(prompts, batch_size)
    ]


def compute_baseline(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    saes: dict[Site, nn.Module],
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
) -> Baseline:
    """Means of latents and errors over ``prompts`` (the safe split) at each post-instruction offset."""
    (baseline,) = compute_baselines(
        model, tokenizer, prompts, [saes], batch_size, system_prompt, device
    )
    return baseline


@torch.no_grad()
def compute_baselines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sae_sets: Sequence[dict[Site, nn.Module]],
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
) -> list[Baseline]:
    """:func:`compute_baseline` for each of ``sae_sets`` (SAEs at the same sites) from one forward
    pass: only the encoding differs between dictionaries."""
    from refusal_assets.lm.activations import forward_sites

    sites = sorted(sae_sets[0])
    f_sum: list[dict[Site, torch.Tensor]] = [{} for _ in sae_sets]
    e_sum: list[dict[Site, torch.Tensor]] = [{} for _ in sae_sets]
    n = 0
    for chunk in batches(prompts, batch_size):
        batch = encode_chat(tokenizer, chunk, system_prompt).to(device)
        pos = post_positions(batch)
        acts = forward_sites(model, batch, sites)
        for s in sites:
            x = _gather(acts[s], pos).float()  # [B, P, d]
            for saes, fs, es in zip(sae_sets, f_sum, e_sum):
                f = saes[s].encode(x)
                err = x - saes[s].decode(f)
                fs[s] = fs.get(s, 0) + f.sum(0)
                es[s] = es.get(s, 0) + err.sum(0)
        n += len(chunk)
    if n == 0:
        raise ValueError("the mean-ablation baseline needs at least one safe prompt")
    return [
        Baseline({s: fs[s] / n for s in sites}, {s: es[s] / n for s in sites})
        for fs, es in zip(f_sum, e_sum)
    ]
