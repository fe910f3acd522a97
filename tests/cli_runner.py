"""Run the ``esft-rs`` CLI in a process of its own, forked from a server that has already
imported torch, transformers and esft_rs (``forkserver``): a command's process,
exit code, stdout and stderr as ``python -m esft_rs`` gives them, without paying seconds of
imports per command. Where forkserver is missing (Windows), a plain subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import forkserver


def _command(argv: list[str], env: dict[str, str], cwd: str, umask: int, out: str,
             err: str) -> None:
    """In the forked process: the descriptors, environment, directory and umask of the
    caller, then the entry point (its SystemExit is the process's exit code)."""
    for fd, path in ((1, out), (2, err)):
        with open(path, "wb") as f:
            os.dup2(f.fileno(), fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.umask(umask)
    sys.argv = ["esft-rs", *argv]
    from esft_rs.cli import run

    run()


def run(args: Sequence[str | bytes], *, env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None, timeout: float = 600,
        text: bool = True) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", "esft_rs", *args], capture_output=True)``."""
    ctx = forkserver.context()
    argv = [a if isinstance(a, str) else os.fsdecode(a) for a in args]
    if ctx is None:
        return subprocess.run([sys.executable, "-m", "esft_rs", *argv], capture_output=True,
                              text=text, timeout=timeout, env=env, cwd=cwd)
    umask = os.umask(0)
    os.umask(umask)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        proc = ctx.Process(target=_command, args=(
            argv, dict(os.environ if env is None else env), os.fspath(cwd or os.getcwd()),
            umask, out, err))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["esft-rs", *argv], timeout)
        with open(out, "rb") as f, open(err, "rb") as g:
            stdout, stderr = f.read(), g.read()
    code = proc.exitcode if proc.exitcode is not None else -1
    if text:
        return subprocess.CompletedProcess(["esft-rs", *argv], code, stdout.decode(),
                                           stderr.decode())
    return subprocess.CompletedProcess(["esft-rs", *argv], code, stdout, stderr)
