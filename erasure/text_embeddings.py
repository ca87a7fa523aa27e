"""Prompt → text-encoder embeddings, tokenised the way ``StableDiffusionPipeline`` does it.

Methods encode their prompts once (with the original text encoder, under ``no_grad``) and keep the result:
:class:`PromptEmbeddings` is that cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """``input_ids`` ``[n, model_max_length]``: padded to the maximum length and truncated, as the pipeline does."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def token_count(tokenizer, text: str) -> int:
    """Number of tokens ``text`` adds inside a prompt (without start/end tokens)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def encode_ids(text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The per-token embeddings SD's UNet cross-attends to (``last_hidden_state``), ``[n, L, D]``."""
    device = next(text_encoder.parameters()).device
    return text_encoder(input_ids.to(device))[0]


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder: nn.Module, prompts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Embeddings ``[n, L, D]`` of ``prompts`` under ``no_grad``."""
    ids = tokenize(tokenizer, prompts)
    return torch.cat(
        [encode_ids(text_encoder, ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
    )


class PromptEmbeddings:
    """A fixed list of prompts and their embeddings by the text encoder as it was when this was built."""

    def __init__(self, tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> None:
        if not prompts:
            raise ValueError("PromptEmbeddings needs at least one prompt")
        self.prompts = list(prompts)
        self.embeddings = encode_prompts(tokenizer, text_encoder, self.prompts)
        self.empty = encode_prompts(tokenizer, text_encoder, [""])[0]
        """The empty prompt's embedding ``[L, D]`` (the unconditional branch of classifier-free guidance)."""

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: torch.Tensor | int) -> torch.Tensor:
        return self.embeddings[index]

    def uncond(self, n: int) -> torch.Tensor:
        """The empty-prompt embedding repeated ``n`` times, ``[n, L, D]``."""
        return self.empty.unsqueeze(0).expand(n, -1, -1)
