"""Rank processes shared by the multi-process tests: each imports torch, transformers and
esft_rs once per pytest session instead of once per test (seconds of CPU a rank).

``RankPool.spawn(fn, args, nprocs)`` is ``torch.multiprocessing.spawn``'s contract: ``fn(rank,
*args)`` on ``nprocs`` processes, ``ProcessRaisedException`` (with the rank's traceback) or
``ProcessExitedException`` when one fails. A job runs on a pool of that many ranks, each a
process started the way ``spawn`` starts them. A rank starts each job as a spawned one would:
with the caller's environment (``os.environ`` now) and the private APIs probed again
(``esft_rs.private_api``); after it, the rank leaves any process group the job left behind.
Where a spawned rank would exit (``esft_rs.distributed.exit_process``) a pooled one returns to
the pool. A job that fails
takes its pool with it, as ``spawn`` terminates the other ranks: the next job gets fresh ones.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

#: a job that takes longer has hung (a rank waiting on a collective that never comes)
JOB_TIMEOUT = 900.0


class _Exit(BaseException):
    """Raised where a spawned rank would have exited with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _return_to_pool(code: int) -> None:
    raise _Exit(code)


def _serve(rank: int, conn: Connection) -> None:
    """A pooled rank: run jobs until told to stop, then leave past the interpreter's
    teardown, where gloo may abort a process (``esft_rs.distributed.exit_process``)."""
    import torch
    import torch.distributed as dist

    import esft_rs.distributed
    from esft_rs import private_api

    torch.set_num_threads(1)
    esft_rs.distributed.exit_process = _return_to_pool  # type: ignore[assignment]
    while (job := conn.recv()) is not None:
        fn, args, env = job
        os.environ.clear()
        os.environ.update(env)
        private_api.clear()
        try:
            fn(rank, *args)
            reply: str | None = None
        except _Exit as e:
            reply = None if e.code == 0 else f"rank {rank} exited with code {e.code}"
        except BaseException:
            reply = traceback.format_exc()
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.send(reply)
    os._exit(0)


class _Ranks:
    """``world`` pooled processes and the pipe to each."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for rank in range(world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, theirs), daemon=True,
                               name=f"esft-test-rank-{rank}")
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)

    def run(self, fn: Callable[..., Any], args: tuple) -> None:
        for conn in self.conns:
            conn.send((fn, args, dict(os.environ)))
        pending = dict(enumerate(self.conns))
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs)}
        while pending:
            ready = wait([*pending.values(), *sentinels], timeout=JOB_TIMEOUT)
            if not ready:
                raise TimeoutError(f"{fn.__qualname__}: no answer from ranks "
                                   f"{sorted(pending)} in {JOB_TIMEOUT:.0f} s")
            for rank, conn in list(pending.items()):
                if conn in ready or conn.poll():
                    del pending[rank]
                    if (trace := conn.recv()) is not None:
                        msg = f"\n\n-- Process {rank} terminated with the following error:\n"
                        raise ProcessRaisedException(msg + trace, rank, self.procs[rank].pid)
            for sentinel in ready:
                if sentinel in sentinels and (rank := sentinels[sentinel]) in pending:
                    proc = self.procs[rank]
                    proc.join()
                    raise ProcessExitedException(
                        f"process {rank} terminated with exit code {proc.exitcode}",
                        rank, proc.pid, proc.exitcode or 0)

    def stop(self, graceful: bool) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if graceful and proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
            proc.join(timeout=10 if graceful else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()


class RankPool:
    """Pools of ranks by world size, for one pytest session (the ``rank_pool`` fixture)."""

    def __init__(self) -> None:
        self._pools: dict[int, _Ranks] = {}

    def spawn(self, fn: Callable[..., Any], args: tuple = (), nprocs: int = 1) -> None:
        ranks = self._pools.pop(nprocs, None) or _Ranks(nprocs)
        try:
            ranks.run(fn, args)
        except BaseException:
            ranks.stop(graceful=False)
            raise
        self._pools[nprocs] = ranks

    def close(self) -> None:
        for ranks in self._pools.values():
            ranks.stop(graceful=True)
        self._pools.clear()


#: the session's pools (closed by conftest's ``pytest_sessionfinish``)
POOL = RankPool()
spawn = POOL.spawn
