"""Worker pools for grids of runs (``wpgflow sweep``, ``wpgflow study``): at most one process per core.

Workers are started with the "spawn" method (a fresh interpreter: no state inherited from the caller, MPI and
BLAS initialised per worker) and ignore SIGINT: Ctrl-C is the main process's business, which terminates them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Callable, Sequence

from .config import ConfigError


def workers_for(jobs: int | None, n_tasks: int) -> int:
    """``min(jobs, os.cpu_count(), n_tasks)``; ``jobs`` None means the core count.

    >>> workers_for(1, 10)
    1
    """
    cores = os.cpu_count() or 1
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs: must be an integer >= 1 (got {jobs})")
    return max(1, min(cores if jobs is None else jobs, cores, n_tasks))


def ignore_sigint() -> None:
    """Worker initialiser: leave Ctrl-C to the main process (no half-dead pool, no tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_all(fn: Callable, tasks: Sequence[tuple], results: list, jobs: int | None = None,
            on_done: Callable[[int, object], None] | None = None, inline: bool = False) -> list:
    """``results[i] = fn(*tasks[i])`` for every task, in a pool of :func:`workers_for` spawned processes.

    ``results`` (a list of ``len(tasks)`` slots) is filled in place, so a caller that catches an exception still
    has the finished results. ``on_done(i, result)`` is called as each task finishes. With ``inline`` and one
    worker the tasks run one after the other in this process (no interpreter start-up). On any exception (Ctrl-C
    included) the queued tasks are cancelled, the workers terminated and reaped, and the exception re-raised.
    """
    workers = workers_for(jobs, len(tasks))
    if inline and workers == 1:
        for i, task in enumerate(tasks):
            results[i] = fn(*task)
            if on_done:
                on_done(i, results[i])
        return results
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=ignore_sigint)
    try:
        pending: dict[Future, int] = {executor.submit(fn, *task): i for i, task in enumerate(tasks)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                results[i] = future.result()
                if on_done:
                    on_done(i, results[i])
    except BaseException:
        _terminate(executor)
        raise
    executor.shutdown(wait=True)
    return results


def _terminate(executor: ProcessPoolExecutor) -> None:
    """Stop the pool now: cancel queued tasks, terminate the running workers and reap them (no zombies).

    ``ProcessPoolExecutor`` has no public terminate; its ``_processes`` (pid -> Process) is the only handle.
    """
    processes = list((executor._processes or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
