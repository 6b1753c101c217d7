"""One prefill per batch, with the prompt prefix that every prompt shares computed once.

Every chat prompt opens with the same system turn and user header (~24 of ~44 tokens for Qwen's
default template). :func:`prefill` runs that shared prefix once at batch size 1, repeats its KV
cache over the batch, and runs only each prompt's own tokens on top. The batch is laid out as
``[shared prefix][left padding][own tokens]``: the padding sits between the two, masked out, and
position ids count real tokens only, so every real token sees exactly the keys and positions it
sees in the plain left-padded batch (the results match it within float tolerance; tests compare).

The same pass can capture site outputs (for activations) and returns the KV cache and the
next-token logits (for generation and p_ref), so one prefill serves all three.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from refusal_assets.lm.chat import ChatBatch
from refusal_assets.lm.hooks import site_hooks, until_stopped
from refusal_assets.lm.sites import Site, decoder_layers, output_tensor


def cache_kwargs(model: nn.Module, cache: object) -> dict:
    """The KV cache as a forward argument: transformers 5 renamed ``past_key_values`` to ``cache``
    (the old name is removed in 5.40); 4.x only knows the old one."""
    name = (
        "cache"
        if "cache" in inspect.signature(type(model).forward).parameters
        else "past_key_values"
    )
    return {name: cache}


def output_cache(out) -> object:
    """The KV cache of a forward's output, under either name (see :func:`cache_kwargs`)."""
    return out["cache"] if "cache" in out else out.past_key_values


@contextlib.contextmanager
def capture(
    model: PreTrainedModel, sites: list[Site], stop_early: bool = True
) -> Iterator[dict[Site, torch.Tensor]]:
    """Within the context, each forward fills ``captured[site]`` with the site's output [B, T, d].

    The hooks only read; hooks registered later on the same modules still see (and may change)
    the original outputs. With ``stop_early`` the pass ends inside the deepest block's hooks, so a
    hook registered later on that block does not run.
    """
    captured: dict[Site, torch.Tensor] = {}

    def reader(site: Site):
        def hook(_module, _inputs, output):
            # A copy: a later hook that edits the output in place must not change what we recorded.
            captured[site] = output_tensor(output).detach().clone()

        return hook

    stop = decoder_layers(model)[max(s.layer for s in sites)] if stop_early else None
    with site_hooks(model, {s: reader(s) for s in sites}, stop_after=stop):
        yield captured


class LastLogits(NamedTuple):
    """A forward's next-token logits at the last position, and its output (cache, hidden states)."""

    logits: torch.Tensor
    """[B, vocab]."""
    output: object
    """The base model's output (``last_hidden_state``, the cache, hidden states if asked)."""


def last_logits(model: PreTrainedModel, **inputs) -> LastLogits:
    """The forward of ``model`` with the LM head applied to the last position only, as a [B, d] x
    [d, vocab] matmul. (``model(..., logits_to_keep=1)`` feeds the head a [B, 1, d] tensor, which
    torch 2.13 on CPU runs as a batched matmul over a broadcast weight: 3.3 s instead of ~0.1 s for
    207 rows of the 0.5B model's 152k vocabulary, measured.) Models that transform their logits
    (Gemma's soft-capping) take the plain path."""
    if getattr(model.config, "final_logit_softcapping", None):
        out = model(**inputs, logits_to_keep=1)
        return LastLogits(out.logits[:, -1], out)
    out = model.base_model(**inputs)
    return LastLogits(model.get_output_embeddings()(out.last_hidden_state[:, -1]), out)


def shared_prefix_length(batch: ChatBatch) -> int:
    """Leading real tokens identical in every row, leaving at least one own token per row."""
    lengths = batch.attention_mask.sum(-1)  # [B]
    T = batch.input_ids.shape[1]
    rows = [
        batch.input_ids[b, T - int(n) :] for b, n in enumerate(lengths)
    ]  # real tokens of each row
    limit = int(lengths.min()) - 1
    first = rows[0]
    same = torch.ones(limit, dtype=torch.bool, device=first.device)
    for row in rows[1:]:
        same &= row[:limit] == first[:limit]
    mismatch = (~same).nonzero()
    return int(mismatch[0]) if len(mismatch) else limit


@dataclass
class Prefilled:
    """A batch after its prefill: what generation, p_ref and activation collection need."""

    cache: object
    """transformers Cache over ``[shared prefix][padding][own tokens]`` ([B, L + S] positions), or
    None when the pass stopped early (activations only)."""
    attention_mask: torch.Tensor
    """[B, L + S]: 1 on real tokens, 0 on the padding between prefix and own tokens."""
    next_position: torch.Tensor
    """[B] position id of each row's next token (its number of real tokens)."""
    last_logits: torch.Tensor | None
    """[B, vocab] next-token logits at the last prompt position (None when stopped early)."""
    site_outputs: dict[Site, torch.Tensor]
    """[B, T, d] per captured site, in the ChatBatch's own left-padded layout."""
    prefix_length: int
    """L: tokens computed once for the whole batch."""


def prefix_pass(model: PreTrainedModel, batch: ChatBatch, L: int, cache: object) -> None:
    """One pass over the batch's shared prefix (its first ``L`` real tokens, one row) into
    ``cache``; the caller repeats the cache over the batch's rows."""
    T = batch.input_ids.shape[1]
    n = int(batch.attention_mask[0].sum())
    prefix_ids = batch.input_ids[:1, T - n :][:, :L]  # [1, L]
    model.base_model(input_ids=prefix_ids, use_cache=True, **cache_kwargs(model.base_model, cache))


def own_token_inputs(batch: ChatBatch, L: int) -> dict[str, torch.Tensor | bool]:
    """Forward inputs of the pass over each row's own tokens after a shared prefix of ``L``
    (see :func:`_own_token_inputs`)."""
    return _own_token_inputs(batch, L, batch.attention_mask.sum(-1))


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    batch: ChatBatch,
    sites: Sequence[Site] = (),
    *,
    shared_prefix: bool = True,
    stop_early: bool = False,
    logits: bool = True,
) -> Prefilled:
    """Prefill ``batch``, capturing ``sites``. ``shared_prefix=False`` is the plain left-padded pass
    (the reference the tests compare with). ``stop_early`` ends the pass after the deepest site's
    block (no later blocks, no LM head, no cache): activation collection alone. ``logits=False``
    keeps the cache but skips the LM head (a prefix that more tokens will follow)."""
    sites = sorted(sites)
    if stop_early and not sites:
        raise ValueError("prefill(stop_early=True) needs at least one site to stop after")
    B, T = batch.input_ids.shape
    L = shared_prefix_length(batch) if shared_prefix else 0
    lengths = batch.attention_mask.sum(-1)  # [B]
    # Our own cache object, passed in: a pass that stops early still leaves it filled up to the
    # deepest site's block, which is all the own-token pass then needs.
    cache = DynamicCache(config=model.config)
    prefix_outputs: dict[Site, torch.Tensor] = {}
    if L:
        with capture(model, sites, stop_early) as captured, until_stopped():
            prefix_pass(model, batch, L, cache)
        prefix_outputs = dict(captured)  # [1, L, d] per site
        cache.batch_repeat_interleave(B)  # [1, L] -> [B, L] per layer
    with capture(model, sites, stop_early) as captured:
        inputs = _own_token_inputs(batch, L, lengths)
        attention_mask = inputs["attention_mask"]
        next_logits = None
        with until_stopped():
            if stop_early or not logits:
                model.base_model(**inputs, **cache_kwargs(model.base_model, cache))
            else:
                next_logits = last_logits(
                    model, **inputs, **cache_kwargs(model.base_model, cache)
                ).logits
    outputs = {s: _assemble(prefix_outputs.get(s), captured[s], L, lengths, T) for s in sites}
    return Prefilled(
        None if stop_early else cache,
        attention_mask,
        lengths.clone(),
        next_logits,
        outputs,
        L,
    )


def _own_token_inputs(
    batch: ChatBatch, L: int, lengths: torch.Tensor
) -> dict[str, torch.Tensor | bool]:
    """Forward inputs for the own-token pass after a shared prefix of ``L`` tokens.

    Row b's real tokens are the last n_b of its row; its own tokens (after the shared L) are the last
    n_b - L, so the last S = T - L columns hold them flush right, with the row's padding and prefix
    copy before them, which the own-token mask hides."""
    B, T = batch.input_ids.shape
    S = T - L
    own_mask = (
        torch.arange(S, device=lengths.device) >= (S - (lengths - L))[:, None]
    ).long()  # [B, S]
    return dict(
        input_ids=torch.where(own_mask.bool(), batch.input_ids[:, L:], 0),  # masked slots: any id
        attention_mask=torch.cat(
            [batch.attention_mask.new_ones(B, L), own_mask], dim=1
        ),  # [B, L + S]
        position_ids=(L + own_mask.cumsum(-1) - 1).clamp(min=L),  # [B, S]: continuing the prefix
        use_cache=True,
    )


def _assemble(
    prefix: torch.Tensor | None, own: torch.Tensor, L: int, lengths: torch.Tensor, T: int
) -> torch.Tensor:
    """Site outputs [B, T, d] in the left-padded layout from the prefix part [1, L, d] (if any) and
    the own-token part [B, T - L, d]."""
    if not L:
        return own
    prefix = prefix[0]  # [L, d]
    B, _, d = own.shape
    full = own.new_zeros(B, T, d)
    for b in range(B):
        n = int(lengths[b])
        full[b, T - n : T - n + L] = prefix
        full[b, T - n + L :] = own[b, own.shape[1] - (n - L) :]
    return full


@torch.no_grad()
def full_logits(
    model: PreTrainedModel, batch: ChatBatch, shared_prefix: bool = True
) -> torch.Tensor:
    """Logits [B, T, vocab] at every position of ``batch`` in its left-padded layout (padding rows:
    zeros), with the shared prefix computed once (``shared_prefix=False``: the plain pass). Forward
    hooks active around the call see the prefix pass ([1, L, d]) and the own-token pass
    ([B, T - L, d]): an edit that depends only on each position's own activation (a splice) gives
    the same logits as in the plain pass."""
    B, T = batch.input_ids.shape
    L = shared_prefix_length(batch) if shared_prefix else 0
    if not L:
        return model(**batch.model_inputs(), use_cache=False).logits
    lengths = batch.attention_mask.sum(-1)  # [B]
    cache = DynamicCache(config=model.config)
    prefix_ids = batch.input_ids[:1, T - int(lengths[0]) :][:, :L]  # [1, L]
    prefix = model(
        input_ids=prefix_ids, use_cache=True, **cache_kwargs(model, cache)
    ).logits  # [1, L, V]
    cache.batch_repeat_interleave(B)
    own = model(
        **_own_token_inputs(batch, L, lengths), **cache_kwargs(model, cache)
    ).logits  # [B, T - L, V]
    return _assemble(prefix, own, L, lengths, T)


def merge_prefilled(parts: list[Prefilled]) -> Prefilled:
    """Several prefilled batches as one, for joint decoding: a decode step reads every weight once
    whatever the number of rows (bandwidth-bound), so decoding chunks together costs about one
    chunk's steps. Shorter caches get masked zero columns in front (positions are explicit, so a
    masked column anywhere is the same as left padding). Site outputs are not merged."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.attention_mask.shape[1] for p in parts)
    masks, keys, values = [], [], []
    for p in parts:
        pad = width - p.attention_mask.shape[1]
        masks.append(
            torch.cat([p.attention_mask.new_zeros(len(p.attention_mask), pad), p.attention_mask], 1)
        )
        keys.append(
            [_pad_front(layer.keys, pad) for layer in p.cache.layers]
        )  # [B, H, width, D] per layer
        values.append([_pad_front(layer.values, pad) for layer in p.cache.layers])
    cache = parts[0].cache
    for i, layer in enumerate(cache.layers):
        layer.keys = torch.cat([k[i] for k in keys])
        layer.values = torch.cat([v[i] for v in values])
    return Prefilled(
        cache,
        torch.cat(masks),
        torch.cat([p.next_position for p in parts]),
        torch.cat([p.last_logits for p in parts]),
        {},
        min(p.prefix_length for p in parts),
    )


def _pad_front(x: torch.Tensor, pad: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, pad + T, D] with zeros in front (masked out by the caller)."""
    return torch.cat([x.new_zeros(*x.shape[:2], pad, x.shape[3]), x], dim=2) if pad else x
