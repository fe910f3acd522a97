"""Resumable checkpoints: trained weights, optimizer, scheduler, RNG states and the step.

Layout: ``OUT_DIR/checkpoints/step-N/`` with ``dcp/`` (a
``torch.distributed.checkpoint`` of the fp32 trained tensors, the best weights
by eval loss so far and the AdamW state, each rank writing its own shards),
``scheduler.pt``, ``rng-R.pt`` per process and ``state.json`` (the step, loop
counters and what the run was made from, checked on resume). DCP reshards on
load, so a checkpoint written by N processes (FSDP or DDP) resumes in M. A
checkpoint is built in a staging folder and put in place whole
(``esft_rs.files.outputs``); only then is the previous one removed.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from esft_rs.distributed import Dist, from_rank0
from esft_rs.errors import EsftError, InvalidFileError, MismatchError
from esft_rs.files.outputs import staged, write_file
from esft_rs.private_api import had_state, nested_keys
from esft_rs.training import expert_parallel
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


def read_state(path: Path, steps: int | None = None) -> dict[str, Any]:
    """The checkpoint's ``state.json``, checked: a JSON object whose step is a whole
    number in 1..``steps``. Anything else is a damaged checkpoint (``damaged``)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise damaged(path, e) from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise damaged(path, ValueError(f"state.json: step {step!r} is not a step number"))
    if steps is not None and step > steps:
        raise damaged(path, ValueError(f"state.json: step {step} is beyond the run's {steps}"
                                       " steps"))
    return state


def _first_failure(e: BaseException) -> BaseException:
    """The error inside DCP's CheckpointException ({rank: (error, stack)}), else ``e``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            return inner[0]
    return e


def damaged(path: Path, e: BaseException) -> EsftError:
    """One line for a checkpoint that cannot be read: what failed, and what to do."""
    if isinstance(e, EsftError):
        return e
    e = _first_failure(e)
    text = " ".join(str(e).split())
    why = f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__
    return InvalidFileError(f"{path}: damaged checkpoint, cannot resume ({why}); remove"
                            f" {path.parent} to train from the start", path)


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


DCP = "dcp"


def _state_dict(
    model: torch.nn.Module, trainables: list[Trainable], optimizer: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """What DCP saves and loads in place: tensors (DTensor shards under FSDP) by name;
    the optimizer state keyed by parameter names, so that any world size maps it back."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if expert_parallel.placement_of(model) is not None:
        return {"ep": expert_parallel.state_dict(trainables, optimizer, best, saving=True)}
    out: dict[str, Any] = {"weights": {t.name: t.param for t in trainables},
                           "optimizer": get_optimizer_state_dict(model, optimizer)}
    if best is not None:
        out["best"] = best
    return out


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that one process without a process group saves alone: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def write(
    out_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    trainables: list[Trainable],
    best: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    place: Dist,
) -> Path:
    """Write checkpoint ``step`` (every process calls this)."""
    import torch.distributed.checkpoint as dcp

    root = out_dir / CHECKPOINTS
    final = root / f"{PREFIX}{step}"
    with ExitStack() as stack:
        tmp = None
        if place.main:
            root.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(staged(final, directory=True))
        tmp = from_rank0(tmp)
        torch.save(rng_state(), tmp / f"rng-{place.rank}.pt")
        with _single_process_quiet():
            try:
                dcp.save(_state_dict(model, trainables, optimizer, best),
                         checkpoint_id=tmp / DCP, no_dist=place.world == 1)
            except dcp.api.CheckpointException as e:
                # DCP wraps a failed write (a full disk, a file size limit) in a BaseException:
                # raise what failed, which the staging turns into one line naming the output
                raise _first_failure(e) from None
        if place.main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            write_file(tmp / "state.json", json.dumps({"step": step, **state}, indent=1))
        place.barrier()  # every rank's files are in; rank 0 commits as the block ends
    if place.main:
        for old in root.glob(f"{PREFIX}*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    place.barrier()
    return final


def check_identity(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint made from another model, data, expert set or config."""
    # seq_length: checkpoints written before it was recorded lack it (their data digest
    # covers it)
    diffs = [k for k in current if saved.get(k) != current[k]
             and not (k == "seq_length" and k not in saved)]
    if not diffs:
        return
    k = diffs[0]
    if k == "config" and isinstance(saved.get(k), dict):
        keys = [key for key in current[k] if saved[k].get(key) != current[k][key]]
        what = ", ".join(f"{key}={saved[k].get(key)!r} there, {current[k][key]!r} here"
                         for key in keys[:3])
    else:
        what = {"base": "a different base model", "data": "different training data",
                "seq_length": f"sequences of {saved.get(k)} tokens (this run cuts them to"
                              f" {current[k]}: --seq-length)",
                "experts": "a different expert selection",
                "global_batch": f"a global batch of {saved.get(k)} sequences (this run has"
                                f" {current[k]})"}.get(k, k)
    raise MismatchError(f"{path}: cannot resume, the checkpoint was written for {what}")


def read(
    path: Path,
    *,
    model: torch.nn.Module,
    trainables: list[Trainable],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    best: dict[str, torch.Tensor] | None,
    place: Dist,
) -> dict[str, Any]:
    """Restore a checkpoint in place (``best``: tensors to load the best weights into, when
    the checkpoint has them); returns its state. A rank the writing run did not have
    keeps its RNG state: training draws no random numbers after the data is split."""
    import torch.distributed.checkpoint as dcp

    state = read_state(path)
    try:
        if expert_parallel.placement_of(model) is not None:
            _read_ep(path, trainables, optimizer, best, place)
        else:
            _read_dcp(path, model, trainables, optimizer, best, place)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = path / f"rng-{place.rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
    except (Exception, dcp.api.CheckpointException) as e:  # a truncated .distcp, a garbage
        raise damaged(path, e) from None  # rng or scheduler file
    return state


def _read_ep(path: Path, trainables: list[Trainable], optimizer: torch.optim.Optimizer,
             best: dict[str, torch.Tensor] | None, place: Dist) -> None:
    """Expert parallelism: each rank loads its experts' rows by their placement-free keys,
    so a checkpoint of any world size or placement resumes (one written under FSDP, DDP or
    one process is keyed otherwise: refused in one line)."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(path / DCP).read_metadata().state_dict_metadata
    keys = nested_keys(set(saved), "ep")
    if keys is None:  # the keys name the rows a rank loads: without them, nothing is sure
        raise MismatchError(f"{path}: this torch writes checkpoint keys esft-rs cannot read;"
                            " cannot resume with --parallelism ep")
    if not keys:
        raise MismatchError(f"{path}: cannot resume with --parallelism ep: the checkpoint was"
                            " written with fsdp, ddp or one process (resume it with those)")
    expert_parallel.prepare_optimizer(trainables, optimizer, keys)
    loaded = {"ep": expert_parallel.state_dict(trainables, optimizer, best, saving=False)}
    wanted = {k: v for k, v in loaded["ep"].items() if k in keys}
    if missing := sorted(set(loaded["ep"]) - keys - {k for k in loaded["ep"]
                                                       if k.startswith("optimizer/")}):
        raise MismatchError(f"{path}: the checkpoint has no {missing[0]}")
    loaded["ep"] = wanted
    with _single_process_quiet():
        dcp.load(loaded, checkpoint_id=path / DCP, no_dist=place.world == 1)
    expert_parallel.restore_lr(optimizer, loaded["ep"])


def _read_dcp(path: Path, model: torch.nn.Module, trainables: list[Trainable],
              optimizer: torch.optim.Optimizer, best: dict[str, torch.Tensor] | None,
              place: Dist) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    loaded = _state_dict(model, trainables, optimizer, best)
    # get_optimizer_state_dict gives every parameter state to load into; one that had no
    # gradient yet had none when saved, and must have none again (AdamW counts its steps).
    saved = set(dcp.FileSystemReader(path / DCP).read_metadata().state_dict_metadata)
    loaded["optimizer"]["state"] = {
        fqn: v for fqn, v in loaded["optimizer"]["state"].items()
        if had_state(saved, f"optimizer.state.{fqn}") is not False
    }
    with _single_process_quiet():
        dcp.load(loaded, checkpoint_id=path / DCP, no_dist=place.world == 1)
    set_optimizer_state_dict(model, optimizer, loaded["optimizer"],
                             options=StateDictOptions(strict=False))
