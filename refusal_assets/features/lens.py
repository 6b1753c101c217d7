"""What a latent writes: the logit lens of its decoder direction, and its refusal-direction cosine.

The logit lens reads the unembedding ``W_U [vocab, d]`` of the direction scaled by the final norm's
weight (``W_U (g * d_i)``): the final norm rescales the residual stream element-wise before the
unembedding, so its scale is part of the path; its centring and ``1/rms`` are common to every token
and do not change the ranking. The model is loaded for its weights only; it is never run here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

LENS_TOKENS = 10
LATENTS_PER_MATMUL = 256  # [256, vocab] float32 scores at a time (~155 MB for a 151k vocabulary)


@dataclass(frozen=True, kw_only=True)
class LensInputs:
    """The model weights the lens needs: ``unembedding [vocab, d]``, the final norm's
    ``norm_scale [d]`` (None: no element-wise final norm weight) and a token decoder."""

    unembedding: Tensor
    norm_scale: Tensor | None
    decode: Callable[[int], str]


@dataclass(frozen=True, kw_only=True)
class LensTable:
    """Per latent the ``LENS_TOKENS`` most promoted (``top``) and most suppressed (``bottom``)
    token ids with their scores, ``[d_sae, LENS_TOKENS]`` each, best first;
    ``decode``: id -> text."""

    top_ids: np.ndarray
    top_scores: np.ndarray
    bottom_ids: np.ndarray
    bottom_scores: np.ndarray
    decode: Callable[[int], str]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm before the unembedding (Llama, Qwen2, Mistral, Gemma, GPT-2, NeoX), or None."""
    for path in (
        "model.norm",
        "transformer.ln_f",
        "gpt_neox.final_layer_norm",
        "model.decoder.final_layer_norm",
    ):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.Module):
            return obj
    return None


def lens_inputs(model: nn.Module, tokenizer) -> LensInputs:
    """Unembedding and final-norm scale of a loaded HF causal LM (weights only, no pass)."""
    unembedding = model.get_output_embeddings().weight.detach().float().cpu()
    norm = final_norm(model)
    weight = getattr(norm, "weight", None)
    scale = weight.detach().float().cpu() if isinstance(weight, Tensor) else None
    if scale is not None and type(norm).__name__.startswith("Gemma"):
        scale = scale + 1.0  # Gemma's RMSNorm multiplies by (1 + weight)
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return LensInputs(unembedding=unembedding, norm_scale=scale, decode=decode)


def logit_lens(decoder: Tensor, inputs: LensInputs, n: int = LENS_TOKENS) -> LensTable:
    """Top and bottom ``n`` tokens of ``W_U (g * W_dec[i])`` per row of ``decoder [d_sae, d]``."""
    if decoder.shape[1] != inputs.unembedding.shape[1]:
        raise ValueError(
            f"SAE decoder width {decoder.shape[1]} differs from the model's unembedding width "
            f"{inputs.unembedding.shape[1]}: the SAE belongs to another model"
        )
    directions = decoder.detach().float().cpu()
    if inputs.norm_scale is not None:
        directions = directions * inputs.norm_scale
    parts: list[tuple[Tensor, ...]] = []
    with torch.no_grad():
        for chunk in directions.split(LATENTS_PER_MATMUL):
            scores = chunk @ inputs.unembedding.T  # [c, vocab]
            top, top_i = scores.topk(n, dim=1)
            bottom, bottom_i = scores.topk(n, dim=1, largest=False)
            parts.append((top_i, top, bottom_i, bottom))
    top_i, top, bottom_i, bottom = (torch.cat(p).numpy() for p in zip(*parts))
    return LensTable(
        top_ids=top_i,
        top_scores=top,
        bottom_ids=bottom_i,
        bottom_scores=bottom,
        decode=inputs.decode,
    )


def refusal_cosines(decoder: Tensor, direction: Tensor | None) -> np.ndarray | None:
    """Cosine of each decoder row ``[d_sae, d]`` with the refusal ``direction [d]`` (None: None)."""
    if direction is None:
        return None
    direction = direction.detach().float().reshape(-1)
    if direction.shape[0] != decoder.shape[1]:
        raise ValueError(
            f"refusal direction of width {direction.shape[0]}, "
            f"but the SAE decoder has width {decoder.shape[1]}"
        )
    rows = decoder.detach().float()
    cos = (rows @ direction) / (rows.norm(dim=1) * direction.norm()).clamp_min(1e-12)
    return cos.numpy()


def pooled_direction(path: Path | None, site_layer: int) -> tuple[Tensor | None, str]:
    """The pooled refusal direction for a site of block ``site_layer`` (its output, the input of
    block ``site_layer + 1``: key ``pooled.layer{site_layer + 1}`` of ``directions.safetensors``),
    and a note saying where it came from or why there is none."""
    key = f"pooled.layer{site_layer + 1}"
    if path is None:
        return None, "no refusal_direction asset in this graph: cosines left null"
    if not Path(path).is_file():
        return None, f"{path} not found (refusal_direction not materialized): cosines left null"
    tensors = load_file(str(path))
    if key not in tensors:
        return None, f"{path} has no {key}: cosines left null"
    return tensors[key].float(), f"{key} of {path}"
