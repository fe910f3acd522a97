"""The API takes what users hold: transformers models and tokenizer directories, paths,
plain dicts; router hooks do not pile up; an ESFT run on a Qwen3-MoE with its chat
template learns exactly the assistant tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import esft_rs
from chat_fixtures import CHATML_GENERATION, tokenizer_dir
from esft_rs.data import IGNORE_INDEX, encode_conversation, read_task_data
from esft_rs.data.tokenizer import load_tokenizer
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models import as_moe_model, init_model, save_model

transformers = pytest.importorskip("transformers")
from hf_tiny import build  # noqa: E402 (needs transformers)

WORDS = ("moe", "expert", "router", "gate", "token", "shard", "adapter", "merge", "split",
         "profile")


def router_hooks(model: torch.nn.Module) -> list[int]:
    from esft_rs.models import hf

    return [len(r._forward_hooks) for r in hf.routers(model).values()]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return [(ids, mask)]


def test_profile_takes_a_transformers_model_directly():
    model = build("qwen3_moe")
    direct = esft_rs.profile(model, batches())
    assert router_hooks(model) == [0, 0, 0]  # the call's own view is closed
    with as_moe_model(model) as view:
        viewed = esft_rs.profile(view, batches())
    assert direct.layers == viewed.layers
    assert (direct.counts == viewed.counts).all() and direct.counts.sum() > 0
    assert (direct.gate_sum == viewed.gate_sum).all()
    assert (direct.sample_gate_sum == viewed.sample_gate_sum).all()


def test_router_hooks_do_not_pile_up():
    model = build("mixtral")
    views = [as_moe_model(model) for _ in range(3)]
    assert all(v is views[0] for v in views)
    assert router_hooks(model) == [1, 1, 1]
    views[0].close()
    assert router_hooks(model) == [0, 0, 0]
    for _ in range(3):  # views dropped at once take their hooks with them
        esft_rs.profile(as_moe_model(model), batches())
    assert router_hooks(model) == [0, 0, 0]
    with as_moe_model(model) as view:
        assert router_hooks(model) == [1, 1, 1]
        esft_rs.profile(view, batches())
    assert router_hooks(model) == [0, 0, 0]


def test_wrong_types_say_what_is_expected(tmp_path):
    with pytest.raises(TypeError, match="expected an MoE model: the built-in model"):
        esft_rs.profile(torch.nn.Linear(2, 2), batches())
    model = init_model("tiny")
    save_model(model, tmp_path / "m")
    hf_tok = object()
    with pytest.raises(TypeError, match=r"esft-rs tokenizer \(esft_rs.data.load_tokenizer"):
        esft_rs.evaluate(model, hf_tok, tmp_path / "x.jsonl")
    with pytest.raises(TypeError, match="evaluate expects task data"):
        esft_rs.evaluate(model, tmp_path / "m", 3)
    cfg = ExpertConfig({1: [0]})
    with pytest.raises(TypeError, match="save_adapter expects a dict of tensors"):
        esft_rs.save_adapter(model, tmp_path / "a.safetensors", cfg)
    with pytest.raises(TypeError, match=r"'w' is list"):
        esft_rs.save_adapter({"w": [1.0]}, tmp_path / "a.safetensors", cfg)
    with pytest.raises(TypeError, match="expert_config must be an ExpertConfig"):
        esft_rs.save_adapter({"w": torch.zeros(2)}, tmp_path / "a.safetensors", 7)
    assert not (tmp_path / "a.safetensors").exists()


def test_evaluate_takes_a_directory_and_a_path(tmp_path):
    model = init_model("tiny")
    save_model(model, tmp_path / "m")
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Reverse words."}, {"role": "user", "content": w},
        {"role": "assistant", "content": w[::-1]}]}) + "\n" for w in WORDS))
    by_path = esft_rs.evaluate(model, tmp_path / "m", data)
    by_data = esft_rs.evaluate(model, load_tokenizer(tmp_path / "m"), read_task_data(data))
    assert by_path == by_data and by_path.answered == len(WORDS)


def test_save_adapter_takes_plain_dicts(tmp_path):
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    path = esft_rs.save_adapter({name: torch.ones(2, 2)}, tmp_path / "a.safetensors",
                                {"experts": {"1": [0]}, "shared_experts": False,
                                 "non_expert_modules": False})
    info = esft_rs.read_adapter(path)
    assert info.expert_config == ExpertConfig({1: [0]})


@pytest.fixture(scope="module")
def qwen3_chat(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE whose tokenizer carries a ChatML template with generation blocks."""
    root = tmp_path_factory.mktemp("qwen3chat")
    base = tokenizer_dir(root / "base", CHATML_GENERATION, bos=None)
    vocab = load_tokenizer(base).vocab_size
    build("qwen3_moe", vocab_size=vocab, bos_token_id=None, eos_token_id=2, pad_token_id=0,
          max_position_embeddings=512).save_pretrained(base)
    rows = [{"messages": [{"role": "system", "content": "Reverse the word."},
                          {"role": "user", "content": w},
                          {"role": "assistant", "content": w[::-1]}]} for w in WORDS]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_esft_on_qwen3_learns_exactly_the_assistant_tokens(qwen3_chat, tmp_path, monkeypatch):
    from esft_rs.training import loop

    seen = {}
    real_loop = loop.Loop

    def spy(net, trainables, tensors, *args, **kwargs):
        seen.update(tensors)
        return real_loop(net, trainables, tensors, *args, **kwargs)

    monkeypatch.setattr(loop, "Loop", spy)
    base = qwen3_chat / "base"
    result = esft_rs.train(base, qwen3_chat / "task.jsonl", tmp_path / "run",
                           ExpertConfig({0: [1, 5], 2: [0, 6]}), steps=2, seq_length=512,
                           per_device_batch_size=1, gradient_accumulation_steps=1,
                           random_concat_ratio=0.0, val_ratio=0.0, eval_steps=100,
                           save_steps=100, gradient_checkpointing=False, device="cpu",
                           progress=False)
    assert result.adapter.is_file()
    tok = load_tokenizer(base)
    ids, labels = seen["input_ids"][0], seen["labels"][0]
    real = seen["attention_mask"][0].bool()
    # the row holds the conversations in order, rendered with the model's template
    expected = [encode_conversation(tok, json.loads(line)["messages"])
                for line in (qwen3_chat / "task.jsonl").read_text().splitlines()]
    assert ids[real].tolist() == [t for e, _ in expected for t in e]
    learned = [int(t) for t in labels[labels != IGNORE_INDEX]]
    text = tok._tok.decode(learned, skip_special_tokens=False)
    assert text == "".join(f"{w[::-1]}<|im_end|>" for w in WORDS)
    assert (labels[~real] == IGNORE_INDEX).all()
    # ... and transformers agrees on which tokens those are
    theirs = transformers.AutoTokenizer.from_pretrained(base).apply_chat_template(
        json.loads((qwen3_chat / "task.jsonl").read_text().splitlines()[0])["messages"],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    n = len(theirs["input_ids"])
    assert labels[:n].tolist() == [t if m else IGNORE_INDEX for t, m in
                                   zip(theirs["input_ids"], theirs["assistant_masks"],
                                       strict=True)]


def test_profile_and_eval_cli_use_the_template(qwen3_chat, tmp_path):
    from conftest import run_cli

    base = qwen3_chat / "base"
    data = qwen3_chat / "task.jsonl"
    run_cli("profile", base, data, "-o", tmp_path / "r.safetensors", "--seq-length", "128",
            "--device", "cpu", check=True)
    stats = esft_rs.RoutingStats.load(tmp_path / "r.safetensors")
    packed = read_task_data(data).pack(load_tokenizer(base), seq_length=128)  # the same seed
    assert int(stats.tokens[0]) == int(packed.attention_mask.sum())
    proc = run_cli("profile", base, data, "-o", tmp_path / "o.safetensors", "--chat-template",
                   "official")
    assert proc.returncode == 2 and "no BOS token" in proc.stderr
    proc = run_cli("eval", base, data, "--device", "cpu", check=True)
    assert "exact match" in proc.stdout
    proc = run_cli("eval", base, data, "--chat-template", "nope.jinja")
    assert proc.returncode == 2 and "nope.jinja" in proc.stderr
