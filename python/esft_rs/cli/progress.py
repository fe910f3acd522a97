"""tqdm progress bars for the Rust jobs' ``progress(stage, done, total)`` callbacks."""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm

# Stages counted in items rather than bytes.
_UNITS = {"fingerprint": "tensor"}


class StageBars:
    """One bar per stage, replaced when the stage changes; shown only on a terminal."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._bar: tqdm | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            unit = _UNITS.get(stage, "B")
            self._bar = tqdm(
                total=total,
                desc=stage,
                unit=unit,
                unit_scale=unit == "B",
                unit_divisor=1024,
                disable=None,  # no bar when stderr is not a terminal
                leave=False,
            )
        if self._bar is not None:
            self._bar.update(done - self._bar.n)

    def warn(self, message: str) -> None:
        tqdm.write(f"esft-rs: warning: {message}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
