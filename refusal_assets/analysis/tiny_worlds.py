"""Three planted worlds on the tiny model, each recovered at both levels by the real pipeline.

Why: the synthetic feature-level plant (:mod:`.feature_calibration`) checks the statistics of
:func:`~refusal_assets.analysis.feature_level.core_share_test`, not the steps that produce its
input. Here a copy of the tiny Qwen2-style model carries a known refusal mechanism, and both levels
run on it as the assets do: diff-in-means directions with directional ablation
(:func:`~refusal_assets.directions.execution.run_execution`), and trained TopK SAEs (no identity
SAE), attribution patching (:func:`~refusal_assets.circuits.attribution.node_effects`) and the
core-share test for the features.

The model (:func:`build_world`). Every block's attention is on: a uniform causal copy of the first
``width`` residual dimensions (:func:`~refusal_assets.directions.planted.wire_attention_copy`), so
the marker token that opens a toxic prompt reaches the post-instruction positions, block after
block. MLPs are off except in block ``mlp_block``. One residual dimension (the last) holds a
constant ``bias`` in every token embedding; it dominates the RMS norms, so each norm is close to a
fixed scale and the MLP's SiLU gate, which reads that dimension, is close to a constant. The MLP is
then close to a linear map of planted dimensions ``src -> dst``. Dimension 0 is the shared refusal
dimension e_0, dimension 1 + c category c's own dimension e_c.

* ``monolithic``: every marker writes e_0, the MLP maps e_0 -> e_0, REFUSE0 reads e_0.
* ``modular``: marker c writes e_c, the MLP maps e_c -> e_c, REFUSE<c> reads e_c.
* ``two_level``: marker c writes e_c (category-specific upstream features); the MLP moves every e_c
  into e_0 (one shared downstream feature and one shared execution direction), REFUSE0 reads e_0.

Noise: ordinary tokens get small random components in the planted dimensions, and each marker a
random jitter around its planted dimension, redrawn per replicate (with fresh prompts), so the
directions are estimated with noise and the SAEs see a non-trivial distribution.

Expected answers: execution monolithic / modular / monolithic, features monolithic / modular /
not monolithic (ideally "shared core + specific tail"). Feature sites: the residual stream entering
the MLP block (upstream, where the categories' own features live in ``two_level``) and the MLP's
output (downstream, the shared feature).
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from refusal_assets.analysis.feature_calibration import DECIDED, MAX_FALSE_ANSWER_RATE
from refusal_assets.analysis.feature_level import CoreShareTest, FeatureRule, core_share_test
from refusal_assets.config import DirectionsConfig, ModelConfig, RefusalConfig, SAEConfig
from refusal_assets.directions.planted import (
    FILLER_WORDS,
    filler_text,
    judged_rows,
    wire_attention_copy,
)
from refusal_assets.directions.prompts import PromptRow
from refusal_assets.lm.sites import Site, decoder_layers

World = Literal["monolithic", "modular", "two_level"]
WORLDS: tuple[World, ...] = ("monolithic", "modular", "two_level")
EXPECTED_EXECUTION: dict[World, str] = {
    "monolithic": "monolithic",
    "modular": "modular",
    "two_level": "monolithic",
}
EXPECTED_FEATURES: dict[World, str] = {
    "monolithic": "monolithic",
    "modular": "modular",
    "two_level": "shared core + specific tail",
}


@dataclass(frozen=True, kw_only=True)
class WorldDesign:
    """Strengths, noise and the feature-level settings of the tiny planted worlds."""

    alpha: float = 6.0
    """Marker strength on its planted dimension."""
    beta: float = 8.0
    """Refusal readout weight on its dimension (after the final norm)."""
    threshold: float = 1.0
    """The refusal logit is about ``beta * (x - threshold)``: noise alone does not refuse."""
    bias: float = 8.0
    """The constant dimension: with d_model 64, RMS norms then scale by about sqrt(64) / 8 = 1."""
    gain: float = 4.0
    """MLP gain from ``src`` to ``dst``."""
    token_noise: float = 0.05
    """Sd of ordinary tokens' random components in the planted dimensions."""
    marker_noise: float = 0.1
    """Sd of each marker's random jitter in the planted dimensions, relative to ``alpha``."""
    copy_gain: float = 2.0
    """Attention copies the planted dimensions with this gain: uniform attention over a ~30-token
    prompt dilutes the marker, and the signal must stand well above what ablating a random
    direction moves (that direction's share of the constant dimension)."""
    detector_cut: float = 0.2
    """The MLP detector fires above this value of its source dimension."""
    detector_sharpness: float = 8.0
    mlp_block: int = 1
    sae_expansion: int = 2
    sae_k: int = 4
    sae_steps: int = 300
    k_per_site: int = 2
    """Circuit latents per site: a category's mechanism is one or two directions per site."""
    n_splits: int = 4
    n_bootstrap: int = 50


class PlantedWorldModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    markers: dict[str, str]
    """Category -> its marker token."""
    refusals: list[str]
    """The refusal tokens (REFUSE0, or REFUSE<c> per category in ``modular``)."""
    sites: tuple[Site, Site]
    """(upstream residual entering the MLP block, the MLP's output)."""


def _wiring(world: World, n_categories: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(each category's marker dimension, the MLP's (src, dst) pairs)."""
    if world == "monolithic":
        return [0] * n_categories, [(0, 0)]
    own = [1 + c for c in range(n_categories)]
    if world == "modular":
        return own, [(d, d) for d in own]
    return own, [(d, 0) for d in own]


def _wire_mlp(mlp: torch.nn.Module, pairs, bias_dim: int, design: WorldDesign, d: int) -> None:
    """Hidden unit j detects ``src_j``: SiLU(sharpness x (x_src - cut)) (about a ReLU, the cut read
    off the constant dimension) x (up reading the constant dimension, about sqrt(d)), written to
    ``dst_j`` with ``gain``. A detector, not a linear map: small perturbations of the categories'
    dimensions (noise, a random direction's ablation) do not add up in the shared one. In
    ``two_level`` (src != dst) it also subtracts ``src_j``'s detected part (the category dimension
    is consumed)."""
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        proj.weight.zero_()
    root = d**0.5  # the constant dimension after the norm
    sharp = design.detector_sharpness
    out = design.gain / (sharp * root)
    for j, (src, dst) in enumerate(pairs):
        mlp.gate_proj.weight[j, src] = sharp
        mlp.gate_proj.weight[j, bias_dim] = -sharp * design.detector_cut / root
        mlp.up_proj.weight[j, bias_dim] = 1.0
        mlp.down_proj.weight[dst, j] += out
        if src != dst:
            mlp.down_proj.weight[src, j] -= out / design.gain


def _filler_ids(tokenizer) -> list[int]:
    """The token ids of the prompts' filler words (with and without a leading space)."""
    ids = set()
    for word in FILLER_WORDS:
        for text in (word, f" {word}"):
            ids.update(tokenizer.encode(text, add_special_tokens=False))
    return sorted(ids)


def build_world(
    model, tokenizer, world: World, categories: list[str], design: WorldDesign, seed: int
) -> PlantedWorldModel:
    """A copy of the tiny model with ``world`` planted (module docstring); noise from ``seed``."""
    model, tokenizer = copy.deepcopy(model), copy.deepcopy(tokenizer)
    n = len(categories)
    markers = {c: f"<cat{i}>" for i, c in enumerate(categories)}
    refusals = [f"REFUSE{m}" for m in range(n if world == "modular" else 1)]
    tokenizer.add_tokens(list(markers.values()), special_tokens=True)
    tokenizer.add_tokens(refusals)
    model.resize_token_embeddings(len(tokenizer))
    cfg = model.config
    head, n_kv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads
    group, width, d = cfg.num_attention_heads // n_kv, n_kv * head, cfg.hidden_size
    if width < n + 1 or d <= width:
        raise ValueError(f"the worlds need {n + 1} <= {width} planted dimensions < d_model {d}")
    marker_dims, pairs = _wiring(world, n)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, block in enumerate(decoder_layers(model)):
            wire_attention_copy(block.self_attn, head, n_kv, group)
            if i <= design.mlp_block:  # up to the detector: later blocks copy with gain 1
                block.self_attn.o_proj.weight *= design.copy_gain
            if block.self_attn.o_proj.bias is not None:
                block.self_attn.o_proj.bias.zero_()
            block.input_layernorm.weight.fill_(1.0)
            block.post_attention_layernorm.weight.fill_(1.0)
            block.mlp.down_proj.weight.zero_()
            if i == design.mlp_block:
                # the constant dimension dominates the norm: after it, it reads about sqrt(d)
                _wire_mlp(block.mlp, pairs, d - 1, design, d)
        emb = model.get_input_embeddings().weight
        emb[:, :width] = 0.0
        words = _filler_ids(tokenizer)
        noise = design.token_noise * torch.randn(len(words), width, generator=gen)
        emb[words, :width] = noise - noise.mean(0)  # no offset shared by every prompt
        emb[:, d - 1] = design.bias
        for c, dim in zip(categories, marker_dims):
            jitter = design.marker_noise * torch.randn(width, generator=gen)
            row = tokenizer.convert_tokens_to_ids(markers[c])
            emb[row, :width] = design.alpha * jitter
            emb[row, dim] += design.alpha
        model.model.norm.weight.fill_(1.0)
        dst = sorted({p[1] for p in pairs})
        for token, dim in zip(refusals, dst):
            readout = torch.zeros(d)
            readout[dim] = design.beta
            readout[d - 1] = -design.beta * design.threshold / d**0.5  # about -beta * threshold
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = readout
    sites = (Site(design.mlp_block - 1, "resid"), Site(design.mlp_block, "mlp"))
    return PlantedWorldModel(model.eval(), tokenizer, markers, refusals, sites)


def world_prompts(
    markers: dict[str, str], counts: dict[str, int], n_harmless: int, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(toxic, harmless) prompts per category: filler words, the toxic ones led by the category's
    marker; ``counts[c]`` toxic and ``max(counts[c], n_harmless)`` harmless prompts."""
    rng = random.Random(seed)
    toxic = {c: [filler_text(rng, markers[c]) for _ in range(counts[c])] for c in counts}
    harmless = {c: [filler_text(rng) for _ in range(max(counts[c], n_harmless))] for c in counts}
    return toxic, harmless


# ------------------------------------------------------------------------------ execution level


def execution_rows(
    scorer, toxic: dict[str, list[str]], harmless: dict[str, list[str]]
) -> list[PromptRow]:
    """Toxic and safe rows per category with the clean model's judgement, a quarter held out."""
    probe = [
        PromptRow(
            prompt_id=f"{c}-{split}-{i}",
            prompt=text,
            category=c,
            split=split,
            heldout=i % 4 == 0,
            refused=False,
            refusal_score=0.0,
        )
        for split, prompts in (("toxic", toxic), ("safe", harmless))
        for c in sorted(prompts)
        for i, text in enumerate(prompts[c])
    ]
    return judged_rows(scorer, probe)


def recover_execution(
    planted: PlantedWorldModel,
    model_cfg: ModelConfig,
    toxic: dict[str, list[str]],
    harmless: dict[str, list[str]],
    seed: int,
) -> tuple[str, str]:
    """(verdict, reason) of :func:`~refusal_assets.directions.execution.run_execution` on the
    planted model, as the ``refusal_direction`` asset runs it."""
    from refusal_assets.directions.execution import run_execution
    from refusal_assets.directions.measure import Scorer

    refusal = RefusalConfig(phrases=planted.refusals, refusal_tokens=planted.refusals)
    scorer = Scorer(
        planted.model, planted.tokenizer, model_cfg.model_copy(update={"refusal": refusal})
    )
    dcfg = DirectionsConfig(
        layer_stride=1,
        max_new_tokens=2,
        steering_coefficients=[],
        selection_prompts=8,
        min_selection_prompts=4,
        seed=seed,
    )
    rows = execution_rows(scorer, toxic, harmless)
    result = run_execution(scorer, rows, dcfg, "planted", log=lambda _: None).result
    return result.verdict_execution, result.verdict_reason


# -------------------------------------------------------------------------------- feature level


def site_rows(
    planted: PlantedWorldModel, prompts: list[str], batch_size: int = 32
) -> tuple[dict[Site, torch.Tensor], np.ndarray]:
    """Activations at both sites at every real token of ``prompts`` ([n_rows, d] per site), and
    each row's prompt index (the SAE's training rows and their groups)."""
    from refusal_assets.lm.activations import forward_sites
    from refusal_assets.lm.chat import encode_chat

    out: dict[Site, list[torch.Tensor]] = {s: [] for s in planted.sites}
    groups = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_chat(planted.tokenizer, prompts[start : start + batch_size])
        acts = forward_sites(planted.model, batch, list(planted.sites))
        b, t = batch.attention_mask.bool().nonzero(as_tuple=True)
        for s in planted.sites:
            out[s].append(acts[s][b, t].float())
        groups.append(b.numpy() + start)
    return {s: torch.cat(v) for s, v in out.items()}, np.concatenate(groups)


def train_site_saes(
    planted: PlantedWorldModel, prompts: list[str], design: WorldDesign, seed: int
) -> dict[Site, torch.nn.Module]:
    """A TopK SAE per site, trained on every token of ``prompts`` (toxic and harmless)."""
    from refusal_assets.sae.training import train_sae

    vectors, groups = site_rows(planted, prompts)
    cfg = SAEConfig(
        expansion_factor=design.sae_expansion,
        k=design.sae_k,
        aux_k=16,
        batch_size=256,
        max_steps=design.sae_steps,
        eval_every=50,
        dead_after_tokens=5000,
        seed=seed,
    )
    return {s: train_sae(v, groups, cfg).sae for s, v in vectors.items()}


def recover_features(
    planted: PlantedWorldModel,
    toxic: dict[str, list[str]],
    harmless: dict[str, list[str]],
    design: WorldDesign,
    seed: int,
    rule: FeatureRule = FeatureRule(),
) -> CoreShareTest:
    """Trained SAEs at both sites, node effects of each category's toxic prompts against its
    harmless ones (mean ablation), then :func:`core_share_test`."""
    from refusal_assets.circuits.attribution import node_effects
    from refusal_assets.circuits.passes import compute_baseline
    from refusal_assets.circuits.selection import NodeIndex

    every = [p for c in sorted(toxic) for p in toxic[c] + harmless[c]]
    saes = train_site_saes(planted, every, design, seed)
    ids = torch.tensor([planted.tokenizer.convert_tokens_to_ids(t) for t in planted.refusals])
    effects = {}
    for c in sorted(toxic):
        baseline = compute_baseline(planted.model, planted.tokenizer, harmless[c], saes, 32)
        effects[c], _ = node_effects(
            planted.model, planted.tokenizer, toxic[c], saes, baseline, ids, batch_size=32
        )
    index = NodeIndex(sorted(saes), [saes[s].W_dec.shape[0] for s in sorted(saes)])
    return core_share_test(
        effects,
        index.site_of_node,
        k_per_site=design.k_per_site,
        rule=rule,
        n_splits=design.n_splits,
        n_bootstrap=design.n_bootstrap,
        seed=seed,
    )


# ---------------------------------------------------------------------------------- calibration


@dataclass(frozen=True, kw_only=True)
class WorldAnswers:
    """One world's recovered answers at both levels, one per replicate."""

    world: World
    execution: list[str]
    features: list[str]
    core_share: list[float]


@dataclass(frozen=True, kw_only=True)
class TestRates:
    """How one test answers the planted worlds: power and false-answer rate per world."""

    planted: dict[str, str]
    power: dict[str, float]
    false_answer_rate: dict[str, float]
    """Planted answer A called a different decided answer B."""
    n_replicates: int

    @property
    def votes(self) -> bool:
        return all(r <= MAX_FALSE_ANSWER_RATE for r in self.false_answer_rate.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "votes": self.votes}


def rates_of(answers: dict[str, list[str]], planted: dict[str, str]) -> TestRates:
    """Power and false-answer rate of one test from its answers per world."""
    n = min(len(a) for a in answers.values())
    power = {w: sum(x == planted[w] for x in a) / len(a) for w, a in answers.items()}
    false = {
        w: sum(x in DECIDED and x != planted[w] for x in a) / len(a) for w, a in answers.items()
    }
    return TestRates(planted=dict(planted), power=power, false_answer_rate=false, n_replicates=n)


def majority(answers: list[str]) -> str:
    """The most frequent answer (ties: the first seen)."""
    return max(answers, key=answers.count)


def calibrate_tiny_worlds(
    model,
    tokenizer,
    model_cfg: ModelConfig,
    counts: dict[str, int],
    *,
    n_replicates: int = 3,
    n_harmless: int = 8,
    seed: int = 0,
    design: WorldDesign = WorldDesign(),
) -> dict[World, WorldAnswers]:
    """Every world, ``n_replicates`` times (fresh noise, prompts and SAE seeds), at ``counts``
    toxic prompts per category, through both levels."""
    out = {}
    for w_i, world in enumerate(WORLDS):
        execution, features, shares = [], [], []
        for r in range(n_replicates):
            s = seed + 1000 * w_i + r
            planted = build_world(model, tokenizer, world, sorted(counts), design, s)
            toxic, harmless = world_prompts(planted.markers, counts, n_harmless, s)
            execution.append(recover_execution(planted, model_cfg, toxic, harmless, s)[0])
            test = recover_features(planted, toxic, harmless, design, s)
            features.append(test.verdict)
            shares.append(test.core_share)
        out[world] = WorldAnswers(
            world=world, execution=execution, features=features, core_share=shares
        )
    return out
