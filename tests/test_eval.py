"""``esft-rs eval`` / ``esft_rs.evaluation``: loss and greedy exact match against references
computed another way (one conversation at a time; a literal greedy decoder)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import forked_ranks
from conftest import free_port, run_cli, run_torchrun
from esft_rs.data import Message, TaskData, causal_lm_loss, format_conversation, loss_tokens
from esft_rs.data.tokenizer import ByteTokenizer
from esft_rs.demo.tasks import DOWNSTREAM, examples
from esft_rs.evaluation import evaluate, exact_match
from esft_rs.models import load_model
from hf_tiny import save

PROMPTS = ["Reverse moe", "Sort 3 1 2", "Upper case", "Add 2 and 2", "Hi", "Name an expert"]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save("mixtral", tmp_path_factory.mktemp("eval") / "mixtral", seed=3)


def task(answers: list[str]) -> TaskData:
    convs = [[Message("user", p), Message("assistant", a)] for p, a in zip(PROMPTS, answers,
                                                                           strict=True)]
    return TaskData(convs, [f"x:{i}" for i in range(len(convs))], [])


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


def write_chat(path: Path, prompts: list[str], answers: list[str]) -> Path:
    """One user/assistant conversation per line, as chat JSONL."""
    path.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": p},
                                 {"role": "assistant", "content": a}]}) + "\n"
        for p, a in zip(prompts, answers, strict=True)))
    return path


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
        while len(ids) < len(prompt) + 16:  # the longest answer: 12 bytes and EOS
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


def test_loss_equals_one_conversation_at_a_time(mixtral: Path) -> None:
    model = load_model(mixtral).eval()
    data = task(["eom", "1 2 3", "UPPER CASE", "4", "Hello there", "router"])
    result = evaluate(model, ByteTokenizer(), data, batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for conv in data.conversations:
            ids, labels = (torch.tensor([x]) for x in format_conversation(conv, ByteTokenizer()))
            total += float(causal_lm_loss(model(ids).logits, labels, reduction="sum"))
            count += loss_tokens(labels)
    assert result.label_tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.answered == len(PROMPTS)


def test_cli_prints_and_writes_figures(mixtral: Path, tmp_path: Path) -> None:
    data = write_chat(tmp_path / "task.jsonl", PROMPTS, ["x"] * len(PROMPTS))
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


def answering_model(src: Path, dst: Path) -> Path:
    """A copy of model ``src`` whose head predicts, from the last token's embedding (which
    the residual stream carries), " " after ":", "a" after " " and EOS after "a": greedy
    decoding answers "Assistant: a" then EOS, right for some references, wrong for others."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    head = torch.zeros_like(weights["lm_head.weight"])
    for before, after in ((":", " "), (" ", "a"), ("a", ByteTokenizer().eos)):
        head[after if isinstance(after, int) else ord(after)] = embed[ord(before)] * 100
    weights["lm_head.weight"] = head
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.multiprocess
@pytest.mark.parametrize(("family", "parallelism"), [("builtin", "fsdp"), ("mixtral", "fsdp"),
                                                    ("builtin", "ddp"), ("builtin", "ep"),
                                                    ("mixtral", "ep")])
def test_torchrun_gives_the_figures_of_one_process(mixtral: Path, tmp_path: Path, family: str,
                                                   parallelism: str) -> None:
    """2 CPU ranks (gloo) share the batches; under FSDP every rank runs every forward (7
    conversations in batches of 2: rank 1 runs a spare fourth). Rank 0 writes the figures
    of one process: counts exactly, the loss up to the order of float additions."""
    from esft_rs.models import init_model, save_model

    src = mixtral if family == "mixtral" else save_model(init_model("tiny", seed=1),
                                                          tmp_path / "base")
    model = answering_model(src, tmp_path / "model")
    data = write_chat(tmp_path / "task.jsonl", [*PROMPTS, "One more"],
                      ["a", "aa", "a", "b", "aaa", "a", "a"])
    args = ["eval", model, data, "--device", "cpu", "--batch-size", "2"]
    run_cli(*args, "-o", tmp_path / "one.json", check=True)
    proc = run_torchrun(*args, "-o", tmp_path / "two.json", "--parallelism", parallelism,
                        nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("loss ") == 1  # rank 0 alone prints
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["correct"], one["answered"]) == (4, 7)  # the answers "a"
    # The perplexity is exp(loss): its relative error is the loss's absolute error (loss 14
    # here, so 2.2e-6 of the perplexity for 1.6e-7 of the loss on one AVX-512 machine).
    assert two == {**one, "loss": pytest.approx(one["loss"], rel=1e-6),
                   "perplexity": pytest.approx(math.exp(two["loss"]), rel=1e-12)}


def _evaluate_sharded(rank: int, world: int, port: int, model: str, data: str,
                      out: str) -> None:
    """One torchrun-like rank: the model sharded by FSDP2, ``esft_rs.evaluate`` on it."""
    import os
    from dataclasses import asdict

    import esft_rs
    from esft_rs.distributed import exit_process, process_group
    from esft_rs.training.sharded_load import load_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    device = torch.device("cpu")
    with process_group(device) as place:
        net = load_sharded(model, place, device)
        result = esft_rs.evaluate(net, model, data, batch_size=3)
    Path(out, f"rank{rank}.json").write_text(json.dumps(asdict(result)))
    exit_process(0)  # past the interpreter's teardown, where gloo may abort a rank


@pytest.mark.multiprocess
def test_evaluate_on_a_sharded_model_in_a_torchrun_job(tmp_path: Path) -> None:
    """``esft_rs.evaluate`` called by every rank of a job (Qwen3-MoE sharded over 2 gloo
    ranks, 7 conversations in batches of 3): each rank returns one process's figures."""
    model = answering_model(save("qwen3_moe", tmp_path / "base", seed=2), tmp_path / "model")
    data = write_chat(tmp_path / "task.jsonl", [*PROMPTS, "One more"],
                      ["a", "b", "a", "aa", "a", "a", "ab"])
    one = evaluate(load_model(model).eval(), model, data, batch_size=3)
    assert (one.correct, one.answered) == (4, 7)
    port = free_port()
    forked_ranks.spawn(_evaluate_sharded,
                                args=(2, port, str(model), str(data), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"conversations": 7, "label_tokens": one.label_tokens,
                       "loss": pytest.approx(one.loss, rel=1e-6), "answered": 7, "correct": 4}


def test_cli_says_which_conversations_exact_match_leaves_out(tmp_path: Path) -> None:
    """One of 4 conversations ends in a user turn (and a bad line is skipped): the line says
    it is in the loss but not among the 3 exact match scores."""
    from esft_rs.models import init_model, save_model

    save_model(init_model("tiny"), tmp_path / "m")
    turns = [[("user", "hi"), ("assistant", "yo")], [("user", "a"), ("assistant", "b")],
             [("user", "c"), ("assistant", "d")],
             [("user", "c"), ("assistant", "d"), ("user", "more?")]]
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n"
        for conv in turns) + "not json\n")
    proc = run_cli("eval", tmp_path / "m", tmp_path / "d.jsonl", "--skip-bad", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "of 4 conversations; exact match" in proc.stdout and "/3);" in proc.stdout
    assert ("1 conversation not ending in an assistant reply to a user: in the loss, not in"
            " exact match") in proc.stdout
