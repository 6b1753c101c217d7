"""Sparse feature circuits (Marks et al. 2024) for the refusal score.

Nodes are the SAE latents of every site plus one error node per site, from the exact
decomposition ``x = decode(f) + err``. With the SAEs spliced in this way the model is unchanged,
so the gradient of the metric at a site's output is the model's own gradient ``g``; the linear
(attribution-patching) effect of a latent is then ``(g · d decode/d f_i) * (f_i - f̄_i)`` and of
the error node ``g · (err - err̄)``, summed over the post-instruction positions. ``f̄`` and ``err̄``
are the means over the category's safe prompts at the same post-instruction offset (mean
ablation). Integrated gradients replaces ``g`` by its average along the straight path from the
baseline to the activation, one site at a time.

Faithfulness and completeness (unclipped) evaluate a node set by running the model with every
node outside the set (or inside it, for completeness) replaced by its mean.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.behaviour import refusal_score
from refusal_assets.chat import ChatBatch, batches, encode_chat
from refusal_assets.sites import Site, output_tensor, replace_output, site_module


class NodeIndex:
    """Flat node index over sites: each site's latents, then its error node."""

    def __init__(self, sites: list[Site], d_saes: list[int]):
        self.sites = sites
        self.d_saes = d_saes
        self.offsets = np.cumsum([0] + [d + 1 for d in d_saes])  # [S+1]
        self.n_nodes = int(self.offsets[-1])
        self.site_of_node = np.repeat(np.arange(len(sites)), [d + 1 for d in d_saes])  # [n_nodes]

    def site_slice(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def error_node(self, s: int) -> int:
        return int(self.offsets[s + 1] - 1)

    def describe(self, node: int) -> dict:
        s = int(self.site_of_node[node])
        local = node - int(self.offsets[s])
        return {"node": int(node), "site": self.sites[s].name, "latent": None if local == self.d_saes[s] else int(local), "is_error": local == self.d_saes[s]}


@dataclass
class Baseline:
    """Mean latents and mean error per site at each post-instruction offset (the mean ablation)."""

    f_mean: dict[Site, torch.Tensor]  # [P, d_sae]
    err_mean: dict[Site, torch.Tensor]  # [P, d]


def _post_positions(batch: ChatBatch) -> torch.Tensor:
    """[B, P] indices of the post-instruction tokens; the template suffix has the same length P."""
    counts = batch.post_instruction.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"post-instruction spans differ in length across prompts: {counts.tolist()}")
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
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, P]

    def run(self, model: PreTrainedModel, **kwargs):
        cache = copy.deepcopy(self.cache)  # a forward appends to the cache: keep the prefix pristine
        return model(input_ids=self.suffix_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                     past_key_values=cache, use_cache=True, **kwargs)


@torch.no_grad()
def split_prefix(model: PreTrainedModel, batch: ChatBatch) -> SuffixBatch:
    pos = _post_positions(batch)  # [B, P]
    T, P = batch.input_ids.shape[1], pos.shape[1]
    if not bool((pos == torch.arange(T - P, T, device=pos.device)).all()):
        raise ValueError("the post-instruction tokens do not end the prompt; check the chat template")
    out = model.base_model(input_ids=batch.input_ids[:, : T - P], attention_mask=batch.attention_mask[:, : T - P],
                           position_ids=batch.position_ids[:, : T - P], use_cache=True)
    return SuffixBatch(out.past_key_values, batch.input_ids[:, T - P :], batch.attention_mask, batch.position_ids[:, T - P :])


@contextlib.contextmanager
def _hooks(model: PreTrainedModel, fns: dict[Site, Callable]) -> Iterator[None]:
    handles = [site_module(model, s).register_forward_hook(fn) for s, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _score(model: PreTrainedModel, batch: "ChatBatch | SuffixBatch", refusal_ids: torch.Tensor) -> torch.Tensor:
    """Refusal score [B] at the last prompt position (differentiable)."""
    if isinstance(batch, SuffixBatch):
        logits = batch.run(model, logits_to_keep=1).logits[:, -1].float()
    else:
        logits = model(**batch.model_inputs(), use_cache=False, logits_to_keep=1).logits[:, -1].float()
    p = torch.softmax(logits, -1)[:, refusal_ids].sum(-1)
    return refusal_score(p)


def _site_grads(model: PreTrainedModel, batch: SuffixBatch, sites: list[Site], refusal_ids: torch.Tensor,
                patch: dict[Site, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> tuple[dict, dict, torch.Tensor]:
    """Suffix activations and d(sum of scores)/d(activation) at every site: ({site: [B,P,d]}, {site: [B,P,d]}, score [B])."""
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

    with torch.enable_grad(), _hooks(model, {s: hook_for(s) for s in sites}):
        score = _score(model, batch, refusal_ids)
        score.sum().backward()
    grads = {s: acts[s].grad.detach() for s in sites}
    return {s: a.detach() for s, a in acts.items()}, grads, score.detach()


def _decoder_grad(sae: nn.Module, g: torch.Tensor, d_sae: int) -> torch.Tensor:
    """g · d decode(f)/d f for each latent: g [N, d] -> [N, d_sae] (decode is affine in f)."""
    f = torch.zeros(g.shape[0], d_sae, dtype=g.dtype, device=g.device, requires_grad=True)
    with torch.enable_grad():
        (out,) = torch.autograd.grad((sae.decode(f) * g).sum(), f)
    return out


@torch.no_grad()
def compute_baseline(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], saes: dict[Site, nn.Module],
                     batch_size: int, system_prompt: str | None = None, device: str = "cpu") -> Baseline:
    """Means of latents and errors over ``prompts`` (the safe split) at each post-instruction offset."""
    from refusal_assets.activations import forward_sites

    sites = sorted(saes)
    f_sum: dict[Site, torch.Tensor] = {}
    e_sum: dict[Site, torch.Tensor] = {}
    n = 0
    for chunk in batches(prompts, batch_size):
        batch = encode_chat(tokenizer, chunk, system_prompt).to(device)
        pos = _post_positions(batch)
        acts = forward_sites(model, batch, sites)
        for s in sites:
            x = _gather(acts[s], pos).float()  # [B, P, d]
            f = saes[s].encode(x)
            err = x - saes[s].decode(f)
            f_sum[s] = f_sum.get(s, 0) + f.sum(0)
            e_sum[s] = e_sum.get(s, 0) + err.sum(0)
        n += len(chunk)
    if n == 0:
        raise ValueError("the mean-ablation baseline needs at least one safe prompt")
    return Baseline({s: f_sum[s] / n for s in sites}, {s: e_sum[s] / n for s in sites})


def node_effects(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], saes: dict[Site, nn.Module],
                 baseline: Baseline, refusal_ids: torch.Tensor, *, batch_size: int, system_prompt: str | None = None,
                 method: str = "attribution", ig_steps: int = 10, device: str = "cpu",
                 log: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt node effects [n_prompts, n_nodes] on the refusal score, and the scores [n_prompts]."""
    sites = sorted(saes)
    index = NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])
    out, scores = [], []
    for i, chunk in enumerate(batches(prompts, batch_size)):
        suffix = split_prefix(model, encode_chat(tokenizer, chunk, system_prompt).to(device))
        acts, grads, score = _site_grads(model, suffix, sites, refusal_ids)
        if method == "integrated_gradients":
            grads = {s: _ig_grads(model, suffix, s, sites, saes[s], baseline, refusal_ids, ig_steps) for s in sites}
        effects = torch.zeros(len(chunk), index.n_nodes)
        for k, s in enumerate(sites):
            x, g = acts[s].float(), grads[s].float()  # [B, P, d]
            B, P, d = x.shape
            with torch.no_grad():
                f = saes[s].encode(x)  # [B, P, d_sae]
                err = x - saes[s].decode(f)
            g_f = _decoder_grad(saes[s], g.reshape(B * P, d), f.shape[-1]).view(B, P, -1)
            sl = index.site_slice(k)
            effects[:, sl.start : sl.stop - 1] = (g_f * (f - baseline.f_mean[s])).sum(1)
            effects[:, sl.stop - 1] = (g * (err - baseline.err_mean[s])).sum((1, 2))
        out.append(effects.numpy())
        scores.append(score.cpu().numpy())
        log(f"node effects: {min((i + 1) * batch_size, len(prompts))}/{len(prompts)} prompts")
    return np.concatenate(out), np.concatenate(scores)


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


def prepare_suffixes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, batch_size: int,
                     system_prompt: str | None = None, device: str = "cpu") -> list[SuffixBatch]:
    """Prefix caches for ``prompts``, computed once and reused by every ablation of a sweep."""
    return [split_prefix(model, encode_chat(tokenizer, chunk, system_prompt).to(device)) for chunk in batches(prompts, batch_size)]


@torch.no_grad()
def ablated_score(model: PreTrainedModel, suffixes: list[SuffixBatch], saes: dict[Site, nn.Module],
                  baseline: Baseline, keep: np.ndarray, refusal_ids: torch.Tensor) -> float:
    """Mean refusal score with every node outside ``keep`` [n_nodes] mean-ablated at the post-instruction positions."""
    sites = sorted(saes)
    index = NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])
    keep_t = torch.from_numpy(keep.astype(bool))
    total, n = 0.0, 0
    for suffix in suffixes:
        def hook_for(k: int, s: Site):
            sl = index.site_slice(k)
            keep_f, keep_err = keep_t[sl.start : sl.stop - 1], bool(keep_t[sl.stop - 1])

            def hook(_m, _i, output):
                x = output_tensor(output)  # [B, P, d]: the suffix only
                f = saes[s].encode(x.float())
                err = x.float() - saes[s].decode(f)
                f = torch.where(keep_f, f, baseline.f_mean[s])
                err = err if keep_err else baseline.err_mean[s].expand_as(err)
                return replace_output(output, (saes[s].decode(f) + err).to(x.dtype))

            return hook

        with _hooks(model, {s: hook_for(k, s) for k, s in enumerate(sites)}):
            score = _score(model, suffix, refusal_ids)
        total += float(score.sum())
        n += len(score)
    return total / max(n, 1)


def faithfulness(m_c: float, m_empty: float, m_full: float) -> float:
    """(m(C) - m(∅)) / (m(M) - m(∅)), unclipped."""
    return (m_c - m_empty) / (m_full - m_empty) if m_full != m_empty else float("nan")


def evaluate_sizes(score_fn: Callable[[np.ndarray], float], mean_effect: np.ndarray, site_of_node: np.ndarray, sizes: list[int],
                   select: Callable[[np.ndarray, int], np.ndarray], seed: int) -> dict:
    """Faithfulness and completeness of the top-n-per-site circuit for each n, and of a random
    circuit with the same number of nodes per site (the control)."""
    n_nodes = len(mean_effect)
    m_full = score_fn(np.ones(n_nodes, bool))
    m_empty = score_fn(np.zeros(n_nodes, bool))
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        circuit = select(mean_effect, n)
        random = np.zeros(n_nodes, bool)
        for s in np.unique(site_of_node):
            members = np.flatnonzero(site_of_node == s)
            random[rng.choice(members, size=min(int(circuit[members].sum()), len(members)), replace=False)] = True
        rows.append({
            "size_per_site": n, "n_nodes": int(circuit.sum()),
            "faithfulness": faithfulness(score_fn(circuit), m_empty, m_full),
            "completeness": faithfulness(score_fn(~circuit), m_empty, m_full),
            "random_faithfulness": faithfulness(score_fn(random), m_empty, m_full),
        })
    return {"m_full": m_full, "m_empty": m_empty, "sweep": rows}


def edge_effects(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], saes: dict[Site, nn.Module],
                 baseline: Baseline, refusal_ids: torch.Tensor, circuit: np.ndarray, *, batch_size: int, max_edges: int,
                 targets_per_site: int = 10, mean_effect: np.ndarray | None = None, system_prompt: str | None = None,
                 device: str = "cpu") -> list[dict]:
    """Edges between circuit latents of consecutive sites: mean over prompts of
    Σ_pos (∂m/∂f_d)(∂f_d/∂f_u)(f_u - f̄_u), by one backward per downstream node (the
    ``targets_per_site`` downstream latents with the largest node effect)."""
    sites = sorted(saes)
    index = NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])
    totals: dict[tuple[int, int], float] = {}
    n = 0
    for chunk in batches(prompts, batch_size):
        suffix = split_prefix(model, encode_chat(tokenizer, chunk, system_prompt).to(device))
        acts, grads, _ = _site_grads(model, suffix, sites, refusal_ids)
        for k in range(len(sites) - 1):
            up, down = sites[k], sites[k + 1]
            up_sl, down_sl = index.site_slice(k), index.site_slice(k + 1)
            up_nodes = np.flatnonzero(circuit[up_sl.start : up_sl.stop - 1])
            down_nodes = np.flatnonzero(circuit[down_sl.start : down_sl.stop - 1])
            if mean_effect is not None:  # the strongest downstream latents first
                down_nodes = down_nodes[np.argsort(-mean_effect[down_sl.start + down_nodes], kind="stable")]
            down_nodes = down_nodes[:targets_per_site]
            if not len(up_nodes) or not len(down_nodes):
                continue
            captured: dict[Site, torch.Tensor] = {}

            def hook_for(site: Site):
                def hook(_m, _i, output):
                    x = output_tensor(output)
                    if site == up:
                        x = x.detach().requires_grad_(True)
                    captured[site] = x
                    return replace_output(output, x)

                return hook

            from refusal_assets.activations import _StopForward

            def stop(_m, _i, _o):
                raise _StopForward

            with torch.enable_grad(), _hooks(model, {up: hook_for(up), down: hook_for(down)}):
                h = site_module(model, down).register_forward_hook(stop)
                try:
                    cache = copy.deepcopy(suffix.cache)
                    model.base_model(input_ids=suffix.suffix_ids, attention_mask=suffix.attention_mask,
                                     position_ids=suffix.position_ids, past_key_values=cache, use_cache=True)
                except _StopForward:
                    pass
                finally:
                    h.remove()
                x_up, x_down = captured[up], captured[down]
                f_down = saes[down].encode(x_down.float())  # [B, P, d_sae]
                g_down = grads[down].float()
                B, P, d = g_down.shape
                g_f_down = _decoder_grad(saes[down], g_down.reshape(B * P, d), f_down.shape[-1]).view(B, P, -1)
                with torch.no_grad():
                    delta_up = saes[up].encode(acts[up].float()) - baseline.f_mean[up]  # [B, P, d_sae_up]
                for j in down_nodes:
                    (h_up,) = torch.autograd.grad((g_f_down[..., j].detach() * f_down[..., j]).sum(), x_up, retain_graph=True)
                    h_f = _decoder_grad(saes[up], h_up.float().reshape(B * P, d), delta_up.shape[-1]).view(B, P, -1)
                    contrib = (h_f[..., up_nodes] * delta_up[..., up_nodes]).sum((0, 1))  # [n_up]
                    for u, c in zip(up_nodes.tolist(), contrib.tolist()):
                        key = (int(up_sl.start + u), int(down_sl.start + j))
                        totals[key] = totals.get(key, 0.0) + c
        n += len(chunk)
    edges = [{"source": s, "target": t, "effect": v / max(n, 1)} for (s, t), v in totals.items()]
    edges.sort(key=lambda e: -abs(e["effect"]))
    return edges[:max_edges]


@torch.no_grad()
def direction_ablation_score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], site: Site,
                             direction: torch.Tensor, refusal_ids: torch.Tensor, *, batch_size: int,
                             system_prompt: str | None = None, device: str = "cpu") -> float:
    """Mean refusal score with the unit ``direction`` [d] projected out of ``site`` at every position."""
    r = direction / direction.norm().clamp_min(1e-8)

    def hook(_m, _i, output):
        x = output_tensor(output)
        rr = r.to(x.dtype)
        return replace_output(output, x - (x @ rr)[..., None] * rr)

    total, n = 0.0, 0
    for chunk in batches(prompts, batch_size):
        batch = encode_chat(tokenizer, chunk, system_prompt).to(device)
        with _hooks(model, {site: hook}):
            total += float(_score(model, batch, refusal_ids).sum())
        n += len(chunk)
    return total / max(n, 1)
