"""Exact-match accuracy by greedy decoding, batched with left padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from esft_rs.data import Message, format_conversation
from esft_rs.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch


def prompt_ids(prompt: str, tokenizer: Tokenizer) -> list[int]:
    """The tokens a model sees before its answer, formatted as in training."""
    ids, _ = format_conversation([Message("user", prompt)], tokenizer)
    return ids


def greedy_answers(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 128,
) -> list[str]:
    """Greedy continuation of each prompt up to EOS, decoded and stripped."""
    import torch

    device = next(model.parameters()).device
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = [prompt_ids(p, tokenizer) for p in prompts[start : start + batch_size]]
            width = max(map(len, batch))
            ids = torch.tensor(
                [[tokenizer.pad] * (width - len(b)) + b for b in batch], device=device
            )
            mask = torch.tensor(
                [[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device
            )
            done = torch.zeros(len(batch), dtype=torch.bool, device=device)
            new: list[torch.Tensor] = []
            for _ in range(max_new_tokens):
                nxt = model(ids, mask)[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, tokenizer.eos), nxt)
                new.append(nxt)
                done |= nxt == tokenizer.eos
                if bool(done.all()):
                    break
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            for row in torch.stack(new, dim=1).tolist():
                row = row[: row.index(tokenizer.eos)] if tokenizer.eos in row else row
                out.append(tokenizer.decode(row).strip())
    return out


def exact_match(
    model: torch.nn.Module, tokenizer: Tokenizer, items: Sequence[tuple[str, str]]
) -> float:
    """Share of (prompt, answer) items whose greedy answer equals the reference."""
    if not items:
        return 0.0
    answers = greedy_answers(model, tokenizer, [p for p, _ in items])
    return sum(a == ref for a, (_, ref) in zip(answers, items, strict=True)) / len(items)
