"""How much of the model's behaviour survives when an SAE replaces a site's activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_assets.lm.behaviour import refusal_score
from refusal_assets.lm.chat import batches, encode_chat
from refusal_assets.lm.hooks import forward_hooks
from refusal_assets.lm.prefill import full_logits
from refusal_assets.lm.sites import Site, output_tensor, replace_output, site_module


@torch.no_grad()
def splice_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    site: Site,
    sae: nn.Module,
    *,
    batch_size: int,
    system_prompt: str | None = None,
    device: str = "cpu",
    max_norm: float = float("inf"),
    refusal_ids: torch.Tensor | None = None,
    shared_prefix: bool = True,
) -> dict[str, float]:
    """Next-token loss on the chat-formatted prompts with the site clean, replaced by the SAE's
    reconstruction (without its error term), and zero-ablated; ``loss_recovered`` = (zero - spliced)
    / (zero - clean), ``delta_ce`` = spliced - clean, and the mean KL(clean || spliced) per token.
    With ``refusal_ids`` (the refusal-opening tokens) also the refusal score at the last prompt
    position, the quantity the circuits explain: its mean clean and spliced, the mean change
    (spliced - clean) and the mean absolute change per prompt. Positions whose activation norm
    exceeds ``max_norm`` (attention sinks the SAE was not trained on) keep their clean value in
    both ablations. The caller should pass prompts the SAE was not trained on. ``shared_prefix``:
    the chat template's head, the same in every prompt, is computed once per batch
    (:func:`refusal_assets.lm.prefill.full_logits`; False = the plain left-padded pass, same numbers)."""
    module = site_module(model, site)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    n_tokens = 0
    scores: dict[str, list[torch.Tensor]] = {"clean": [], "spliced": []}

    def run(batch, replace=None):
        hooks = (
            []
            if replace is None
            else [(module, lambda _m, _i, out: replace_output(out, replace(output_tensor(out))))]
        )
        with forward_hooks(hooks):
            return full_logits(
                model, batch, shared_prefix
            ).float()  # [B, T, V]; the template head once

    for chunk in batches(prompts, batch_size):
        batch = encode_chat(tokenizer, chunk, system_prompt).to(device)
        targets = batch.input_ids[:, 1:]
        mask = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool()  # [B, T-1]
        clean_full = run(batch)  # [B, T, V]

        def keep_sinks(x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return torch.where(x.float().norm(dim=-1, keepdim=True) > max_norm, x, new.to(x.dtype))

        spliced_full = run(batch, lambda x: keep_sinks(x, sae.decode(sae.encode(x.float()))))
        if refusal_ids is not None:
            # prompts are left-padded, so the last position is every prompt's own last token
            for name, logits in (("clean", clean_full), ("spliced", spliced_full)):
                p_ref = torch.softmax(logits[:, -1], -1)[:, refusal_ids.to(logits.device)].sum(-1)
                scores[name].append(refusal_score(p_ref).cpu())
        clean, spliced = clean_full[:, :-1], spliced_full[:, :-1]
        del clean_full, spliced_full
        zero = run(batch, lambda x: keep_sinks(x, torch.zeros_like(x)))[:, :-1]
        for name, logits in (("clean", clean), ("spliced", spliced), ("zero", zero)):
            ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T-1]
            sums[name] += float(ce[mask].sum())
        logp_clean, logp_spliced = F.log_softmax(clean, -1), F.log_softmax(spliced, -1)
        kl = (logp_clean.exp() * (logp_clean - logp_spliced)).sum(-1)  # [B, T-1]
        sums["kl"] += float(kl[mask].sum())
        n_tokens += int(mask.sum())
    m = {k: v / max(n_tokens, 1) for k, v in sums.items()}
    denom = m["zero"] - m["clean"]
    out = {
        "loss_clean": m["clean"],
        "loss_spliced": m["spliced"],
        "loss_zero_ablated": m["zero"],
        "kl_spliced": m["kl"],
        "delta_ce": m["spliced"] - m["clean"],
        "loss_recovered": (m["zero"] - m["spliced"]) / denom if denom else float("nan"),
        "n_tokens": n_tokens,
        "n_prompts": len(prompts),
    }
    if refusal_ids is not None and scores["clean"]:
        clean_s, spliced_s = (
            torch.cat(scores["clean"]).double(),
            torch.cat(scores["spliced"]).double(),
        )
        out.update(
            refusal_score_clean=float(clean_s.mean()),
            refusal_score_spliced=float(spliced_s.mean()),
            refusal_score_change=float((spliced_s - clean_s).mean()),
            refusal_score_abs_change=float((spliced_s - clean_s).abs().mean()),
        )
    return out
