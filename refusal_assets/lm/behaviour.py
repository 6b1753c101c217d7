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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import polars as pl
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.config import ModelConfig
from refusal_assets.lm.chat import ChatBatch, batches, by_length, encode_chat
from refusal_assets.lm.prefill import cache_kwargs, last_logits, merge_prefilled, prefill
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
                raise ValueError(
                    f"refusal.refusal_tokens: {t!r} is {len(enc)} tokens for this tokenizer, not one"
                )
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
    return last_token_refusal_prob(
        last_logits(model, **batch.model_inputs(), use_cache=False).logits, refusal_ids
    )


class Generated(NamedTuple):
    """Greedy responses for one batch."""

    responses: list[str]
    """Decoded new tokens of each row (special tokens skipped, as ``tokenizer.batch_decode`` does)."""
    first_logits: torch.Tensor
    """[B, vocab] next-token logits at the last prompt position: p_ref costs no extra pass."""
    stop_reasons: list[str]
    """Why each row stopped: "eos", "judged" (a refusal phrase appeared) or "length"."""
    decode_steps: int
    """Forward passes after the prefill (at most ``max_new_tokens - 1``)."""
    decode_rows: int
    """Rows summed over those passes (what the decoding computed; ``model.generate`` keeps every row)."""


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _plain_greedy(model: PreTrainedModel) -> bool:
    """Whether ``model.generate(do_sample=False)`` is a plain argmax for this model: no logits
    processor in its generation config (repetition penalty, n-gram bans, forced or suppressed
    tokens, minimum lengths). Only then does our cached decoder reproduce it."""
    g = model.generation_config
    return (
        (g.repetition_penalty in (None, 1.0))
        and not g.no_repeat_ngram_size
        and not g.bad_words_ids
        and not g.suppress_tokens
        and not g.begin_suppress_tokens
        and g.forced_bos_token_id is None
        and g.forced_eos_token_id is None
        and not g.min_new_tokens
        and not (g.min_length or 0)
        and not g.sequence_bias
    )


class RowState(Protocol):
    """What per-row hooks read during one :func:`generate` call over several chunks."""

    def prefill_chunk(self, k: int) -> None:
        """Chunk ``k`` is prefilled next (its prefix pass is one row, its own pass its rows)."""

    def decode(self, chunk_sizes: list[int]) -> None:
        """The merged decode starts: row i belongs to the chunks in order."""

    def keep(self, index: torch.Tensor) -> None:
        """The decode keeps only these rows (positions into the current rows)."""


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: ChatBatch | list[ChatBatch],
    max_new_tokens: int,
    *,
    stop_phrases: list[str] | None = None,
    shared_prefix: bool = True,
    row_state: RowState | None = None,
) -> Generated:
    """Greedy decoding of one batch from one shared-prefix prefill (:func:`refusal_assets.lm.prefill.prefill`).

    The same tokens as ``model.generate(do_sample=False)`` (the benchmark asserts it), cheaper: the
    shared prompt prefix is computed once per batch, and a row that has ended (EOS, or with
    ``stop_phrases`` a refusal phrase in its text) leaves the batch, so later steps run only the
    rows still generating. ``batch`` may be a list of batches: each is prefilled on its own (the
    prefill's memory follows the batch size) and all are decoded together, since a decode step costs
    about the same for 8 rows as for 64 (it reads every weight once; measured 0.19 s and 0.32 s on
    the 0.5B model, 2 cores); rows come back in the order of the batches. Models whose generation
    config asks for logits processing take ``model.generate`` itself (:func:`generate_plain`).
    ``row_state``: what per-row hooks read (one intervention per chunk), told which chunk is
    prefilled and which rows the merged decode holds (:class:`RowState`)."""
    chunks = batch if isinstance(batch, list) else [batch]
    if not _plain_greedy(model):
        parts = []
        for k, c in enumerate(chunks):
            if row_state is not None:
                row_state.prefill_chunk(k)
            parts.append(
                generate_plain(model, tokenizer, c, max_new_tokens, stop_phrases=stop_phrases)
            )
        return Generated(
            [t for g in parts for t in g.responses],
            torch.cat([g.first_logits for g in parts]),
            [r for g in parts for r in g.stop_reasons],
            sum(g.decode_steps for g in parts),
            sum(g.decode_rows for g in parts),
        )
    prefilled = []
    for k, c in enumerate(chunks):
        if row_state is not None:
            row_state.prefill_chunk(k)
        prefilled.append(prefill(model, c, shared_prefix=shared_prefix))
    pre = merge_prefilled(prefilled)
    if row_state is not None:
        row_state.decode([len(c.input_ids) for c in chunks])
    eos = eos_token_ids(model, tokenizer)
    B = len(pre.next_position)
    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    alive = list(range(B))  # batch rows still generating, in cache order
    cache, mask, position = pre.cache, pre.attention_mask, pre.next_position
    logits = pre.last_logits.float()  # [b, vocab]
    steps = rows = 0
    for step in range(max_new_tokens):
        next_ids = logits.argmax(-1)  # [b]
        keep = []
        for i, row in enumerate(alive):
            token = int(next_ids[i])
            if token in eos:
                reasons[row] = "eos"
                continue
            tokens[row].append(token)
            if stop_phrases and judge_refusal(
                tokenizer.decode(tokens[row], skip_special_tokens=True), stop_phrases
            ):
                reasons[row] = "judged"
                continue
            keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):  # drop ended rows from every tensor and the cache
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, position, next_ids = mask[index], position[index], next_ids[index]
            if row_state is not None:
                row_state.keep(index)
            alive = [alive[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)  # [b, t + 1]
        logits = last_logits(
            model,
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=position[:, None],
            use_cache=True,
            **cache_kwargs(model.base_model, cache),
        ).logits.float()
        position = position + 1
        steps += 1
        rows += len(alive)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return Generated(texts, pre.last_logits, reasons, steps, rows)


class _PhraseStop:
    """A transformers stopping criterion: a row stops once its new text contains a refusal phrase."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, phrases: list[str], prompt_length: int):
        self.tokenizer, self.phrases, self.prompt_length = tokenizer, phrases, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_length :], skip_special_tokens=True
        )
        return torch.tensor(
            [judge_refusal(t, self.phrases) for t in texts], device=input_ids.device
        )


@torch.no_grad()
def generate_plain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: ChatBatch,
    max_new_tokens: int,
    *,
    stop_phrases: list[str] | None = None,
) -> Generated:
    """``model.generate`` on the full left-padded batch: the reference :func:`generate` is checked
    against, and the path for models whose generation config processes logits."""
    from transformers import StoppingCriteriaList

    T = batch.input_ids.shape[1]
    stopping = (
        StoppingCriteriaList([_PhraseStop(tokenizer, stop_phrases, T)]) if stop_phrases else None
    )
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        stopping_criteria=stopping,
    )
    new = out.sequences[:, T:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    eos = eos_token_ids(model, tokenizer)
    # A phrase in the text means the criterion stopped the row when it completed (EOS would have
    # stopped it first otherwise), the same rule :func:`generate` records.
    reasons = [
        "judged"
        if stop_phrases and judge_refusal(text, stop_phrases)
        else "eos"
        if eos & set(row)
        else "length"
        for row, text in zip(new.tolist(), texts)
    ]
    steps = len(out.logits) - 1
    return Generated(texts, out.logits[0], reasons, steps, steps * len(texts))


def decode_groups(items: list, cfg: ModelConfig) -> Iterator[list[list]]:
    """``items`` in groups decoded together (up to ``generation.decode_batch_size`` rows), each
    split into the prefill chunks of the model's ``batch_size``."""
    for group in batches(items, max(cfg.generation.decode_batch_size, cfg.batch_size)):
        yield list(batches(group, cfg.batch_size))


def run_behaviour(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: pl.DataFrame,
    cfg: ModelConfig,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> pl.DataFrame:
    """One row per prompt: ``prompt_id, split, heldout, response, refused, p_refusal, refusal_score,
    stop_reason`` (why generation ended: "eos", "judged" or "length")."""
    ids = torch.tensor(
        refusal_token_ids(tokenizer, cfg.refusal.phrases, cfg.refusal.refusal_tokens), device=device
    )
    rows = by_length(sample.select("prompt_id", "prompt", "split", "heldout").to_dicts())
    responses: list[str] = []
    p_refs: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    stop_reasons: list[str] = []
    with progress("behaviour: generation", total=len(rows), unit="prompts", log=log) as prog:
        for group in decode_groups(rows, cfg):
            chunks = [
                encode_chat(
                    tokenizer, [r["prompt"] for r in chunk], cfg.chat_template.system_prompt
                ).to(device)
                for chunk in group
            ]
            gen = generate(
                model,
                tokenizer,
                chunks,
                cfg.generation.max_new_tokens,
                stop_phrases=cfg.refusal.phrases if cfg.generation.stop_when_judged else None,
            )
            p_refs.append(last_token_refusal_prob(gen.first_logits, ids).cpu())
            scores.append(refusal_score_from_logits(gen.first_logits, ids).cpu())
            responses.extend(gen.responses)
            stop_reasons.extend(gen.stop_reasons)
            prog.update(sum(len(chunk) for chunk in group))
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
            "stop_reason": stop_reasons,
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
    groups = [("all", df)] + [
        (s, df.filter(pl.col("split") == s)) for s in sorted(df["split"].unique().to_list())
    ]
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
        [
            [rates[k]["rate"] - rates[k]["lo"] for k in names],
            [rates[k]["hi"] - rates[k]["rate"] for k in names],
        ]
    )
    fig = new_figure((4, 3))
    ax = fig.add_subplot()
    ax.bar(names, vals, yerr=err, capsize=4, color=["#4c72b0", "#dd8452", "#c44e52"][: len(names)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("refusal rate (95% Wilson)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
