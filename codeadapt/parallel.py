"""CPU-bound per-source work in worker processes, for the thread task runner.

Prefect's thread runner runs every task in the flow's process, and tree-sitter parsing and
example generation hold the GIL: on a machine with N cores, a hundred sources still use one.
`call` and `starmap` run such work in a process pool of the flow's process instead (one process per
core by default: `runner.processes`), and a big repository's parse is cut into chunks so it
spreads over the pool instead of becoming the straggler. With Dask, workers already are
processes: the pool stays off there (`configure(1)`), so nothing nests.

Results are the same objects the inline call returns (tested), so caches and outputs do not
depend on where the work ran. A worker that dies (a crash in a native parser) breaks only the
calls in flight: each is run again in this process, and the next call gets a fresh pool.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")
_PRELOAD = ["codeadapt.extract", "codeadapt.generate", "codeadapt.dataset"]
_lock = threading.Lock()
_size = 1
_pool: ProcessPoolExecutor | None = None


def configure(processes: int) -> int:
    """Use `processes` workers (0: one per core; 1: none, run inline). Returns the count."""
    global _size, _pool
    n = processes or os.cpu_count() or 1
    with _lock:
        if n != _size and _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=False)
            _pool = None
        _size = n
    return n


def _get() -> ProcessPoolExecutor | None:
    global _pool
    with _lock:
        if _size <= 1:
            return None
        if _pool is None:
            # forkserver: never fork the flow's process, which runs threads (Prefect, the runner).
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            _pool = ProcessPoolExecutor(max_workers=_size, mp_context=ctx)
        return _pool


def _broken(pool: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def call(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker process (inline when the pool is off)."""
    return starmap(fn, [args])[0]


def starmap(fn: Callable[..., T], arglists: Sequence[Sequence[Any]]) -> list[T]:
    """`[fn(*a) for a in arglists]`, spread over the worker processes, in order."""
    pool = _get()
    if pool is None or not arglists:
        return [fn(*a) for a in arglists]
    try:
        futures = [pool.submit(fn, *a) for a in arglists]
    except (BrokenProcessPool, RuntimeError):  # shut down or broken by another task: inline
        _broken(pool)
        return [fn(*a) for a in arglists]
    out: list[T] = []
    for fut, a in zip(futures, arglists):
        try:
            out.append(fut.result())
        except BrokenProcessPool:
            _broken(pool)
            out.append(fn(*a))
    return out
