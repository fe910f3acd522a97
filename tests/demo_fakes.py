"""A stand-in for the demo's ``FineTune`` whose runs write files and fail: imported by the
demo's spawned workers by module name (they inherit the test's sys.path)."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esft_rs.demo.runs import METHODS


@dataclass
class Settings:
    learning_rates: dict[str, list[float]] = field(
        default_factory=lambda: {name: [0.1] for name in METHODS})


@dataclass
class DiskFullFineTune:
    """FFT's run fails with a full disk once another run has started; every other run
    writes its files into ``runs`` a moment later, as a real run writes its checkpoint,
    then fails too. Each run names its worker process in ``pids`` (outside the demo's
    output)."""

    runs: Path
    pids: Path
    s: Settings = field(default_factory=Settings)

    def train(self, name: str, lr: float, seed: int) -> tuple[Any, float]:
        (self.pids / str(os.getpid())).touch()
        if name == "fft":
            deadline = time.monotonic() + 60
            while len(list(self.pids.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(0.5)
        run = self.runs / f"seed{seed}" / f"{name}-lr{lr:g}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "adapter.safetensors").write_bytes(b"late")
        raise OSError(errno.ENOSPC, "No space left on device")
