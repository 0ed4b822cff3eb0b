"""Blocking sockets and asyncio over real UDP on 127.0.0.1 (and ::1), crossed."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from pydtls_ossl import ConnectionClosed, DtlsContext, Verify, aio

from .surfaces import (BlockingEchoServer, async_echo, async_echo_client, blocking_echo_client)


def blocking_client(ctx: DtlsContext, port: int, host: str = "127.0.0.1") -> Any:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = ctx.wrap_socket(socket.socket(family, socket.SOCK_DGRAM))
    sock.settimeout(10)
    sock.connect((host, port))
    return sock


def test_blocking_client_with_blocking_server(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    with BlockingEchoServer(server_ctx) as server:
        blocking_echo_client(lambda: blocking_client(client_ctx, server.port))


def test_asyncio_client_with_asyncio_server(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    async def main() -> None:
        async with await aio.serve(async_echo, "127.0.0.1", 0, context=server_ctx) as server:
            await async_echo_client("127.0.0.1", server.address[1], client_ctx)
    asyncio.run(main())


def test_blocking_client_with_asyncio_server(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    async def main() -> None:
        async with await aio.serve(async_echo, "127.0.0.1", 0, context=server_ctx) as server:
            port = server.address[1]
            await asyncio.to_thread(blocking_echo_client, lambda: blocking_client(client_ctx, port))
    asyncio.run(main())


def test_asyncio_client_with_blocking_server(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    with BlockingEchoServer(server_ctx) as server:
        asyncio.run(async_echo_client("127.0.0.1", server.port, client_ctx))


def test_ipv6_both_surfaces(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    async def main() -> None:
        async with await aio.serve(async_echo, "::1", 0, context=server_ctx) as server:
            connection = await aio.connect("::1", server.address[1], context=client_ctx)
            connection.send(b"over IPv6")
            assert await asyncio.wait_for(connection.recv(), 5) == b"over IPv6"
            await connection.close()
    asyncio.run(main())
    with BlockingEchoServer(server_ctx, host="::1") as server, \
            blocking_client(client_ctx, server.port, "::1") as sock:
        sock.send(b"blocking over IPv6")
        assert sock.recv() == b"blocking over IPv6"


def test_empty_send_is_a_no_op_and_bufsize_never_truncates(server_ctx: DtlsContext,
                                                           client_ctx: DtlsContext) -> None:
    with BlockingEchoServer(server_ctx) as server, blocking_client(client_ctx, server.port) as sock:
        assert sock.send(b"") == 0
        sock.send(b"0123456789")
        with pytest.raises(ValueError, match="more than bufsize=4"):
            sock.recv(4)
        assert sock.recv(10) == b"0123456789", "the record was kept, not cut"
        assert sock.getpeercert()["subject"] == "CN=server.test"
        assert sock.getpeercert(binary_form=True)[:1] == b"\x30"


def test_blocking_timeouts(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        sock = client_ctx.wrap_socket(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.connect(silent.getsockname())
        sock.close()
    with BlockingEchoServer(server_ctx) as server, blocking_client(client_ctx, server.port) as sock:
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv()
        with pytest.raises(TimeoutError):
            server.listener.accept(timeout=0.1)


def test_asyncio_server_with_100_concurrent_clients(server_ctx: DtlsContext,
                                                    client_ctx: DtlsContext) -> None:
    async def one(port: int, i: int) -> bytes:
        connection = await aio.connect("127.0.0.1", port, context=client_ctx, timeout=20)
        async with connection:
            connection.send(b"client %d" % i)
            return await asyncio.wait_for(connection.recv(), 20)

    async def main() -> None:
        async with await aio.serve(async_echo, "127.0.0.1", 0, context=server_ctx) as server:
            replies = await asyncio.gather(*(one(server.address[1], i) for i in range(100)))
            assert replies == [b"client %d" % i for i in range(100)]
            assert server.core.stats.handshakes_completed == 100
            await asyncio.sleep(0.2)
            assert len(server.core) == 0, "every client closed; nothing left"
    asyncio.run(main())


def test_cancelled_connect_leaves_nothing_behind(server_ctx: DtlsContext,
                                                 client_ctx: DtlsContext) -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            task = asyncio.create_task(aio.connect("127.0.0.1", silent.getsockname()[1],
                                                   context=client_ctx))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []
        with pytest.raises(asyncio.TimeoutError):
            await aio.connect("127.0.0.1", 9, context=client_ctx, timeout=0.3)
    asyncio.run(main())


def test_server_close_mid_handshake_and_after(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def slow_handler(connection: aio.AsyncDtlsConnection) -> None:
            gate.set()
            await connection.recv()

        server = await aio.serve(slow_handler, "127.0.0.1", 0, context=server_ctx,
                                 handshake_timeout=0.5)
        port = server.address[1]
        # a client that starts a handshake and vanishes: reclaimed by the deadline
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        from pydtls_ossl import Dtls
        half = Dtls(context=client_ctx)
        half.handshake()
        raw.sendto(half.pull(), ("127.0.0.1", port))  # type: ignore[arg-type]
        connection = await aio.connect("127.0.0.1", port, context=client_ctx)
        await asyncio.wait_for(gate.wait(), 5)
        assert len(server.core) == 1
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
        assert len(server.core) == 0 and not server._tasks
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(connection.recv(), 5)  # the server's close_notify
        raw.close()
    asyncio.run(main())


def test_handshake_failure_surfaces_in_connect(server_ctx: DtlsContext) -> None:
    from pydtls_ossl import FingerprintMismatch

    async def main() -> None:
        async with await aio.serve(async_echo, "127.0.0.1", 0, context=server_ctx) as server:
            with pytest.raises(FingerprintMismatch):
                await aio.connect("127.0.0.1", server.address[1], context=DtlsContext(),
                                  expected_peer_fingerprint="AB:" * 31 + "AB")
    asyncio.run(main())


def test_psk_over_asyncio() -> None:
    key = bytes(16)

    async def main() -> None:
        server_ctx = DtlsContext(psk_keys={"dev": key}, verify=Verify.NONE)
        async with await aio.serve(async_echo, "127.0.0.1", 0, context=server_ctx) as server:
            connection = await aio.connect("127.0.0.1", server.address[1],
                                           context=DtlsContext(psk=("dev", key)))
            connection.send(b"psk")
            assert await asyncio.wait_for(connection.recv(), 5) == b"psk"
            assert connection.psk_identity() == "dev"
            await connection.close()
    asyncio.run(main())


def test_listener_waits_for_the_socket_without_holding_its_lock(certs: Any) -> None:
    """The listener's lock is free while a caller waits for datagrams, so another
    thread's send() or recv() never queues behind that wait (it once did: a
    100 ms round trip per echo with accept() in one thread and recv() in another)."""
    import threading as _threading

    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    with ctx.listen(("127.0.0.1", 0)) as listener:
        waiter = _threading.Thread(target=lambda: pytest.raises(TimeoutError, listener.accept,
                                                                timeout=1.0))
        waiter.start()
        free = 0
        for _ in range(200):
            if listener._lock.acquire(blocking=False):
                free += 1
                listener._lock.release()
            _threading.Event().wait(0.002)
        waiter.join()
    assert free >= 180, f"the lock was free only {free} times out of 200"


@pytest.mark.parametrize("reader", ["drives the socket", "waits while accept() drives"])
def test_closing_a_connection_wakes_the_thread_reading_it(server_ctx: DtlsContext, client_ctx: DtlsContext,
                                                          reader: str) -> None:
    """close() from one thread ends another's recv() on that peer at once, whether
    the reader was the one waiting for the socket or was waiting for its turn."""
    import threading as _threading
    import time as _time

    with server_ctx.listen(("127.0.0.1", 0)) as listener:
        accepted: list[Any] = []
        acceptor = _threading.Thread(target=lambda: accepted.append(listener.accept(timeout=10)))
        acceptor.start()
        client = blocking_client(client_ctx, listener.address[1])
        acceptor.join()
        conn = accepted[0]
        if reader != "drives the socket":  # accept() takes the socket first, until the listener closes
            def accept_nothing() -> None:
                with pytest.raises(ConnectionClosed):
                    listener.accept(timeout=10)

            acceptor = _threading.Thread(target=accept_nothing, daemon=True)
            acceptor.start()
            while not listener._pumping:
                _time.sleep(0.001)
        outcome: list[BaseException] = []

        def read() -> None:
            try:
                conn.recv()
            except BaseException as exc:
                outcome.append(exc)

        thread = _threading.Thread(target=read, daemon=True)
        thread.start()
        while not (listener._pumping and (reader == "drives the socket" or listener._waiting)):
            _time.sleep(0.001)
        conn.close()
        thread.join(2)
        assert not thread.is_alive(), "recv() still waits after close()"
        assert isinstance(outcome[0], ConnectionClosed)
        client.close()
