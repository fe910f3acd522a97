"""Trains the tiny reference model and sends itself SIGINT at chosen moments.

SIGINT arrives as the CALL-th forward call of decoder layer 1 starts (1-based). With
gradient checkpointing every second call is the recomputation inside ``backward``,
where an interrupt used to crash the process (a pre-hook: torch stops a recomputation
early, before post-hooks run).

- ``python interrupt_worker.py cli CALL ARGS...`` runs ``esft-rs train ARGS`` and exits
  as the CLI does.
- ``python interrupt_worker.py api N BASE DATA EXPERTS ROOT`` runs ``esft_rs.train`` N
  times, interrupted at calls 1..N, in ROOT/run-CALL; prints the last checkpoint of each.
  A crash ends the process, so every interrupt is tried in this one process.
"""

from __future__ import annotations

import os
import signal
import sys
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


def main() -> None:
    global _at
    api._prepare = _prepare_and_hook
    mode, n, *rest = sys.argv[1:]
    if mode == "cli":
        from esft_rs.cli import run

        _at = int(n)
        sys.argv = ["esft-rs", "train", *rest]
        run()
        return
    base, data, experts, root = rest
    for call in range(1, int(n) + 1):
        _at = call
        out = Path(root, f"run-{call}")
        try:
            esft_rs.train(base, data, out, experts, steps=int(n), seq_length=64,
                          per_device_batch_size=2, gradient_accumulation_steps=1, save_steps=1,
                          gradient_checkpointing=True, device="cpu", progress=False)
        except KeyboardInterrupt:
            last = checkpoint.latest(out)
            print(call, last.name if last is not None else None, flush=True)
        else:
            print(call, "finished", flush=True)


if __name__ == "__main__":
    main()
