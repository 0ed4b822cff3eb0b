"""The blocking listener and the asyncio server, batched and not, serving many clients at once."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from pydtls_ossl import DtlsContext, aio
from pydtls_ossl._batch_io import batch_available

CLIENTS, MESSAGES = 24, 8
MODES = [pytest.param(None, id="batched"), pytest.param(False, id="fallback")]


def messages(i: int) -> list[bytes]:
    return [b"%d-%d:" % (i, j) + bytes([j]) * (j * 150) for j in range(MESSAGES)]  # up to 1050 B


@pytest.mark.parametrize("batch_io", MODES)
def test_blocking_listener_serves_many_clients(server_ctx: DtlsContext, client_ctx: DtlsContext,
                                               batch_io: bool | None) -> None:
    with server_ctx.listen(("127.0.0.1", 0), batch_io=batch_io) as listener:
        assert listener.batched == (batch_io is None and batch_available())
        port = listener.address[1]

        def echo(conn: Any) -> None:
            for _ in range(MESSAGES):
                conn.send(conn.recv())

        def accept() -> None:
            for _ in range(CLIENTS):
                threading.Thread(target=echo, args=(listener.accept(timeout=30),), daemon=True).start()
        threading.Thread(target=accept, daemon=True).start()
        errors: list[BaseException] = []
        answers: dict[int, list[bytes]] = {}

        def client(i: int) -> None:
            try:
                with client_ctx.wrap_socket(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
                    sock.settimeout(30)
                    sock.connect(("127.0.0.1", port))
                    got = []
                    for m in messages(i):
                        sock.send(m)
                        got.append(sock.recv())
                    answers[i] = got
            except BaseException as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert answers == {i: messages(i) for i in range(CLIENTS)}


@pytest.mark.parametrize("batch_io", MODES + [pytest.param("reader", id="unbatched-reader")])
def test_asyncio_server_serves_many_clients(server_ctx: DtlsContext, client_ctx: DtlsContext,
                                            batch_io: bool | str | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``reader``: no batches (as where the platform has none), the server still
    reading its socket itself, a recvfrom loop per loop iteration."""
    reader = batch_io == "reader"
    if reader:
        monkeypatch.setenv("PYDTLS_OSSL_BATCH_IO", "0")
        batch_io = None
    async def echo(conn: aio.AsyncDtlsConnection) -> None:
        async for message in conn:
            conn.send(message)

    async def client(port: int, i: int) -> list[bytes]:
        conn = await aio.connect("127.0.0.1", port, context=client_ctx, timeout=30)
        got = []
        for m in messages(i):  # one in flight
            conn.send(m)
            got.append(await asyncio.wait_for(conn.recv(), 30))
        burst = [b"burst %d %d" % (i, k) for k in range(10)]  # many in flight at once
        for m in burst:
            conn.send(m)
        got += [await asyncio.wait_for(conn.recv(), 30) for _ in burst]
        await conn.close()
        return got

    async def main() -> None:
        async with await aio.serve(echo, "127.0.0.1", 0, context=server_ctx,
                                   batch_io=batch_io) as server:  # type: ignore[arg-type]
            assert server.batched == (batch_io is None and batch_available())
            assert server._reading == (batch_io is None)
            server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            port = server.address[1]
            results = await asyncio.gather(*(client(port, i) for i in range(CLIENTS)))
        for i, got in enumerate(results):
            assert got == messages(i) + [b"burst %d %d" % (i, k) for k in range(10)]
    asyncio.run(main())


def test_asyncio_batched_server_on_ipv6(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")

    async def echo(conn: aio.AsyncDtlsConnection) -> None:
        async for message in conn:
            conn.send(message)

    async def main() -> None:
        async with await aio.serve(echo, "::1", 0, context=server_ctx) as server:
            conn = await aio.connect("::1", server.address[1], context=client_ctx, timeout=30)
            conn.send(b"six")
            assert await asyncio.wait_for(conn.recv(), 30) == b"six"
            await conn.close()
    asyncio.run(main())
