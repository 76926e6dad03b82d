"""A tiny Hugging Face model and data for the Trainer tests: a 2-layer GPT-2 built from a config (no weights
downloaded) and random token rows."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_gpt2", "token_data"]


def tiny_gpt2() -> Any:
    """A ``GPT2LMHeadModel`` of 2 layers, width 32, a vocabulary of 64 (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def token_data(n: int = 64, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """``n`` rows of random tokens, each its own label (language modelling)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids})
    return rows
