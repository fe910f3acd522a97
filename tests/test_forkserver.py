"""The harness that forks a test's processes (``forkserver``, ``forked_ranks``,
``cli_runner``): its processes leave the interpreter's files as they found them, only tests
marked ``multiprocess`` start several ranks, and a command's exit code is never lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import cli_runner
import forked_ranks


def _import_under_a_file_size_limit(rank: int, root: str) -> None:
    cli_runner.file_size_limit(1024)
    sys.path.insert(0, root)
    import large_module  # noqa: F401


def test_a_file_size_limit_cuts_no_bytecode_short(tmp_path: Path) -> None:
    """A forked process under ``ulimit -f 1`` imports a module compiled to more than 1 KiB:
    it used to leave a ``.pyc`` of 1024 bytes, and the next import failed ("EOFError:
    marshal data too short"), in every test that imported the module after it."""
    (tmp_path / "large_module.py").write_text("".join(f"x{i} = {i}\n" for i in range(500)))
    for _ in range(2):  # the second reads what the first left
        forked_ranks.spawn(_import_under_a_file_size_limit, args=(str(tmp_path),))
    assert not (tmp_path / "__pycache__").exists()


def test_a_test_not_marked_multiprocess_starts_no_ranks() -> None:
    """``make test-fast`` leaves out the tests marked ``multiprocess``: one that starts
    several ranks without the mark fails, before any starts (three such tests ran there)."""
    with pytest.raises(AssertionError, match="starts 2 ranks: mark it multiprocess"):
        forked_ranks.spawn(print, nprocs=2)
    with pytest.raises(AssertionError, match="starts 2 ranks: mark it multiprocess"):
        cli_runner.run_ranks(["--help"], [{}, {}])
    forked_ranks.spawn(print, nprocs=1)  # one process is no job of several ranks


def test_a_command_that_ends_before_the_wait_keeps_its_exit_code(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A command refused at once can end before the runner starts waiting for it: its exit
    code was then lost, and the test saw 0 (``test_bad_yaml`` once failed so)."""
    wait_all = cli_runner._wait_all

    def late(procs: list, *args: object) -> int | None:
        for p in procs:
            p.join()  # every process has ended before the wait starts
        return wait_all(procs, *args)

    monkeypatch.setattr(cli_runner, "_wait_all", late)
    assert cli_runner.run(["no-such-command"]).returncode == 2  # click's usage error
