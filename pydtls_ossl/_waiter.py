"""A handler's wait for its next record, resumed by the batch that brings it."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any, Callable, Generator


def outside_tasks(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether no task of ``loop`` runs now, so a waiting one may be stepped inline."""
    return asyncio.current_task(loop) is None


class RecordWaiter:
    """What ``AsyncDtlsConnection.recv()`` awaits: asyncio's future protocol
    (``_asyncio_future_blocking``, ``add_done_callback``, ``result``,
    ``cancel``, ``_loop``) without being a Future. One per connection,
    reused by every wait: no Future per record.

    A Future wakes its task through ``call_soon``: one more event-loop
    iteration (and ``epoll_wait``) per record, the reply leaving in another
    batch than the one that brought the record. ``wake(inline=True)`` steps the
    waiting task at once, from the callback delivering the record, so its reply
    joins that batch's ``sendmmsg``. Only where no task is running
    (``outside_tasks``): asyncio refuses to step a task inside another's step.
    """

    __slots__ = ("_loop", "_callback", "_context", "_asyncio_future_blocking")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._callback: Callable[[Any], object] | None = None
        self._context: contextvars.Context | None = None
        self._asyncio_future_blocking = False

    @property
    def waiting(self) -> bool:
        """Whether a task waits on it now."""
        return self._callback is not None

    def __await__(self) -> Generator[RecordWaiter, None, None]:
        if self._callback is not None:
            raise RuntimeError("recv() is already waiting for this connection in another task")
        self._asyncio_future_blocking = True
        yield self  # the task registers through add_done_callback

    def wake(self, inline: bool) -> None:
        """Resume the waiting task, if any: now (``inline``) or on the next loop iteration."""
        callback, context = self._callback, self._context
        if callback is None or context is None:
            return
        self._callback = self._context = None
        if inline:
            context.run(callback, self)
        else:
            self._loop.call_soon(callback, self, context=context)

    # ---- the protocol asyncio.Task speaks to what a coroutine yields (it reads the
    # loop from ``_loop`` when there is no ``get_loop()`` to call)
    def add_done_callback(self, fn: Callable[[Any], object], *,
                          context: contextvars.Context | None = None) -> None:
        self._callback, self._context = fn, context if context is not None else contextvars.copy_context()

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        if self._callback is not fn:
            return 0
        self._callback = self._context = None
        return 1

    def done(self) -> bool:
        return self._callback is None

    def cancelled(self) -> bool:
        return False

    def result(self) -> None:
        return None

    def cancel(self, msg: Any = None) -> bool:
        """``Task.cancel()`` of the waiting task: it wakes with ``CancelledError``.

        It is handed a cancelled Future to take its result from, so the
        cancellation stays with that task even if another one waits here next.
        """
        callback, context = self._callback, self._context
        if callback is None:
            return False
        self._callback = self._context = None
        cancelled = self._loop.create_future()
        cancelled.cancel(msg)
        self._loop.call_soon(callback, cancelled, context=context)
        return True

    def __repr__(self) -> str:
        return f"<RecordWaiter {'waiting' if self.waiting else 'idle'}>"

