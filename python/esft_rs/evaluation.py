"""How well a model does on task data: answer-token loss and greedy exact match.

Any causal LM whose call ``model(ids, attention_mask)`` returns logits (or an
output with ``.logits``, as transformers models do) works: the built-in model and
every transformers family. Conversations are encoded as for training
(``esft_rs.data.encode_conversation``: the chat template or the official format),
one per row, never packed.

Exact match needs no decoding loop. Greedy decoding reproduces a reference answer
(its tokens, then EOS) exactly when, fed the prompt and the reference, the model's
argmax at every answer position is the reference's next token: each greedy step then
sees the same prefix as the reference. So the one teacher-forced pass that gives the
loss also scores exact match (tests check it against literal greedy decoding and
transformers' ``generate``; ``benches/bench_demo_eval.py`` times both).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from esft_rs.data import IGNORE_INDEX, Message, TaskData, encode_conversation, read_task_data
from esft_rs.data.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EvalResult:
    conversations: int
    label_tokens: int  # answer tokens the loss averages over
    loss: float  # mean next-token cross-entropy over the answer tokens
    answered: int  # conversations ending in user -> assistant: scored for exact match
    correct: int  # of those, answers greedy decoding reproduces exactly (tokens, then EOS)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def exact_match(self) -> float | None:
        return self.correct / self.answered if self.answered else None


def conversation_rows(
    conversations: Sequence[Sequence[Message]], tokenizer: Tokenizer, max_length: int | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One conversation per row, encoded as in training and right-padded:
    (``input_ids``, ``labels``, ``attention_mask``; the length of each row's scored
    answer: the labelled tokens of its last turn, EOS or end-of-turn included, when
    that is an unmasked assistant reply to a user, else 0). A scored row ends with
    its answer (what a template writes after it teaches nothing).

    ``max_length`` keeps the last tokens of longer conversations (as packing does).
    """
    import torch

    encoded, answer = [], []
    for conv in conversations:
        ids, labels = encode_conversation(tokenizer, conv)
        n = 0
        if (len(conv) >= 2 and conv[-1].role == "assistant" and conv[-2].role == "user"
                and not conv[-1].mask):
            end = max((i + 1 for i, t in enumerate(labels) if t != IGNORE_INDEX), default=0)
            start = end
            while start > 0 and labels[start - 1] != IGNORE_INDEX:
                start -= 1
            ids, labels, n = ids[:end], labels[:end], end - start
        if max_length is not None:
            ids, labels = ids[-max_length:], labels[-max_length:]
        encoded.append((ids, labels))
        answer.append(min(n, len(ids) - 1))
    width = max(len(ids) for ids, _ in encoded)
    pad = [width - len(ids) for ids, _ in encoded]
    rows = {
        "input_ids": torch.tensor([ids + [tokenizer.pad] * n
                                   for (ids, _), n in zip(encoded, pad, strict=True)]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * n
                                for (_, labels), n in zip(encoded, pad, strict=True)]),
        "attention_mask": torch.tensor([[1] * (width - n) + [0] * n for n in pad]),
    }
    return rows, torch.tensor(answer)


def item_rows(items: Sequence[tuple[str, str]], tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """(prompt, answer) items as one-turn conversations, one per row (``conversation_rows``)."""
    return conversation_rows(_conversations(items), tokenizer)[0]


def greedy_reproduces(
    logits: torch.Tensor, rows: dict[str, torch.Tensor], answer: torch.Tensor
) -> torch.Tensor:
    """Per row: does greedy decoding reproduce the row's last ``answer`` tokens
    (module docstring)? Rows with no scored answer are False."""
    import torch

    ids, mask = rows["input_ids"], rows["attention_mask"]
    length = mask.sum(-1, keepdim=True)  # real tokens (right padding)
    pos = torch.arange(ids.shape[1] - 1, device=ids.device)  # predicts token pos + 1
    scored = (pos >= length - answer[:, None].to(ids.device) - 1) & (pos < length - 1)
    hit = logits[:, :-1].argmax(-1) == ids[:, 1:]
    return (hit | ~scored).all(-1) & (answer.to(ids.device) > 0)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Tokenizer | str | os.PathLike[str],
    data: TaskData | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> EvalResult:
    """Answer-token loss of every conversation, and greedy exact match of each
    conversation's last turn when it is an assistant reply to a user.

    ``model``: the built-in model or a transformers causal LM (any module whose
    call returns logits or an output with ``.logits``). ``tokenizer``: an esft-rs
    tokenizer (``esft_rs.data.load_tokenizer``) or the model directory to load
    it from. ``data``: ``TaskData`` or chat data files (``read_task_data``).
    ``max_length``: see ``conversation_rows``. ``progress`` is called with 0 once the
    inputs are checked (token ids, answer tokens), then with the number of conversations
    done in each batch (this rank's, under torch.distributed).

    Under ``torch.distributed`` (torchrun) every rank must call it: batch i (of
    ``batch_size`` conversations, as in one process) runs on rank i mod world size, the
    sums are all-reduced and every rank returns the figures of one process. A model
    sharded by FSDP2 (``esft_rs.training.sharded_load.load_sharded``) runs every forward
    on all ranks together (``esft_rs.distributed.sum_over_batches``).
    """
    import torch

    from esft_rs.data import causal_lm_loss, loss_tokens
    from esft_rs.distributed import sum_over_batches

    if not callable(model):
        raise TypeError(f"evaluate expects a model (torch.nn.Module), got {type(model).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    elif not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            "evaluate expects an esft-rs tokenizer (esft_rs.data.load_tokenizer(model_dir))"
            f" or a model directory, got {type(tokenizer).__name__}"
        )
    if not isinstance(data, TaskData):
        if isinstance(data, (str, os.PathLike)) or (
            isinstance(data, Sequence) and all(isinstance(p, (str, os.PathLike)) for p in data)
        ):
            data = read_task_data(data)
        else:
            raise TypeError(
                "evaluate expects task data: a chat data file (or a list of them) or"
                f" esft_rs.data.read_task_data(...), got {type(data).__name__}"
            )

    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    convs = data.conversations
    _preflight(model, tokenizer, data, max_length)
    if progress is not None:
        progress(0)  # the inputs hold: a caller may show its progress bar from here on

    def run(i: int) -> torch.Tensor:
        rows, answer = conversation_rows(convs[i * batch_size : (i + 1) * batch_size],
                                         tokenizer, max_length)
        rows = {k: v.to(device) for k, v in rows.items()}
        out = model(rows["input_ids"], rows["attention_mask"])
        logits = getattr(out, "logits", out)  # transformers models return an output object
        sums = torch.tensor([float(causal_lm_loss(logits, rows["labels"], reduction="sum")),
                             loss_tokens(rows["labels"]), int((answer > 0).sum()),
                             int(greedy_reproduces(logits, rows, answer).sum())],
                            dtype=torch.float64)
        if progress is not None:
            progress(len(answer))
        return sums

    with torch.no_grad():  # not inference_mode: a sharded model may train after this
        total, count, answered, correct = sum_over_batches(
            model, -(-len(convs) // batch_size), run, 4, device).tolist()
    return EvalResult(len(convs), int(count), total / count if count else math.nan,
                      int(answered), int(correct))


def exact_match(
    model: torch.nn.Module, tokenizer: Tokenizer, items: Sequence[tuple[str, str]],
    batch_size: int = 256,
) -> float:
    """Share of (prompt, answer) items that greedy decoding answers exactly."""
    if not items:
        return 0.0
    return evaluate_items(model, tokenizer, items, batch_size).exact_match or 0.0


def evaluate_items(
    model: torch.nn.Module, tokenizer: Tokenizer, items: Sequence[tuple[str, str]],
    batch_size: int = 256,
) -> EvalResult:
    """Loss and exact match of (prompt, answer) items, each one user -> assistant turn."""
    data = TaskData(_conversations(items), [f"item {i}" for i in range(len(items))], [])
    return evaluate(model, tokenizer, data, batch_size=batch_size)


def _preflight(model: Any, tokenizer: Tokenizer, data: TaskData, max_length: int | None) -> None:
    """Token ids and answer tokens of every conversation, checked before the first batch runs."""
    from esft_rs.data.preflight import check_answer_tokens, check_token_ids

    lo, hi, answer = 0, 0, 0
    for conv in data.conversations:
        ids, labels = encode_conversation(tokenizer, conv)
        if max_length is not None:
            ids, labels = ids[-max_length:], labels[-max_length:]
        lo, hi = min(lo, *ids), max(hi, *ids)
        answer += sum(1 for x in labels[1:] if x != IGNORE_INDEX)
    origin = ", ".join(sorted({s.rsplit(":", 1)[0] for s in data.sources})) or "data"
    check_token_ids(lo, hi, model, origin)
    check_answer_tokens(answer, origin, "to score")


def _conversations(items: Sequence[tuple[str, str]]) -> list[list[Message]]:
    return [[Message("user", p), Message("assistant", a)] for p, a in items]
