"""The prompts of one model with their clean behaviour, and the splits the procedure uses.

Train (candidates) and validation (selection) split the non-held-out prompts by a seeded hash of
the prompt id; every reported number is on held-out prompts, except leave-one-category-out, whose
held-out set is a whole category. Directions read refused toxic prompts with a positive refusal
score against complied-with safe prompts with a negative one (the reference's filter).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class PromptRow:
    """One sampled prompt and what the clean model did with it (``refusal_behaviour``)."""

    prompt_id: str
    prompt: str
    category: str
    split: str
    """OR-Bench split: "toxic", "safe" or "hard"."""
    heldout: bool
    refused: bool
    """The refusal judge on the clean greedy generation."""
    refusal_score: float
    """First-token refusal log-odds of the clean model."""
    response: str = ""
    """The clean greedy response (for before/after examples)."""


def in_validation(prompt_id: str, fraction: float, seed: int) -> bool:
    """Stable pseudo-random membership of a non-held-out prompt in the validation split."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True, kw_only=True)
class Splits:
    """Prompt groups of one model; "refusing" = refused by the judge on the clean generation."""

    train_harmful: list[PromptRow]
    """Non-held-out, train part: toxic, refused, score > 0."""
    train_harmless: list[PromptRow]
    """Non-held-out, train part: safe, complied with, score < 0."""
    val_harmful: list[PromptRow]
    val_harmless: list[PromptRow]
    test_refusing: list[PromptRow]
    """Held-out toxic prompts the clean model refuses."""
    test_complied_harmless: list[PromptRow]
    """Held-out safe prompts the clean model complies with (induced refusal)."""
    test_toxic: list[PromptRow]
    test_benign: list[PromptRow]
    """Held-out safe and hard prompts (over-refusal in the steering trade-off)."""
    refusing: list[PromptRow]
    """Every toxic prompt the clean model refuses (leave-one-category-out)."""


def split_prompts(rows: list[PromptRow], val_fraction: float, seed: int) -> Splits:
    harmful = [r for r in rows if r.split == "toxic" and r.refused and r.refusal_score > 0]
    harmless = [r for r in rows if r.split == "safe" and not r.refused and r.refusal_score < 0]

    def part(group: list[PromptRow], val: bool) -> list[PromptRow]:
        return [
            r
            for r in group
            if not r.heldout and in_validation(r.prompt_id, val_fraction, seed) == val
        ]

    test = [r for r in rows if r.heldout]
    return Splits(
        train_harmful=part(harmful, False),
        train_harmless=part(harmless, False),
        val_harmful=part(harmful, True),
        val_harmless=part(harmless, True),
        test_refusing=[r for r in test if r.split == "toxic" and r.refused],
        test_complied_harmless=[r for r in test if r.split == "safe" and not r.refused],
        test_toxic=[r for r in test if r.split == "toxic"],
        test_benign=[r for r in test if r.split in ("safe", "hard")],
        refusing=[r for r in rows if r.split == "toxic" and r.refused],
    )
