"""Planted execution-level worlds on the tiny model, recovered by the asset's own functions.

:func:`planted_direction_model` turns a copy of the tiny Qwen2-style model into one whose refusal is
carried by known residual directions. MLPs are off; every block's attention is on, with zero queries
and keys (uniform causal attention) and values and outputs that copy the first ``width`` residual
dimensions, so each position carries the running mean of the earlier positions there, block after
block (a prefix computed without the ablation would leak the direction into later positions). Only
the marker token ``<catC>`` that opens category C's toxic prompts has anything in those dimensions:
``alpha * e_m`` with ``m = 0`` for every category (``shared``: one direction) or ``m = C``
(``specific``: one direction per category). Refusal token ``REFUSE<m>`` reads ``beta * e_m`` after
the
final norm, so a category refuses while its own direction is present, whatever the others do.
:func:`recover_execution_verdict` builds prompts, judges them on the clean model, and runs
:func:`refusal_assets.directions.execution.run_execution`, as the asset does; expected verdicts:
``shared`` -> monolithic, ``specific`` -> modular.
"""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from typing import Literal

import torch

from refusal_assets.config import DirectionsConfig, ModelConfig, RefusalConfig
from refusal_assets.directions.execution import ExecutionRun, run_execution
from refusal_assets.directions.measure import Scorer
from refusal_assets.directions.prompts import PromptRow
from refusal_assets.lm.sites import decoder_layers

World = Literal["shared", "specific"]
EXPECTED = {"shared": "monolithic", "specific": "modular"}
FILLER_WORDS = [  # the planted prompts' neutral words (both tiny-model plants)
    "the",
    "river",
    "stone",
    "blue",
    "quiet",
    "market",
    "seven",
    "letter",
    "garden",
    "window",
    "cloud",
    "paper",
]


def wire_attention_copy(attn: torch.nn.Module, head: int, n_kv: int, group: int) -> None:
    """Turn one Qwen2/Llama-style attention into a copy of the first ``n_kv * head`` residual
    dimensions under uniform causal attention (call under ``torch.no_grad``).

    Queries and keys are zero (weights and biases), so every position attends uniformly to the
    ones before it; kv head ``h`` reads dims ``[h*head, (h+1)*head)`` through an identity value and
    the first query head of its group writes them back through an identity output. The output
    projection's bias is left alone: the callers differ on it.
    """
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    attn.o_proj.weight.zero_()
    for h in range(n_kv):
        attn.v_proj.weight[h * head : (h + 1) * head, h * head : (h + 1) * head] = torch.eye(head)
        q = h * group
        attn.o_proj.weight[h * head : (h + 1) * head, q * head : (q + 1) * head] = torch.eye(head)


def planted_direction_model(
    model, tokenizer, world: World, n_categories: int, *, alpha: float = 6.0, beta: float = 8.0
):
    """(model copy, tokenizer copy, marker tokens, refusal tokens) of a planted world (module
    docstring)."""
    model, tokenizer = copy.deepcopy(model), copy.deepcopy(tokenizer)
    markers = [f"<cat{c}>" for c in range(n_categories)]
    refusals = [f"REFUSE{m}" for m in range(n_categories if world == "specific" else 1)]
    tokenizer.add_tokens(markers, special_tokens=True)
    tokenizer.add_tokens(refusals)  # ordinary added tokens: they decode, so the judge reads them
    model.resize_token_embeddings(len(tokenizer))
    cfg = model.config
    head, n_kv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads
    group, width = cfg.num_attention_heads // n_kv, n_kv * head
    if width < n_categories or cfg.hidden_size <= width:
        raise ValueError(
            f"planted worlds need {n_categories} <= {width} planted dimensions < d_model "
            f"{cfg.hidden_size}"
        )
    with torch.no_grad():
        for block in decoder_layers(model):
            block.mlp.down_proj.weight.zero_()
            wire_attention_copy(block.self_attn, head, n_kv, group)
            if block.self_attn.o_proj.bias is not None:
                block.self_attn.o_proj.bias.zero_()
            block.input_layernorm.weight.fill_(1.0)
        emb = model.get_input_embeddings().weight
        emb[:, :width] = 0.0
        for c, marker in enumerate(markers):
            emb[tokenizer.convert_tokens_to_ids(marker), 0 if world == "shared" else c] = alpha
        model.model.norm.weight.fill_(1.0)
        for m, token in enumerate(refusals):
            readout = torch.zeros(cfg.hidden_size)
            readout[m] = beta
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = readout
    return model.eval(), tokenizer, markers, refusals


def filler_text(rng: random.Random, marker: str = "") -> str:
    """A planted prompt: 3-8 random filler words, led by ``marker`` when given (a toxic prompt)."""
    body = " ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(3, 8)))
    return f"{marker} {body}".strip()


def judged_rows(scorer: Scorer, probe: list[PromptRow]) -> list[PromptRow]:
    """The ``probe`` rows again, now carrying the clean model's judgement, score and response."""
    clean = scorer.judge(probe, max_new_tokens=2)
    return [
        replace(row, refused=bool(refused), refusal_score=float(score), response=response)
        for row, refused, score, response in zip(
            probe, clean.refused, clean.scores, clean.responses
        )
    ]


def planted_rows(
    scorer: Scorer, markers: list[str], n_per_split: int, seed: int
) -> list[PromptRow]:
    """Toxic (marker-led), safe and hard (no marker) prompts per category, with the clean model's
    judgement and score, a quarter held out."""
    rng = random.Random(seed)
    probe = [
        PromptRow(
            prompt_id=f"cat{c}-{split}-{i}",
            prompt=filler_text(rng, marker if split == "toxic" else ""),
            category=f"cat{c}",
            split=split,
            heldout=i % 4 == 0,
            refused=False,
            refusal_score=0.0,
        )
        for c, marker in enumerate(markers)
        for split in ("toxic", "safe", "hard")
        for i in range(n_per_split)
    ]
    return judged_rows(scorer, probe)


def recover_execution_verdict(
    model,
    tokenizer,
    model_cfg: ModelConfig,
    world: World,
    *,
    n_categories: int = 4,
    n_per_split: int = 16,
    seed: int = 0,
    directions: DirectionsConfig | None = None,
) -> ExecutionRun:
    """Plant ``world`` in a copy of the tiny model and run the execution level on it; the run's
    ``result.verdict_execution`` should be ``EXPECTED[world]``."""
    planted, tok, markers, refusals = planted_direction_model(model, tokenizer, world, n_categories)
    cfg = model_cfg.model_copy(
        update={"refusal": RefusalConfig(phrases=refusals, refusal_tokens=refusals)}
    )
    scorer = Scorer(planted, tok, cfg)
    dcfg = directions or DirectionsConfig(
        layer_stride=1,
        max_new_tokens=2,
        steering_coefficients=[1.0],
        steering_prompts=8,
        selection_prompts=8,
        seed=seed,
    )
    rows = planted_rows(scorer, markers, n_per_split, seed)
    return run_execution(scorer, rows, dcfg, f"planted-{world}", log=lambda _: None)
