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
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import numpy as np
import polars as pl
import torch
from scipy import stats
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.config import CircuitConfig
from refusal_assets.lm.behaviour import refusal_score_from_logits
from refusal_assets.lm.chat import ChatBatch, batches, encode_chat
from refusal_assets.lm.hooks import site_hooks, until_stopped
from refusal_assets.lm.prefill import cache_kwargs, capture, last_logits, prefill
from refusal_assets.lm.sites import Site, decoder_layers, output_tensor, replace_output, site_module
from refusal_assets.progress import progress

Mode = Literal["topk", "threshold", "topk_abs", "threshold_abs"]


# ---------------------------------------------------------------------------------- selection


def select_circuits(
    means: np.ndarray, site_of_node: np.ndarray, mode: Mode, k_per_site: int, threshold: float
) -> np.ndarray:
    """Circuit masks ``[batch, n_nodes]`` for mean effects ``[batch, n_nodes]``: :func:`select_circuit`
    over a batch of resampled means at once (the comparison's permutations and bootstraps)."""
    if mode not in ("topk", "threshold", "topk_abs", "threshold_abs"):
        raise ValueError(f"mode must be 'topk', 'threshold', 'topk_abs' or 'threshold_abs', not {mode!r}")
    if mode.endswith("_abs"):  # rank by magnitude: refusal-suppressing nodes count too (Marks et al. keep both signs)
        means, mode = np.abs(means), mode.removesuffix("_abs")
    if mode == "threshold":
        return means >= threshold
    mask = np.zeros(means.shape, dtype=bool)
    if k_per_site == 0:
        return mask
    for site in np.unique(site_of_node):
        nodes = np.flatnonzero(site_of_node == site)  # ascending node index
        x = means[:, nodes]  # [batch, n_site]
        if k_per_site >= nodes.size:
            mask[:, nodes] = True
            continue
        # O(n) partition instead of a full sort (sites can hold ~10^4-10^5 latents): keep everything
        # above the k-th largest value, then fill the remaining slots from its ties, lowest index first.
        kth = -np.partition(-x, k_per_site - 1, axis=1)[:, k_per_site - 1 : k_per_site]  # [batch, 1]
        above = x > kth
        ties = x == kth
        n_fill = k_per_site - above.sum(axis=1, keepdims=True)  # [batch, 1], >= 1
        mask[:, nodes] = above | (ties & (np.cumsum(ties, axis=1) <= n_fill))
    return mask


def select_circuit(
    mean_effect: np.ndarray,
    site_of_node: np.ndarray,
    mode: Mode = "topk",
    k_per_site: int = 20,
    threshold: float = 0.0,
) -> np.ndarray:
    """Circuit mask ``[n_nodes]`` (bool) from a mean effect vector ``[n_nodes]``.

    ``topk``: at every site the ``k_per_site`` nodes with the largest SIGNED mean effect (those that
    push hardest towards refusal; ties go to the lower node index); a site with fewer nodes keeps all.
    ``threshold``: every node with mean effect ``>= threshold``.
    ``topk_abs`` / ``threshold_abs``: the same on ``|mean effect|``, so nodes that push away from
    refusal are kept too; the circuit then tends to faithfulness 1 instead of overshooting it.
    """
    mean_effect = np.asarray(mean_effect, dtype=float)
    site_of_node = np.asarray(site_of_node)
    if mean_effect.ndim != 1 or mean_effect.shape != site_of_node.shape:
        raise ValueError(f"mean_effect {mean_effect.shape} and site_of_node {site_of_node.shape} must be equal 1-D")
    if k_per_site < 0:
        raise ValueError(f"k_per_site must be >= 0, not {k_per_site}")
    if not np.isfinite(mean_effect).all():
        raise ValueError("mean_effect holds non-finite values; a NaN node has no rank")
    return select_circuits(mean_effect[None], site_of_node, mode, k_per_site, threshold)[0]


def select_prompts(rows: pl.DataFrame, prompt_filter: str, min_prompts: int) -> tuple[pl.DataFrame, str]:
    """The prompts of one group that its circuit is found and evaluated on, and a label for that set.

    ``rows`` carries the behaviour columns ``refused`` and ``refusal_score``. A filter that leaves
    fewer than ``min_prompts`` falls back to every prompt, and the label says so.
    """
    if prompt_filter == "all":
        return rows, "all"
    keep = pl.col("refused") if prompt_filter == "refused" else pl.col("refusal_score") > 0
    chosen = rows.filter(keep)
    if chosen.height < min_prompts:
        return rows, f"all ({prompt_filter}: only {chosen.height} < {min_prompts})"
    return chosen, prompt_filter


def baseline_prompts(sample: pl.DataFrame, prompt_filter: str) -> tuple[list[str], str]:
    """Prompts whose mean activations are the ablation baseline: the safe prompts, and with a
    refusal filter only those the model complied with (so the baseline is the non-refusing state)."""
    safe = sample.filter(pl.col("split") == "safe")
    if prompt_filter != "all":
        complied = safe.filter(~pl.col("refused") if prompt_filter == "refused" else pl.col("refusal_score") <= 0)
        if complied.height:
            return complied["prompt"].to_list(), "safe, complied"
    if safe.height:
        return safe["prompt"].to_list(), "safe"
    return sample.filter(pl.col("split") != "toxic")["prompt"].to_list(), "non-toxic"


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
        return {
            "node": int(node),
            "site": self.sites[s].name,
            "latent": None if local == self.d_saes[s] else int(local),
            "is_error": local == self.d_saes[s],
        }


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
    attention_mask: torch.Tensor  # [B, cached + P]: the cache's positions, then the suffix
    position_ids: torch.Tensor  # [B, P]

    def inputs(self, model: nn.Module) -> dict:
        cache = copy.deepcopy(self.cache)  # a forward appends to the cache: keep the prefix pristine
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
    pos = _post_positions(batch)  # [B, P]
    T, P = batch.input_ids.shape[1], pos.shape[1]
    if not bool((pos == torch.arange(T - P, T, device=pos.device)).all()):
        raise ValueError("the post-instruction tokens do not end the prompt; check the chat template")
    head = ChatBatch(
        batch.input_ids[:, : T - P],
        batch.attention_mask[:, : T - P],
        batch.position_ids[:, : T - P],
        batch.post_instruction[:, : T - P],
    )
    pre = prefill(model, head, logits=False)  # the template head once, then each prompt's own tokens
    # the suffix follows the prefill's own layout: [shared head][padding][own tokens][suffix]
    suffix_positions = pre.next_position[:, None] + torch.arange(P, device=pos.device)  # [B, P]
    mask = torch.cat([pre.attention_mask, pre.attention_mask.new_ones(len(pos), P)], dim=1)
    return SuffixBatch(pre.cache, batch.input_ids[:, T - P :], mask, suffix_positions)


def _score(model: PreTrainedModel, batch: "ChatBatch | SuffixBatch", refusal_ids: torch.Tensor) -> torch.Tensor:
    """Refusal score [B] at the last prompt position (differentiable)."""
    if isinstance(batch, SuffixBatch):
        logits = batch.next_logits(model).float()
    else:
        logits = last_logits(model, **batch.model_inputs(), use_cache=False).logits.float()
    return refusal_score_from_logits(logits, refusal_ids)


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
        score = _score(model, batch, refusal_ids)
        score.sum().backward()
    grads = {s: acts[s].grad.detach() for s in sites}
    return SiteGrads({s: a.detach() for s, a in acts.items()}, grads, score.detach())


def _decoder_grad(sae: nn.Module, g: torch.Tensor, d_sae: int) -> torch.Tensor:
    """g · d decode(f)/d f for each latent: g [N, d] -> [N, d_sae] (decode is affine in f)."""
    f = torch.zeros(g.shape[0], d_sae, dtype=g.dtype, device=g.device, requires_grad=True)
    with torch.enable_grad():
        (out,) = torch.autograd.grad((sae.decode(f) * g).sum(), f)
    return out


@torch.no_grad()
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
    from refusal_assets.lm.activations import forward_sites

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


def node_effects(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    saes: dict[Site, nn.Module],
    baseline: Baseline,
    refusal_ids: torch.Tensor,
    *,
    batch_size: int,
    system_prompt: str | None = None,
    method: str = "attribution",
    ig_steps: int = 10,
    device: str = "cpu",
    log: Callable[[str], None] = lambda s: None,
    suffixes: list[SuffixBatch] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt node effects [n_prompts, n_nodes] on the refusal score, and the scores [n_prompts].
    ``suffixes``: the prompts' cached prefixes when the caller already has them (:func:`prepare_suffixes`)."""
    sites = sorted(saes)
    index = NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])
    out, scores = [], []
    if suffixes is None:
        suffixes = prepare_suffixes(
            model, tokenizer, prompts, batch_size=batch_size, system_prompt=system_prompt, device=device
        )
    with progress("node effects", total=len(prompts), unit="prompts", log=log) as prog:
        for suffix in suffixes:
            n_rows = len(suffix.suffix_ids)
            acts, grads, score = _site_grads(model, suffix, sites, refusal_ids)
            if method == "integrated_gradients":
                grads = {s: _ig_grads(model, suffix, s, sites, saes[s], baseline, refusal_ids, ig_steps) for s in sites}
            effects = torch.zeros(n_rows, index.n_nodes)
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
            prog.update(n_rows)
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


def stacked_passes(suffixes: list[SuffixBatch], n_stack: int, max_cache_bytes: int) -> Iterator[StackedPass]:
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
    masks = torch.from_numpy(np.broadcast_to(masks, (len(masks), n_prompts, index.n_nodes)).copy())  # [M, n, N]
    M = len(masks)
    first = sites[0]
    resume = resume and first.kind == "resid"
    out = np.zeros((M, n_prompts))
    clean_first: dict[int, torch.Tensor] = {}  # the current prompt batch's first-site output, once for every mask
    for p in stacked_passes(suffixes, M, max_cache_bytes):
        m, B = p.stack.stop - p.stack.start, p.prompts.stop - p.prompts.start
        rows = masks[p.stack, p.prompts].transpose(0, 1).reshape(B * m, -1)  # [B * m, N], b-major
        hooks = {s: _ablation_hook(saes[s], baseline, s, index.site_slice(k), rows) for k, s in enumerate(sites)}
        resumed = contextlib.nullcontext()
        if resume:
            if p.prompts.start not in clean_first:
                with capture(model, [first]) as captured, until_stopped():
                    p.source.run(model.base_model)
                clean_first = {p.prompts.start: captured[first]}  # [B, P, d]
            resumed = resumed_blocks(model, first.layer, clean_first[p.prompts.start].repeat_interleave(m, 0))
        with resumed, site_hooks(model, hooks):
            out[p.stack, p.prompts] = p.unstack(_score(model, p.batch, refusal_ids))
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


def faithfulness(m_c: float, m_empty: float, m_full: float) -> float:
    """(m(C) - m(∅)) / (m(M) - m(∅)), unclipped."""
    return float((m_c - m_empty) / (m_full - m_empty)) if m_full != m_empty else float("nan")


def crossfit_folds(n_prompts: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each prompt [n_prompts]: ``n_folds`` = 0 (or >= n_prompts) is leave-one-out; else a
    seeded, balanced assignment to ``n_folds`` folds."""
    if n_folds < 0 or n_folds == 1:
        raise ValueError(f"n_folds must be 0 (leave-one-out) or at least 2, not {n_folds}")
    if n_folds == 0 or n_folds >= n_prompts:
        return np.arange(n_prompts)
    order = np.random.default_rng(seed).permutation(n_prompts)
    folds = np.empty(n_prompts, dtype=np.int64)
    folds[order] = np.arange(n_prompts) % n_folds
    return folds


def _ratio_ci(
    num: np.ndarray, den: np.ndarray, n_bootstrap: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI over prompts of mean(num) / mean(den) (paired resampling)."""
    if len(num) < 2 or n_bootstrap < 1:
        return float("nan"), float("nan")
    res = stats.bootstrap(
        (num, den),
        lambda a, b, axis=-1: a.mean(axis) / b.mean(axis),
        paired=True,
        vectorized=True,
        n_resamples=n_bootstrap,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


CI = tuple[float, float]


@dataclass(frozen=True)
class SweepPoint:
    """Cross-fitted scores of the circuits of one size (``size_per_site`` nodes at every site)."""

    size_per_site: int
    n_nodes: int
    """Nodes of the circuit selected on all prompts (the one the asset reports)."""
    n_nodes_mean_fold: float
    """Mean nodes of the out-of-fold circuits that actually scored the prompts."""
    faithfulness: float
    faithfulness_ci: CI
    completeness: float
    completeness_ci: CI
    random_faithfulness: float
    """The control: a random circuit with the same number of nodes per site."""
    random_faithfulness_ci: CI
    advantage_ci: CI
    """CI of faithfulness minus the control's, paired by prompt."""


@dataclass(frozen=True)
class SizeSweep:
    """Faithfulness and completeness over circuit sizes, with the ratios' shared denominator."""

    m_full: float
    """Mean score with no node ablated, m(M)."""
    m_empty: float
    """Mean score with every node ablated, m(∅)."""
    denominator_ci: CI
    n_prompts: int
    n_folds: int
    sweep: list[SweepPoint]

    def at(self, size_per_site: int) -> SweepPoint:
        return next(p for p in self.sweep if p.size_per_site == size_per_site)

    def to_json(self) -> dict:
        return asdict(self)


def evaluate_sizes(
    score_fn: Callable[[np.ndarray], np.ndarray],
    effects: np.ndarray,
    site_of_node: np.ndarray,
    sizes: list[int],
    select: Callable[[np.ndarray, int], np.ndarray],
    folds: np.ndarray,
    *,
    seed: int,
    n_bootstrap: int = 1000,
    log: Callable[[str], None] | None = None,
) -> SizeSweep:
    """Cross-fitted faithfulness and completeness over circuit sizes.

    ``effects`` [n_prompts, n_nodes] are the per-prompt node effects and ``folds`` [n_prompts] a fold
    per prompt: each prompt is scored with the circuit selected from the mean effect over the OTHER
    folds only, so no prompt evaluates a circuit that was chosen on it. ``score_fn(keep)`` maps
    per-prompt masks [n_prompts, n_nodes] to per-prompt scores [n_prompts]. The control is a random
    circuit per prompt with its circuit's number of nodes at every site (a fresh draw per prompt, so
    the mean averages over draws). ``score_fn`` is called once, with every mask of the sweep stacked
    [n_masks, n_prompts, n_nodes] -> [n_masks, n_prompts]. Ratios are of means over prompts, with
    percentile bootstrap CIs;
    ``advantage_ci`` is the CI of faithfulness minus the control's (paired by prompt).
    """
    n_prompts, n_nodes = effects.shape
    folds = np.asarray(folds)
    if folds.shape != (n_prompts,):
        raise ValueError(f"folds {folds.shape} must have one entry per prompt ({n_prompts})")
    if len(np.unique(folds)) < 2:
        raise ValueError("cross-fitting needs at least two folds (two prompts)")
    fold_means = {f: effects[folds != f].mean(0) for f in np.unique(folds)}  # out-of-fold mean effect per fold
    rng = np.random.default_rng(seed)
    site_members = [np.flatnonzero(site_of_node == s) for s in np.unique(site_of_node)]
    # Every mask of the sweep first, then one call: the model scores the whole stack in few passes.
    circuits = [_crossfit_circuit(n, select, folds, fold_means) for n in sizes]
    stack = [np.ones((n_prompts, n_nodes), bool), np.zeros((n_prompts, n_nodes), bool)]
    for circuit in circuits:
        stack += [circuit, ~circuit, random_like(circuit, site_members, rng)]
    if log:
        log(f"faithfulness sweep: {len(sizes)} sizes x 3 masks + 2 on {n_prompts} prompts")
    scores = np.asarray(score_fn(np.stack(stack)))  # [n_masks, n_prompts]
    m_full, m_empty = scores[0], scores[1]
    den = m_full - m_empty
    rows = [
        _sweep_point(
            n, circuit, *scores[2 + 3 * i : 5 + 3 * i], effects, select, m_full, m_empty, den, n_bootstrap, seed
        )
        for i, (n, circuit) in enumerate(zip(sizes, circuits))
    ]
    return SizeSweep(
        m_full=float(m_full.mean()),
        m_empty=float(m_empty.mean()),
        denominator_ci=_ratio_ci(den, np.ones_like(den), n_bootstrap, seed),
        n_prompts=n_prompts,
        n_folds=int(len(np.unique(folds))),
        sweep=rows,
    )


def _crossfit_circuit(n: int, select: Callable[[np.ndarray, int], np.ndarray], folds: np.ndarray, fold_means: dict):
    """[n_prompts, n_nodes]: each prompt's circuit of size ``n``, selected on the other folds."""
    circuits = {f: select(mean, n) for f, mean in fold_means.items()}
    return np.stack([circuits[f] for f in folds])


def random_like(circuit: np.ndarray, site_members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The control: per prompt, a random circuit with ``circuit``'s number of nodes at every site."""
    random = np.zeros_like(circuit)
    for i in range(len(circuit)):
        for members in site_members:
            random[i, rng.choice(members, size=int(circuit[i, members].sum()), replace=False)] = True
    return random


def _sweep_point(
    n: int,
    circuit: np.ndarray,
    m_c: np.ndarray,
    m_comp: np.ndarray,
    m_rand: np.ndarray,
    effects: np.ndarray,
    select: Callable[[np.ndarray, int], np.ndarray],
    m_full: np.ndarray,
    m_empty: np.ndarray,
    den: np.ndarray,
    n_bootstrap: int,
    seed: int,
) -> SweepPoint:
    """One size of :func:`evaluate_sizes` from the scores of its cross-fitted circuit, the
    complement and the random control."""
    full_circuit = select(effects.mean(0), n)  # the circuit that the asset reports at this size
    return SweepPoint(
        size_per_site=n,
        n_nodes=int(full_circuit.sum()),
        n_nodes_mean_fold=float(circuit.sum(1).mean()),
        faithfulness=faithfulness(m_c.mean(), m_empty.mean(), m_full.mean()),
        faithfulness_ci=_ratio_ci(m_c - m_empty, den, n_bootstrap, seed),
        completeness=faithfulness(m_comp.mean(), m_empty.mean(), m_full.mean()),
        completeness_ci=_ratio_ci(m_comp - m_empty, den, n_bootstrap, seed),
        random_faithfulness=faithfulness(m_rand.mean(), m_empty.mean(), m_full.mean()),
        random_faithfulness_ci=_ratio_ci(m_rand - m_empty, den, n_bootstrap, seed),
        advantage_ci=_ratio_ci(m_c - m_rand, den, n_bootstrap, seed),
    )


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
    sites = sorted(saes)
    index = NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])
    totals: dict[tuple[int, int], float] = {}
    n = 0
    if suffixes is None:
        suffixes = prepare_suffixes(
            model, tokenizer, prompts, batch_size=batch_size, system_prompt=system_prompt, device=device
        )
    for suffix in suffixes:
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

            with (
                torch.enable_grad(),
                site_hooks(model, {up: hook_for(up), down: hook_for(down)}, stop_after=site_module(model, down)),
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
                g_down = grads[down].float()
                B, P, d = g_down.shape
                g_f_down = _decoder_grad(saes[down], g_down.reshape(B * P, d), f_down.shape[-1]).view(B, P, -1)
                with torch.no_grad():
                    delta_up = saes[up].encode(acts[up].float()) - baseline.f_mean[up]  # [B, P, d_sae_up]
                for j in down_nodes:
                    (h_up,) = torch.autograd.grad(
                        (g_f_down[..., j].detach() * f_down[..., j]).sum(), x_up, retain_graph=True
                    )
                    h_f = _decoder_grad(saes[up], h_up.float().reshape(B * P, d), delta_up.shape[-1]).view(B, P, -1)
                    contrib = (h_f[..., up_nodes] * delta_up[..., up_nodes]).sum((0, 1))  # [n_up]
                    for u, c in zip(up_nodes.tolist(), contrib.tolist()):
                        key = (int(up_sl.start + u), int(down_sl.start + j))
                        totals[key] = totals.get(key, 0.0) + c
        n += len(suffix.suffix_ids)
    edges = [{"source": s, "target": t, "effect": v / max(n, 1)} for (s, t), v in totals.items()]
    edges.sort(key=lambda e: -abs(e["effect"]))
    return edges[:max_edges]


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
            total += float(_score(model, batch, refusal_ids).sum())
        n += len(chunk)
    return total / max(n, 1)


# ------------------------------------------------------------------------- the whole procedure

# Prompt groups a circuit is found on: toxic and benign separately, or every prompt at once.
GROUPS = {"toxic": ["toxic"], "benign": ["safe", "hard"], "all": ["safe", "hard", "toxic"]}


def refusal_direction(vectors: torch.Tensor, meta: pl.DataFrame) -> torch.Tensor | None:
    """Difference of means (toxic - safe) at the last post-instruction position (Arditi et al. 2024),
    over the training prompts only (the held-out ones score its ablation). ``vectors`` [N, d] and
    ``meta`` are one activations file's post-instruction rows; None without a toxic or a safe prompt."""
    meta = meta.with_row_index("row").filter(~pl.col("heldout"))
    last = meta.group_by("prompt_id").agg(pl.col("row").max(), pl.col("split").first())
    last = last.filter(pl.col("split").is_in(["toxic", "safe"]))
    rows = {s: last.filter(pl.col("split") == s)["row"].to_numpy().astype(np.int64) for s in ("toxic", "safe")}
    if any(len(r) == 0 for r in rows.values()):
        return None
    v = vectors.float()
    return v[torch.from_numpy(rows["toxic"])].mean(0) - v[torch.from_numpy(rows["safe"])].mean(0)


@dataclass(frozen=True)
class GroupCircuit:
    """The circuit of one prompt group, with its cross-fitted evaluation."""

    n_prompts: int
    """Prompts the circuit was found and evaluated on (after the prompt filter)."""
    n_prompts_in_group: int
    prompt_set: str
    """The prompt filter applied, or the fallback it took (see :func:`select_prompts`)."""
    chosen: np.ndarray
    """Circuit mask [n_nodes] selected on every prompt of the group."""
    nodes: list[dict]
    """The circuit's nodes (:meth:`NodeIndex.describe` + mean effect), strongest first."""
    edges: list[dict]
    sweep: SizeSweep
    at_k: SweepPoint
    """The sweep point at the configured ``k_per_site``."""
    effects: np.ndarray
    """Per-prompt node effects [n_prompts, n_nodes]."""
    scores: np.ndarray
    """Refusal score per prompt [n_prompts]."""
    prompt_ids: list[str]
    folds: np.ndarray

    def to_json(self) -> dict:
        """The group's entry of ``circuit.json``."""
        at_k = asdict(self.at_k)
        return {
            "n_prompts": self.n_prompts,
            "n_prompts_in_group": self.n_prompts_in_group,
            "prompt_set": self.prompt_set,
            "n_nodes": int(self.chosen.sum()),
            "nodes": self.nodes,
            "edges": self.edges,
            **{
                key: at_k[key]
                for key in (
                    "faithfulness",
                    "faithfulness_ci",
                    "completeness",
                    "completeness_ci",
                    "random_faithfulness",
                    "random_faithfulness_ci",
                    "advantage_ci",
                )
            },
            "sweep": self.sweep.to_json(),
            "mean_refusal_score": float(self.scores.mean()),
            "prompt_ids": self.prompt_ids,
            "folds": self.folds.tolist(),
        }


@dataclass(frozen=True)
class DirectionBaseline:
    """A refusal direction at one site, and the held-out toxic score with it projected out."""

    direction: torch.Tensor  # [d]
    score_clean: float | None
    """Held-out toxic prompts' mean score without ablation (None without held-out toxic prompts)."""
    score_ablated: float | None

    def to_json(self) -> dict:
        entry: dict = {"norm": float(self.direction.norm())}
        if self.score_clean is not None:
            entry["score_clean"], entry["score_ablated"] = self.score_clean, self.score_ablated
        return entry


@dataclass(frozen=True)
class CategoryCircuit:
    """Everything :func:`find_circuit` finds for one (model, category)."""

    category: str
    model_key: str
    index: NodeIndex
    prompt_filter: str
    baseline_set: str
    """Which prompts the mean-ablation baseline averages (see :func:`baseline_prompts`)."""
    n_baseline: int
    groups: dict[str, GroupCircuit]
    directions: dict[str, DirectionBaseline]

    @property
    def main(self) -> GroupCircuit:
        """The group the asset reports: toxic when the groups are separate."""
        return self.groups.get("toxic") or next(iter(self.groups.values()))

    def to_json(self) -> dict:
        """``circuit.json`` (the asset adds its wall time)."""
        return {
            "category": self.category,
            "model": self.model_key,
            "sites": [s.name for s in self.index.sites],
            "n_nodes_total": self.index.n_nodes,
            "prompt_filter": self.prompt_filter,
            "baseline": {"prompts": self.baseline_set, "n_prompts": self.n_baseline},
            "groups": {g: v.to_json() for g, v in self.groups.items()},
            "directions": {s: d.to_json() for s, d in self.directions.items()},
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """``effects.safetensors``: node sites, per-prompt effects and scores per group, directions per site."""
        out = {"site_of_node": torch.from_numpy(self.index.site_of_node.astype(np.int32))}
        for g, v in self.groups.items():
            out[f"effects_{g}"] = torch.from_numpy(v.effects.astype(np.float32))
            out[f"scores_{g}"] = torch.from_numpy(v.scores.astype(np.float32))
        for s, d in self.directions.items():
            out[f"direction_{s}"] = d.direction
        return {k: v.contiguous() for k, v in out.items()}


def find_circuit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: pl.DataFrame,
    saes: dict[Site, nn.Module],
    refusal_ids: torch.Tensor,
    directions: dict[Site, torch.Tensor | None],
    cc: CircuitConfig,
    *,
    category: str,
    model_key: str,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = lambda s: None,
    warn: Callable[[str], None] = lambda s: None,
) -> CategoryCircuit:
    """The circuit of one category per prompt group, cross-fitted faithfulness and completeness,
    edges, and the refusal-direction baseline.

    ``sample`` is the category's prompt sample joined with its behaviour (``refused``,
    ``refusal_score``); ``directions`` holds each site's refusal direction (:func:`refusal_direction`).
    """
    kw = {"batch_size": batch_size, "system_prompt": system_prompt, "device": device}
    baseline_texts, baseline_set = baseline_prompts(sample, cc.prompt_filter)
    baseline = compute_baseline(model, tokenizer, baseline_texts, saes, **kw)
    sites = sorted(saes)
    index = NodeIndex(sites, [baseline.f_mean[s].shape[-1] for s in sites])

    def select(mean_effect: np.ndarray, k: int) -> np.ndarray:
        return select_circuit(mean_effect, index.site_of_node, mode=cc.selection, k_per_site=k, threshold=cc.threshold)

    groups = (
        {"toxic": GROUPS["toxic"], "benign": GROUPS["benign"]} if cc.separate_safe_toxic else {"all": GROUPS["all"]}
    )
    found: dict[str, GroupCircuit] = {}
    for group, splits in groups.items():
        group_rows = sample.filter(pl.col("split").is_in(splits))
        rows, prompt_set = select_prompts(group_rows, cc.prompt_filter, cc.min_prompts)
        if rows.height < 2:
            warn(f"{category}/{group}: {rows.height} prompt(s); a cross-fitted circuit needs two, skipped")
            continue
        if prompt_set != cc.prompt_filter:
            warn(f"{category}/{group}: prompt set {prompt_set}")
        prompts = rows["prompt"].to_list()
        suffixes = prepare_suffixes(model, tokenizer, prompts, **kw)  # one prefill serves every pass below
        effects, scores = node_effects(
            model,
            tokenizer,
            prompts,
            saes,
            baseline,
            refusal_ids,
            method=cc.method,
            ig_steps=cc.ig_steps,
            log=log,
            suffixes=suffixes,
            **kw,
        )
        mean_effect = effects.mean(0)
        chosen = select(mean_effect, cc.k_per_site)
        folds = crossfit_folds(len(prompts), cc.n_folds, cc.seed)

        def score_fn(keep: np.ndarray, suffixes: list[SuffixBatch] = suffixes) -> np.ndarray:
            return ablated_scores(model, suffixes, saes, baseline, keep, refusal_ids)

        sweep = evaluate_sizes(
            score_fn,
            effects,
            index.site_of_node,
            sorted(set(cc.eval_sizes) | {cc.k_per_site}),
            select,
            folds,
            seed=cc.seed,
            n_bootstrap=cc.n_bootstrap,
            log=log,
        )
        edges = []
        if cc.edges and (group == "toxic" or not cc.separate_safe_toxic):
            edges = edge_effects(
                model,
                tokenizer,
                prompts,
                saes,
                baseline,
                refusal_ids,
                chosen,
                max_edges=cc.max_edges,
                targets_per_site=cc.edge_targets_per_site,
                mean_effect=mean_effect,
                suffixes=suffixes,
                **kw,
            )
        nodes = sorted(
            ({**index.describe(int(i)), "effect": float(mean_effect[i])} for i in np.flatnonzero(chosen)),
            key=lambda n: -n["effect"],
        )
        at_k = sweep.at(cc.k_per_site)
        found[group] = GroupCircuit(
            rows.height,
            group_rows.height,
            prompt_set,
            chosen,
            nodes,
            edges,
            sweep,
            at_k,
            effects,
            scores,
            rows["prompt_id"].to_list(),
            folds,
        )
        lo, hi = at_k.faithfulness_ci
        log(
            f"{category}/{group} ({rows.height} {prompt_set} prompts): {int(chosen.sum())} nodes, faithfulness "
            f"{at_k.faithfulness:.3f} [{lo:.2f}, {hi:.2f}], completeness {at_k.completeness:.3f}, "
            f"random {at_k.random_faithfulness:.3f}, m(M) - m(∅) {sweep.m_full - sweep.m_empty:.3f}"
        )
    if not found:
        raise ValueError(
            f"circuit {category}|{model_key}: no prompt group has two prompts to cross-fit; "
            f"raise data.sampling.max_per_cell or set circuits.prompt_filter: all"
        )
    return CategoryCircuit(
        category,
        model_key,
        index,
        cc.prompt_filter,
        baseline_set,
        len(baseline_texts),
        found,
        _direction_baselines(model, tokenizer, sample, saes, baseline, index, refusal_ids, directions, **kw),
    )


def _direction_baselines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: pl.DataFrame,
    saes: dict[Site, nn.Module],
    baseline: Baseline,
    index: NodeIndex,
    refusal_ids: torch.Tensor,
    directions: dict[Site, torch.Tensor | None],
    *,
    batch_size: int,
    system_prompt: str | None,
    device: str,
) -> dict[str, DirectionBaseline]:
    """Each site's refusal direction, scored by ablating it on the held-out toxic prompts."""
    kw = {"batch_size": batch_size, "system_prompt": system_prompt, "device": device}
    toxic_heldout = sample.filter((pl.col("split") == "toxic") & pl.col("heldout"))["prompt"].to_list()
    score_clean = None  # the held-out toxic prompts' score without any ablation: one pass serves every site
    if toxic_heldout:
        heldout_suffixes = prepare_suffixes(model, tokenizer, toxic_heldout, **kw)
        score_clean = ablated_score(model, heldout_suffixes, saes, baseline, np.ones(index.n_nodes, bool), refusal_ids)
    out = {}
    for site, r in directions.items():
        if r is None:
            continue
        ablated = (
            direction_ablation_score(model, tokenizer, toxic_heldout, site, r.to(device), refusal_ids, **kw)
            if toxic_heldout
            else None
        )
        out[site.name] = DirectionBaseline(r, score_clean, ablated)
    return out
