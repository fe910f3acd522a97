from __future__ import annotations

import os

# Tests use tiny tensors: one intra-op thread is fastest, and on a busy machine two
# threads waiting on each other make a forward pass up to 30x slower. Set before
# torch is imported; CLI subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test may reach the Hugging Face Hub: tiny models are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import cli_runner
import forkserver
from esft_rs.files.expert_config import ExpertConfig
from esft_rs.testing import MoEShape, random_tensors, write_checkpoint

CLI = [sys.executable, "-m", "esft_rs"]


def run_cli(*args: object, check: bool = False, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 600,
            preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``esft-rs`` entry point in a process of its own (``cli_runner``), after
    ``preexec`` there (``cli_runner.file_size_limit``, ``cli_runner.nobody``)."""
    proc = cli_runner.run(list(map(str, args)), env=env, cwd=cwd, timeout=timeout,
                          preexec=preexec)
    if check and proc.returncode != 0:
        raise AssertionError(f"esft-rs {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_torchrun(*args: object, nproc: int, env: dict[str, str] | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node {nproc} -m esft_rs *args``, its workers forked
    (``cli_runner.run_ranks``), each with the environment torchrun gives it. Tests of
    torchrun itself (its launcher's exit code and report) start the real one."""
    base = dict(os.environ if env is None else env)
    base.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several workers
    world, port = str(nproc), str(free_port())
    envs = [{**base, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0",
             "ROLE_RANK": str(r), "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world,
             "ROLE_WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0",
             "TORCHELASTIC_MAX_RESTARTS": "0"} for r in range(nproc)]
    return cli_runner.run_ranks(list(map(str, args)), envs, timeout=timeout)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: the rendezvous (``MASTER_PORT``) of a job whose
    ranks a test starts. The one copy of this snippet.

    Drawn below the ephemeral ports (32768 up on Linux, 49152 up on macOS and Windows): one
    the OS hands out for port 0 may be taken, before rank 0 binds it, as the local port of
    any outgoing connection, such as the gloo connections of a job on the other pytest
    worker. Each worker draws from a band of its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    low = 20000 + 2000 * (int(worker) % 6 if worker.isdigit() else 0)
    for port in random.SystemRandom().sample(range(low, low + 2000), 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{low + 1999}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> object:
    """While a test and its fixtures run: whether it may start several ranks
    (``forkserver.check_ranks``)."""
    forkserver.unmarked_test = None if item.get_closest_marker("multiprocess") else item.nodeid
    try:
        return (yield)
    finally:
        forkserver.unmarked_test = None


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Over several workers (pytest-xdist ``--dist loadgroup``), the demo's tests share one
    worker, and so the module's one run of the demo."""
    for item in items:
        if item.get_closest_marker("demo"):
            item.add_marker(pytest.mark.xdist_group("demo"))


@pytest.fixture
def tiny_shape() -> MoEShape:
    return MoEShape(layers=3, experts=4, shared_experts=1, hidden=8, intermediate=4, vocab=16)


@pytest.fixture
def single_ckpt(tmp_path: Path, tiny_shape: MoEShape) -> Path:
    return write_checkpoint(tmp_path / "single", random_tensors(tiny_shape, seed=1))


@pytest.fixture
def sharded_ckpt(tmp_path: Path, tiny_shape: MoEShape) -> Path:
    return write_checkpoint(
        tmp_path / "sharded", random_tensors(tiny_shape, seed=2), shards=3, config={"x": 1}
    )


#: the experts the multi-process training tests train on the built-in model
BUILTIN_EXPERTS = ExpertConfig({1: [0, 5], 2: [3], 3: [7, 8, 9]}, False, False)


@pytest.fixture(scope="session")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny built-in model, task data and ``BUILTIN_EXPERTS`` (read only: shared)."""
    from esft_rs.models import init_model, save_model
    from train_fakes import plus_chat

    root = tmp_path_factory.mktemp("builtin_run")
    save_model(init_model("tiny", seed=0), root / "base")
    (root / "task.jsonl").write_text(plus_chat(10, 4))
    BUILTIN_EXPERTS.save(root / "experts.json")
    return root
