"""Synthetic tasks for the demo: a "general" mix to pretrain on, and downstream tasks
that the pretrained base is poor at. Each task is a seeded generator of
(prompt, answer) pairs, written as official ESFT chat JSONL.

Every prompt starts with the task's keyword, so a task is recognisable from its
first tokens, as a domain is for a real model; answers are short, so that exact
match by greedy decoding is cheap to evaluate.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_lowercase


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _substitution(seed: int) -> dict[str, str]:
    shuffled = list(LETTERS)
    random.Random(seed).shuffle(shuffled)
    return dict(zip(LETTERS, shuffled, strict=True))


_TRANSLATE = _substitution(7)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a} {b}", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"reverse {w}", w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"sort {w}", "".join(sorted(w))


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(LETTERS, 4)
    values = [str(rng.randint(0, 9)) for _ in keys]
    k = rng.randrange(4)
    table = " ".join(f"{a}={v}" for a, v in zip(keys, values, strict=True))
    return f"lookup {keys[k]} in {table}", values[k]


def _translate(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"translate {w}", "".join(_TRANSLATE[c] for c in w)


def _upper(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"upper {w}", w.upper()


def _binary(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 255)
    return f"binary {n}", format(n, "b")


def _shift(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"shift {w}", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


Generator = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class Task:
    name: str
    generate: Generator


GENERAL: tuple[Task, ...] = (
    Task("add", _add),
    Task("reverse", _reverse),
    Task("sort", _sort),
    Task("lookup", _lookup),
    Task("translate", _translate),
    Task("upper", _upper),
)

DOWNSTREAM: tuple[Task, ...] = (
    Task("binary", _binary),
    Task("shift", _shift),
)

TASKS = {t.name: t for t in GENERAL + DOWNSTREAM}


def examples(task: Task, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) pairs, deterministic in (task, seed)."""
    rng = random.Random(f"{task.name}:{seed}")
    seen: dict[str, str] = {}
    tries = 0
    while len(seen) < n and tries < 50 * n:
        prompt, answer = task.generate(rng)
        seen.setdefault(prompt, answer)
        tries += 1
    return list(seen.items())


def split(
    task: Task, train: int, test: int, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint train and held-out test items."""
    items = examples(task, train + test, seed)
    return items[test:], items[:test]


def mixture(tasks: tuple[Task, ...], per_task: int, seed: int) -> Iterator[tuple[str, str]]:
    """Interleaved items of several tasks, shuffled under ``seed``."""
    items = [x for t in tasks for x in examples(t, per_task, seed)]
    random.Random(seed).shuffle(items)
    return iter(items)


def write_jsonl(items: list[tuple[str, str]], path: Path) -> Path:
    with path.open("w") as f:
        for prompt, answer in items:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
