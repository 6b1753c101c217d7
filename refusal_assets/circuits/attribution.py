"""Node and edge effects on the refusal score (Marks et al. 2024).

Nodes are the SAE latents of every site plus one error node per site, from the exact
decomposition ``x = decode(f) + err``. With the SAEs spliced in this way the model is unchanged,
so the gradient of the metric at a site's output is the model's own gradient ``g``; the linear
(attribution-patching) effect of a latent is then ``(g · d decode/d f_i) * (f_i - f̄_i)`` and of
the error node ``g · (err - err̄)``, summed over the post-instruction positions. ``f̄`` and ``err̄``
are the means over the category's safe prompts at the same post-instruction offset (mean
ablation). Integrated gradients replaces ``g`` by its average along the straight path from the
baseline to the activation, one site at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.circuits.passes import (
    Baseline,
    SuffixBatch,
    batch_refusal_score,
    prepare_suffixes,
)
from refusal_assets.circuits.selection import NodeIndex
from refusal_assets.lm.hooks import site_hooks, until_stopped
from refusal_assets.lm.prefill import cache_kwargs
from refusal_assets.lm.sites import Site, output_tensor, replace_output, site_module
from refusal_assets.progress import progress


class SiteGrads(NamedTuple):
    """One forward and backward over a suffix batch, at every site."""

    acts: dict[Site, torch.Tensor]
    """Site outputs on the suffix [B, P, d], detached."""
    grads: dict[Site, torch.Tensor]
    """d(sum of refusal scores)/d(site output) [B, P, d]."""
    score: torch.Tensor
    """Refusal score per prompt [B]."""


def _site_grads(
    model: PreTrainedModel,
    batch: SuffixBatch,
    sites: list[Site],
    refusal_ids: torch.Tensor,
    patch: dict[Site, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> SiteGrads:
    """Suffix activations and d(sum of scores)/d(activation) at every site."""
    acts: dict[Site, torch.Tensor] = {}
    first = min(sites)

    def hook_for(site: Site):
        def hook(_m, _i, output):
            x = output_tensor(output)
            if site == first:  # no parameter needs grad: start the graph here
                x = x.detach().requires_grad_(True)
            if patch and site in patch:
                x = patch[site](x)
            x.retain_grad()
            acts[site] = x
            return replace_output(output, x)

        return hook

    with torch.enable_grad(), site_hooks(model, {s: hook_for(s) for s in sites}):
        score = batch_refusal_score(model, batch, refusal_ids)
        score.sum().backward()
    grads = {s: acts[s].grad.detach() for s in sites}
    return SiteGrads({s: a.detach() for s, a in acts.items()}, grads, score.detach())


def _decoder_grad(sae: nn.Module, g: torch.Tensor, d_sae: int) -> torch.Tensor:
    """g · d decode(f)/d f for each latent: g [N, d] -> [N, d_sae] (decode is affine in f)."""
    f = torch.zeros(g.shape[0], d_sae, dtype=g.dtype, device=g.device, requires_grad=True)
    with torch.enable_grad():
        (out,) = torch.autograd.grad((sae.decode(f) * g).sum(), f)
    return out


def _latent_grads(sae: nn.Module, g: torch.Tensor, d_sae: int) -> torch.Tensor:
    """:func:`_decoder_grad` over every position: g [B, P, d] -> [B, P, d_sae]."""
    B, P, d = g.shape
    return _decoder_grad(sae, g.reshape(B * P, d), d_sae).view(B, P, -1)


def _sites_and_index(
    saes: dict[Site, nn.Module], baseline: Baseline
) -> tuple[list[Site], NodeIndex]:
    """The sites in node order and the index of their latents (plus one error node each)."""
    sites = sorted(saes)
    return sites, NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])


def _given_or_prepared(
    suffixes: list[SuffixBatch] | None,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int,
    system_prompt: str | None,
    device: str,
) -> list[SuffixBatch]:
    """The caller's cached prefixes, or the prompts' own when it has none."""
    if suffixes is not None:
        return suffixes
    return prepare_suffixes(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        system_prompt=system_prompt,
        device=device,
    )


class Dictionaries(NamedTuple):
    """One SAE per site and the mean-ablation baseline computed with them."""

    saes: dict[Site, nn.Module]
    baseline: Baseline


def node_effects(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    saes: dict[Site, nn.Module],
    baseline: Baseline,
    refusal_ids: torch.Tensor,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt node effects [n_prompts, n_nodes] on the refusal score, and the scores
    [n_prompts] (keywords: :func:`node_effects_per_dictionary`'s)."""
    effects, scores = node_effects_per_dictionary(
        model, tokenizer, prompts, [Dictionaries(saes, baseline)], refusal_ids, **kwargs
    )
    return effects[0], scores


def node_effects_per_dictionary(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    dictionaries: Sequence[Dictionaries],
    refusal_ids: torch.Tensor,
    *,
    batch_size: int,
    system_prompt: str | None = None,
    method: str = "attribution",
    ig_steps: int = 10,
    device: str = "cpu",
    log: Callable[[str], None] = lambda s: None,
    suffixes: list[SuffixBatch] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-prompt node effects [n_prompts, n_nodes] through each of ``dictionaries`` (trainings of
    SAEs at the same sites, each with its baseline), and the scores [n_prompts].
    ``suffixes``: the prompts' cached prefixes when the caller already has them (:func:`prepare_suffixes`).

    The spliced model is the model itself whatever the dictionary (``x = decode(f) + err``), so one
    forward and backward serves every dictionary: only the encoding differs (attribution patching;
    integrated gradients walks a path per dictionary)."""
    saes, baseline = dictionaries[0]
    sites, index = _sites_and_index(saes, baseline)
    out: list[list[np.ndarray]] = [[] for _ in dictionaries]
    scores = []
    suffixes = _given_or_prepared(
        suffixes, model, tokenizer, prompts, batch_size, system_prompt, device
    )
    with progress("node effects", total=len(prompts), unit="prompts", log=log) as prog:
        for suffix in suffixes:
            acts, grads, score = _site_grads(model, suffix, sites, refusal_ids)
            for j, (set_saes, set_baseline) in enumerate(dictionaries):
                if method == "integrated_gradients":
                    grads = {
                        s: _ig_grads(
                            model,
                            suffix,
                            s,
                            sites,
                            set_saes[s],
                            set_baseline,
                            refusal_ids,
                            ig_steps,
                        )
                        for s in sites
                    }
                out[j].append(_latent_effects(set_saes, set_baseline, sites, index, acts, grads))
            scores.append(score.cpu().numpy())
            prog.update(len(suffix.suffix_ids))
    return [np.concatenate(chunks) for chunks in out], np.concatenate(scores)


def _latent_effects(
    saes: dict[Site, nn.Module],
    baseline: Baseline,
    sites: list[Site],
    index: NodeIndex,
    acts: dict[Site, torch.Tensor],
    grads: dict[Site, torch.Tensor],
) -> np.ndarray:
    """[B, n_nodes]: each latent's ``g_f * (f - f̄)`` and each error node's ``g * (err - err̄)``,
    summed over the post-instruction positions."""
    n_rows = next(iter(acts.values())).shape[0]
    effects = torch.zeros(n_rows, index.n_nodes)
    for k, s in enumerate(sites):
        x, g = acts[s].float(), grads[s].float()  # [B, P, d]
        with torch.no_grad():
            f = saes[s].encode(x)  # [B, P, d_sae]
            err = x - saes[s].decode(f)
        g_f = _latent_grads(saes[s], g, f.shape[-1])
        sl = index.site_slice(k)
        effects[:, sl.start : sl.stop - 1] = (g_f * (f - baseline.f_mean[s])).sum(1)
        effects[:, sl.stop - 1] = (g * (err - baseline.err_mean[s])).sum((1, 2))
    return effects.numpy()


def _ig_grads(model, suffix: SuffixBatch, site, sites, sae, baseline, refusal_ids, steps):
    """Mean gradient at ``site`` along x_α = x̄ + α (x - x̄) on the post-instruction positions."""
    with torch.no_grad():
        x_bar = sae.decode(baseline.f_mean[site]) + baseline.err_mean[site]  # [P, d]
    total = 0
    for alpha in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:

        def patch(x, a=float(alpha)):
            return x_bar.to(x.dtype) + a * (x - x_bar.to(x.dtype))

        _, grads, _ = _site_grads(model, suffix, sites, refusal_ids, patch={site: patch})
        total = total + grads[site]
    return total / steps


def edge_effects(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    saes: dict[Site, nn.Module],
    baseline: Baseline,
    refusal_ids: torch.Tensor,
    circuit: np.ndarray,
    *,
    batch_size: int,
    max_edges: int,
    targets_per_site: int = 10,
    mean_effect: np.ndarray | None = None,
    system_prompt: str | None = None,
    device: str = "cpu",
    suffixes: list[SuffixBatch] | None = None,
) -> list[dict]:
    """Edges between circuit latents of consecutive sites: mean over prompts of
    Σ_pos (∂m/∂f_d)(∂f_d/∂f_u)(f_u - f̄_u), by one backward per downstream node (the
    ``targets_per_site`` downstream latents with the largest node effect)."""
    sites, index = _sites_and_index(saes, baseline)
    totals: dict[tuple[int, int], float] = {}
    n = 0
    suffixes = _given_or_prepared(
        suffixes, model, tokenizer, prompts, batch_size, system_prompt, device
    )
    for suffix in suffixes:
        acts, grads, _ = _site_grads(model, suffix, sites, refusal_ids)
        for k in range(len(sites) - 1):
            up, down = sites[k], sites[k + 1]
            up_sl, down_sl = index.site_slice(k), index.site_slice(k + 1)
            up_nodes, down_nodes = _edge_endpoints(
                circuit, up_sl, down_sl, mean_effect, targets_per_site
            )
            if not len(up_nodes) or not len(down_nodes):
                continue
            contributions = _site_pair_contributions(
                model, suffix, saes, baseline, acts, grads, (up, down), up_nodes, down_nodes
            )
            for u, j, c in contributions:
                key = (int(up_sl.start + u), int(down_sl.start + j))
                totals[key] = totals.get(key, 0.0) + c
        n += len(suffix.suffix_ids)
    edges = [{"source": s, "target": t, "effect": v / max(n, 1)} for (s, t), v in totals.items()]
    edges.sort(key=lambda e: -abs(e["effect"]))
    return edges[:max_edges]


def _edge_endpoints(
    circuit: np.ndarray,
    up_sl: slice,
    down_sl: slice,
    mean_effect: np.ndarray | None,
    targets_per_site: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The circuit latents (site-local indices, error nodes excluded) of an upstream and a
    downstream site; downstream, only the ``targets_per_site`` strongest when effects are given."""
    up_nodes = np.flatnonzero(circuit[up_sl.start : up_sl.stop - 1])
    down_nodes = np.flatnonzero(circuit[down_sl.start : down_sl.stop - 1])
    if mean_effect is not None:  # the strongest downstream latents first
        down_nodes = down_nodes[np.argsort(-mean_effect[down_sl.start + down_nodes], kind="stable")]
    return up_nodes, down_nodes[:targets_per_site]


def _site_pair_contributions(
    model: PreTrainedModel,
    suffix: SuffixBatch,
    saes: dict[Site, nn.Module],
    baseline: Baseline,
    acts: dict[Site, torch.Tensor],
    grads: dict[Site, torch.Tensor],
    up_down: tuple[Site, Site],
    up_nodes: np.ndarray,
    down_nodes: np.ndarray,
) -> list[tuple[int, int, float]]:
    """``(u, j, effect)`` summed over the batch for every upstream latent ``u`` and downstream
    latent ``j`` (site-local indices), by one backward per downstream latent."""
    up, down = up_down
    captured: dict[Site, torch.Tensor] = {}
    out: list[tuple[int, int, float]] = []

    def hook_for(site: Site):
        def hook(_m, _i, output):
            x = output_tensor(output)
            if site == up:
                x = x.detach().requires_grad_(True)
            captured[site] = x
            return replace_output(output, x)

        return hook

    with (
        torch.enable_grad(),
        site_hooks(
            model,
            {up: hook_for(up), down: hook_for(down)},
            stop_after=site_module(model, down),
        ),
    ):
        with until_stopped():
            cache = copy.deepcopy(suffix.cache)
            model.base_model(
                input_ids=suffix.suffix_ids,
                attention_mask=suffix.attention_mask,
                position_ids=suffix.position_ids,
                use_cache=True,
                **cache_kwargs(model.base_model, cache),
            )
        x_up, x_down = captured[up], captured[down]
        f_down = saes[down].encode(x_down.float())  # [B, P, d_sae]
        g_f_down = _latent_grads(saes[down], grads[down].float(), f_down.shape[-1])
        with torch.no_grad():
            delta_up = saes[up].encode(acts[up].float()) - baseline.f_mean[up]  # [B, P, d_sae_up]
        for j in down_nodes:
            (h_up,) = torch.autograd.grad(
                (g_f_down[..., j].detach() * f_down[..., j]).sum(), x_up, retain_graph=True
            )
            h_f = _latent_grads(saes[up], h_up.float(), delta_up.shape[-1])
            contrib = (h_f[..., up_nodes] * delta_up[..., up_nodes]).sum((0, 1))  # [n_up]
            out.extend((u, j, c) for u, c in zip(up_nodes.tolist(), contrib.tolist()))
    return out
