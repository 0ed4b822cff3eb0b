"""A bounded pool of threads for ``DtlsServer(handshake_workers=N)``.

The server core submits one job per handshaking peer at a time (the peer's
next datagram waits for the previous step's result), so the queue never holds
more than ``max_handshakes`` jobs and a peer's steps run in arrival order. A
job is a plain function of its arguments (which leaves this thread's OpenSSL
error queue empty); its result, or the exception it
raised, is appended to ``results`` for the core to apply on its own thread,
and ``notify()`` is called so a driver blocked in a wait notices. cffi
releases the GIL around each call into libssl, so public-key work in two
workers runs on two cores while the caller's thread carries established
records.

Threads start on the first job, not before (a server without handshakes
starts none), and ``stop()`` ends them: jobs not started are handed back,
running ones finish, and every thread is joined.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any, Callable

__all__ = ["HandshakePool"]

#: (key, function, arguments) or None, which ends one thread.
_Job = tuple[Any, Callable[..., Any], tuple[Any, ...]]


class HandshakePool:
    """``size`` threads running jobs; results in ``results`` as (key, result, error)."""

    def __init__(self, size: int, notify: Callable[[], None]) -> None:
        if size <= 0:
            raise ValueError("handshake_workers must be positive")
        self.size = size
        self.results: deque[tuple[Any, Any, BaseException | None]] = deque()
        self._notify = notify
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # start and stop, never the hot path

    @property
    def threads(self) -> list[threading.Thread]:
        """The running threads (empty before the first job and after ``stop()``)."""
        return list(self._threads)

    def submit(self, key: Any, function: Callable[..., Any], *args: Any) -> None:
        if not self._threads:
            self._start()
        self._jobs.put((key, function, args))

    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            for i in range(self.size):
                thread = threading.Thread(target=self._run, name=f"pydtls-handshake-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _run(self) -> None:
        jobs, results, notify = self._jobs, self.results, self._notify
        while (job := jobs.get()) is not None:
            key, function, args = job
            try:
                outcome: tuple[Any, Any, BaseException | None] = (key, function(*args), None)
            except BaseException as exc:  # a job's failure is its peer's, never the pool's
                outcome = (key, None, exc)
            results.append(outcome)  # deque.append is atomic
            try:
                notify()
            except Exception:  # a driver's wake-up must not end the worker
                pass

    def stop(self) -> list[Any]:
        """End every thread; return the keys of the jobs that never started."""
        with self._lock:
            threads, self._threads = self._threads, []
            cancelled: list[Any] = []
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    cancelled.append(job[0])
            for _ in threads:
                self._jobs.put(None)
            for thread in threads:
                thread.join()
            return cancelled
