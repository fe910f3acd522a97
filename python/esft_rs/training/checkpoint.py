"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG states and the step.

Layout: ``OUT_DIR/checkpoints/step-N/`` with ``trainable.safetensors`` (fp32
trained tensors), ``best.safetensors`` (the best weights by eval loss so far),
``trainer.pt`` (optimizer and scheduler state), ``rng-R.pt`` per process and
``state.json`` (the step, loop counters and what the run was made from, checked
on resume). A checkpoint is built in a staging folder and put in place whole
(``esft_rs.outputs``); only then is the previous one removed.
"""

from __future__ import annotations

import json
import random
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from esft_rs.errors import MismatchError
from esft_rs.outputs import save_tensors, staged, write_file
from esft_rs.training.freeze import Trainable

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir``, if any."""
    root = out_dir / CHECKPOINTS
    found = [
        (int(p.name[len(PREFIX):]), p)
        for p in root.glob(f"{PREFIX}*")
        if p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file()
    ]
    return max(found)[1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights(trainables: list[Trainable]) -> dict[str, torch.Tensor]:
    return {t.name: t.param.detach().cpu().contiguous() for t in trainables}


def write(
    out_dir: Path,
    step: int,
    *,
    trainables: list[Trainable],
    best: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    rank: int,
    barrier: Any,
) -> Path:
    """Write checkpoint ``step`` (every process calls this; ``barrier`` syncs them)."""
    root = out_dir / CHECKPOINTS
    final = root / f"{PREFIX}{step}"
    with ExitStack() as stack:
        tmp = None
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(staged(final, directory=True))
        tmp = _from_rank0(tmp)
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        if rank == 0:
            save_tensors(_weights(trainables), tmp / "trainable.safetensors")
            if best is not None:
                save_tensors(best, tmp / "best.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / "trainer.pt")
            write_file(tmp / "state.json", json.dumps({"step": step, **state}, indent=1))
        barrier()  # every rank's file is in; rank 0 commits as the block ends
    if rank == 0:
        for old in root.glob(f"{PREFIX}*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _from_rank0(path: Path | None) -> Path:
    """Rank 0's staging folder, on every rank."""
    import torch.distributed as dist

    shared = [str(path) if path is not None else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    return Path(str(shared[0]))


def check_identity(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint made from another model, data, expert set or config."""
    diffs = [k for k in current if saved.get(k) != current[k]]
    if not diffs:
        return
    k = diffs[0]
    if k == "config":
        keys = [key for key in current[k] if saved[k].get(key) != current[k][key]]
        what = ", ".join(f"{key}={saved[k].get(key)!r} there, {current[k][key]!r} here"
                         for key in keys[:3])
    else:
        what = {"base": "a different base model", "data": "different training data",
                "experts": "a different expert selection",
                "world": f"{saved.get(k)} processes (this run has {current[k]})"}.get(k, k)
    raise MismatchError(f"{path}: cannot resume, the checkpoint was written for {what}")


def read(
    path: Path,
    *,
    trainables: list[Trainable],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore a checkpoint in place; returns its state and the best weights, if any."""
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    with torch.no_grad():
        for t in trainables:
            t.param.copy_(weights[t.name])
    best_file = path / "best.safetensors"
    best = load_file(best_file) if best_file.is_file() else None
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(torch.load(path / f"rng-{rank}.pt", weights_only=True))
    return state, best
