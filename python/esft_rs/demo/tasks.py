"""Synthetic tasks for the demo: a "general" mix to pretrain on, and downstream tasks
that the pretrained base is poor at (``shift`` has met the base only as a trace of the
mix). Each task is a seeded generator of
(prompt, answer) pairs, written as official ESFT chat JSONL.

Every prompt starts with the task's name as its keyword, so a task is recognisable
from its first tokens, as a domain is for a real model. Symbols are written apart
(``shift 1 2 3 4`` -> ``4 5 6 7``) so that the demo's word-level tokenizer
(``vocabulary``) makes each one token. Most tasks map each symbol of a
four-symbol word through a table: letters (``a``-``l``) or digits. They share one
skill (find the i-th symbol of the word) and differ in their table, which is what
the experts hold: the downstream task ``shift`` (digit + 3) reuses that skill with
another table in the digits' domain. A model of half a million parameters learns these
within a CPU minute or two, and answers are short, so exact match is cheap.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_lowercase[:12]
DIGITS = string.digits
WORD_LENGTH = 4

Generator = Callable[[random.Random], tuple[str, str]]


def _substitution(seed: int) -> dict[str, str]:
    shuffled = list(LETTERS)
    random.Random(seed).shuffle(shuffled)
    return dict(zip(LETTERS, shuffled, strict=True))


def _symbolwise(keyword: str, table: dict[str, str]) -> Generator:
    """A task that maps every symbol of a word (over ``table``'s keys) through ``table``."""
    alphabet = sorted(table)

    def generate(rng: random.Random) -> tuple[str, str]:
        word = [rng.choice(alphabet) for _ in range(WORD_LENGTH)]
        return f"{keyword} {' '.join(word)}", " ".join(table[c] for c in word)

    return generate


def _rotation(alphabet: str, k: int) -> dict[str, str]:
    return {c: alphabet[(i + k) % len(alphabet)] for i, c in enumerate(alphabet)}


#: The general tasks' tables: four over the letters a-l, two over the digits.
TABLES = {
    "upper": {c: c.upper() for c in LETTERS},
    "translate": _substitution(7),
    "mirror": {c: LETTERS[-1 - i] for i, c in enumerate(LETTERS)},
    "complement": {d: str(9 - int(d)) for d in DIGITS},
    "successor": _rotation(DIGITS, 1),
}
_shift = _symbolwise("shift", _rotation(DIGITS, 3))


def _binary(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 63)
    return f"binary {' '.join(str(n))}", " ".join(format(n, "b"))


@dataclass(frozen=True)
class Task:
    name: str
    generate: Generator


GENERAL: tuple[Task, ...] = tuple(Task(k, _symbolwise(k, t)) for k, t in TABLES.items())

DOWNSTREAM: tuple[Task, ...] = (
    Task("shift", _shift),
    Task("binary", _binary),
)

TASKS = {t.name: t for t in GENERAL + DOWNSTREAM}
KEYWORDS = tuple(TASKS)
#: Every symbol a prompt or answer holds: the letters, their upper case, the digits.
SYMBOLS = tuple(LETTERS + LETTERS.upper() + DIGITS)


def examples(task: Task, n: int, seed: int) -> list[tuple[str, str]]:
    """Up to ``n`` distinct (prompt, answer) pairs (fewer if the task has fewer),
    deterministic in (task, seed)."""
    rng = random.Random(f"{task.name}:{seed}")
    seen: dict[str, str] = {}
    for _ in range(50 * n):
        if len(seen) >= n:
            break
        prompt, answer = task.generate(rng)
        seen.setdefault(prompt, answer)
    return list(seen.items())


def split(
    task: Task, train: int, test: int, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint train and held-out test items (the test items come first)."""
    items = examples(task, train + test, seed)
    return items[test:], items[:test]


def write_jsonl(items: list[tuple[str, str]], path: Path) -> Path:
    with path.open("w") as f:
        for prompt, answer in items:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
