"""``esft-rs profile`` end to end on the tiny built-in model, and on to ``esft-rs select``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import esft_rs
from conftest import run_torchrun
from esft_rs import RoutingStats, aggregate
from esft_rs.cli import run
from esft_rs.data import read_task_data
from esft_rs.data.tokenizer import ByteTokenizer
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models import init_model, load_model, save_model

SEQ, BATCH = 64, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(save_model(init_model("tiny", seed=3), tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("d") / "task.jsonl"
    lines = [
        json.dumps({"messages": [
            {"role": "user", "content": f"What is {i} times {i % 7}? " * (1 + i % 3)},
            {"role": "assistant", "content": f"It is {i * (i % 7)}."},
        ]})
        for i in range(25)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """The real entry point (``esft_rs.cli.run``) in this process: (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["esft-rs", *map(str, args)]
    try:
        run()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def packed_rows(data: Path, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    packed = read_task_data(data).pack(ByteTokenizer(), seq_length=seq)  # profile's seed
    return packed.input_ids, packed.attention_mask


def direct(model_dir: Path, ids: torch.Tensor, mask: torch.Tensor, batch: int) -> RoutingStats:
    """esft_rs.profile over the same packed rows, batched the same way."""
    batches = [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)]
    return esft_rs.profile(load_model(model_dir), batches)


def assert_same(got: RoutingStats, want: RoutingStats) -> None:
    assert got.layers == want.layers and got.num_samples == want.num_samples
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    for name in ("gate_sum", "sample_token_sum", "sample_gate_sum"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6)


def test_profile_matches_python_api_and_skips_padding(tmp_path, capsys, model_dir, data):
    out = tmp_path / "routing.safetensors"
    code, stdout, err = cli(capsys, "profile", model_dir, data, "-o", out,
                            "--seq-length", SEQ, "--batch-size", BATCH)
    assert code == 0, err
    stats = RoutingStats.load(out)
    ids, mask = packed_rows(data)
    real = int(mask.sum())
    assert real < mask.numel()  # the last row is padded ...
    assert stats.tokens.tolist() == [real] * 3  # ... and its padding is not counted
    assert stats.counts.sum(axis=1).tolist() == [real * 4] * 3  # top-4
    assert_same(stats, direct(model_dir, ids, mask, BATCH))
    assert stats.layers == [1, 2, 3] and stats.top_k == 4 and stats.num_samples == len(ids)
    assert stats.metadata == {
        "model": str(model_dir), "data": str(data), "tokens": str(real),
        "seq_len": str(SEQ), "seed": "5934875", "model_fingerprint": esft_rs.fingerprint(model_dir),
    }
    assert f"wrote {out}: {real} tokens (all the data holds" in stdout
    assert "profile" in err and "tok" in err  # the progress bar, in tokens


def test_token_budget_takes_rows_in_order(tmp_path, capsys, model_dir, data):
    out = tmp_path / "routing.safetensors"
    code, _, err = cli(capsys, "profile", model_dir, data, "-o", out, "--seq-length", SEQ,
                       "--tokens", 3 * SEQ + 1, "--batch-size", 2)
    assert code == 0, err
    ids, mask = packed_rows(data)
    stats = RoutingStats.load(out)
    assert stats.tokens[0] == 4 * SEQ and stats.num_samples == 4  # the 4th row reaches it
    assert_same(stats, direct(model_dir, ids[:4], mask[:4], 2))


def test_records_aggregate_back(tmp_path, capsys, model_dir, data):
    out, records = tmp_path / "routing.safetensors", tmp_path / "records"
    code, _, err = cli(capsys, "profile", model_dir, data, "-o", out, "--seq-length", SEQ,
                       "--records", records)
    assert code == 0, err
    stats = RoutingStats.load(out)
    ids = np.stack([np.load(records / f"layer_{layer}_ids.npy") for layer in stats.layers])
    w = np.stack([np.load(records / f"layer_{layer}_weights.npy") for layer in stats.layers])
    assert ids.shape == (3, stats.tokens[0], 4)  # real tokens only
    again = aggregate(ids, w, num_experts=16, layers=stats.layers)
    np.testing.assert_array_equal(again.counts, stats.counts)
    np.testing.assert_allclose(again.gate_sum, stats.gate_sum, rtol=1e-6)


def test_profile_then_select_names_moe_layers_only(tmp_path, capsys, model_dir, data):
    routing, cfg = tmp_path / "routing.safetensors", tmp_path / "expert_cfg.json"
    assert cli(capsys, "profile", model_dir, data, "-o", routing, "--seq-length", SEQ)[0] == 0
    code, stdout, err = cli(capsys, "select", routing, "-o", cfg)
    assert code == 0, err
    config = ExpertConfig.load(cfg)
    moe_layers = load_model(model_dir).config.moe_layers  # 1..3; layer 0 is dense
    assert sorted(config.experts) == moe_layers
    assert all(0 < len(e) < 16 and max(e) < 16 for e in config.experts.values())
    assert f"wrote {cfg}" in stdout


def one_line_error(code: int, err: str, out: Path) -> str:
    assert code == 2 and not out.exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_seq_length_beyond_the_context_is_cut_as_train_cuts_it(tmp_path, capsys, model_dir,
                                                                data):
    """--seq-length means what it means to train and plan: rows longer than the model's
    context (1024) are cut to it, with train's note (``preflight.fit_to_context``), not
    refused."""
    out = tmp_path / "r.safetensors"
    code, _, err = cli(capsys, "profile", model_dir, data, "-o", out, "--seq-length", 2048)
    assert code == 0, err
    assert ("esft-rs: note: rows are cut to the model's context of 1024 tokens"
            " (max_position_embeddings), not seq_length 2048 (--seq-length)") in err.splitlines()
    stats = RoutingStats.load(out)
    assert stats.metadata["seq_len"] == "1024"
    ids, mask = packed_rows(data, 1024)
    assert_same(stats, direct(model_dir, ids, mask, 4))


def test_python_api_writes_what_the_command_writes(tmp_path, capsys, model_dir, data):
    """``esft_rs.profile_task``: the command's library call, the same file from Python."""
    import importlib

    from esft_rs.routing.profiling import DEFAULT_TOKENS

    assert importlib.import_module("esft_rs.cli.profile_cmd").DEFAULT_TOKENS == DEFAULT_TOKENS
    cmd, api = tmp_path / "cmd.safetensors", tmp_path / "api.safetensors"
    assert cli(capsys, "profile", model_dir, data, "-o", cmd, "--seq-length", SEQ)[0] == 0
    result = esft_rs.profile_task(model_dir, data, api, seq_length=SEQ, progress=False)
    assert result.main and result.seq_length == SEQ and result.tokens == result.available
    assert api.read_bytes() == cmd.read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["--tokens", "0"], "Invalid value for '--tokens': 0 is not in the range x>=1"),
    (["--batch-size", "-1"], "Invalid value for '--batch-size'"),
    (["--device", "gpu9"], "'--device': 'gpu9' is not a torch device"),
    (["--frobnicate"], "No such option '--frobnicate'"),
])
def test_bad_options_are_one_line(tmp_path, capsys, model_dir, data, args, message):
    out = tmp_path / "r.safetensors"
    line = one_line_error(*cli(capsys, "profile", model_dir, data, "-o", out, *args)[::2], out)
    assert line.startswith("esft-rs: error: ") and message in line


def test_bad_inputs_are_one_line(tmp_path, capsys, model_dir, data):
    out = tmp_path / "r.safetensors"
    missing = tmp_path / "no-model"
    line = one_line_error(*cli(capsys, "profile", missing, data, "-o", out)[::2], out)
    assert f"Directory '{missing}' does not exist" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(*cli(capsys, "profile", tmp_path / "empty", data, "-o", out)[::2], out)
    assert line == f"esft-rs: error: {tmp_path / 'empty'}: no config.json (not a model directory)"

    # A bad line is reported before the model is even loaded: its weights are garbage here.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data.read_bytes() + b'{"messages": [{"role": "bot", "content": "x"}]}\n')
    line = one_line_error(*cli(capsys, "profile", broken, bad, "-o", out)[::2], out)
    assert line == f'esft-rs: error: {bad}:26: message 0 has unknown role "bot"'

    # --skip-bad leaves the line out, says so, and profiles the rest.
    code, _, err = cli(capsys, "profile", model_dir, bad, "-o", out, "--seq-length", SEQ,
                       "--skip-bad")
    assert code == 0 and f"warning: skipped {bad}:26: message 0 has unknown role" in err
    assert RoutingStats.load(out).tokens[0] == int(packed_rows(data)[1].sum())


@pytest.mark.multiprocess
@pytest.mark.parametrize(("parallelism", "world"), [("fsdp", 2), ("ddp", 2), ("fsdp", 3),
                                                    ("ep", 3)])
def test_torchrun_gives_the_counts_of_one_process(tmp_path, capsys, model_dir, data,
                                                  parallelism, world):
    """CPU ranks (gloo) share the rows; rank 0 writes the same file as 1 process. FSDP: one
    model sharded over the ranks, all running each forward (3 ranks: some run spare ones)."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    args = ["profile", model_dir, data, "--seq-length", SEQ, "--batch-size", 2]
    assert cli(capsys, *args, "-o", one)[0] == 0
    proc = run_torchrun(*args, "-o", two, "--parallelism", parallelism, nproc=world,
                        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{world} processes" in proc.stdout
    assert_same(RoutingStats.load(two), RoutingStats.load(one))
