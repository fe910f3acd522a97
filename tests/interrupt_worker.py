"""Runs ``esft-rs train`` in this process and sends itself SIGINT at a chosen moment.

``python interrupt_worker.py CALL ARGS...``: SIGINT arrives as the CALL-th forward call
of decoder layer 1 starts (1-based). With gradient checkpointing every second call is
the recomputation inside ``backward``, where an interrupt used to crash the process
(a pre-hook: torch stops a recomputation early, before post-hooks run).
ARGS are the ``esft-rs train`` arguments. Exits as the CLI does.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from esft_rs.cli import run
from esft_rs.training import api


def main() -> None:
    at = int(sys.argv[1])
    prepare = api._prepare
    calls = 0

    def hook(module: torch.nn.Module, args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == at:
            os.kill(os.getpid(), signal.SIGINT)

    def prepare_and_hook(model: torch.nn.Module, *args: object, **kw: object) -> None:
        prepare(model, *args, **kw)
        model.model.layers[1].register_forward_pre_hook(hook)

    api._prepare = prepare_and_hook
    sys.argv = ["esft-rs", "train", *sys.argv[2:]]
    run()


if __name__ == "__main__":
    main()
