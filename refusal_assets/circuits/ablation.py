"""Ablated passes: the refusal score with the nodes outside a circuit mean-ablated (many masks
stacked into few passes, resumed after the first site), and with a direction projected out."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.circuits.passes import Baseline, SuffixBatch, batch_refusal_score
from refusal_assets.circuits.selection import NodeIndex
from refusal_assets.lm.chat import batches, encode_chat
from refusal_assets.lm.hooks import site_hooks, until_stopped
from refusal_assets.lm.prefill import capture
from refusal_assets.lm.sites import Site, decoder_layers, output_tensor, replace_output


class _Replay(nn.Module):
    """Stands in for an early block during a resumed pass (:func:`resumed_blocks`): the block of the
    first site returns its stored output, the blocks before it pass their input through (their work
    is already in that stored output)."""

    def __init__(self, stored: torch.Tensor | None = None):
        super().__init__()
        self.stored = stored

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.stored is None else self.stored


@contextlib.contextmanager
def resumed_blocks(model: PreTrainedModel, layer: int, stored: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward skips blocks 0..``layer``: block ``layer`` outputs ``stored``
    [B, P, d] (captured once from a clean pass; hooks registered inside the block on that site see
    it as the block's output) and later blocks, the norm and the LM head run as usual. Blocks keep
    their indices, so the KV cache, masks and positions are those of a full pass."""
    layers = decoder_layers(model)
    originals = [layers[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            layers[i] = _Replay()
        layers[layer] = _Replay(stored)
        yield
    finally:
        for i, block in enumerate(originals):
            layers[i] = block


def repeat_rows(suffix: SuffixBatch, m: int) -> SuffixBatch:
    """Each prompt's row repeated ``m`` times in a row (b-major: row b * m + j), cache included."""
    cache = copy.deepcopy(suffix.cache)
    cache.batch_repeat_interleave(m)
    return SuffixBatch(
        cache,
        suffix.suffix_ids.repeat_interleave(m, 0),
        suffix.attention_mask.repeat_interleave(m, 0),
        suffix.position_ids.repeat_interleave(m, 0),
    )


def cache_bytes_per_row(suffix: SuffixBatch) -> int:
    """Bytes of the prefix KV cache per prompt row (a Cache keeps its tensors per layer)."""
    total = sum(
        t.numel() * t.element_size()
        for layer in getattr(suffix.cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )
    return max(1, total // max(1, len(suffix.suffix_ids))) if total else 2**20


class StackedPass(NamedTuple):
    """One forward pass of a stack of interventions (masks, directions) over one prompt batch."""

    prompts: slice
    """This prompt batch's columns of the result (its rows in the concatenated prompts)."""
    stack: slice
    """The interventions run in this pass."""
    batch: SuffixBatch
    """The prompt batch with each row repeated once per intervention, b-major: row b * m + j."""
    source: SuffixBatch
    """The prompt batch itself."""

    def unstack(self, scores: torch.Tensor) -> np.ndarray:
        """Per-row scores [B * m] -> [m, B] (intervention, prompt)."""
        return scores.view(-1, self.stack.stop - self.stack.start).T.cpu().numpy()


def stacked_passes(
    suffixes: list[SuffixBatch], n_stack: int, max_cache_bytes: int
) -> Iterator[StackedPass]:
    """The passes that score ``n_stack`` interventions on every prompt batch: as many per pass as
    ``max_cache_bytes`` of repeated prefix cache allow (a decode-free pass reads every weight once,
    so filling it with rows is nearly free)."""
    start = 0
    for suffix in suffixes:
        B = len(suffix.suffix_ids)
        per_pass = max(1, min(n_stack, max_cache_bytes // (cache_bytes_per_row(suffix) * B)))
        for m0 in range(0, n_stack, per_pass):
            m = min(per_pass, n_stack - m0)
            batch = repeat_rows(suffix, m) if m > 1 else suffix
            yield StackedPass(slice(start, start + B), slice(m0, m0 + m), batch, suffix)
        start += B


@torch.no_grad()
def ablated_scores(
    model: PreTrainedModel,
    suffixes: list[SuffixBatch],
    saes: dict[Site, nn.Module],
    baseline: Baseline,
    keep: np.ndarray,
    refusal_ids: torch.Tensor,
    *,
    max_cache_bytes: int = 512 * 2**20,
    resume: bool = True,
) -> np.ndarray:
    """Per-prompt refusal scores with every node outside the kept set mean-ablated at the
    post-instruction positions.

    ``keep`` is one mask [n_nodes] for every prompt, one per prompt [n_prompts, n_nodes] (a whole
    cross-fitted sweep point, each prompt ablated by the circuit of its own fold), or a stack of such
    mask sets [n_masks, n_prompts, n_nodes]; the result is [n_prompts] or [n_masks, n_prompts].

    A stack is scored in few passes: each prompt's row is repeated once per mask (as many masks per
    pass as ``max_cache_bytes`` of repeated prefix cache allow), and, when the first site is a
    residual site, every pass resumes after that block from its clean output, computed once per
    prompt batch: nothing upstream of the first ablation depends on the mask
    (:func:`resumed_blocks`; ``resume=False`` runs every block). Equal to one plain pass per mask
    within float tolerance (tested).
    """
    sites = sorted(saes)
    index = NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])
    n_prompts = sum(len(s.suffix_ids) for s in suffixes)
    keep = np.asarray(keep, dtype=bool)
    stacked = keep.ndim == 3
    masks = keep if stacked else keep[None]
    masks = torch.from_numpy(
        np.broadcast_to(masks, (len(masks), n_prompts, index.n_nodes)).copy()
    )  # [M, n, N]
    M = len(masks)
    first = sites[0]
    resume = resume and first.kind == "resid"
    out = np.zeros((M, n_prompts))
    clean_first: dict[
        int, torch.Tensor
    ] = {}  # the current prompt batch's first-site output, once for every mask
    for p in stacked_passes(suffixes, M, max_cache_bytes):
        m, B = p.stack.stop - p.stack.start, p.prompts.stop - p.prompts.start
        rows = masks[p.stack, p.prompts].transpose(0, 1).reshape(B * m, -1)  # [B * m, N], b-major
        hooks = {
            s: _ablation_hook(saes[s], baseline, s, index.site_slice(k), rows)
            for k, s in enumerate(sites)
        }
        resumed = contextlib.nullcontext()
        if resume:
            if p.prompts.start not in clean_first:
                with capture(model, [first]) as captured, until_stopped():
                    p.source.run(model.base_model)
                clean_first = {p.prompts.start: captured[first]}  # [B, P, d]
            resumed = resumed_blocks(
                model, first.layer, clean_first[p.prompts.start].repeat_interleave(m, 0)
            )
        with resumed, site_hooks(model, hooks):
            out[p.stack, p.prompts] = p.unstack(batch_refusal_score(model, p.batch, refusal_ids))
    return out if stacked else out[0]


def _ablation_hook(sae: nn.Module, baseline: Baseline, site: Site, sl: slice, rows: torch.Tensor):
    """Mean-ablate the latents (and the error node) that ``rows`` [B, n_nodes] does not keep."""
    device = baseline.f_mean[site].device
    keep_f = rows[:, None, sl.start : sl.stop - 1].to(device)  # [B, 1, d_sae]
    keep_err = rows[:, None, sl.stop - 1 : sl.stop].to(device)  # [B, 1, 1]

    def hook(_m, _i, output):
        x = output_tensor(output)  # [B, P, d]: the suffix only
        f = sae.encode(x.float())
        err = x.float() - sae.decode(f)
        f = torch.where(keep_f, f, baseline.f_mean[site])
        err = torch.where(keep_err, err, baseline.err_mean[site])
        return replace_output(output, (sae.decode(f) + err).to(x.dtype))

    return hook


def ablated_score(
    model: PreTrainedModel,
    suffixes: list[SuffixBatch],
    saes: dict[Site, nn.Module],
    baseline: Baseline,
    keep: np.ndarray,
    refusal_ids: torch.Tensor,
) -> float:
    """Mean refusal score with every node outside ``keep`` [n_nodes] mean-ablated at the post-instruction positions."""
    scores = ablated_scores(model, suffixes, saes, baseline, keep, refusal_ids)
    return float(scores.mean()) if len(scores) else float("nan")


@torch.no_grad()
def direction_ablation_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    site: Site,
    direction: torch.Tensor,
    refusal_ids: torch.Tensor,
    *,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
) -> float:
    """Mean refusal score with the unit ``direction`` [d] projected out of ``site`` at every position."""
    r = direction / direction.norm().clamp_min(1e-8)

    def hook(_m, _i, output):
        x = output_tensor(output)
        rr = r.to(x.dtype)
        return replace_output(output, x - (x @ rr)[..., None] * rr)

    total, n = 0.0, 0
    for chunk in batches(prompts, batch_size):
        batch = encode_chat(tokenizer, chunk, system_prompt).to(device)
        with site_hooks(model, {site: hook}):
            total += float(batch_refusal_score(model, batch, refusal_ids).sum())
        n += len(chunk)
    return total / max(n, 1)
