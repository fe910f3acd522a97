"""Run the ``esft-rs`` CLI in a process of its own, forked from a server that has already
imported torch, transformers and esft_rs (``forkserver``): a command's process,
exit code, stdout and stderr as ``python -m esft_rs`` gives them, without paying seconds of
imports per command. Where forkserver is missing (Windows), a plain subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

import forkserver


def _command(argv: list[str], env: dict[str, str], cwd: str, umask: int, out: str,
             err: str, preexec: Callable[[], None] | None) -> None:
    """In the forked process: the descriptors, environment, directory and umask of the
    caller, ``preexec``, then the entry point (its SystemExit is the process's exit code)."""
    forkserver.child()
    for fd, path in ((1, out), (2, err)):
        with open(path, "wb") as f:
            os.dup2(f.fileno(), fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.umask(umask)
    if preexec is not None:
        preexec()
    sys.argv = ["esft-rs", *argv]
    from esft_rs.cli import run

    run()


def run(args: Sequence[str | bytes], *, env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None, timeout: float = 600, text: bool = True,
        preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", "esft_rs", *args], capture_output=True,
    preexec_fn=preexec)``; ``preexec`` is pickled (a module's function, or a partial of
    one), as are the ranks' functions."""
    ctx = forkserver.context()
    argv = [a if isinstance(a, str) else os.fsdecode(a) for a in args]
    if ctx is None:
        return subprocess.run([sys.executable, "-m", "esft_rs", *argv], capture_output=True,
                              text=text, timeout=timeout, env=env, cwd=cwd,
                              preexec_fn=preexec)
    code, _, [(stdout, stderr)] = _forked(ctx, argv, [dict(os.environ if env is None else env)],
                                       os.fspath(cwd or os.getcwd()), timeout, preexec)
    if text:
        return subprocess.CompletedProcess(["esft-rs", *argv], code, stdout.decode(),
                                           stderr.decode())
    return subprocess.CompletedProcess(["esft-rs", *argv], code, stdout, stderr)


def run_ranks(args: Sequence[str], envs: list[dict[str, str]], *,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """The processes of ``torchrun -m esft_rs *args``: one command per environment (each a
    rank's, as torchrun sets it), all at once. stdout and stderr are the ranks' in rank
    order; the exit code is the first failing rank's, and the others are then killed, as
    torchrun kills them. Where forkserver is missing, torchrun itself."""
    forkserver.check_ranks(len(envs))
    ctx = forkserver.context()
    argv = list(args)
    if ctx is None:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={len(envs)}", "-m", "esft_rs", *argv],
            capture_output=True, text=True, timeout=timeout, env=envs[0])
    code, _, streams = _forked(ctx, argv, envs, os.getcwd(), timeout)
    return subprocess.CompletedProcess(["esft-rs", *argv], code,
                                       b"".join(o for o, _ in streams).decode(),
                                       b"".join(e for _, e in streams).decode())


def run_each(args: Sequence[str], envs: list[dict[str, str]], *,
             timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """One command per environment, all at once, each left to finish (none killed for
    another's failure): each process's result, in the order of ``envs``. For ranks that
    each fail on their own, before any collective."""
    forkserver.check_ranks(len(envs))
    argv = list(args)
    ctx = forkserver.context()
    if ctx is None:
        procs = [subprocess.Popen([sys.executable, "-m", "esft_rs", *argv], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for env in envs]
        return [subprocess.CompletedProcess(p.args, p.returncode, *p.communicate(timeout=timeout))
                for p in procs]
    _, codes, streams = _forked(ctx, argv, envs, os.getcwd(), timeout, together=False)
    return [subprocess.CompletedProcess(["esft-rs", *argv], code, out.decode(), err.decode())
            for code, (out, err) in zip(codes, streams, strict=True)]


def _forked(ctx: Any, argv: list[str], envs: list[dict[str, str]], cwd: str,
            timeout: float, preexec: Callable[[], None] | None = None, together: bool = True
            ) -> tuple[int, list[int], list[tuple[bytes, bytes]]]:
    """The command forked once per environment, all at once, with the caller's umask: the
    first non-zero exit code (0 when none), then each process's exit code and (stdout,
    stderr), in the order of ``envs``. ``together``: one failing kills the others (torchrun's
    way)."""
    umask = os.umask(0)
    os.umask(umask)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [(os.path.join(tmp, f"out{r}"), os.path.join(tmp, f"err{r}"))
                 for r in range(len(envs))]
        procs = [ctx.Process(target=_command, args=(argv, env, cwd, umask, *p, preexec))
                 for env, p in zip(envs, paths, strict=True)]
        for proc in procs:
            proc.start()
        code = _wait_all(procs, timeout, together)
        if code is None:
            raise subprocess.TimeoutExpired(["esft-rs", *argv], timeout)
        streams = []
        for out, err in paths:
            with open(out, "rb") as f, open(err, "rb") as g:
                streams.append((f.read(), g.read()))
    return code, [p.exitcode for p in procs], streams


def file_size_limit(nbytes: int) -> None:
    """A ``preexec``: files of at most ``nbytes`` (``ulimit -f``, a "disk" that fills up); a
    write past it fails with EFBIG (Python ignores SIGXFSZ, which would kill the process)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def nobody() -> None:
    """A ``preexec`` for root: the user ``nobody`` (65534, no groups), whom file modes bind
    (a read-only folder), as ``setpriv --reuid=65534 --regid=65534 --clear-groups``."""
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def _wait_all(procs: list, timeout: float, together: bool) -> int | None:
    """Wait for every process; the first non-zero exit code (0 when none), the others
    killed once one fails when ``together``; None past ``timeout`` (every process killed).
    Exit codes are read before each wait: one that had ended before the first was
    counted as a success (a command refused at once exited 2, and the test saw 0)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            running = [p.sentinel for p in procs if p.exitcode is None]
            if not running or (failed and together):
                return failed[0] if failed else 0
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            wait(running, left)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
