"""`prepare.executor=dask`: prepare's per-document batches on the workers of a Dask cluster,
an existing one (`prepare.cluster_address`, e.g. tcp://HOST:8786 of `dask scheduler`) or one
started here with `prepare.workers` processes and stopped at the end.

Dask rather than Ray, by measurement on a 2-core machine (BENCHMARKS.md, "Prepare on a
cluster"): a sixth of Ray's installed size, a local cluster up in about a second instead
of 3 to 6, and the same shards in less time.

Tasks carry their documents (the driver reads the inputs), so workers need lmforge installed,
not the input files.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lmforge.common import LmforgeError
from lmforge.data.executors import ordered_bounded

try:
    from distributed import Client, LocalCluster
    from distributed.comm import connect
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:
    raise LmforgeError(
        "prepare.executor=dask needs Dask: pip install 'lmforge[cluster]' "
        "(or pip install 'dask[distributed]'), or use --executor=local"
    ) from None

T = TypeVar("T")
R = TypeVar("R")
_PLUGIN = "lmforge-prepare-setup"


class _Setup(WorkerPlugin):
    """Runs `init(*initargs)` in every worker process, also in one that joins or is restarted
    later (Client.run would reach only the workers there now)."""

    def __init__(self, init: Callable[..., None], initargs: tuple):
        self.init, self.initargs = init, initargs

    def setup(self, worker: Any) -> None:
        self.init(*self.initargs)


def _check_scheduler(address: str, timeout_s: float) -> None:
    """Connect to `address` and finish Dask's handshake within `timeout_s`, or raise.

    Client(address, timeout=...) bounds the TCP connection but not the handshake after it,
    so an address where something else listens (a web server, the dashboard's port) would
    hang it for good."""

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout_s), timeout_s)
        await comm.close()

    with ThreadPoolExecutor(1) as thread:  # a fresh event loop, whatever runs in this thread
        thread.submit(asyncio.run, handshake()).result()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class DaskExecutor:
    def __init__(
        self,
        address: str,
        workers: int,
        timeout_s: float,
        init: Callable[..., None],
        initargs: tuple,
    ):
        self._cluster: LocalCluster | None = None
        self._client: Client | None = None
        self._registered = False
        try:
            if address:
                _check_scheduler(address, timeout_s)
                self._client = Client(address, timeout=timeout_s, set_as_default=False)
            else:
                self._cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,  # no dashboard; its HTTP server on a free port:
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # 8787 may be taken
                )
                self._client = Client(self._cluster, set_as_default=False)
            self._client.wait_for_workers(1, timeout=timeout_s)
        except Exception as e:  # refused, timed out, a bad address or something else answering
            self.close()
            if not address:
                raise LmforgeError(
                    f"prepare.executor=dask: a local cluster of {workers} workers did not start "
                    f"({_first_line(e)}); try --executor=local"
                ) from None
            raise LmforgeError(
                f"prepare.executor=dask: no Dask cluster with workers answered at {address} "
                f"within {timeout_s:g} s ({_first_line(e)}); check prepare.cluster_address "
                "(tcp://HOST:PORT), or leave it empty to start a local cluster"
            ) from None
        try:
            self._client.register_plugin(_Setup(init, initargs), name=_PLUGIN)
        except Exception as e:
            self.close()
            raise LmforgeError(
                f"prepare.executor=dask: the workers at {address} cannot set up lmforge's "
                f"cleaning ({_first_line(e)}); install this lmforge on every worker"
            ) from None
        self._registered = True
        self.workers = len(self._client.scheduler_info()["workers"])

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        client = self._client
        return ordered_bounded(
            lambda t: client.submit(fn, t, pure=False),
            lambda f: f.result(),
            tasks,
            2 * self.workers,
        )

    def close(self) -> None:
        if self._client is not None:
            if self._registered and self._cluster is None:
                self._client.unregister_worker_plugin(_PLUGIN)  # leave a shared cluster clean
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
