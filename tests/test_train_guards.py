"""Training stops cleanly: on a NaN loss (no NaN adapter or checkpoint), and on Ctrl-C
(exit 130, one line, the last checkpoint intact), even inside checkpoint recomputation."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import cli_runner
import esft_rs
import forked_ranks
import interrupt_worker
from conftest import run_cli
from esft_rs.errors import EsftError
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.models import init_model, save_model
from esft_rs.training import checkpoint
from train_fakes import FakeMoE, checkpoint_weights, fake_data, plus_chat

EXPERTS = ExpertConfig({1: [0, 2], 2: [1]})


def test_nan_loss_stops_before_the_update(tmp_path: Path) -> None:
    model, out = FakeMoE(), tmp_path / "out"

    def poison(done: int, record: dict) -> None:
        if done == 2:  # from step 3 on, every forward pass gives NaN
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(math.nan)

    with pytest.raises(EsftError, match=r"^step 3: the training loss is nan") as e:
        esft_rs.train(model, fake_data(), out, EXPERTS, progress=False, on_step=poison,
                      steps=5, per_device_batch_size=2, gradient_accumulation_steps=2,
                      save_steps=1, eval_steps=100, learning_rate=1e-2,
                      gradient_checkpointing=False)
    assert "\n" not in str(e.value)
    assert not (out / "adapter.safetensors").exists()
    last = checkpoint.latest(out)
    assert last is not None and last.name == "step-2"
    weights = checkpoint_weights(last)
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert all(bool(torch.isfinite(p).all()) for n, p in model.named_parameters()
               if "experts" in n)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    save_model(init_model("tiny", seed=0), root / "base")
    (root / "task.jsonl").write_text(plus_chat(10, 6))
    (root / "experts.json").write_text(json.dumps(
        {"experts": {"1": [0, 5], "2": [3]}, "shared_experts": False,
         "non_expert_modules": False}))
    return {"base": root / "base", "data": root / "task.jsonl", "experts": root / "experts.json"}


# Layer 1's forward calls with checkpointing: odd = forward, even = recomputation in
# backward, two per step; an interrupt at call c stops after step (c + 1) // 2.
def test_ctrl_c_stops_between_steps(files: dict[str, Path], tmp_path: Path) -> None:
    """20 interrupts, one in each phase of steps 1-10 of 20, in one process (a crash ends it)."""
    forked_ranks.spawn(interrupt_worker.interrupt_each_call,
                       args=(20, files["base"], files["data"], files["experts"], tmp_path))
    got = [line.split() for line in (tmp_path / "interrupts.txt").read_text().splitlines()]
    assert got == [[str(c), f"step-{(c + 1) // 2}"] for c in range(1, 21)], got
    for c in range(1, 21):
        out = tmp_path / f"run-{c}"
        last = checkpoint.latest(out)
        assert last is not None and not (out / "adapter.safetensors").exists()
        assert [p.name for p in (out / "checkpoints").iterdir()] == [last.name]  # intact, alone
        assert checkpoint_weights(last)
        assert json.loads((last / "state.json").read_text())["step"] == (c + 1) // 2


@pytest.mark.parametrize("call", [3, 4])  # in step 2's forward pass, and in its backward
def test_ctrl_c_in_the_cli(files: dict[str, Path], tmp_path: Path, call: int) -> None:
    """Exit code 130, one line on stderr, the last checkpoint intact."""
    out = tmp_path / "out"
    args = [files["base"], files["data"], "-e", files["experts"], "-o", out, "--steps", "5",
            "--seq-length", "64", "--per-device-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--save-steps", "1", "--device", "cpu",
            "--gradient-checkpointing"]
    proc = run_cli("train", *args, timeout=300, preexec=functools.partial(_ignored_then, call))
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    lines = [x for x in proc.stderr.replace("\r", "\n").splitlines()
             if x.strip() and not x.startswith("train:")]  # the progress bar aside
    assert lines == ["Aborted!"], proc.stderr[-2000:]  # click's one line for Ctrl-C
    assert not (out / "adapter.safetensors").exists()
    assert checkpoint.latest(out) == out / "checkpoints" / "step-2"


def _ignored_then(call: int) -> None:
    """As under a test run started in the background, whose SIGINT is ignored: the
    interrupts still arrive (``interrupt_worker``); they did nothing, and these tests failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    interrupt_worker.interrupt_at(call)


@pytest.mark.parametrize("start", [signal.default_int_handler, signal.SIG_IGN])
def test_stop_request_restores_the_handler(start: object) -> None:
    """Python's handler is replaced while training and restored; an ignored SIGINT (a
    background job, nohup) stays ignored. Either, whatever SIGINT pytest started with."""
    from esft_rs.training.guards import StopRequest

    outside = signal.signal(signal.SIGINT, start)
    try:
        stop = StopRequest()
        if start is signal.SIG_IGN:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        # a second Ctrl-C: at once
        assert stop() is (start is not signal.SIG_IGN) and signal.getsignal(signal.SIGINT) is start
        stop.close()
        assert signal.getsignal(signal.SIGINT) is start
    finally:
        signal.signal(signal.SIGINT, outside)


def test_checkpoint_over_a_file_size_limit_is_one_line(files: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """`ulimit -f` (or a full disk) while a checkpoint is written: one line naming the
    checkpoint, exit 2, no traceback, and no partial checkpoint."""
    out = tmp_path / "run"
    proc = run_cli(
        "train", files["base"], files["data"], "-e", files["experts"], "-o", out, "--steps", "2",
        "--save-steps", "1", "--seq-length", "64", "--per-device-batch-size", "2",
        "--gradient-accumulation-steps", "1", "--device", "cpu", "--no-gradient-checkpointing",
        preexec=functools.partial(cli_runner.file_size_limit, 40_000))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("esft-rs:")]
    assert len(lines) == 1 and lines[0].startswith("esft-rs: error: "), proc.stderr[-2000:]
    assert "checkpoints/step-1: could not be written" in lines[0], lines[0]
    assert not out.exists() or not any((out / "checkpoints").glob("*"))


def test_a_failed_distributed_checkpoint_write_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP wraps a failed write (ENOSPC) in a CheckpointException, a BaseException that
    went past the staging's error handling as a traceback; it is the I/O error again."""
    import errno

    import torch.distributed.checkpoint as dcp

    def full_disk(*args: object, **kwargs: object) -> None:
        raise dcp.api.CheckpointException(
            "save", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    out = tmp_path / "out"
    with pytest.raises(esft_rs.EsftIOError, match=r"step-1: No space left on device") as e:
        esft_rs.train(FakeMoE(), fake_data(), out, EXPERTS, progress=False, steps=2,
                      per_device_batch_size=2, gradient_accumulation_steps=2, save_steps=1,
                      gradient_checkpointing=False)
    assert "\n" not in str(e.value)
    assert not out.exists()
