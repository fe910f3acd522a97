"""Task data: chat conversations -> token ids and labels -> packed tensors.

Input is the official ESFT format, one JSON object per line of a ``.jsonl`` (or
``.jsonl.gz``) file, or one row of a Parquet file's ``messages`` column (the form
datasets on the Hugging Face Hub take)::

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "mask": 0}]}

``encode_conversation`` turns a conversation into ids and labels: with the
tokenizer's chat template (``esft_rs.data.chat_template``; labels on the assistant tokens
only), or in the official ESFT format. The official formatting and the packing
follow the official code, so the same tokenizer and seed give the same sequences:

- BOS once; a system turn is ``{content}\\n\\n``, masked from the loss (DeepSeek-V2's
  template writes it so, before the first user turn; the official code has none); a
  user turn is ``User: {content}\\n\\nAssistant:``; an assistant turn is
  `` {content}`` + EOS; contents are stripped.
- Labels are aligned with ``input_ids`` (the loss shifts, see ``causal_lm_loss``):
  user turns are ``-100``; assistant turns are their own ids unless ``"mask": 1``;
  BOS labels itself (in a packed row, the step EOS -> BOS is learned).
- Packing fills rows of ``seq_length`` in file order. An example longer than what
  is left of the row keeps its tail (left truncation) and completes the row. With
  probability ``random_concat_ratio`` an example joining a non-empty row loses its
  first token (its BOS, or after truncation its first kept token). The last row is
  padded: PAD ids, ``-100`` labels, attention mask 0.

Validation reads every row before anything is tokenised, so bad input fails fast
with ``file:line`` (``file:row`` for Parquet). torch is imported only to build the
final tensors.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from esft_rs.data.tokenizer import Tokenizer
from esft_rs.errors import EsftError, EsftValueError, InvalidFileError, MismatchError
from esft_rs.files.inputs import json_problem, read_bytes

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

#: The seed of data order and packing, in train and profile alike (the official base.yaml's).
DEFAULT_SEED = 5934875

#: Largest seed: torch's generators take 64-bit seeds.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    mask: bool = False  # an assistant turn kept out of the loss


@dataclass(frozen=True)
class TaskData:
    """Validated conversations, in file order, with where each came from."""

    conversations: list[list[Message]]
    sources: list[str]  # "file:line" of each conversation
    skipped: list[str]  # "file:line: problem" of each line skipped by skip_bad

    def pack(
        self,
        tokenizer: Tokenizer,
        *,
        seq_length: int = 4096,
        random_concat_ratio: float = 0.2,
        seed: int = DEFAULT_SEED,
    ) -> Packed:
        """Encode every conversation (``encode_conversation``) and pack them (module docstring)."""
        return pack(
            self.encoded(tokenizer),
            seq_length=seq_length,
            random_concat_ratio=random_concat_ratio,
            seed=seed,
            pad_id=tokenizer.pad,
        )


    def encoded(self, tokenizer: Tokenizer) -> Iterator[tuple[list[int], list[int]]]:
        """``encode_conversation`` of each conversation; one that the chat template
        refuses is a ``MismatchError`` naming its ``file:line``."""
        for conv, where in zip(self.conversations, self.sources, strict=True):
            try:
                yield encode_conversation(tokenizer, conv)
            except MismatchError as e:
                raise MismatchError(f"{where}: {e}") from None


class Packed(NamedTuple):
    """Rows ready for a training or profiling loop, each [rows, seq_length] int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor  # 1 = token, 0 = padding


def read_task_data(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, skip_bad: bool = False
) -> TaskData:
    """Read and validate ESFT chat data: ``.jsonl`` (blank lines are ignored),
    ``.jsonl.gz``, or ``.parquet`` with a ``messages`` column (needs pyarrow:
    ``pip install 'esft-rs[parquet]'``).

    A bad row (not UTF-8, not JSON, no ``messages``, an unknown role, empty
    content, ...) raises ``InvalidFileError`` naming ``file:line`` (``file:row``)
    and how many other rows are bad; with ``skip_bad`` such rows are left out and
    listed in ``TaskData.skipped``. A file with no conversation at all is an error.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    conversations: list[list[Message]] = []
    sources: list[str] = []
    bad: list[str] = []
    for path in map(Path, paths):
        for where, row in _rows(path):
            try:
                conversations.append(_parse_line(row) if isinstance(row, bytes)
                                     else _parse_messages(row))
                sources.append(where)
            except ValueError as e:
                bad.append(f"{where}: {e}")
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise InvalidFileError(f"{bad[0]}{more}")
    if not conversations:
        names = ", ".join(map(str, paths))
        raise InvalidFileError(f"{names}: no conversations" + (" left" if bad else ""))
    return TaskData(conversations, sources, bad)


def _rows(path: Path) -> Iterator[tuple[str, bytes | object]]:
    """(``file:line``, the line) of a JSONL file, plain or gzip; (``file:row``, the
    ``messages`` value) of a Parquet file."""
    if path.name.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    raw = read_bytes(path)
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # header, truncation, corrupt stream
            raise InvalidFileError(f"{path}: not a valid gzip file ({e})", path) from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # the file's byte-order mark; none mid-file
    for number, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            yield f"{path}:{number}", line


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EsftError(
            f"{path}: reading Parquet needs pyarrow: pip install 'esft-rs[parquet]'"
        ) from None
    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidFileError(f"{path}: not a valid Parquet file ({first})", path) from None
    if "messages" not in table.column_names:
        raise InvalidFileError(
            f"{path}: no messages column (columns: {', '.join(table.column_names)})", path
        )
    for number, messages in enumerate(table.column("messages").to_pylist(), 1):
        if isinstance(messages, list):  # a struct field some rows lack reads as null
            messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict)
                        else m for m in messages]
        yield f"{path}:{number}", {"messages": messages}


def _parse_line(line: bytes) -> list[Message]:
    obj, why = json_problem(line, bom=False)
    if why is not None:
        raise EsftValueError(why)
    return _parse_messages(obj)


def _parse_messages(obj: object) -> list[Message]:
    """The conversation in a row's ``{"messages": [...]}``."""
    if not isinstance(obj, dict):
        raise EsftValueError("not a JSON object")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EsftValueError('no "messages" list (or it is empty)')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise EsftValueError(f"message {i} is not an object")
        role, content, mask = m.get("role"), m.get("content"), m.get("mask", 0)
        if role not in ROLES:
            raise EsftValueError(f"message {i} has unknown role {json.dumps(role)}")
        if not isinstance(content, str) or not content.strip():
            raise EsftValueError(f"message {i} has empty or non-string content")
        if mask not in (0, 1):
            raise EsftValueError(f"message {i} has mask {json.dumps(mask)} (expected 0 or 1)")
        out.append(Message(role, content, bool(mask)))
    return out


def encode_conversation(
    tokenizer: Tokenizer, messages: Sequence[Message | Mapping[str, object]]
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, for training, profiling and evaluation.

    ``tokenizer``: what ``esft_rs.data.load_tokenizer`` returns. ``messages``:
    ``Message``s or the data's ``{"role", "content"[, "mask"]}`` dicts. With the
    tokenizer's chat template, the ids are transformers' ``apply_chat_template``
    ids and only assistant tokens carry labels (``esft_rs.data.chat_template``);
    without one, the official ESFT format (``format_conversation``). Labels are
    -100 where there is nothing to learn; a message with ``mask`` teaches nothing.
    """
    conv = list(messages)
    if not all(isinstance(m, Message) for m in conv):
        conv = _parse_messages({"messages": [dict(m) if isinstance(m, Mapping) else vars(m)
                                             for m in conv]})
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return format_conversation(conv, tokenizer)
    from esft_rs.data.chat_template import encode

    return encode(tokenizer, template, conv, IGNORE_INDEX)


def format_conversation(
    messages: Sequence[Message], tokenizer: Tokenizer
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, the official ESFT way (module docstring)."""
    if tokenizer.bos is None:
        raise EsftError("the official ESFT format needs a BOS token; the tokenizer has none")
    ids = [tokenizer.bos]
    labels = [tokenizer.bos]
    for m in messages:
        if m.role == "system":
            tokens = tokenizer.encode(f"{m.content.strip()}\n\n")
            ids += tokens
            labels += [IGNORE_INDEX] * len(tokens)
        elif m.role == "user":
            tokens = tokenizer.encode(f"User: {m.content.strip()}\n\nAssistant:")
            ids += tokens
            labels += [IGNORE_INDEX] * len(tokens)
        else:
            tokens = [*tokenizer.encode(f" {m.content.strip()}"), tokenizer.eos]
            ids += tokens
            labels += [IGNORE_INDEX] * len(tokens) if m.mask else tokens
    return ids, labels


def pack(
    examples: Iterable[tuple[list[int], list[int]]],
    *,
    seq_length: int = 4096,
    random_concat_ratio: float = 0.2,
    seed: int = DEFAULT_SEED,
    pad_id: int,
) -> Packed:
    """Pack (input_ids, labels) pairs into rows of ``seq_length`` (module docstring).

    Deterministic: the coin for random concatenation comes from ``random.Random(seed)``,
    tossed only when an example joins a non-empty row, as the official code does
    with the global ``random`` after ``random.seed(seed)``.
    """
    import torch

    if seq_length <= 0:
        raise EsftValueError("seq_length must be positive")
    coin = random.Random(seed)
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for x, y in examples:
        room = seq_length - len(ids)
        if len(x) > room:
            x, y = x[-room:], y[-room:]
        if ids and coin.random() < random_concat_ratio:
            x, y = x[1:], y[1:]
        ids += x
        labels += y
        if len(ids) == seq_length:
            rows.append((ids, labels))
            ids, labels = [], []
    real = [seq_length] * len(rows)
    if ids:  # the official code also emits an all-padding row here; it is useless
        real.append(len(ids))
        pad = seq_length - len(ids)
        rows.append((ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad))
    input_ids = torch.tensor([r[0] for r in rows], dtype=torch.long).view(-1, seq_length)
    label_t = torch.tensor([r[1] for r in rows], dtype=torch.long).view(-1, seq_length)
    lengths = torch.tensor(real, dtype=torch.long)
    mask = (torch.arange(seq_length) < lengths[:, None]).long()
    return Packed(input_ids, label_t, mask)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t+1; -100 is ignored.

    ``reduction="sum"`` gives the summed loss, which the trainer divides by the
    label tokens of a whole global batch (``loss_tokens``).
    """
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def loss_tokens(labels: torch.Tensor) -> int:
    """How many tokens of ``labels`` count in ``causal_lm_loss`` (the shifted, unmasked ones)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
