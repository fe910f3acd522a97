"""Stopping a training run cleanly: on Ctrl-C between steps, and on a non-finite loss.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when
SIGINT arrives. During ``backward`` with gradient checkpointing that is inside
autograd's recomputation of activations (checkpoint hooks called from the C++
engine), and unwinding from there crashed the process in about 8 of 20 tries.
So while the loop runs, the first SIGINT only sets a flag; the loop stops at the
next step boundary, after that step's checkpoint (if any) is complete, and the
CLI exits with 130. A second Ctrl-C interrupts at once, as before.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from esft_rs.errors import EsftError


class StopRequest:
    """Catches Ctrl-C for the duration of a run (main thread only); call it between steps."""

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | None = None) -> None:
        self.requested = False
        self._reduce, self._device = reduce, device
        self._previous: Any = None
        # Only in place of Python's own handler: an ignored SIGINT (a background job,
        # nohup) stays ignored, and a host's handler (a notebook kernel) stays its own.
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.default_int_handler
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self._restore()  # a second Ctrl-C interrupts at once

    def __call__(self) -> bool:
        """Whether to stop now. With ``reduce`` (a sum over processes), all stop together:
        one that stopped alone would leave the others waiting in a collective forever."""
        if self._reduce is None:
            return self.requested
        flag = torch.tensor(float(self.requested), device=self._device)
        return bool(self._reduce(flag) > 0)

    def close(self) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def check_finite(step: int, loss: float, grad_norm: float) -> None:
    """Stops the run before a NaN or infinite loss or gradient reaches the weights."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise EsftError(
        f"step {step}: the training loss is {loss} and the gradient norm {grad_norm}; stopped"
        " before updating the weights, no adapter written (earlier checkpoints are intact);"
        " try a lower learning_rate, or check the data and the base weights"
    )
