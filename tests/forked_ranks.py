"""The ranks of a multi-process test, each a fresh process forked from the session's
``forkserver`` (torch, transformers and esft_rs already imported) instead of a spawned one
that imports them again (seconds of CPU a rank).

``spawn(fn, args, nprocs)`` is ``torch.multiprocessing.spawn``'s contract: ``fn(rank, *args)``
on ``nprocs`` processes; ``ProcessRaisedException`` (with the rank's traceback) or
``ProcessExitedException`` when one fails, the other ranks then killed. A rank starts with
the caller's environment (``os.environ`` now) and the private APIs probed afresh
(``esft_rs.private_api``); its stdout and stderr reach the caller's once it is done.

Fresh processes, not long-lived ones reused across tests: a process that outlived a job
collected its gloo objects during the next one, and gloo's teardown is racy (a rank aborted
with ``malloc(): unaligned tcache chunk detected`` in a fresh-clone run).
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.multiprocessing
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

import forkserver

#: a job that takes longer has hung (a rank waiting on a collective that never comes)
JOB_TIMEOUT = 900.0


def _rank(fn: Callable[..., Any], rank: int, args: tuple, env: dict[str, str], out: str,
          conn: Connection) -> None:
    """In the forked process: the caller's environment, a fresh probe of the private APIs,
    then ``fn``; the traceback of what it raised goes back on ``conn``."""
    forkserver.child()
    with open(out, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    os.environ.clear()
    os.environ.update(env)
    from esft_rs import private_api

    private_api.clear()
    reply: str | None = None
    try:
        fn(rank, *args)
    except SystemExit as e:  # as a spawned rank's: its code is the process's
        if e.code not in (0, None):
            reply = f"rank {rank} exited with code {e.code}"
    except BaseException:
        reply = traceback.format_exc()
    conn.send(reply)


def spawn(fn: Callable[..., Any], args: tuple = (), nprocs: int = 1) -> None:
    forkserver.check_ranks(nprocs)
    ctx = forkserver.context()
    if ctx is None:
        torch.multiprocessing.spawn(fn, args=args, nprocs=nprocs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}") for r in range(nprocs)]
        procs, conns = [], []
        env = dict(os.environ)
        try:
            for rank in range(nprocs):
                ours, theirs = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_rank, args=(fn, rank, args, env, outs[rank], theirs),
                                   name=f"esft-test-rank-{rank}")
                proc.start()
                theirs.close()
                procs.append(proc)
                conns.append(ours)
            _wait(fn, procs, conns)
            for rank, proc in enumerate(procs):
                proc.join()
                if proc.exitcode != 0:
                    raise ProcessExitedException(
                        f"process {rank} terminated with exit code {proc.exitcode}",
                        rank, proc.pid, proc.exitcode or 0)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
            for path in outs:
                if os.path.exists(path):
                    with open(path, errors="replace") as f:
                        sys.stderr.write(f.read())


def _wait(fn: Callable[..., Any], procs: list, conns: list[Connection]) -> None:
    """Every rank's end, or the first failure as ``torch.multiprocessing.spawn`` says it:
    a rank's traceback, or its exit code where it died without one. A rank that exits 0
    without a reply (``exit_process``) succeeded."""
    pending = set(range(len(procs)))
    listening = dict(enumerate(conns))

    def read(rank: int) -> None:
        try:
            trace = listening.pop(rank).recv()
        except EOFError:
            return
        pending.discard(rank)
        if trace is not None:
            msg = f"\n\n-- Process {rank} terminated with the following error:\n"
            raise ProcessRaisedException(msg + trace, rank, procs[rank].pid)

    while pending:
        sentinels = {procs[r].sentinel: r for r in pending}
        ready = wait([*listening.values(), *sentinels], timeout=JOB_TIMEOUT)
        if not ready:
            raise TimeoutError(f"{fn.__qualname__}: no answer from ranks {sorted(pending)}"
                               f" in {JOB_TIMEOUT:.0f} s")
        for rank, conn in list(listening.items()):
            if conn in ready:
                read(rank)
        for sentinel in ready:
            if (rank := sentinels.get(sentinel)) is None or rank not in pending:
                continue
            procs[rank].join()
            if rank in listening and listening[rank].poll():
                read(rank)
            if rank in pending and procs[rank].exitcode == 0:
                pending.discard(rank)
            elif rank in pending:
                code = procs[rank].exitcode
                raise ProcessExitedException(f"process {rank} terminated with exit code {code}",
                                             rank, procs[rank].pid, code or 0)
