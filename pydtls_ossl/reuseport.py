"""Several processes serving one UDP port (``SO_REUSEPORT``): one per core.

``serve_workers(handler, host, port, context=ctx, workers=N)`` forks N
processes, each running ``aio.serve(..., reuse_port=True)`` on the same port;
the kernel spreads peers over them by their address. Because the processes
are forked from the one that made ``ctx``, they share its cookie secret (a
HelloVerifyRequest from one worker is honoured by all), its ticket and
association keys, and any store it names. ``run_workers(N, target)`` is the
same supervision for any per-process server (a blocking ``ctx.listen(...,
reuse_port=True)`` loop, say).

The parent only supervises: SIGTERM or SIGINT to it is passed to every worker
(with ``export_on_close`` a worker then moves its peers into the store), and it
returns when all have exited. POSIX only (``fork``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, Callable

from .aio import Handler, serve
from .context import DtlsContext

__all__ = ["run_workers", "serve_workers"]


def run_workers(count: int, target: Callable[[int], object], *,
                on_ready: Callable[[list[int]], None] | None = None) -> list[int]:
    """Fork ``count`` processes running ``target(index)``; wait for them all.

    Returns their exit statuses (0: ``target`` returned, 1: it raised, or the
    negated signal that ended it). ``on_ready(pids)`` is called in the parent
    once every worker is started. A second SIGTERM/SIGINT kills the workers.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"workers must be a positive number, got {count!r}")
    if not hasattr(os, "fork"):
        raise OSError("run_workers needs fork() (POSIX)")
    pids: list[int] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                signal.signal(signal.SIGTERM, signal.default_int_handler)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                target(index)
                status = 0
            except KeyboardInterrupt:
                status = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(status)
        pids.append(pid)
    signals = {"count": 0}

    def forward(signum: int, _frame: Any) -> None:
        signals["count"] += 1
        for pid in pids:
            try:
                os.kill(pid, signum if signals["count"] == 1 else signal.SIGKILL)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_ready is not None:
            on_ready(list(pids))
        statuses: dict[int, int] = {}
        while len(statuses) < len(pids):
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:  # pragma: no cover (PEP 475 retries)
                continue
            if pid in pids:
                statuses[pid] = (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                                 else -os.WTERMSIG(status))
        return [statuses.get(pid, 1) for pid in pids]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve_workers(handler: Handler, host: str, port: int, *, context: DtlsContext,
                  workers: int = os.cpu_count() or 1,
                  on_ready: Callable[[list[int]], None] | None = None,
                  **serve_options: Any) -> list[int]:
    """``aio.serve`` in ``workers`` processes on one port; returns when they all end.

    ``serve_options`` go to ``aio.serve`` (``export_on_close``, limits, an
    ``association_store`` shared by the workers, ...). A worker ends on
    SIGTERM/SIGINT (``serve_forever()`` closes the server; with
    ``export_on_close`` its peers move to the store for the others).
    """
    if port == 0:
        raise ValueError("serve_workers needs a fixed port: each worker binds it with SO_REUSEPORT")

    def worker(_index: int) -> None:
        async def main() -> None:
            server = await serve(handler, host, port, context=context, reuse_port=True,
                                 **serve_options)
            loop = asyncio.get_running_loop()
            for s in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(s, server.close)
            await server.serve_forever()

        asyncio.run(main())

    return run_workers(workers, worker, on_ready=on_ready)
