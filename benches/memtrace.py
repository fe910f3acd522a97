"""Where a training process's memory goes, phase by phase: anonymous and file-backed.

``Trace`` samples ``RssAnon`` and ``RssFile`` of ``/proc/self/status`` in a thread
(every ``interval`` seconds) and keeps, for each named phase, their peaks and their
values when it ends. The peak of the whole resident set in a phase is exact, not
sampled: the kernel's high-water mark (``VmHWM``), reset at every phase change
(``/proc/self/clear_refs`` ``5``). ``trace_training`` names the phases of
``esft_rs.train``: model built (meta under FSDP, loaded whole otherwise), sharded,
filled from the checkpoint, then forward, backward and optimizer step of each step.
Linux only.
"""

from __future__ import annotations

import threading
from typing import Any

FIELDS = ("RssAnon", "RssFile", "VmHWM", "VmRSS")


def status() -> dict[str, int]:
    """This process's ``FIELDS`` from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Trace:
    """Per-phase peaks (``anon``, ``file``: sampled; ``rss``: exact) and end values."""

    def __init__(self, interval: float = 0.002) -> None:
        self.phases: dict[str, dict[str, int]] = {}
        self.order: list[str] = []
        self._name = "start"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        reset_peak()
        self._open(self._name, status())
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _open(self, name: str, now: dict[str, int]) -> None:
        if name not in self.phases:
            self.order.append(name)
            self.phases[name] = {"anon": 0, "file": 0, "rss": 0}
        self._name = name
        self._note(now)

    def _note(self, now: dict[str, int]) -> None:
        p = self.phases[self._name]
        p["anon"] = max(p["anon"], now["RssAnon"])
        p["file"] = max(p["file"], now["RssFile"])

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            now = status()
            with self._lock:
                self._note(now)

    def phase(self, name: str) -> None:
        """End the current phase (exact peak, end values) and start ``name``."""
        with self._lock:
            now = status()
            self._note(now)
            p = self.phases[self._name]
            p["rss"] = max(p["rss"], now["VmHWM"])
            p["anon_end"], p["file_end"] = now["RssAnon"], now["RssFile"]
            reset_peak()
            self._open(name, status())

    def close(self) -> dict[str, Any]:
        self.phase("end")
        self._stop.set()
        self._thread.join()
        return {"order": self.order, "phases": self.phases}


def trace_training(trace: Trace) -> None:
    """Name ``esft_rs.train``'s phases in ``trace`` (patches the functions it calls)."""
    import torch

    from esft_rs.training import api, loop, sharded_load, sharding

    def named(owner: Any, attr: str, name: str, after: str) -> None:
        fn = getattr(owner, attr)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            trace.phase(name)
            out = fn(*args, **kwargs)
            trace.phase(after)
            return out

        setattr(owner, attr, wrapped)

    named(sharded_load, "meta_model", "build on meta", "setup")
    named(api, "_load_model", "load whole", "setup")
    named(sharding, "shard", "fully_shard", "setup")
    named(sharded_load, "fill", "fill shards", "setup")
    base = loop.Loop

    class Traced(base):  # type: ignore[misc, valid-type]
        def __init__(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            super().__init__(model, *args, **kwargs)
            model.register_forward_pre_hook(lambda *_: trace.phase(
                "forward" if torch.is_grad_enabled() else "eval"))
            model.register_forward_hook(lambda *_: trace.phase(
                "backward" if torch.is_grad_enabled() else "other"))
            self.optimizer.register_step_pre_hook(lambda *_: trace.phase("optimizer step"))
            self.optimizer.register_step_post_hook(lambda *_: trace.phase("other"))

        def fit(self, **kwargs: Any) -> Any:
            trace.phase("other")
            return super().fit(**kwargs)

    loop.Loop = Traced


def table(traces: list[dict[str, Any]]) -> str:
    """Per-phase rows (MiB): for each rank, peak anon / peak file / exact peak RSS."""
    mib = 2**20
    names = [n for n in traces[0]["order"] if n != "end"]
    head = "phase".ljust(15) + "".join(
        f"{f'rank {r}: anon / file / rss peak':>34}" for r in range(len(traces)))
    rows = [head]
    for n in names:
        cells = []
        for t in traces:
            p = t["phases"].get(n)
            cells.append(f"{p['anon'] / mib:>12.0f} {p['file'] / mib:>9.0f} {p['rss'] / mib:>10.0f}"
                         if p else f"{'-':>34}")
        rows.append(n.ljust(15) + "".join(f"{c:>34}" for c in cells))
    return "\n".join(rows)
