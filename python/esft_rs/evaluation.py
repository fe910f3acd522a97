"""How well a model does on task data: answer-token loss and greedy exact match.

Any causal LM whose call ``model(ids, attention_mask)`` returns logits (or an
output with ``.logits``, as transformers models do) works: the built-in model and
every transformers family. Conversations are formatted as for training
(``esft_rs.data.format_conversation``), one per batch row, never packed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esft_rs.data import IGNORE_INDEX, Message, TaskData, format_conversation
from esft_rs.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EvalResult:
    conversations: int
    label_tokens: int  # answer tokens the loss averages over
    loss: float  # mean next-token cross-entropy over the answer tokens
    answered: int  # conversations ending in user -> assistant: scored by greedy decoding
    correct: int  # of those, greedy answers equal to the reference (stripped)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def exact_match(self) -> float | None:
        return self.correct / self.answered if self.answered else None


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(ids, mask)
    return getattr(out, "logits", out)  # transformers models return an output object


def evaluate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    data: TaskData,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    generate: bool = True,
    max_new_tokens: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> EvalResult:
    """Answer-token loss of every conversation, and exact match of the greedy answer to
    each conversation's last turn when it is an assistant reply to a user.

    ``max_length`` keeps the last tokens of longer conversations (as packing does).
    ``max_new_tokens``: the greedy budget; default: the batch's longest reference + EOS.
    ``progress`` is called with the number of conversations done in each batch.
    """
    import torch

    from esft_rs.data import causal_lm_loss, loss_tokens

    device = next(model.parameters()).device
    convs = data.conversations
    total, count, answered, correct = 0.0, 0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(convs), batch_size):
            batch = [format_conversation(c, tokenizer) for c in convs[start : start + batch_size]]
            if max_length is not None:
                batch = [(x[-max_length:], y[-max_length:]) for x, y in batch]
            width = max(len(x) for x, _ in batch)
            ids = torch.tensor([x + [tokenizer.pad] * (width - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for _, y in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
            logits = _logits(model, ids.to(device), mask.to(device))
            total += float(causal_lm_loss(logits, labels.to(device), reduction="sum"))
            count += loss_tokens(labels)
            if generate:
                items = [_prompt_and_answer(c, tokenizer, max_length)
                         for c in convs[start : start + batch_size]]
                items = [it for it in items if it is not None]
                if items:
                    budget = max_new_tokens or 1 + max(
                        len(tokenizer.encode(f" {a}")) for _, a in items)
                    got = greedy_answers(model, tokenizer, [p for p, _ in items],
                                         max_new_tokens=budget, batch_size=batch_size)
                    answered += len(items)
                    correct += sum(g == a for g, (_, a) in zip(got, items, strict=True))
            if progress is not None:
                progress(len(batch))
    return EvalResult(len(convs), count, total / count if count else math.nan, answered, correct)


def _prompt_and_answer(
    messages: Sequence[Message], tokenizer: Tokenizer, max_length: int | None
) -> tuple[list[int], str] | None:
    """(prompt ids up to "Assistant:", reference answer) of a conversation's last turn."""
    if len(messages) < 2 or messages[-1].role != "assistant" or messages[-2].role != "user":
        return None
    ids, _ = format_conversation(messages[:-1], tokenizer)
    return (ids[-max_length:] if max_length is not None else ids), messages[-1].content.strip()


def greedy_answers(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 128,
) -> list[str]:
    """Greedy continuation of each prompt (token ids) up to EOS, decoded and stripped.

    Batched with left padding; each step re-reads the whole prefix (no KV cache),
    which keeps it model-agnostic and is cheap for short answers.
    """
    import torch

    device = next(model.parameters()).device
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor(
                [[tokenizer.pad] * (width - len(b)) + list(b) for b in batch], device=device
            )
            mask = torch.tensor(
                [[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device
            )
            done = torch.zeros(len(batch), dtype=torch.bool, device=device)
            new: list[torch.Tensor] = []
            for _ in range(max_new_tokens):
                nxt = _logits(model, ids, mask)[:, -1].argmax(-1)
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
