"""Where `lmforge prepare` runs its per-document work (cleaning and MinHash signatures of
batches of documents, stage_docs.py): processes on this machine (`prepare.executor=local`),
or the workers of a Dask cluster (`dask`, executor_dask.py).

An executor only maps one function over a stream of tasks and hands the results back in task
order. Everything that must see all documents (dedup decisions, the split, the mixture, shard
order) stays with the caller, so the output does not depend on the executor, on the number of
workers, or on which worker ran what.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from lmforge.config import PrepareSettings

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        """`fn` over `tasks` on the workers, results in task order."""
        ...

    def close(self) -> None: ...


def ordered_bounded(
    submit: Callable[[T], Any], result: Callable[[Any], R], tasks: Iterable[T], in_flight: int
) -> Iterator[R]:
    """Results in task order, with at most `in_flight` tasks submitted and not yet collected
    (Pool.imap and Client.map read the whole input ahead: unbounded memory)."""
    queue: deque = deque()
    for t in tasks:
        queue.append(submit(t))
        if len(queue) >= in_flight:
            yield result(queue.popleft())
    while queue:
        yield result(queue.popleft())


class LocalExecutor:
    """`workers` processes on this machine, each set up once by `init(*initargs)`; with one
    worker, the work runs in this process."""

    def __init__(self, workers: int, init: Callable[..., None], initargs: tuple):
        self.workers = workers
        self._pool = None
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._pool = ctx.Pool(workers, init, initargs)
        else:
            init(*initargs)

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        if self._pool is None:
            return map(fn, tasks)
        pool = self._pool
        return ordered_bounded(
            lambda t: pool.apply_async(fn, (t,)), lambda r: r.get(), tasks, 2 * self.workers
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()


@contextmanager
def open_executor(
    p: PrepareSettings, init: Callable[..., None], initargs: tuple
) -> Iterator[Executor]:
    """The executor `p.executor` names, its workers set up by `init(*initargs)`; closed (a
    cluster started for it stopped) when the block ends."""
    workers = p.workers or os.cpu_count() or 1
    if p.executor == "dask":
        from lmforge.data.executor_dask import DaskExecutor

        ex: Executor = DaskExecutor(p.cluster_address, workers, p.cluster_timeout_s, init, initargs)
    else:
        ex = LocalExecutor(workers, init, initargs)
    try:
        yield ex
    finally:
        ex.close()
