"""Shared pieces for the surface tests: payloads, echo servers and clients."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any, Callable, Iterator

from pydtls_ossl import ConnectionClosed, DtlsContext
from pydtls_ossl import aio

MESSAGES = 1000
WINDOW = 32  # in flight at once: a burst of 1,000 would overflow a UDP receive buffer


def payloads(limit: int, count: int = MESSAGES) -> list[bytes]:
    """``count`` messages of every size from 1 to ``limit``, each distinct."""
    out = []
    for i in range(count):
        size = 1 + i % limit
        tag = i.to_bytes(2, "big")
        out.append((tag * size)[:size] if size >= 2 else bytes([i % 256]))
    return out


def windows(items: list[bytes]) -> Iterator[list[bytes]]:
    for start in range(0, len(items), WINDOW):
        yield items[start:start + WINDOW]


def check_echoes(sent: list[bytes], received: list[bytes]) -> None:
    assert Counter(received) == Counter(sent), "every message came back exactly once"


def blocking_echo_client(connect: Callable[[], Any], limit: int | None = None) -> None:
    """Send 1,000 messages of sizes 1..max over a blocking DtlsSocket; check the echoes."""
    sock = connect()
    with sock:
        sent = payloads(limit or sock.engine.max_write_size)
        received = []
        for window in windows(sent):
            for message in window:
                sock.send(message)
            for _ in window:
                received.append(sock.recv())
        check_echoes(sent, received)


async def async_echo_client(host: str, port: int, context: DtlsContext,
                            limit: int | None = None, **kw: Any) -> None:
    connection = await aio.connect(host, port, context=context, timeout=10, **kw)
    async with connection:
        sent = payloads(limit or connection._engine.max_write_size)
        received = []
        for window in windows(sent):
            for message in window:
                connection.send(message)
            for _ in window:
                received.append(await asyncio.wait_for(connection.recv(), 10))
        check_echoes(sent, received)


async def async_echo(connection: aio.AsyncDtlsConnection) -> None:
    async for message in connection:
        connection.send(message)


class BlockingEchoServer:
    """A ``DtlsListener`` echoing every peer, each in its own thread."""

    def __init__(self, context: DtlsContext, host: str = "127.0.0.1", **limits: Any) -> None:
        self.listener = context.listen((host, 0), **limits)
        self.port = self.listener.address[1]
        self.errors: list[BaseException] = []
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                connection = self.listener.accept(timeout=0.2)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            self.served += 1
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    def _echo(self, connection: Any) -> None:
        try:
            while True:
                connection.send(connection.recv())
        except ConnectionClosed:
            pass
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(5)

    def __enter__(self) -> BlockingEchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        assert not self.errors, self.errors
