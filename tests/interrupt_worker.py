"""Trains the tiny reference model and sends itself SIGINT at chosen moments, in a process
of its own (a test forks it: ``cli_runner``, ``forked_ranks``).

SIGINT arrives as the CALL-th forward call of decoder layer 1 starts (1-based). With
gradient checkpointing every second call is the recomputation inside ``backward``,
where an interrupt used to crash the process (a pre-hook: torch stops a recomputation
early, before post-hooks run).

- ``interrupt_at(CALL)``, a ``preexec`` of ``cli_runner.run``: ``esft-rs train`` is then
  interrupted at call CALL, and exits as the CLI does.
- Either way SIGINT first gets Python's own handler, as in a terminal's foreground job:
  a test run started in the background (``make test &`` from a script) ignores SIGINT,
  which the trainer then leaves ignored, and the interrupts would do nothing.
- ``interrupt_each_call(rank, N, BASE, DATA, EXPERTS, ROOT)`` runs ``esft_rs.train`` N times,
  interrupted at calls 1..N, in ROOT/run-CALL; writes the last checkpoint of each to
  ROOT/interrupts.txt. A crash ends the process, so every interrupt is tried in this one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

import esft_rs
from esft_rs.training import api, checkpoint

_prepare = api._prepare
_at = 0


def _prepare_and_hook(model: torch.nn.Module, *args: object, **kw: object) -> None:
    _prepare(model, *args, **kw)
    calls = 0

    def hook(module: torch.nn.Module, inputs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == _at:
            os.kill(os.getpid(), signal.SIGINT)

    model.model.layers[1].register_forward_pre_hook(hook)


def interrupt_at(call: int) -> None:
    """From now on, training in this process is interrupted at forward call ``call``."""
    global _at
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _at = call
    api._prepare = _prepare_and_hook


def interrupt_each_call(rank: int, n: int, base: Path, data: Path, experts: Path,
                        root: Path) -> None:
    lines = []
    for call in range(1, n + 1):
        interrupt_at(call)
        out = root / f"run-{call}"
        try:
            esft_rs.train(base, data, out, experts, steps=n, seq_length=64,
                          per_device_batch_size=2, gradient_accumulation_steps=1, save_steps=1,
                          gradient_checkpointing=True, device="cpu", progress=False)
        except KeyboardInterrupt:
            last = checkpoint.latest(out)
            lines.append(f"{call} {last.name if last is not None else None}\n")
        else:
            lines.append(f"{call} finished\n")
    (root / "interrupts.txt").write_text("".join(lines))
