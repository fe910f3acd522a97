"""Task data: the official ESFT formatting and packing, and every kind of bad line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from esft_rs.data import (
    IGNORE_INDEX,
    Message,
    causal_lm_loss,
    format_conversation,
    pack,
    read_task_data,
)
from esft_rs.data.tokenizer import ByteTokenizer
from esft_rs.errors import InvalidFileError

TOK = ByteTokenizer()
BOS, EOS, M = TOK.bos, TOK.eos, IGNORE_INDEX


def b(text: str) -> list[int]:
    return list(text.encode())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows
    ))
    return path


def chat(*turns: str, mask: int | None = None) -> dict:
    msgs = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    if mask is not None:
        msgs[1]["mask"] = mask
    return {"messages": msgs}


def test_format_single_turn() -> None:
    ids, labels = format_conversation(
        [Message("user", "  Hi there \n"), Message("assistant", "Hello!")], TOK
    )
    prompt = b("User: Hi there\n\nAssistant:")
    answer = [*b(" Hello!"), EOS]
    assert ids == [BOS, *prompt, *answer]
    assert labels == [BOS, *[M] * len(prompt), *answer]


def test_format_multi_turn_with_mask() -> None:
    msgs = [Message("user", "a"), Message("assistant", "b", mask=True),
            Message("user", "c"), Message("assistant", "d")]
    ids, labels = format_conversation(msgs, TOK)
    u1, a1 = b("User: a\n\nAssistant:"), [*b(" b"), EOS]
    u2, a2 = b("User: c\n\nAssistant:"), [*b(" d"), EOS]
    assert ids == [BOS, *u1, *a1, *u2, *a2]
    assert labels == [BOS, *[M] * (len(u1) + len(a1) + len(u2)), *a2]


def test_read_and_pack_end_to_end(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [chat("q1", "a1"), chat("q2", "a2", mask=1)])
    data = read_task_data(f)
    assert data.sources == [f"{f}:1", f"{f}:2"] and data.skipped == []
    assert data.conversations[1][1] == Message("assistant", "a2", mask=True)
    packed = data.pack(TOK, seq_length=64, random_concat_ratio=0.0)
    one, _ = format_conversation(data.conversations[0], TOK)
    two, two_labels = format_conversation(data.conversations[1], TOK)
    n = len(one) + len(two)
    assert packed.input_ids.tolist() == [one + two + [TOK.pad] * (64 - n)]
    assert packed.attention_mask.tolist() == [[1] * n + [0] * (64 - n)]
    assert packed.labels[0, len(one):n].tolist() == two_labels


def ex(first: int, n: int) -> tuple[list[int], list[int]]:
    """An example: BOS then n ids; labels mask the first half."""
    ids = [BOS, *range(first, first + n)]
    return ids, [BOS, *[M] * (n // 2), *ids[1 + n // 2:]]


def test_pack_truncates_from_the_left() -> None:
    rows = pack([ex(10, 4), ex(20, 5), ex(30, 2)], seq_length=8, random_concat_ratio=0.0,
                pad_id=0)
    # Row 1: all of the first example, then the last 3 ids of the second.
    assert rows.input_ids.tolist() == [[BOS, 10, 11, 12, 13, 22, 23, 24],
                                       [BOS, 30, 31, 0, 0, 0, 0, 0]]
    assert rows.labels.tolist() == [[BOS, M, M, 12, 13, 22, 23, 24],
                                    [BOS, M, 31, M, M, M, M, M]]
    assert rows.attention_mask.tolist() == [[1] * 8, [1] * 3 + [0] * 5]


def test_pack_random_concat_drops_first_token() -> None:
    rows = pack([ex(10, 2), ex(20, 2), ex(30, 6)], seq_length=8, random_concat_ratio=1.0,
                pad_id=0)
    # Every example joining a non-empty row loses its first token, even after
    # truncation (then the row stays one short and takes the next example).
    assert rows.input_ids.tolist() == [[BOS, 10, 11, 20, 21, 34, 35, 0]]


def test_pack_exact_fit_has_no_padding_row() -> None:
    rows = pack([ex(10, 3), ex(20, 3)], seq_length=4, random_concat_ratio=0.0, pad_id=0)
    assert rows.input_ids.shape == (2, 4) and bool(rows.attention_mask.all())
    assert pack([], seq_length=4, pad_id=0).input_ids.shape == (0, 4)


def test_pack_invariants_and_determinism() -> None:
    rng = random.Random(1)
    examples = [ex(rng.randrange(256), rng.randrange(1, 40)) for _ in range(200)]
    state = random.getstate()
    a = pack(examples, seq_length=64, random_concat_ratio=0.2, seed=7, pad_id=TOK.pad)
    assert random.getstate() == state  # the global random module is not used
    same = pack(examples, seq_length=64, random_concat_ratio=0.2, seed=7, pad_id=TOK.pad)
    other = pack(examples, seq_length=64, random_concat_ratio=0.2, seed=8, pad_id=TOK.pad)
    assert all(x.equal(y) for x, y in zip(a, same, strict=True))
    assert not a.input_ids.equal(other.input_ids)
    ids, labels, mask = a
    assert ids.shape == labels.shape == mask.shape and ids.shape[1] == 64
    assert mask[:-1].all() and mask[-1].tolist() == sorted(mask[-1].tolist(), reverse=True)
    assert ((labels == ids) | (labels == M)).all()  # labels are aligned copies of ids
    assert (labels[mask == 0] == M).all() and (ids[mask == 0] == TOK.pad).all()
    # Without random concatenation and truncation, rows are the examples end to end.
    short = [e for e in examples if len(e[0]) <= 8]
    flat = pack(short, seq_length=4096, random_concat_ratio=0.0, pad_id=TOK.pad)
    n = int(flat.attention_mask.sum())
    assert flat.input_ids[0, :n].tolist() == [t for e in short for t in e[0]]


def test_causal_lm_loss_shifts() -> None:
    import torch

    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, M, 3, 4, M], [M, 2, M, M, 6]])
    expected = torch.stack([
        torch.nn.functional.cross_entropy(logits[b, t - 1], labels[b, t])
        for b in range(2) for t in range(1, 5) if labels[b, t] != M
    ]).mean()
    assert torch.allclose(causal_lm_loss(logits, labels), expected)


GOOD = json.dumps(chat("q", "a")).encode()
BAD = {
    "invalid JSON": (b'{"messages": [', "not valid JSON"),
    "not UTF-8": (b'{"messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8"),
    "not an object": (b"[1, 2]", "not a JSON object"),
    "missing messages": (b'{"conversation": []}', 'no "messages" list'),
    "empty messages": (b'{"messages": []}', 'no "messages" list'),
    "message not object": (b'{"messages": ["hi"]}', "message 0 is not an object"),
    "unknown role": (
        b'{"messages": [{"role": "tool", "content": "x"}]}', 'message 0 has unknown role "tool"'
    ),
    "missing role": (b'{"messages": [{"content": "x"}]}', "message 0 has unknown role null"),
    "empty content": (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}',
        "message 1 has empty or non-string content",
    ),
    "content not str": (
        b'{"messages": [{"role": "user", "content": 5}]}', "message 0 has empty or non-string"
    ),
    "bad mask": (
        b'{"messages": [{"role": "assistant", "content": "a", "mask": "1"}]}',
        'message 0 has mask "1" (expected 0 or 1)',
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_line_names_file_and_line(tmp_path: Path, case: str) -> None:
    line, problem = BAD[case]
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, b"", GOOD, line, GOOD])
    with pytest.raises(InvalidFileError) as e:
        read_task_data(f)
    assert str(e.value).startswith(f"{f}:4: {problem}")
    assert "\n" not in str(e.value)
    data = read_task_data(f, skip_bad=True)
    assert len(data.conversations) == 3 and data.sources[-1] == f"{f}:5"
    assert data.skipped == [str(e.value)]


def test_many_bad_lines_counted(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [b"x", GOOD, b"y", b"z"])
    g = write_jsonl(tmp_path / "e.jsonl", [GOOD])
    message = r"d\.jsonl:1: not valid JSON .*\(and 2 more bad lines\)$"
    with pytest.raises(InvalidFileError, match=message):
        read_task_data([g, f])
    assert len(read_task_data([g, f], skip_bad=True).skipped) == 3


def test_no_conversations(tmp_path: Path) -> None:
    with pytest.raises(InvalidFileError, match=r"e\.jsonl: no conversations$"):
        read_task_data(write_jsonl(tmp_path / "e.jsonl", [b"", b"  "]))
    with pytest.raises(InvalidFileError, match=r"no conversations left"):
        read_task_data(write_jsonl(tmp_path / "f.jsonl", [b"x"]), skip_bad=True)
    with pytest.raises(FileNotFoundError):
        read_task_data(tmp_path / "missing.jsonl")


def test_parsing_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    f = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    code = (
        "import sys; from esft_rs.data import read_task_data, format_conversation\n"
        "from esft_rs.data.tokenizer import ByteTokenizer\n"
        f"d = read_task_data({str(f)!r})\n"
        "format_conversation(d.conversations[0], ByteTokenizer())\n"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_jsonl_is_strict_json(tmp_path: Path) -> None:
    """NaN / Infinity and a byte-order mark inside the file are not JSON (docs/inputs.md);
    a byte-order mark at the very start is the file's, and fine."""
    from esft_rs.data import read_task_data
    from esft_rs.errors import InvalidFileError

    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n")
    assert len(read_task_data(tmp_path / "bom.jsonl").conversations) == 1
    for name, second, why in [
        ("nan.jsonl", good[:-1] + ', "score": NaN}', "NaN is not a JSON number"),
        ("inf.jsonl", good[:-1] + ', "score": -Infinity}', "-Infinity is not a JSON number"),
        ("midbom.jsonl", "\ufeff" + good, "Unexpected UTF-8 BOM"),
    ]:
        (tmp_path / name).write_text(good + "\n" + second + "\n")
        with pytest.raises(InvalidFileError, match=rf"{name}:2: not valid JSON \({why}"):
            read_task_data(tmp_path / name)
