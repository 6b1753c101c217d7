"""Chat-formatted, left-padded batches with the post-instruction positions marked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class ChatBatch:
    input_ids: torch.Tensor  # [B, T] long, left-padded
    attention_mask: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long; 0 at each prompt's first real token
    post_instruction: torch.Tensor  # [B, T] bool: template tokens after the user message

    def to(self, device: str | torch.device) -> "ChatBatch":
        return ChatBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.position_ids,
                    self.post_instruction,
                )
            )
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def render(tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: str | None) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; this project studies chat models"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], system_prompt: str | None = None
) -> ChatBatch:
    """Apply the chat template, tokenize, left-pad, and mark the post-instruction tokens.

    Post-instruction tokens are those that start at or after the end of the user's text in the
    rendered template (Arditi et al. 2024): e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``.
    """
    texts = [render(tokenizer, p, system_prompt) for p in prompts]
    ends = []
    for text, prompt in zip(texts, prompts):
        at = text.rfind(prompt)
        if at < 0:
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} altered the prompt text {prompt[:60]!r}; "
                "cannot locate the post-instruction tokens"
            )
        ends.append(at + len(prompt))
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        padding=True,
        padding_side="left",
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    attention_mask = enc["attention_mask"]
    prompt_end = torch.tensor(ends)  # [B]
    starts = enc["offset_mapping"][..., 0]  # [B, T]
    post = (starts >= prompt_end[:, None]) & attention_mask.bool()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return ChatBatch(enc["input_ids"], attention_mask, position_ids, post)


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def by_length(rows: list[dict], key: str = "prompt") -> list[dict]:
    """Rows sorted by prompt length, so each batch pads little (left padding costs real compute)."""
    return sorted(rows, key=lambda r: (len(r[key]), r[key]))
