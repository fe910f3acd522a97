"""Timing helpers every bench shares: methods (or whole processes) run interleaved, round
after round, so that a noisy machine slows each of them alike; figures are medians."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Runs a command as a child and reports its wall time, peak RSS and, when the command
# prints one, its own in-process time (its last stdout line).
MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if p.returncode:
    sys.exit(p.stderr)
inner = p.stdout.strip().splitlines()
print(json.dumps({"wall": wall, "rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "inner": float(inner[-1]) if inner else None}))
"""


def interleaved(methods: dict[str, Callable[[], object]], rounds: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each in-process method, by ``clock`` (wall time by default;
    ``time.process_time``: the CPU time of the process, less sensitive to other jobs)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def measure(cmd: list[str]) -> dict[str, float]:
    """One run of ``cmd`` as a child process (see ``MEASURE``)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench: {cmd[:3]} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def clean(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()  # no dirty pages carried into the next timed run


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file in a directory, by name."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def interleaved_processes(
    jobs: dict[str, tuple[list[str], Path]], rounds: int
) -> dict[str, list[dict[str, float]]]:
    """Every job's runs, ``rounds`` interleaved rounds; each job's ``(command, output)``
    gets the output path as its last argument, and the output is removed after each run."""
    results: dict[str, list[dict[str, float]]] = {k: [] for k in jobs}
    for r in range(rounds):
        for name, (cmd, out) in jobs.items():
            results[name].append(measure([*cmd, str(out)]))
            clean(out)
        print(f"round {r + 1}/{rounds} done", flush=True)
    return results
