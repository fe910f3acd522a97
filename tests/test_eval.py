"""``esft-rs eval`` / ``esft_rs.evaluation``: loss and greedy exact match against references
computed another way (one conversation at a time; transformers' own ``generate``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from esft_rs.data import Message, TaskData, causal_lm_loss, format_conversation, loss_tokens
from esft_rs.evaluation import evaluate
from esft_rs.models import load_model
from esft_rs.tokenizer import ByteTokenizer
from hf_tiny import save

PROMPTS = ["Reverse moe", "Sort 3 1 2", "Upper case", "Add 2 and 2", "Hi", "Name an expert"]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save("mixtral", tmp_path_factory.mktemp("eval") / "mixtral", seed=3)


def generate_reference(model: torch.nn.Module, prompt: str, max_new: int) -> str:
    """transformers' greedy ``generate`` on one unpadded prompt."""
    tok = ByteTokenizer()
    ids, _ = format_conversation([Message("user", prompt)], tok)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=tok.eos, pad_token_id=tok.pad)[0, len(ids):].tolist()
    return tok.decode(out[: out.index(tok.eos)] if tok.eos in out else out).strip()


def task(answers: list[str]) -> TaskData:
    convs = [[Message("user", p), Message("assistant", a)] for p, a in zip(PROMPTS, answers,
                                                                           strict=True)]
    return TaskData(convs, [f"x:{i}" for i in range(len(convs))], [])


def test_exact_match_agrees_with_transformers_generate(mixtral: Path) -> None:
    model = load_model(mixtral).eval()
    greedy = [generate_reference(model, p, 4) for p in PROMPTS]
    # Half the references are the model's own greedy answers, half are not.
    answers = [g if i % 2 == 0 else g + "#" for i, g in enumerate(greedy)]
    answers = [a if a else "#" for a in answers]
    expected = sum(a == g for a, g in zip(answers, greedy, strict=True))
    result = evaluate(model, ByteTokenizer(), task(answers), batch_size=4, max_new_tokens=4)
    assert result.answered == len(PROMPTS)
    assert result.correct == expected


def test_loss_equals_one_conversation_at_a_time(mixtral: Path) -> None:
    model = load_model(mixtral).eval()
    data = task(["eom", "1 2 3", "UPPER CASE", "4", "Hello there", "router"])
    result = evaluate(model, ByteTokenizer(), data, batch_size=4, generate=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for conv in data.conversations:
            ids, labels = (torch.tensor([x]) for x in format_conversation(conv, ByteTokenizer()))
            total += float(causal_lm_loss(model(ids).logits, labels, reduction="sum"))
            count += loss_tokens(labels)
    assert result.label_tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.answered == 0 and result.exact_match is None


def test_cli_prints_and_writes_figures(mixtral: Path, tmp_path: Path) -> None:
    data = tmp_path / "task.jsonl"
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": p},
                                 {"role": "assistant", "content": "x"}]}) + "\n"
        for p in PROMPTS))
    proc = run_cli("eval", mixtral, data, "--device", "cpu", "-o", tmp_path / "e.json",
                   "--limit", "4", check=True)
    figures = json.loads((tmp_path / "e.json").read_text())
    assert figures["conversations"] == 4 and figures["answered"] == 4
    assert f"loss {figures['loss']:.4f}" in proc.stdout
    assert f"({figures['correct']}/4)" in proc.stdout


def test_cli_bad_data_is_one_line(mixtral: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"nope": 1}\n')
    proc = run_cli("eval", mixtral, data)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and f"{data}:2" in proc.stderr
