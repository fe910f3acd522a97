"""The test session's forkserver (multiprocessing's): a server that has imported torch,
transformers and esft_rs once, from which CLI commands (``cli_runner``) and the ranks of
multi-process tests (``forked_ranks``) are forked, each a fresh process without seconds of
imports. ``None`` where the platform has no forkserver (Windows): callers spawn instead."""

from __future__ import annotations

import multiprocessing as mp
import sys
from multiprocessing.context import ForkServerContext

#: what a command's or a rank's process would import; the server imports it once
PRELOAD = ["torch", "numpy", "safetensors", "click", "esft_rs.cli", "esft_rs.training.api",
           "esft_rs.routing.profiling", "esft_rs.evaluation", "transformers",
           "torch.distributed.fsdp", "torch.distributed.checkpoint",
           # imported on first use, not by the modules above; without them each rank or
           # command that trains, or loads a transformers model, pays 1-2 s of CPU:
           # FSDP2's first call imports torch._dynamo (torch.compiler.disable)
           "torch._dynamo", "transformers.modeling_utils", "esft_rs.training.loop",
           "esft_rs.training.sharded_load", "esft_rs.training.parallelism",
           "esft_rs.models.hf_shards"]
_CTX: ForkServerContext | None = None
#: the running test's name when it is not marked ``multiprocess`` (conftest sets it)
unmarked_test: str | None = None


def context() -> ForkServerContext | None:
    global _CTX
    if _CTX is None and "forkserver" in mp.get_all_start_methods():
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def child() -> None:
    """First thing in a forked process: it writes no ``.pyc``. A command may run under a
    file-size limit (``cli_runner.file_size_limit``): a ``.pyc`` it wrote was cut short at
    the limit and still moved into place (CPython does not check the length written), and
    every later import of that module failed ("EOFError: marshal data too short"). The
    server's imports, which are most of a child's, write theirs."""
    sys.dont_write_bytecode = True


def check_ranks(n: int) -> None:
    """A test that starts several ranks is marked ``multiprocess``, so that ``make
    test-fast`` leaves it out: it fails here if not."""
    if n > 1 and unmarked_test is not None:
        raise AssertionError(f"{unmarked_test} starts {n} ranks: mark it multiprocess")
