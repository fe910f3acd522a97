"""``esft-rs demo --quick``: a complete, self-consistent report (figures are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import esft_rs
from conftest import run_cli
from esft_rs.naming import classify


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


def test_base_and_merged_carry_the_word_tokenizer(report: tuple[dict, Path]) -> None:
    from esft_rs.data import Message, format_conversation
    from esft_rs.demo.vocabulary import VOCAB
    from esft_rs.tokenizer import load_tokenizer

    r, _ = report
    conv = [Message("user", "shift 1 2 3 4"), Message("assistant", "4 5 6 7")]
    for model_dir in (r["base"]["path"], r["merge"]["path"]):
        tok = load_tokenizer(model_dir)
        ids, _ = format_conversation(conv, tok)
        words = ["<bos>", "User:", "shift", "1", "2", "3", "4", "Assistant:", "4", "5", "6", "7",
                 "<eos>"]
        assert ids == [VOCAB.index(w) for w in words]
        assert tok.decode(ids) == "User: shift 1 2 3 4 Assistant: 4 5 6 7"


def test_base_key_covers_the_tokenizer() -> None:
    from esft_rs.demo.settings import FULL

    assert FULL.base_key("data", "tokenizer-a") != FULL.base_key("data", "tokenizer-b")


def test_demo_help() -> None:
    assert "--quick" in run_cli("demo", "--help", check=True).stdout
