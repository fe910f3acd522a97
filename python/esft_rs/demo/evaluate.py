"""Exact match of greedy decoding, computed in one forward pass.

Greedy decoding reproduces a reference answer (its tokens, then EOS) exactly when,
fed the prompt and the reference, the model's argmax at every answer position is the
reference's next token: each greedy step then sees the same prefix as the reference.
So one teacher-forced pass over prompt + answer scores greedy exact match without
a decoding loop (tests/test_demo.py checks it against a literal greedy decoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from esft_rs.data import IGNORE_INDEX, Message, format_conversation
from esft_rs.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch


def rows(items: Sequence[tuple[str, str]], tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """One (prompt, answer) item per row, formatted as in training, right-padded to the
    longest: ``input_ids``, ``labels`` (answer tokens and EOS only) and ``attention_mask``."""
    import torch

    encoded = [format_conversation([Message("user", p), Message("assistant", a)], tokenizer)
               for p, a in items]
    width = max(len(ids) for ids, _ in encoded)
    pad = [width - len(ids) for ids, _ in encoded]
    return {
        "input_ids": torch.tensor([ids + [tokenizer.pad] * n
                                   for (ids, _), n in zip(encoded, pad, strict=True)]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * n
                                for (_, labels), n in zip(encoded, pad, strict=True)]),
        "attention_mask": torch.tensor([[1] * (width - n) + [0] * n for n in pad]),
    }


def correct(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: does greedy decoding reproduce the row's answer (module docstring)?"""
    import torch

    with torch.inference_mode():
        logits = model(batch["input_ids"], batch["attention_mask"])
    predicted = logits[:, :-1].argmax(-1)
    target = batch["labels"][:, 1:]
    return ((predicted == target) | (target == IGNORE_INDEX)).all(-1)


def exact_match(
    model: torch.nn.Module, tokenizer: Tokenizer, items: Sequence[tuple[str, str]],
    batch_size: int = 256,
) -> float:
    """Share of (prompt, answer) items that greedy decoding answers exactly."""
    if not items:
        return 0.0
    hits = 0
    for start in range(0, len(items), batch_size):
        batch = rows(items[start : start + batch_size], tokenizer)
        hits += int(correct(model, batch).sum())
    return hits / len(items)
