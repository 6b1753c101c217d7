"""Candidate refusal directions: difference of means at each block input and post-instruction
position.

As ``generate_directions.py`` of the reference: for each candidate layer l (block l's input, the
residual stream before the block) and each of the last P post-instruction positions, the mean
activation over harmful prompts minus the mean over harmless ones. Per-prompt activations are kept,
so per-category, leave-one-out and split-half directions are means of subsets, with no new pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from refusal_assets.directions.measure import Scorer
from refusal_assets.directions.prompts import PromptRow
from refusal_assets.lm.prefill import prefill
from refusal_assets.lm.sites import Site


def candidate_layers(n_layers: int, stride: int, max_fraction: float) -> list[int]:
    """Block inputs below ``max_fraction`` x L, every ``stride``-th counted down from the deepest
    allowed one; layer 0's input (the token embedding) is left out: at the template positions it
    is the same for every prompt, so its difference of means is zero."""
    top = math.ceil(max_fraction * n_layers) - 1
    return sorted(range(top, 0, -stride))


@dataclass(frozen=True, kw_only=True)
class Activations:
    """Block-input activations of some prompts at the candidate grid."""

    prompt_ids: list[str]
    layers: list[int]
    positions: list[int]
    """Negative offsets from the last prompt token (-1 = the last)."""
    values: torch.Tensor
    """[N, P, L_c, d] float32."""


@torch.no_grad()
def collect(
    scorer: Scorer, rows: list[PromptRow], layers: list[int], n_positions: int
) -> Activations:
    """Block-input activations (= the previous block's output) at the last ``n_positions``
    tokens."""
    sites = [Site(layer - 1, "resid") for layer in layers]
    parts = []
    for batch in scorer._batches(rows):
        n_post = int(batch.post_instruction.sum(-1).min())
        if n_post < n_positions:
            raise ValueError(
                f"directions.positions = {n_positions}, but a prompt has {n_post} "
                "post-instruction tokens"
            )
        out = prefill(scorer.model, batch, sites, stop_early=True)
        per_site = [
            out.site_outputs[s][:, -n_positions:].float().cpu() for s in sites
        ]  # [B, P, d] each
        parts.append(torch.stack(per_site, dim=2))  # [B, P, L_c, d]
    d = scorer.model.config.hidden_size
    values = torch.cat(parts) if parts else torch.zeros(0, n_positions, len(layers), d)
    positions = list(range(-n_positions, 0))
    return Activations(
        prompt_ids=[r.prompt_id for r in rows],
        layers=list(layers),
        positions=positions,
        values=values,
    )


def subset(acts: Activations, prompt_ids: set[str]) -> torch.Tensor:
    """[n, P, L_c, d] rows of the given prompts."""
    keep = [i for i, p in enumerate(acts.prompt_ids) if p in prompt_ids]
    return acts.values[keep]


@dataclass(frozen=True, kw_only=True)
class Candidates:
    """Difference-of-means directions over the candidate grid."""

    layers: list[int]
    positions: list[int]
    directions: torch.Tensor
    """[P, L_c, d]: mean(harmful) - mean(harmless)."""
    activation_norms: torch.Tensor
    """[P, L_c]: norm of the mean harmless activation there (the scale a direction's norm is
    judged by)."""

    def direction(self, position: int, layer: int) -> torch.Tensor:
        return self.directions[self.positions.index(position), self.layers.index(layer)]


def mean_difference(
    harmful: torch.Tensor, harmless: torch.Tensor, layers: list[int], positions: list[int]
) -> Candidates:
    """Candidates from per-prompt activations harmful [n1, P, L_c, d] and harmless [n0, P, L_c,
    d]."""
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError(
            f"difference of means needs prompts on both sides; got {len(harmful)} and "
            f"{len(harmless)}"
        )
    mean_harmless = harmless.mean(0)  # [P, L_c, d]
    return Candidates(
        layers=layers,
        positions=positions,
        directions=harmful.mean(0) - mean_harmless,
        activation_norms=mean_harmless.norm(dim=-1),
    )
