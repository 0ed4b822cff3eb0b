"""aio.serve: a handler waiting for a record is stepped by the batch that brings
it (no Future, no extra loop iteration), and its wait behaves as a Future's
would under cancellation, timeouts, context variables and misuse."""

from __future__ import annotations

import asyncio
import contextvars
import select
from typing import Any

import pytest

from pydtls_ossl import ConnectionClosed, DtlsContext, aio
from pydtls_ossl._batch_io import batch_available

from .surfaces import async_echo

tag: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="unset")


def client_socket(connection: aio.AsyncDtlsConnection) -> Any:
    return connection._write.__self__.transport.get_extra_info("socket")  # type: ignore[attr-defined]


@pytest.mark.parametrize("batches", [pytest.param(True, id="recvmmsg"),
                                     pytest.param(False, id="recvfrom-loop")])
def test_reply_leaves_in_the_batch_that_brought_the_record(server_ctx: DtlsContext,
                                                          client_ctx: DtlsContext, batches: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if not batches:
        monkeypatch.setenv("PYDTLS_OSSL_BATCH_IO", "0")
    elif not batch_available():
        pytest.skip("recvmmsg: Linux only")

    async def main() -> None:
        async with await aio.serve(async_echo, "127.0.0.1", 0, context=server_ctx) as server:
            assert server.batched == batches and server._reading
            connection = await aio.connect("127.0.0.1", server.address[1], context=client_ctx)
            connection.send(b"warm")
            assert await asyncio.wait_for(connection.recv(), 5) == b"warm"
            await asyncio.sleep(0.05)  # the handler is waiting again
            loop = asyncio.get_running_loop()
            seen: asyncio.Future[tuple[bool, bool]] = loop.create_future()

            def one_callback() -> None:  # no loop iteration between the read and the check
                arrived = bool(select.select([server.sockets[0]], [], [], 2)[0])
                server._transport._readable()
                replied = bool(select.select([client_socket(connection)], [], [], 1)[0])
                seen.set_result((arrived, replied))

            connection.send(b"ping")
            loop.call_soon(one_callback)
            assert await seen == (True, True)
            assert await asyncio.wait_for(connection.recv(), 5) == b"ping"
            await connection.close()

    asyncio.run(main())


def test_waiting_handler_cancelled_timed_out_and_in_its_context(server_ctx: DtlsContext,
                                                                client_ctx: DtlsContext) -> None:
    outcome: dict[str, Any] = {}

    async def handler(conn: aio.AsyncDtlsConnection) -> None:
        tag.set(f"handler {conn.address[1]}")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.recv(), 0.05)  # cancels the wait
        outcome["after timeout"] = await conn.recv()
        outcome["context"] = tag.get()
        conn.send(b"ready")
        second = asyncio.ensure_future(conn.recv())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already waiting"):
            await conn.recv()
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        outcome["after cancel"] = await conn.recv()
        conn.send(b"done")
        waiting = asyncio.current_task()
        assert waiting is not None
        asyncio.get_running_loop().call_later(0.05, waiting.cancel, "stop")
        try:
            await conn.recv()
        except asyncio.CancelledError as exc:
            outcome["cancelled"] = exc.args
            raise

    async def main() -> None:
        async with await aio.serve(handler, "127.0.0.1", 0, context=server_ctx) as server:
            connection = await aio.connect("127.0.0.1", server.address[1], context=client_ctx)
            await asyncio.sleep(0.2)
            connection.send(b"one")
            assert await asyncio.wait_for(connection.recv(), 5) == b"ready"
            await asyncio.sleep(0.1)
            connection.send(b"two")
            assert await asyncio.wait_for(connection.recv(), 5) == b"done"
            await asyncio.sleep(0.2)
            with pytest.raises(ConnectionClosed):  # the cancelled handler closed its association
                await asyncio.wait_for(connection.recv(), 5)

    asyncio.run(main())
    assert outcome["after timeout"] == b"one"
    assert outcome["context"].startswith("handler ")
    assert outcome["after cancel"] == b"two"
    assert outcome["cancelled"] == ("stop",)


def test_a_cancelled_wait_stays_with_its_task() -> None:
    """One task's cancellation never lands on the next task to wait on the connection."""
    from pydtls_ossl._waiter import RecordWaiter

    async def main() -> tuple[bool, str]:
        waiter = RecordWaiter(asyncio.get_running_loop())

        async def wait() -> str:
            await waiter
            return "woken"

        first = asyncio.create_task(wait())
        await asyncio.sleep(0)
        assert waiter.waiting
        second = asyncio.create_task(wait())  # steps next: it waits once the first is cancelled
        asyncio.get_running_loop().call_soon(waiter.wake, True)  # then a record comes for it
        first.cancel("stop")  # its wake-up runs last
        assert not waiter.waiting
        done = await asyncio.gather(first, second, return_exceptions=True)
        return isinstance(done[0], asyncio.CancelledError), str(done[1])

    assert asyncio.run(main()) == (True, "woken")


@pytest.mark.parametrize("raised", [ValueError, KeyboardInterrupt])
def test_a_failed_handler_is_logged_an_interrupted_one_is_not(server_ctx: DtlsContext, client_ctx: DtlsContext,
                                                              raised: type[BaseException],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A handler's own failure is logged with its peer; Ctrl-C (or SIGTERM in a
    reuseport worker) reaching a handler stops the loop, and is no handler failure."""
    async def handler(connection: aio.AsyncDtlsConnection) -> None:
        await connection.recv()
        raise raised("from the handler")

    async def main() -> None:
        async with await aio.serve(handler, "127.0.0.1", 0, context=server_ctx) as server:
            connection = await aio.connect("127.0.0.1", server.address[1], context=client_ctx)
            connection.send(b"go")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(connection.recv(), 5)  # the handler's end closes it
            await connection.close()

    with caplog.at_level("ERROR", logger="pydtls_ossl"):
        if raised is KeyboardInterrupt:
            with pytest.raises(KeyboardInterrupt):
                asyncio.run(main())
        else:
            asyncio.run(main())
    logged = [r for r in caplog.records if "handler" in r.getMessage() and "failed" in r.getMessage()]
    assert len(logged) == (1 if raised is ValueError else 0)
