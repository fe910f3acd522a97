"""Bad input, one class at a time: in the CLI exit 2 and one line naming the file (no
traceback, no hang, inputs unchanged, nothing written); in the API an ``EsftError``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import cli_runner
import esft_rs
from esft_rs.data import read_task_data
from esft_rs.errors import InvalidFileError, MismatchError
from esft_rs.files.adapter import save_adapter
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models import init_model, save_model
from esft_rs.routing import RoutingStats, aggregate
from esft_rs.testing import MoEShape, expert_tensors, random_tensors, write_checkpoint
from esft_rs.training.config import load_config

CHAT = {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                     {"role": "assistant", "content": "2 plus 3 is 5."}]}
EXPERTS = {"experts": {"1": [0, 5], "2": [3]}, "shared_experts": False,
           "non_expert_modules": False}
QUICK = ["--steps", "2", "--seq-length", "32", "--per-device-batch-size", "2",
         "--gradient-accumulation-steps", "1", "--eval-steps", "2", "--save-steps", "1",
         "--logging-steps", "1", "--val-ratio", "0", "--device", "cpu"]


def chat_lines(n: int = 8, **assistant: object) -> str:
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(CHAT))
        row["messages"][1].update(assistant)
        row["messages"][0]["content"] += f" ({i})"
        rows.append(json.dumps(row))
    return "\n".join(rows) + "\n"


# Bad files by class: name -> bytes (written as regular files).
BAD_JSONL = {
    "surrogate.jsonl": b'{"messages": [{"role": "user", "content": "\\ud800"}]}\n',
    "nested.jsonl": b"[" * 100_000 + b"\n",
    "latin1.jsonl": '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"),
    "dupkey.jsonl": b'{"messages": [], "messages": [{"role": "user", "content": "x"}]}\n',
    "masked.jsonl": chat_lines(mask=1).encode(),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    save_model(init_model("tiny", seed=0), root / "base")
    (root / "task.jsonl").write_text(chat_lines(16))
    (root / "experts.json").write_text(json.dumps(EXPERTS))
    (root / "dup.json").write_text('{"experts": {"1": [0]}, "experts": {"2": [1]}}')
    (root / "dup_layer.json").write_text('{"experts": {"1": [0], "1": [1]}}')
    (root / "dup.yaml").write_text("steps: 2\nlearning_rate: 1e-3\nsteps: 3\n")
    (root / "deep.yaml").write_text("a: " + "[" * 200 + "]" * 200 + "\n")
    for name, data in BAD_JSONL.items():
        (root / name).write_bytes(data)
    os.mkfifo(root / "pipe")
    (root / "folder").mkdir()
    stats = aggregate(np.tile(np.array([0, 1], np.int64), (2, 10, 1)), num_experts=4, top_k=2)
    stats.save(root / "a.routing.safetensors")
    other = aggregate(np.tile(np.array([0, 1], np.int64), (2, 10, 1)), num_experts=8, top_k=2)
    other.save(root / "b.routing.safetensors")
    return {"root": root, "base": root / "base", "data": root / "task.jsonl",
            "experts": root / "experts.json"}


def digest(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` (never opening a pipe) -> its sha256."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath, n)
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(args: list[str | bytes | Path], names: str, root: Path,
            out: Path | None = None) -> str:
    """Runs the CLI: exit 2, one ``esft-rs: error:`` line naming ``names``, inputs unchanged."""
    before = digest(root)
    proc = cli_runner.run(list(map(os.fsencode, args)), timeout=120, text=False)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esft-rs: error: "), err
    assert names in lines[0], err
    assert digest(root) == before
    if out is not None:
        assert not out.exists()
    return lines[0]


# --- files that are not regular files: refused before anything opens them (no hang) ---

@pytest.mark.parametrize("where", ["pipe", "folder", "/dev/null"])
def test_special_files_are_refused(world: dict[str, Path], tmp_path: Path, where: str) -> None:
    root = world["root"]
    special = Path(where) if where.startswith("/") else root / where
    out = tmp_path / "out"
    kind = {"pipe": "is a named pipe", "folder": "is a directory", "/dev/null": "is a device"}
    for args in (
        ["train", world["base"], special, "-e", world["experts"], "-o", out, *QUICK],
        ["train", world["base"], world["data"], "-e", special, "-o", out, *QUICK],
        ["train", world["base"], world["data"], "-e", world["experts"], "-c", special, "-o", out],
        ["split", world["base"], "--experts", special, "-o", out],
        ["inspect", special] if where != "folder" else ["select", special, "-o", out],
    ):
        line = refused(args, str(special), root, out)
        if args[0] != "select":  # a folder of routing logs is a valid select input
            assert kind[where] in line


def test_api_special_files(world: dict[str, Path]) -> None:
    pipe = world["root"] / "pipe"
    for call in (lambda: read_task_data(pipe), lambda: ExpertConfig.load(pipe),
                 lambda: load_config(pipe), lambda: RoutingStats.load(pipe),
                 lambda: esft_rs.inspect(pipe)):
        with pytest.raises(InvalidFileError, match="is a named pipe, not a regular file"):
            call()


# --- malformed content ---

@pytest.mark.parametrize(("name", "message"), [
    ("surrogate.jsonl", "surrogate.jsonl:1: a string is not valid Unicode"),
    ("nested.jsonl", "nested.jsonl:1: nested more than"),
    ("latin1.jsonl", "latin1.jsonl:1: not valid UTF-8"),
    ("dupkey.jsonl", "dupkey.jsonl:1: duplicate key 'messages'"),
])
def test_bad_task_data(world: dict[str, Path], tmp_path: Path, name: str, message: str) -> None:
    data = world["root"] / name
    with pytest.raises(InvalidFileError) as e:
        read_task_data(data)
    assert message in str(e.value) and "\n" not in str(e.value)
    refused(["train", world["base"], data, "-e", world["experts"], "-o", tmp_path / "o", *QUICK],
            message, world["root"], tmp_path / "o")


@pytest.mark.parametrize("name", ["dup.json", "dup_layer.json"])
def test_duplicate_keys_in_expert_config(world: dict[str, Path], tmp_path: Path,
                                         name: str) -> None:
    path = world["root"] / name
    with pytest.raises(InvalidFileError, match="duplicate"):
        ExpertConfig.load(path)
    line = refused(["split", world["base"], "--experts", path, "-o", tmp_path / "a.safetensors"],
                   str(path), world["root"], tmp_path / "a.safetensors")
    assert "duplicate" in line


@pytest.mark.parametrize(("name", "message"), [
    ("dup.yaml", "dup.yaml: duplicate key 'steps'"),
    ("deep.yaml", "deep.yaml: nested more than"),
])
def test_bad_yaml(world: dict[str, Path], tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(InvalidFileError, match=message):
        load_config(world["root"] / name)
    refused(["train", world["base"], world["data"], "-e", world["experts"],
             "-c", world["root"] / name, "-o", tmp_path / "o"], message, world["root"])


def test_non_utf8_argument(world: dict[str, Path], tmp_path: Path) -> None:
    refused(["select", b"r\xff.safetensors", "-o", tmp_path / "x.json"], "not valid UTF-8",
            world["root"], tmp_path / "x.json")


# --- bad values ---

@pytest.mark.parametrize(("option", "value"), [
    ("--num-experts", "1000000000000"), ("--num-experts", "0"), ("--round", "100000"),
    ("--round", "-1"), ("--top-k", "0"), ("--top-k", "99999999999"), ("--top-p", "nan"),
    ("--top-p", "inf"), ("--top-p", "0"), ("--top-p", "1.5"),
])
def test_absurd_selection_values(world: dict[str, Path], tmp_path: Path, option: str,
                                 value: str) -> None:
    out = tmp_path / "x.json"
    refused(["select", world["root"] / "a.routing.safetensors", "-o", out, option, value],
            option, world["root"], out)


@pytest.mark.parametrize("command", ["init-model", "demo", "profile", "train"])
def test_absurd_seed(world: dict[str, Path], tmp_path: Path, command: str) -> None:
    inputs = {"init-model": [], "demo": [], "profile": [world["base"], world["data"]],
              "train": [world["base"], world["data"], "-e", world["experts"]]}[command]
    refused([command, *inputs, "-o", tmp_path / "o", "--seed", str(2**64)], "seed",
            world["root"], tmp_path / "o")


def test_absurd_sizes_in_api(world: dict[str, Path]) -> None:
    ids = np.zeros((4, 2), np.int64)
    with pytest.raises(ValueError, match="num_experts must be between 1 and"):
        aggregate(ids, num_experts=10**12)
    with pytest.raises(ValueError, match="decimals must be between 0 and"):
        esft_rs.select_experts(world["root"] / "a.routing.safetensors", decimals=10**6)


def test_plot_extension_is_checked_before_writing(world: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out, summary = tmp_path / "x.json", tmp_path / "s.json"
    line = refused(["select", world["root"] / "a.routing.safetensors", "-o", out,
                    "--summary", summary, "--plot", tmp_path / "heat.bogus"],
                   "heat.bogus", world["root"], out)
    assert "extension .bogus" in line and not summary.exists()


def test_routing_of_different_models(world: dict[str, Path], tmp_path: Path) -> None:
    a, b = world["root"] / "a.routing.safetensors", world["root"] / "b.routing.safetensors"
    refused(["routing-report", a, b], "experts per layer 8 differ", world["root"])
    refused(["select", a, b, "-o", tmp_path / "x.json"], "experts per layer 8 differ",
            world["root"], tmp_path / "x.json")
    # Same shape, different model fingerprints (the profile metadata records them).
    stats = RoutingStats.load(a)
    for i, fp in enumerate(("f" * 32, "0" * 32)):
        stats.metadata.update(model_fingerprint=fp, model=f"model{i}")
        stats.save(tmp_path / f"{i}.routing.safetensors")
    refused(["routing-report", tmp_path / "0.routing.safetensors",
             tmp_path / "1.routing.safetensors"], "profiled on a different model", tmp_path)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--learning-rate", "nan", "learning_rate must be a finite number"),
    ("--learning-rate", "inf", "learning_rate must be a finite number"),
    ("--learning-rate", "0", "learning_rate must be positive"),
    ("--learning-rate", "-1e-5", "learning_rate must not be negative"),
    ("--weight-decay", "nan", "weight_decay must be a finite number"),
    ("--seq-length", "1", "seq_length must be at least 2"),
    ("--seq-length", "10000000000", "seq_length must be at most"),
])
def test_bad_training_values(world: dict[str, Path], tmp_path: Path, option: str, value: str,
                             message: str) -> None:
    refused(["train", world["base"], world["data"], "-e", world["experts"], "-o", tmp_path / "o",
             option, value], message, world["root"], tmp_path / "o")


def test_data_without_answer_tokens(world: dict[str, Path], tmp_path: Path) -> None:
    masked = world["root"] / "masked.jsonl"
    refused(["train", world["base"], masked, "-e", world["experts"], "-o", tmp_path / "o",
             *QUICK], "masked.jsonl: no answer tokens left", world["root"], tmp_path / "o")
    refused(["eval", world["base"], masked, "--device", "cpu"],
            "masked.jsonl: no answer tokens left to score", world["root"])


def test_token_ids_beyond_the_vocabulary(world: dict[str, Path], tmp_path: Path) -> None:
    import torch

    vocab = init_model("tiny").config.vocab_size
    ids = torch.full((4, 16), vocab + 3)
    data = {"input_ids": ids, "labels": ids.clone()}
    with pytest.raises(MismatchError, match=f"token id {vocab + 3} is beyond the model's"):
        esft_rs.train(world["base"], data, tmp_path / "o", world["experts"], steps=1,
                      per_device_batch_size=1, gradient_accumulation_steps=1, device="cpu",
                      progress=False)
    assert not (tmp_path / "o").exists()


# --- adapters against their own metadata ---

SHAPE = MoEShape(layers=3, experts=4, shared_experts=1, hidden=8, intermediate=4, vocab=16)


@pytest.mark.parametrize(("extra", "why"), [
    ({2: [1]}, "expert 1 of layer 2 is not in its expert config"),
    ("model.layers.1.self_attn.q_proj.weight", "not an expert tensor"),
    ("model.layers.1.mlp.shared_experts.up_proj.weight", "a shared expert"),
])
def test_adapter_outside_its_expert_config(tmp_path: Path, extra: object, why: str) -> None:
    tensors = random_tensors(SHAPE, seed=3)
    base = write_checkpoint(tmp_path / "base", tensors)
    chosen = expert_tensors(tensors, {1: [0]})
    if isinstance(extra, dict):
        chosen |= expert_tensors(tensors, extra)
    else:
        chosen[extra] = tensors[extra]
    adapter = save_adapter(chosen, tmp_path / "a.safetensors", ExpertConfig({1: [0]}), base=base)
    with pytest.raises(InvalidFileError, match=why):
        esft_rs.merge(base, adapter, tmp_path / "m")
    line = refused(["merge", base, adapter, "-o", tmp_path / "m"], str(adapter), tmp_path,
                   tmp_path / "m")
    assert why in line and "--force" in line
    warned: list[str] = []
    report = esft_rs.merge(base, adapter, tmp_path / "m", force=True, on_warning=warned.append)
    assert report.replaced and any(why in w for w in warned)


# --- a finished run ---

def test_resume_of_a_finished_run_changes_nothing(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    esft_rs.train(world["base"], world["data"], out, world["experts"], steps=2,
                  seq_length=32, per_device_batch_size=2, gradient_accumulation_steps=1,
                  save_steps=1, val_ratio=0, device="cpu", progress=False)
    before = digest(out)
    line = refused(["train", world["base"], world["data"], "-e", world["experts"], "-o", out,
                    "--resume", *QUICK], str(out), out)
    assert "already finished" in line
    assert digest(out) == before


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "other.safetensors.index.json",
                                  "b.safetensors"])
def test_special_files_in_a_checkpoint_are_refused(world: dict[str, Path], tmp_path: Path,
                                                   name: str) -> None:
    # was: a pipe named as an index or a shard was skipped, and the rest loaded as the model
    model = tmp_path / "m"
    shutil.copytree(world["base"], model)
    if name == "b.safetensors":  # shards found by listing the folder (no index)
        (model / "model.safetensors").rename(model / "a.safetensors")
    os.mkfifo(model / name)
    with pytest.raises(InvalidFileError, match="is a named pipe, not a regular file") as info:
        esft_rs.inspect(model)
    assert info.value.path == str(model / name)
    refused(["split", model, "--experts", world["experts"], "-o", tmp_path / "a.safetensors"],
            f"{model / name}: is a named pipe", tmp_path, tmp_path / "a.safetensors")
