"""``esft-rs demo --quick``: a complete, self-consistent report (figures are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import esft_rs
from conftest import run_cli
from esft_rs.data import Message, format_conversation
from esft_rs.demo.evaluate import exact_match
from esft_rs.demo.tasks import DOWNSTREAM, examples
from esft_rs.naming import classify
from esft_rs.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "esft_rs", "demo", "--quick", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report.md" in proc.stdout
    return json.loads((out / "report.json").read_text()), out


def test_report_complete(report: tuple[dict, Path]) -> None:
    r, out = report
    assert set(r["methods"]) == {"fft", "esft_token", "esft_gate", "random"}
    keys = {"downstream_acc", "general_acc_before", "general_acc_after", "trainable_params",
            "total_params", "adapter_bytes", "train_seconds"}
    for m in r["methods"].values():
        assert keys <= set(m)
        for k in ("downstream_acc", "general_acc_before", "general_acc_after"):
            assert 0.0 <= m[k] <= 1.0
        assert 0 < m["trainable_params"] <= m["total_params"]
        assert m["train_seconds"] > 0
    assert r["methods"]["fft"]["trainable_params"] == r["methods"]["fft"]["total_params"]
    for accs, mean in [(r["base"]["general_acc_by_task"], r["base"]["general_acc"])] + [
        (m["general_acc_after_by_task"], m["general_acc_after"]) for m in r["methods"].values()
    ]:
        assert sum(accs.values()) / len(accs) == pytest.approx(mean)
    assert all(c["holds"] in (True, False, None) for c in r["claims"].values())
    assert {"concentration", "overlap"} <= set(r["routing"])
    assert (out / "report.md").read_text().startswith("# esft-rs demo report")


def test_adapter_bytes_are_the_selected_experts(report: tuple[dict, Path]) -> None:
    r, _ = report
    base = esft_rs.inspect(r["base"]["path"])
    per_expert = {}
    for name, t in base.tensors.items():
        role = classify(name)
        if role.kind == "routed_expert":
            key = (role.layer, role.expert)
            per_expert[key] = per_expert.get(key, 0) + t.bytes
    for name in ("esft_token", "esft_gate", "random"):
        m = r["methods"][name]
        adapter = esft_rs.inspect(m["adapter"])
        experts = {(lay, e) for lay, layer in adapter.moe.layers.items() for e in layer.experts}
        assert experts and m["adapter_bytes"] == sum(per_expert[k] for k in experts)
        assert m["experts_trained"] == len(experts)


def test_merged_model_scores_like_in_memory(report: tuple[dict, Path]) -> None:
    r, _ = report
    assert r["merge"]["equal"] is True
    assert r["merge"]["downstream_acc"] == r["methods"]["esft_token"]["downstream_acc"]


def test_demo_help() -> None:
    assert "--quick" in run_cli("demo", "--help", check=True).stdout


class _Memorizer:
    """A stand-in LM that, after a known prompt, answers a fixed token sequence then EOS
    (one-hot logits): greedy decoding's output is known exactly."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], tok: ByteTokenizer) -> None:
        self.answers, self.tok = answers, tok

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.tok.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                for prompt, answer in self.answers.items():
                    n = len(prompt)
                    if t + 1 >= n and tuple(row[:n]) == prompt:
                        out = [*answer, self.tok.eos]
                        logits[b, t, out[min(t + 1 - n, len(out) - 1)]] = 1.0
        return logits


def test_one_pass_exact_match_is_greedy_decoding() -> None:
    tok = ByteTokenizer()
    items = examples(DOWNSTREAM[0], 8, seed=0) + examples(DOWNSTREAM[1], 4, seed=0)
    # What the model answers: right, one letter wrong, one letter short, one letter long.
    answers = {}
    for i, (p, a) in enumerate(items):
        prompt = tuple(format_conversation([Message("user", p)], tok)[0])
        answers[prompt] = tok.encode(" " + [a, a[:-1] + "#", a[:-1], a + "x"][i % 4])
    model = _Memorizer(answers, tok)

    def greedy(prompt: list[int]) -> list[int]:
        ids = list(prompt)
        while len(ids) < len(prompt) + 12:
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == tok.eos:
                break
        return ids[len(prompt):]

    expected = sum(
        greedy(format_conversation([Message("user", p)], tok)[0])
        == [*tok.encode(" " + a), tok.eos]
        for p, a in items
    )
    assert expected == 3
    assert exact_match(model, tok, items) == expected / len(items)
    assert exact_match(model, tok, items, batch_size=5) == expected / len(items)
