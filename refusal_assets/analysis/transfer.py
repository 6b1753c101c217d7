"""Functional cross-category tests: does category A's mechanism move category B's refusal?

Three tests, each a category x category matrix (rows A = whose mechanism, columns B = whose prompts)
of mean score changes over B's prompts with bootstrap CIs, a size-matched random control per B,
and the ratio to B's own mechanism (NaN, "not printed", where the own change's CI includes 0:
a ratio over a denominator that may be zero is not a number; DESIGN.md §2):

* **circuit transfer** (Marks et al. circuits): mean-ablate A's circuit (every node of it) on B's
  refusing prompts, with B's mean-ablation baseline; the loss of B's refusal against the loss from
  B's own circuit (leave-one-out: each prompt ablated by the circuit selected on the other prompts).
  Also the faithfulness of A's circuit on B (only A's circuit kept). One batched pass per mask set,
  on the cached prefixes (:func:`refusal_assets.circuits.ablation.ablated_scores`).
* **direction cross-ablation** (Arditi et al. 2024): each category's difference-of-means direction
  r_A, chosen over layers x post-instruction positions by its ablation effect on A's training
  prompts, is projected out of the residual stream at every layer, at the post-instruction positions
  (the prefix stays cached; see :func:`direction_scores`), on B's held-out toxic prompts; the drop of
  B's refusal score against r_B's. One pooled all-category direction is
  the monolithic baseline: what remains of each category's refusal after ablating it.
* **induced refusal**: r_A (its own norm) added at its layer, post-instruction positions, on B's
  held-out harmless prompts; the rise of B's refusal score.

Every test's pair calls and verdict follow :class:`refusal_assets.analysis.verdict_rule.VerdictRule`
(shared: ratio CI low >= 1 - margin; specific: ratio CI high < modular_max_normalised).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.analysis.resampling import CI, bootstrap_ci
from refusal_assets.analysis.serialise import jsonable
from refusal_assets.analysis.verdict_rule import VerdictRule
from refusal_assets.circuits.ablation import stacked_passes
from refusal_assets.circuits.evaluation import random_like
from refusal_assets.circuits.passes import SuffixBatch, prepare_suffixes
from refusal_assets.lm.behaviour import refusal_score_from_logits
from refusal_assets.lm.hooks import forward_hooks
from refusal_assets.lm.sites import decoder_layers, output_tensor, replace_output

# ------------------------------------------------------------------------------ statistics


def _mean_ci(x: np.ndarray, n_bootstrap: int, seed: int) -> CI:
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return (math.nan, math.nan)
    return bootstrap_ci(
        (x,),
        lambda a, axis=-1: a.mean(axis),
        float(x.mean()),
        n_resamples=n_bootstrap,
        batch=n_bootstrap,
        rng=np.random.default_rng(seed),
    )


def _ratio_ci(num: np.ndarray, den: np.ndarray, n_bootstrap: int, seed: int) -> CI:
    """Paired bootstrap CI of mean(num) / mean(den) over the same prompts."""
    if len(num) < 2:
        return (math.nan, math.nan)

    def stat(a, b, axis=-1):
        d = b.mean(axis)
        return np.where(d != 0, a.mean(axis) / np.where(d != 0, d, 1), np.nan)

    return bootstrap_ci(
        (num, den),
        stat,
        float(num.mean() / den.mean()),
        n_resamples=n_bootstrap,
        batch=n_bootstrap,
        rng=np.random.default_rng(seed),
        paired=True,
    )


@dataclass(frozen=True, kw_only=True)
class CrossMatrix:
    """One functional test: ``change[a, b]`` = mean change of B's refusal score by A's mechanism."""

    test: str
    categories: list[str]
    change: np.ndarray  # [n_cat, n_cat]
    change_lo: np.ndarray
    change_hi: np.ndarray
    ratio: np.ndarray  # change[a, b] / change[b, b]; NaN where change[b, b]'s CI includes 0
    ratio_lo: np.ndarray
    ratio_hi: np.ndarray
    control: np.ndarray  # [n_cat]: the size-matched random control's change on B
    control_ci: list[CI]
    n_prompts: list[int]
    calls: dict[str, str]  # "a|b" -> shared / specific / partial / undecided (a != b)
    verdict: str
    reason: str

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def _from_json(values: list) -> np.ndarray:
    """An array written by :func:`jsonable` (NaN as null), nested lists of any depth."""
    if values and isinstance(values[0], list):
        return np.array([_from_json(v) for v in values], dtype=float)
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def read_cross_matrix(data: dict) -> CrossMatrix:
    """A :class:`CrossMatrix` from its ``to_dict()`` (a test of ``transfer.json``)."""
    return CrossMatrix(
        test=data["test"],
        categories=list(data["categories"]),
        **{
            k: _from_json(data[k])
            for k in ("change", "change_lo", "change_hi", "ratio", "ratio_lo", "ratio_hi")
        },
        control=_from_json(data["control"]),
        control_ci=[(lo, hi) for lo, hi in _from_json(data["control_ci"]).reshape(-1, 2).tolist()],
        n_prompts=list(data["n_prompts"]),
        calls=dict(data["calls"]),
        verdict=data["verdict"],
        reason=data["reason"],
    )


def cross_matrix(
    test: str,
    categories: list[str],
    changes: dict[tuple[str, str], np.ndarray],
    control: dict[str, np.ndarray],
    rule: VerdictRule,
    *,
    n_bootstrap: int,
    seed: int,
) -> CrossMatrix:
    """``changes[(a, b)]`` per-prompt score changes [n_b] of B's prompts by A's mechanism -> the matrix,
    ratios, pair calls and the test's verdict. Positive changes = the mechanism carries refusal."""
    n = len(categories)
    m = {k: np.full((n, n), math.nan) for k in ("change", "lo", "hi", "ratio", "rlo", "rhi")}
    calls: dict[str, str] = {}
    for j, b in enumerate(categories):
        own = changes.get((b, b))
        own_ci = _mean_ci(own, n_bootstrap, seed + j) if own is not None else (math.nan, math.nan)
        own_defined = (
            own is not None and math.isfinite(own_ci[0]) and (own_ci[0] > 0 or own_ci[1] < 0)
        )
        for i, a in enumerate(categories):
            x = changes.get((a, b))
            if x is None:
                continue
            m["change"][i, j] = float(x.mean())
            m["lo"][i, j], m["hi"][i, j] = _mean_ci(x, n_bootstrap, seed + 1000 * i + j)
            if own_defined:
                m["ratio"][i, j] = float(x.mean() / own.mean())
                m["rlo"][i, j], m["rhi"][i, j] = _ratio_ci(x, own, n_bootstrap, seed + 1000 * i + j)
            if a != b:
                lo, hi = m["rlo"][i, j], m["rhi"][i, j]
                if math.isfinite(lo) and lo >= 1 - rule.equivalence_margin:
                    calls[f"{a}|{b}"] = "shared"
                elif math.isfinite(hi) and hi < rule.modular_max_normalised_jaccard:
                    calls[f"{a}|{b}"] = "specific"
                elif math.isfinite(hi) and hi < 1 - rule.equivalence_margin:
                    calls[f"{a}|{b}"] = "partial"
                else:
                    calls[f"{a}|{b}"] = "undecided"
    verdict, reason = verdict_from_calls(test, list(calls.values()), rule)
    ctrl = [float(control[b].mean()) if b in control else math.nan for b in categories]
    ctrl_ci = [
        _mean_ci(control[b], n_bootstrap, seed + 7 * j) if b in control else (math.nan, math.nan)
        for j, b in enumerate(categories)
    ]
    n_prompts = [len(changes[(b, b)]) if (b, b) in changes else 0 for b in categories]
    return CrossMatrix(
        test=test,
        categories=categories,
        change=m["change"],
        change_lo=m["lo"],
        change_hi=m["hi"],
        ratio=m["ratio"],
        ratio_lo=m["rlo"],
        ratio_hi=m["rhi"],
        control=np.array(ctrl),
        control_ci=ctrl_ci,
        n_prompts=n_prompts,
        calls=calls,
        verdict=verdict,
        reason=reason,
    )


def verdict_from_calls(test: str, calls: list[str], rule: VerdictRule) -> tuple[str, str]:
    """The same counting rule as :func:`refusal_assets.analysis.verdict_rule.decide_verdict`, on ordered pairs."""
    count = {c: calls.count(c) for c in ("shared", "specific", "partial", "undecided")}
    decided = len(calls) - count["undecided"]
    numbers = (
        f"{test}: of {len(calls)} ordered pairs, {count['shared']} shared (ratio CI low >= "
        f"{1 - rule.equivalence_margin:g}), {count['specific']} specific (ratio CI high < "
        f"{rule.modular_max_normalised_jaccard:g}), {count['partial']} partial, {count['undecided']} undecided (CI "
        "spans both answers, or the own change's CI includes 0)."
    )
    if decided == 0 or decided < rule.min_decided_fraction * len(calls):
        return "insufficient evidence", f"Insufficient evidence: {numbers}"
    if (
        count["shared"] >= rule.majority * decided
        and count["specific"] == 0
        and count["partial"] == 0
    ):
        return "monolithic", f"Monolithic: {numbers}"
    if count["specific"] >= rule.majority * decided and count["shared"] == 0:
        return "modular", f"Modular: {numbers}"
    return "mixed", f"Mixed: {numbers}"


# ------------------------------------------------------------------------- directions


def suffixes_of(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts,
    *,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
) -> list[SuffixBatch]:
    """Prompts as cached prefixes (:func:`refusal_assets.circuits.passes.prepare_suffixes`): one pass over
    each prompt's prefix, after which every intervention costs only the post-instruction tokens."""
    if prompts and isinstance(prompts[0], SuffixBatch):
        return list(prompts)
    return prepare_suffixes(
        model,
        tokenizer,
        list(prompts),
        batch_size=batch_size,
        system_prompt=system_prompt,
        device=device,
    )


@torch.no_grad()
def post_instruction_hidden(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts,
    *,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """Residual stream at the input of every layer, post-instruction positions only: [n, L, P, d]
    (the suffix forward on the cached prefix; the post-instruction span has the same length P in
    every prompt)."""
    out = []
    for suffix in suffixes_of(
        model, tokenizer, prompts, batch_size=batch_size, system_prompt=system_prompt, device=device
    ):
        hs = suffix.run(model.base_model, output_hidden_states=True).hidden_states
        out.append(torch.stack(hs[:-1], 1).float().cpu())  # [B, L, P, d]: hs[l] is layer l's input
    if not out:
        raise ValueError("post_instruction_hidden: no prompts")
    return torch.cat(out)


def _residual_modules(model: PreTrainedModel) -> list[nn.Module]:
    """Modules whose outputs are the residual stream between blocks: the embedding, then every block."""
    return [model.get_input_embeddings(), *decoder_layers(model)]


@torch.no_grad()
def direction_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts,
    directions: torch.Tensor,
    *,
    mode: str,
    refusal_ids: torch.Tensor,
    layers: list[int] | None = None,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
    max_cache_bytes: int = 512 * 2**20,
) -> np.ndarray:
    """Refusal scores [K, n] of ``prompts`` (texts, or their :func:`suffixes_of`) under each of K
    interventions at the post-instruction positions, on the cached prefixes: K directions cost
    passes of P tokens, not K full prompts.

    ``mode="ablate"``: project the unit direction out of the residual stream at every layer
    (embedding output and every block output). ``mode="add"``: add the direction (as given, with its
    norm) at the input of ``layers[k]`` (Arditi et al.'s activation addition). ``mode="none"``: the
    clean scores (K = 1). The K interventions share passes: each prompt's row is repeated once per
    direction (as many per pass as ``max_cache_bytes`` of repeated prefix cache allow), each row with
    its own direction. Arditi et al. intervene at every position; here the prefix (system turn and
    the user's text) stays clean and cached, which is where the circuits intervene too (DESIGN.md §2:
    the post-instruction positions) and what keeps the main job within its budget; attention from
    the post-instruction positions still reads the prefix's clean keys and values, so the ablation
    is, if anything, weaker than Arditi et al.'s."""
    directions = directions.float().to(device)
    K = directions.shape[0]
    if mode not in ("ablate", "add", "none"):
        raise ValueError(f"direction_scores: mode must be 'ablate', 'add' or 'none', not {mode!r}")
    if mode == "add" and (layers is None or len(layers) != K):
        raise ValueError(
            f"direction_scores: mode 'add' needs one layer per direction ({K}), got {layers}"
        )
    suffixes = suffixes_of(
        model, tokenizer, prompts, batch_size=batch_size, system_prompt=system_prompt, device=device
    )
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    mods = _residual_modules(model)
    K = 1 if mode == "none" else K
    out = np.zeros((K, sum(len(s.suffix_ids) for s in suffixes)))
    for p in stacked_passes(suffixes, K, max_cache_bytes):  # one direction per row
        B = p.prompts.stop - p.prompts.start
        ks = torch.arange(p.stack.start, p.stack.stop).repeat(
            B
        )  # [B * m]: the direction of each row
        if mode == "ablate":
            r = unit[ks][:, None]  # [B * m, 1, d]

            def ablate(_m, _i, output, r=r):
                x = output_tensor(output)
                rr = r.to(x.dtype)
                return replace_output(output, x - (x * rr).sum(-1, keepdim=True) * rr)

            hooks = [(mod, ablate) for mod in mods]
        elif mode == "add":
            hooks = []
            for layer in sorted({layers[int(k)] for k in ks}):
                on = torch.tensor([layers[int(k)] == layer for k in ks])[
                    :, None, None
                ]  # [B * m, 1, 1]
                v = torch.where(on, directions[ks][:, None], 0.0)  # [B * m, 1, d]

                def add(_m, _i, output, v=v):
                    x = output_tensor(output)
                    return replace_output(output, x + v.to(x.dtype))

                hooks.append(
                    (mods[layer], add)
                )  # module `layer` outputs the input of block `layer`
        else:
            hooks = []
        with forward_hooks(hooks):
            out[p.stack, p.prompts] = p.unstack(
                refusal_score_from_logits(p.batch.next_logits(model), refusal_ids)
            )
    return out


@dataclass(frozen=True, kw_only=True)
class SelectedDirection:
    category: str
    layer: int
    position: int
    """Post-instruction offset (0 = first post-instruction token)."""
    direction: torch.Tensor  # [d], difference of means (toxic - harmless), raw norm
    train_drop: float
    """Mean drop of the training toxic prompts' score when it is ablated (what selected it)."""


def _head(suffix: SuffixBatch, n: int) -> SuffixBatch:
    """The first ``n`` rows of a suffix batch (its cache sliced along the batch)."""
    import copy

    cache = copy.deepcopy(suffix.cache)
    cache.batch_select_indices(
        torch.arange(min(n, len(suffix.suffix_ids)), device=suffix.suffix_ids.device)
    )
    return SuffixBatch(
        cache, suffix.suffix_ids[:n], suffix.attention_mask[:n], suffix.position_ids[:n]
    )


def candidate_grid(
    n_layers: int, n_positions: int, n_layer_candidates: int, n_position_candidates: int
) -> list[tuple[int, int]]:
    """(layer, position) candidates: evenly spaced layers below 0.8 L (Arditi et al. drop the last
    layers, whose directions act on the output directly) x the last post-instruction positions."""
    top = max(1, int(0.8 * n_layers))
    layers = sorted(
        {round(x) for x in np.linspace(min(1, top - 1), top - 1, min(n_layer_candidates, top))}
    )
    positions = list(range(max(0, n_positions - n_position_candidates), n_positions))
    return [(layer, p) for layer in layers for p in positions]


def select_directions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    toxic: dict[str, list[str]],
    harmless: dict[str, list[str]],
    refusal_ids: torch.Tensor,
    *,
    n_layer_candidates: int,
    n_position_candidates: int,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
    pooled: bool = True,
    pooled_selection_prompts: int = 4,
    hidden: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, SelectedDirection]:
    """Per category (and ``"pooled"`` over all): the difference-of-means direction at the (layer,
    position) whose ablation lowers the category's training toxic scores most. Every candidate of a
    category is scored in one batched :func:`direction_scores` call; the pooled direction (its mean
    over every training prompt) is selected on ``pooled_selection_prompts`` per category, which
    bounds its cost by that of one category. ``hidden``, if given, receives the activations
    (``{"toxic": {c: [n, L, P, d]}, "harmless": ...}``) for :func:`direction_cosines`."""
    kw = {"batch_size": batch_size, "system_prompt": system_prompt, "device": device}
    toxic = {
        c: suffixes_of(model, tokenizer, p, **kw) if p else [] for c, p in toxic.items()
    }  # each prefix computed once
    h_tox = {
        c: post_instruction_hidden(model, tokenizer, p, **kw) for c, p in toxic.items() if p
    }  # [n, L, P, d]
    h_harm = {
        c: post_instruction_hidden(model, tokenizer, p, **kw) for c, p in harmless.items() if p
    }
    if hidden is not None:
        hidden.update(toxic=h_tox, harmless=h_harm)
    groups = {c: ([c], [c]) for c in toxic if c in h_tox and c in h_harm}
    if pooled:
        groups["pooled"] = (list(groups), list(groups))
    out = {}
    for name, (tox_cats, harm_cats) in groups.items():
        mean_tox = torch.cat([h_tox[c] for c in tox_cats]).mean(0)  # [L, P, d]
        mean_harm = torch.cat([h_harm[c] for c in harm_cats]).mean(0)
        diff = mean_tox - mean_harm
        grid = candidate_grid(
            diff.shape[0], diff.shape[1], n_layer_candidates, n_position_candidates
        )
        cands = torch.stack([diff[layer, p] for layer, p in grid])  # [K, d]
        # the pooled direction is selected on the first batch of each category, at most pooled_selection_prompts of it
        prompts = (
            [_head(toxic[c][0], pooled_selection_prompts) for c in tox_cats]
            if name == "pooled"
            else toxic[name]
        )
        clean = direction_scores(
            model, tokenizer, prompts, cands[:1], mode="none", refusal_ids=refusal_ids, **kw
        )[0]
        ablated = direction_scores(
            model, tokenizer, prompts, cands, mode="ablate", refusal_ids=refusal_ids, **kw
        )  # [K, n]
        drops = (clean[None] - ablated).mean(1)
        best = int(np.argmax(drops))
        out[name] = SelectedDirection(
            category=name,
            layer=grid[best][0],
            position=grid[best][1],
            direction=cands[best].cpu(),
            train_drop=float(drops[best]),
        )
    return out


@dataclass(frozen=True, kw_only=True)
class DirectionTests:
    ablation: CrossMatrix
    induced: CrossMatrix
    pooled_remaining: dict[str, tuple[float, CI]]
    """Per category: the share of its refusal (held-out toxic score above its harmless mean) left after
    ablating the pooled direction, with a bootstrap CI over toxic prompts."""
    selected: dict[str, dict]
    cosine: dict

    def to_dict(self) -> dict:
        return jsonable(
            {
                "ablation": self.ablation.to_dict(),
                "induced": self.induced.to_dict(),
                "pooled_remaining": self.pooled_remaining,
                "selected": self.selected,
                "cosine": self.cosine,
            }
        )


def direction_tests(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    selected: dict[str, SelectedDirection],
    toxic_eval: dict[str, list[str]],
    harmless_eval: dict[str, list[str]],
    refusal_ids: torch.Tensor,
    rule: VerdictRule,
    *,
    n_bootstrap: int,
    seed: int,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
) -> DirectionTests:
    """Cross-ablation, induced refusal and the pooled baseline on held-out prompts: each prompt set's
    prefixes are cached once, then every direction (the categories', the pooled one, a random
    control) costs one suffix pass."""
    kw = {
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "device": device,
        "refusal_ids": refusal_ids,
    }
    cats = sorted(c for c in selected if c != "pooled")
    gen = torch.Generator().manual_seed(seed)
    d = selected[cats[0]].direction.shape[0]
    abl: dict[tuple[str, str], np.ndarray] = {}
    ind: dict[tuple[str, str], np.ndarray] = {}
    abl_ctrl, ind_ctrl, remaining = {}, {}, {}
    for b in cats:
        tox, harm = toxic_eval.get(b, []), harmless_eval.get(b, [])
        cache_kw = {"batch_size": batch_size, "system_prompt": system_prompt, "device": device}
        tox = (
            suffixes_of(model, tokenizer, tox, **cache_kw) if tox else []
        )  # one prefix pass, reused by every direction
        harm = suffixes_of(model, tokenizer, harm, **cache_kw) if harm else []
        names = [*cats, *(["pooled"] if "pooled" in selected else [])]
        dirs = torch.stack([selected[a].direction for a in names])  # [K, d]
        rand = torch.randn(1, d, generator=gen)
        if tox:
            clean = direction_scores(model, tokenizer, tox, dirs[:1], mode="none", **kw)[0]
            ablated = direction_scores(
                model, tokenizer, tox, torch.cat([dirs, rand]), mode="ablate", **kw
            )  # [K + 1, n]
            for k, a in enumerate(names):
                if a != "pooled":
                    abl[(a, b)] = clean - ablated[k]
            abl_ctrl[b] = clean - ablated[-1]
        if harm:
            h_clean = direction_scores(model, tokenizer, harm, dirs[:1], mode="none", **kw)[0]
            layers = [selected[a].layer for a in cats]
            own = selected[b]
            rand_scaled = (
                rand / rand.norm() * own.direction.norm()
            )  # the control: B's norm, at B's layer
            added = direction_scores(
                model,
                tokenizer,
                harm,
                torch.cat([dirs[: len(cats)], rand_scaled]),
                mode="add",
                layers=[*layers, own.layer],
                **kw,
            )
            for k, a in enumerate(cats):
                ind[(a, b)] = added[k] - h_clean
            ind_ctrl[b] = added[-1] - h_clean
        if tox and harm and "pooled" in selected:
            base = float(h_clean.mean())
            ref = clean - base  # [n]: each toxic prompt's refusal above the harmless mean
            left = ablated[names.index("pooled")] - base
            value = float(left.mean() / ref.mean()) if ref.mean() != 0 else math.nan
            remaining[b] = (
                value,
                _ratio_ci(left, ref, n_bootstrap, seed)
                if math.isfinite(value)
                else (math.nan, math.nan),
            )
    cosine = _direction_cosines(selected, cats)
    return DirectionTests(
        ablation=cross_matrix(
            "direction cross-ablation",
            cats,
            abl,
            abl_ctrl,
            rule,
            n_bootstrap=n_bootstrap,
            seed=seed,
        ),
        induced=cross_matrix(
            "induced refusal", cats, ind, ind_ctrl, rule, n_bootstrap=n_bootstrap, seed=seed + 1
        ),
        pooled_remaining=remaining,
        selected=_selected_summary(selected),
        cosine=cosine,
    )


def _direction_cosines(selected: dict[str, SelectedDirection], cats: list[str]) -> dict:
    """Cosines between the categories' unit directions."""
    U = torch.stack(
        [selected[c].direction / selected[c].direction.norm().clamp_min(1e-8) for c in cats]
    )
    return {
        "categories": cats,
        "matrix": (U @ U.T).clamp(-1, 1).tolist(),
        "note": "directions at each category's own selected layer and position",
    }


def _selected_summary(selected: dict[str, SelectedDirection]) -> dict[str, dict]:
    """Layer, position, norm and training drop of each selected direction."""
    return {
        c: {
            "layer": s.layer,
            "position": s.position,
            "norm": float(s.direction.norm()),
            "train_drop": s.train_drop,
        }
        for c, s in selected.items()
    }


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``[..., d]`` arrays."""
    return (a * b).sum(-1) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30
    )


def direction_cosines(
    tox: dict[str, np.ndarray],
    harm: dict[str, np.ndarray],
    *,
    n_splits: int = 50,
    n_permutations: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Cosines of difference-of-means directions at one (layer, position), not bare: per pair, the
    full-sample cosine; a split-half ceiling (cosine of the directions of two disjoint halves of one
    category's toxic prompts) and the cross-category cosine of half-sample directions at the same size,
    whose ratio is ~1 when the two categories share a direction; and a one-sided label-permutation p
    (toxic prompts shuffled between the two categories, harmless means kept) for a cosine lower than
    exchangeable labels give. ``tox[c]`` [n_c, d], ``harm[c]`` [m_c, d]."""
    from math import comb

    cats = sorted(tox)
    rng = np.random.default_rng(seed)
    mu_h = {c: harm[c].mean(0) for c in cats}
    pairs = []
    for i, a in enumerate(cats):
        for b in cats[i + 1 :]:
            na, nb = len(tox[a]), len(tox[b])
            m = min(na, nb) // 2
            full = float(_cos(tox[a].mean(0) - mu_h[a], tox[b].mean(0) - mu_h[b]))
            cross, within = [], []
            for _ in range(n_splits):
                pa, pb = rng.permutation(na), rng.permutation(nb)
                a1, a2 = tox[a][pa[:m]].mean(0) - mu_h[a], tox[a][pa[m : 2 * m]].mean(0) - mu_h[a]
                b1, b2 = tox[b][pb[:m]].mean(0) - mu_h[b], tox[b][pb[m : 2 * m]].mean(0) - mu_h[b]
                cross.append((_cos(a1, b1) + _cos(a2, b2) + _cos(a1, b2) + _cos(a2, b1)) / 4)
                within.append((_cos(a1, a2) + _cos(b1, b2)) / 2)
            pooled = np.concatenate([tox[a], tox[b]])
            null = np.empty(n_permutations)
            for k in range(n_permutations):
                p = rng.permutation(na + nb)
                null[k] = _cos(pooled[p[:na]].mean(0) - mu_h[a], pooled[p[na:]].mean(0) - mu_h[b])
            ceiling = float(np.mean(within))
            min_p = max(1 / (comb(na + nb, na) / (2 if na == nb else 1)), 1 / (1 + n_permutations))
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    "cosine": full,
                    "half_size": m,
                    "cross_half_cosine": float(np.mean(cross)),
                    "ceiling": ceiling,
                    "normalised": float(np.mean(cross)) / ceiling if ceiling > 0 else math.nan,
                    "p_value": float((1 + (null <= full).sum()) / (1 + n_permutations)),
                    "min_p": min_p,
                    "testable": min_p < alpha,
                    "null_mean": float(null.mean()),
                }
            )
    return {"categories": cats, "pairs": pairs}


# ---------------------------------------------------------------------------- circuit transfer


def circuit_transfer(
    score_fns: dict[str, Callable[[np.ndarray], np.ndarray]],
    circuits: dict[str, np.ndarray],
    own_masks: dict[str, np.ndarray],
    site_of_node: np.ndarray,
    rule: VerdictRule,
    *,
    n_bootstrap: int,
    seed: int,
) -> tuple[CrossMatrix, CrossMatrix]:
    """``score_fns[b](keeps [n_masks, n_b, n_nodes]) -> scores [n_masks, n_b]`` on B's refusing
    prompts (B's baseline), called once per B with every mask stacked;
    ``circuits[a]`` A's circuit [n_nodes]; ``own_masks[b]`` B's leave-one-out circuits [n_b, n_nodes].
    Returns (loss matrix: m(M) - m(M without A's circuit); faithfulness-gain matrix: m(A's circuit
    only) - m(∅)), each with a random circuit of B's size per site as the control."""
    cats = sorted(score_fns)
    rng = np.random.default_rng(seed)
    site_members = [np.flatnonzero(site_of_node == s) for s in np.unique(site_of_node)]
    loss: dict[tuple[str, str], np.ndarray] = {}
    keep_only: dict[tuple[str, str], np.ndarray] = {}
    loss_ctrl, keep_ctrl = {}, {}
    for b in cats:
        n_b, n_nodes = own_masks[b].shape
        rand = random_like(own_masks[b], site_members, rng)  # the control: B's own circuit sizes
        masks = {
            a: own_masks[b] if a == b else np.broadcast_to(circuits[a], (n_b, n_nodes))
            for a in cats
        }
        # one stacked call per B: full, empty, then (without A's circuit, only A's circuit) per A, then the control
        stack = [np.ones((n_b, n_nodes), bool), np.zeros((n_b, n_nodes), bool)]
        stack += [m for a in cats for m in (~masks[a], masks[a])] + [~rand, rand]
        scores = np.asarray(score_fns[b](np.stack(stack)))  # [2 + 2 * n_cats + 2, n_b]
        full, empty = scores[0], scores[1]
        for i, a in enumerate(cats):
            loss[(a, b)] = full - scores[2 + 2 * i]
            keep_only[(a, b)] = scores[3 + 2 * i] - empty
        loss_ctrl[b] = full - scores[-2]
        keep_ctrl[b] = scores[-1] - empty
    return (
        cross_matrix(
            "circuit transfer", cats, loss, loss_ctrl, rule, n_bootstrap=n_bootstrap, seed=seed
        ),
        cross_matrix(
            "circuit faithfulness on B",
            cats,
            keep_only,
            keep_ctrl,
            rule,
            n_bootstrap=n_bootstrap,
            seed=seed + 1,
        ),
    )


def loo_masks(effects: np.ndarray, select: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Leave-one-out circuits [n, n_nodes]: prompt i's circuit is selected on the other prompts."""
    n = effects.shape[0]
    total = effects.sum(0)
    return np.stack([select((total - effects[i]) / (n - 1)) for i in range(n)])
