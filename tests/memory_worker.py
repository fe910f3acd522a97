"""A torchrun-like training process that reports its resident memory (Linux /proc): the
peak above its own baseline, exact (the kernel's high-water mark, ``VmHWM``), and what
loading the checkpoint shard by shard added, file-backed pages included."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def status() -> dict[str, int]:
    """``RssAnon``, ``RssFile``, ``VmRSS``, ``VmHWM`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def mapped(directory: str) -> int:
    """Resident bytes of this process's maps of files under ``directory`` (``smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not line.endswith("kB\n"):  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(directory.rstrip("/") + "/")
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def reset_peak() -> None:
    """Start the kernel's high-water mark (``VmHWM``) again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def train_measured(rank: int, world: int, port: int, args: tuple, kwargs: dict,
                   out: str) -> None:
    """Train (``esft_rs.train(*args, **kwargs)``) as rank ``rank`` of ``world``; write
    ``out/rank-R.json``: ``peak`` (bytes above the baseline taken just before), and for
    the sharded load (``fill``) the bytes it read, what it added to the anonymous memory
    and the most it added to the whole resident set."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import esft_rs
    from esft_rs.distributed import exit_process
    from esft_rs.models.config import PRESETS
    from esft_rs.models.reference import ReferenceMoE
    from esft_rs.training import sharded_load

    with torch.device("meta"):  # torch's meta-device machinery, loaded in every setting alike
        ReferenceMoE(PRESETS["tiny"])
    report: dict[str, int] = {}
    peaks: list[int] = []  # high-water marks, each of the stretch since the one before
    fill = sharded_load.fill

    def measured_fill(*a: object) -> int:
        before = status()
        peaks.append(before["VmHWM"])
        reset_peak()
        report["read"] = fill(*a)  # type: ignore[arg-type]
        after = status()
        peaks.append(after["VmHWM"])
        report["fill_anon"] = after["RssAnon"] - before["RssAnon"]
        report["fill_peak"] = after["VmHWM"] - before["VmRSS"]
        reset_peak()
        return report["read"]

    sharded_load.fill = measured_fill  # esft_rs.train calls it by this name
    reset_peak()
    base = status()["VmRSS"]
    result = esft_rs.train(*args, progress=False, **kwargs)
    peaks.append(status()["VmHWM"])
    report["peak"] = max(peaks) - base
    report["frozen"] = result.fit.rank_bytes["frozen"]
    report["trained"] = result.fit.rank_bytes["trained"]
    Path(out, f"rank-{rank}.json").write_text(json.dumps(report))
    exit_process(0)  # past the interpreter's teardown, where gloo may abort a rank


def load_measured(rank: int, directory: str, dtype: str, out: str) -> None:
    """Load the model of ``directory`` in ``dtype`` in this (fresh) process; write to ``out``
    its weight bytes and what loading added: the peak resident set, the file-backed pages
    still resident after (code touched for the first time too), and those of the checkpoint's
    own files."""
    from esft_rs.models import load_model
    from esft_rs.training.sharded_load import meta_model

    meta_model(directory)  # the modelling code's imports, outside the measure (no memory)
    before = status()
    reset_peak()
    model = load_model(directory, dtype=getattr(torch, dtype))
    after = status()
    Path(out).write_text(json.dumps({
        "weights": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "largest": max(t.numel() * 4 for t in model.state_dict().values()),
        "peak": after["VmHWM"] - before["VmRSS"],
        "file": after["RssFile"] - before["RssFile"],
        "checkpoint": mapped(directory),
    }))
