"""The demo's fine-tuning runs, spread over worker processes.

Every run is one method at one learning rate and seed, on one intra-op thread, so its
figures are the same on whichever process runs it: the number of workers changes the
wall time only. A method's rate sweep runs on one worker (it keeps the best run's model
in memory to measure it, and scores test items for that run alone); its other seeds are
queued as soon as its rate is chosen, so that a slow method's sweep overlaps the others'
seeds.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from esft_rs.demo.tuning import choose_rate

if TYPE_CHECKING:
    from esft_rs.demo.pipeline import FineTune

METHODS = ("fft", "esft_token", "esft_gate", "random", "lora_r2", "lora_r8")
#: Sweeps in this order, the slowest first (FFT trains every weight), so that the others'
#: seeds fill the workers while it runs.
SWEEP_ORDER = ("fft", "esft_gate", "esft_token", "lora_r8", "lora_r2", "random")

_FT: FineTune | None = None  # the worker's runner, set once when the worker starts
_EVENTS: Any = None  # a queue of finished runs' phases, for the progress bars
_STOP: Any = None  # set when the demo has failed: start no further run


def default_jobs() -> int:
    """The CPUs this process may run on, at most 8 (each worker is a torch process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def fine_tune(ft: FineTune, seeds: list[int], jobs: int, progress: bool
              ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Choose each method's learning rate on validation at ``seeds[0]``, then run the chosen
    rate at the other seeds. Returns the tuning entries and one ``runs`` entry per seed."""
    grid = sum(len(ft.s.learning_rates[name]) for name in METHODS)
    bars = {"tune": tqdm(total=grid, desc="tune learning rates", unit="run", position=0,
                         disable=not progress),
            "seed": tqdm(total=len(seeds[1:]) * len(METHODS), desc="fine-tune seeds",
                         unit="run", position=1, disable=not progress)}
    tuning: dict[str, dict[str, Any]] = {}
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs torch
    events, stop = ctx.Queue(), ctx.Event()
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_start,
                               initargs=(ft, events, stop))
    try:
        pending: dict[Future[Any], Callable[[Any], None]] = {}

        def swept(name: str) -> Callable[[Any], None]:
            def done(result: tuple[dict[str, Any], dict[str, Any]]) -> None:
                tuning[name], measured[name, seeds[0]] = result
                lr = tuning[name]["learning_rate"]
                for seed in seeds[1:]:
                    pending[pool.submit(_seed_run, name, lr, seed)] = ran(name, seed)
            return done

        def ran(name: str, seed: int) -> Callable[[Any], None]:
            def done(result: dict[str, Any]) -> None:
                measured[name, seed] = result
            return done

        for name in SWEEP_ORDER:
            pending[pool.submit(_sweep, name, seeds[0])] = swept(name)
        while pending:
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(events, bars)
            for future in finished:
                pending.pop(future)(future.result())
        _drain(events, bars)
    except BaseException:
        # The runs still going write into the demo's output, which the caller removes
        # next: they stop at their next run and are waited for, so none writes after it.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        for bar in bars.values():
            bar.close()
    pool.shutdown()
    runs = [{"seed": seed, "methods": {name: measured[name, seed] for name in METHODS}}
            for seed in seeds]
    return {name: tuning[name] for name in METHODS}, runs


def _drain(events: Any, bars: dict[str, Any]) -> None:
    while True:
        try:
            bars[events.get_nowait()].update()
        except queue.Empty:
            return


def _start(ft: FineTune, events: Any, stop: Any) -> None:
    import torch

    torch.set_num_threads(1)  # as the parent: figures do not depend on the core count
    global _FT, _EVENTS, _STOP
    _FT, _EVENTS, _STOP = ft, events, stop


def _train(name: str, lr: float, seed: int) -> tuple[Any, float]:
    """One run, unless the demo has failed meanwhile."""
    assert _FT is not None
    if _STOP.is_set():
        raise RuntimeError("the demo failed; run not started")
    return _FT.train(name, lr, seed)


def _sweep(name: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every rate of the grid at ``seed``, scored on the validation split; the chosen run
    (``tuning.choose_rate``) measured. Only one model is held at a time besides the best."""
    from esft_rs.evaluation import evaluate_items

    assert _FT is not None
    ft = _FT
    validation: dict[float, tuple[float, float]] = {}
    kept: tuple[Any, float] | None = None
    for lr in sorted(ft.s.learning_rates[name]):
        result, seconds = _train(name, lr, seed)
        ev = evaluate_items(result.model.eval(), ft.tok, ft.data.downstream_val)
        validation[lr] = (ev.exact_match or 0.0, ev.loss)
        if choose_rate(validation) == lr:
            kept = (result, seconds)
        _EVENTS.put("tune")
    assert kept is not None
    tuning = {"learning_rate": choose_rate(validation),
              "validation_acc": {f"{lr:g}": v[0] for lr, v in validation.items()},
              "validation_loss": {f"{lr:g}": v[1] for lr, v in validation.items()}}
    return tuning, ft.measure(name, *kept)


def _seed_run(name: str, lr: float, seed: int) -> dict[str, Any]:
    assert _FT is not None
    figures = _FT.measure(name, *_train(name, lr, seed))
    _EVENTS.put("seed")
    return figures
