"""What the model does with each prompt: greedy generation, a refusal judgement, the refusal score.

Refusal score = log p_ref - log(1 - p_ref), where p_ref is the next-token probability mass, at
the last prompt position, on the model's refusal-opening tokens (the first token of each refusal
phrase, with and without a leading space, unless the config lists the tokens). It is computed from
the logits as logsumexp(refusal logits) - logsumexp(other logits) (:func:`refusal_score_from_logits`):
the same value, but finite and with a non-zero gradient for any confidence (a clamp on p_ref would
zero every node effect of a prompt refused with |score| > 13.8, routine for a 7B chat model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.chat import ChatBatch, batches, by_length, encode_chat
from refusal_assets.config import ModelConfig
from refusal_assets.progress import progress

EPS = 1e-6


def refusal_token_ids(
    tokenizer: PreTrainedTokenizerBase, phrases: list[str], tokens: list[str] | None = None
) -> list[int]:
    """Token ids that open a refusal: the configured tokens, else each phrase's first token."""
    ids: set[int] = set()
    if tokens:
        for t in tokens:
            enc = tokenizer.encode(t, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"refusal.refusal_tokens: {t!r} is {len(enc)} tokens for this tokenizer, not one")
            ids.add(enc[0])
    else:
        for phrase in phrases:
            for variant in (phrase, " " + phrase):
                enc = tokenizer.encode(variant, add_special_tokens=False)
                if enc:
                    ids.add(enc[0])
    return sorted(ids)


def judge_refusal(response: str, phrases: list[str]) -> bool:
    """A response refuses when it contains any refusal phrase (case-insensitive substring match)."""

    def norm(t: str) -> str:
        return t.lower().replace("’", "'")

    text = norm(response)
    return any(norm(p) in text for p in phrases)


def refusal_score_from_logits(logits: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """Refusal log-odds [B] from next-token logits [B, vocab]: logsumexp over the refusal tokens minus
    logsumexp over every other token (= log p_ref - log(1 - p_ref), unclamped, differentiable everywhere)."""
    logits = logits.float()
    is_ref = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    is_ref[refusal_ids.to(logits.device)] = True
    if bool(is_ref.all()) or not bool(is_ref.any()):
        raise ValueError(
            f"refusal score: {int(is_ref.sum())} of {logits.shape[-1]} vocabulary tokens are refusal tokens; "
            "need some of each"
        )
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    ref = torch.logsumexp(torch.where(is_ref, logits, neg_inf), dim=-1)
    rest = torch.logsumexp(torch.where(is_ref, neg_inf, logits), dim=-1)
    return ref - rest


def refusal_score(p_ref: torch.Tensor) -> torch.Tensor:
    """log-odds of an already computed refusal mass (stored probabilities only; model code uses
    :func:`refusal_score_from_logits`, which needs no clamp); clamped so p=0 or 1 stay finite."""
    p = p_ref.clamp(EPS, 1 - EPS)
    return torch.log(p) - torch.log1p(-p)


def last_token_refusal_prob(logits_last: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """p_ref [B] from next-token logits [B, vocab]."""
    return torch.softmax(logits_last.float(), dim=-1)[:, refusal_ids].sum(-1)


@torch.no_grad()
def p_refusal(model: PreTrainedModel, batch: ChatBatch, refusal_ids: torch.Tensor) -> torch.Tensor:
    out = model(**batch.model_inputs(), use_cache=False, logits_to_keep=1)
    return last_token_refusal_prob(out.logits[:, -1], refusal_ids)


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch: ChatBatch, max_new_tokens: int
) -> tuple[list[str], torch.Tensor]:
    """Greedy responses and the first step's next-token logits [B, vocab] (the prompt's own
    prediction, so p_ref costs no extra forward pass)."""
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    texts = tokenizer.batch_decode(out.sequences[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    return texts, out.logits[0]


def run_behaviour(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: pl.DataFrame,
    cfg: ModelConfig,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> pl.DataFrame:
    """One row per prompt: ``prompt_id, split, heldout, response, refused, p_refusal, refusal_score``."""
    ids = torch.tensor(refusal_token_ids(tokenizer, cfg.refusal.phrases, cfg.refusal.refusal_tokens), device=device)
    rows = by_length(sample.select("prompt_id", "prompt", "split", "heldout").to_dicts())
    responses: list[str] = []
    p_refs: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    with progress("behaviour: generation", total=len(rows), unit="prompts", log=log) as prog:
        for chunk in batches(rows, cfg.batch_size):
            batch = encode_chat(tokenizer, [r["prompt"] for r in chunk], cfg.chat_template.system_prompt).to(device)
            texts, first_logits = generate(model, tokenizer, batch, cfg.generation.max_new_tokens)
            p_refs.append(last_token_refusal_prob(first_logits, ids).cpu())
            scores.append(refusal_score_from_logits(first_logits, ids).cpu())
            responses.extend(texts)
            prog.update(len(chunk))
    p = torch.cat(p_refs) if p_refs else torch.zeros(0)
    score = torch.cat(scores) if scores else torch.zeros(0)
    return pl.DataFrame(
        {
            "prompt_id": [r["prompt_id"] for r in rows],
            "split": [r["split"] for r in rows],
            "heldout": [r["heldout"] for r in rows],
            "response": responses,
            "refused": [judge_refusal(r, cfg.refusal.phrases) for r in responses],
            "p_refusal": p.numpy().astype(np.float64),
            "refusal_score": score.numpy().astype(np.float64),
        }
    )


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (NaNs when n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    phat = k / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def refusal_rates(df: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Refusal rate with a 95 % Wilson interval, overall and per split."""
    out = {}
    groups = [("all", df)] + [(s, df.filter(pl.col("split") == s)) for s in sorted(df["split"].unique().to_list())]
    for name, sub in groups:
        k, n = int(sub["refused"].sum()), sub.height
        lo, hi = wilson_interval(k, n)
        out[name] = {
            "rate": k / n if n else math.nan,
            "lo": lo,
            "hi": hi,
            "n": n,
            "mean_p_refusal": float(sub["p_refusal"].mean()) if n else math.nan,
        }
    return out


def plot_refusal_rates(rates: dict[str, dict[str, float]], title: str, path: Path) -> Path:
    from refusal_assets.plots import new_figure, save_png

    names = [k for k in rates if k != "all"]
    vals = [rates[k]["rate"] for k in names]
    err = np.array(
        [[rates[k]["rate"] - rates[k]["lo"] for k in names], [rates[k]["hi"] - rates[k]["rate"] for k in names]]
    )
    fig = new_figure((4, 3))
    ax = fig.add_subplot()
    ax.bar(names, vals, yerr=err, capsize=4, color=["#4c72b0", "#dd8452", "#c44e52"][: len(names)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("refusal rate (95% Wilson)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
