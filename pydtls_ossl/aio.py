"""asyncio surface: ``await connect(...)`` and ``await serve(handler, ...)``.

Both drive the sans-IO engine and server core: feed what arrives, send what
is queued, re-arm one ``loop.call_at`` timer. The client is a
``DatagramProtocol``; the server reads its socket with ``loop.add_reader``,
on Linux with ``recvmmsg`` (one trip per batch of datagrams from the socket
to the core and back out through ``sendmmsg``), elsewhere with a ``recvfrom``
loop; with ``batch_io=False`` (or a loop without ``add_reader``) it is a
``DatagramProtocol`` too.
Memory stays bounded: a client reads straight from the engine (which keeps at
most 1 MiB unread), a server connection keeps at most ``max_queued_records``
unread records and drops newer ones, as a full UDP socket buffer would.
``send()`` never blocks; ``await drain()`` waits while the transport is full.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from collections import deque
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine

from ._batch_io import will_batch
from ._waiter import RecordWaiter, outside_tasks
from ._errors import ConnectionClosed, DtlsError
from .context import DtlsContext
from .engine import Dtls
from .server import (Address, AddressChanged, ConnectionEstablished, ConnectionEvicted, ConnectionRestored,
                     ConnectionTerminated, DataReceived, DtlsServer)
from .server_socket import ServerSocket
from .sockets import Introspection

__all__ = ["AsyncDtlsConnection", "AsyncDtlsServer", "connect", "serve"]

_log = logging.getLogger("pydtls_ossl")


class _Timer:
    """One ``call_at`` for whatever sans-IO object owns it, moved only when needed.

    Re-arming for a later time keeps the handle that fires earlier: firing
    early costs one ``handle_timeout()`` that finds nothing due and re-arms,
    where a cancel and a new ``call_at`` per datagram cost every datagram.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[], None]) -> None:
        self._loop, self._fire = loop, fire
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, seconds: float | None) -> None:
        handle = self._handle
        if seconds is None:
            return  # nothing due: a pending handle fires once, harmlessly, or is cancelled
        when = self._loop.time() + seconds
        if handle is not None:
            if handle.when() <= when:
                return
            handle.cancel()
        self._handle = self._loop.call_at(when, self._run)

    def _run(self) -> None:
        self._handle = None
        self._fire()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _read_size(transport: asyncio.BaseTransport) -> None:
    """Read datagrams into 64 KiB, not asyncio's 256 KiB: a buffer that large is an
    mmap, mremap and munmap per datagram (2.3x the echoes once smaller)."""
    if getattr(transport, "max_size", 0) > 65536:
        transport.max_size = 65536  # type: ignore[attr-defined]


class _FlowControl:
    """Tracks pause_writing/resume_writing for ``drain()``."""

    def __init__(self) -> None:
        self._resumed = asyncio.Event()
        self._resumed.set()

    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    async def drain(self) -> None:
        await self._resumed.wait()


class AsyncDtlsConnection(Introspection):
    """One association: ``await recv()``, ``send()``, ``async for``, ``await close()``."""

    def __init__(self, engine: Dtls, address: Address, write: Callable[[bytes], int] | None,
                 close: Callable[[], None], flow: _FlowControl, reads_engine: bool) -> None:
        self._engine = engine
        self.address = address
        self._write = write
        self._close = close
        self._reads_engine = reads_engine
        self._flow = flow
        self._received: deque[bytes] = deque()
        self._loop = loop = asyncio.get_running_loop()  # (asking each time is a getpid() syscall)
        self._waiter = RecordWaiter(loop)
        self._ended: BaseException | None = None
        self.dropped = 0

    # fed by the protocols
    def _wake(self, inline: bool = False) -> None:
        self._waiter.wake(inline)

    def _end(self, error: BaseException) -> None:
        if self._ended is None:
            self._ended = error
        self._waiter.wake(False)

    def recv(self) -> Coroutine[Any, Any, bytes]:
        """The next record's plaintext; ``ConnectionClosed`` once the association ends.

        A coroutine, as from ``async def``: ``await conn.recv()``."""
        return self._receive(False)

    async def _receive(self, iterating: bool) -> bytes:
        """``recv()``, or ``async for``'s next (``StopAsyncIteration`` at the close)."""
        received = self._received
        while True:
            if received:  # the common case on a server: already delivered
                return received.popleft()
            if self._reads_engine and self._engine.state.name != "CLOSED":
                try:
                    data = self._engine.read()  # a client reads its engine's bounded queue
                except DtlsError as exc:
                    self._end(exc)
                    data = None
                if data is not None:
                    return data
            ended = self._ended
            if ended is not None:
                if not isinstance(ended, ConnectionClosed):
                    raise ended
                if iterating:
                    raise StopAsyncIteration
                raise ConnectionClosed(str(ended))
            await self._waiter

    def send(self, data: bytes) -> int:
        """Send one record now; never blocks (see ``drain()``)."""
        if self._ended is not None:
            raise ConnectionClosed(f"association ended: {self._ended}")
        assert self._write is not None  # (a server connection has its own send())
        return self._write(data)

    async def drain(self) -> None:
        """Wait until the transport is ready for more."""
        await self._flow.drain()

    async def close(self) -> None:
        """Send close_notify and end the association."""
        self._close_now()
        await asyncio.sleep(0)

    def _close_now(self) -> None:
        """``close()`` but for its yield: close_notify out and the association ended, once."""
        if self._ended is None:
            self._close()
            self._end(ConnectionClosed("the association was closed by close()"))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    def __anext__(self) -> Coroutine[Any, Any, bytes]:  # one coroutine per record, no wrapper
        return self._receive(True)

    async def __aenter__(self) -> AsyncDtlsConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _ServerConnection(AsyncDtlsConnection):
    """A server's connection: ``send()`` goes straight to the server core."""

    def __init__(self, server: AsyncDtlsServer, engine: Dtls, address: Address) -> None:
        super().__init__(engine, address, None, functools.partial(server._close_peer, address),
                         server._flow, reads_engine=False)
        self._server = server
        self._core_send = server._core.send

    def send(self, data: bytes) -> int:
        """Send one record now; never blocks (see ``drain()``)."""
        if self._ended is not None:
            raise ConnectionClosed(f"association ended: {self._ended}")
        n = self._core_send(self.address, data)
        server = self._server
        if not server._delivering:  # else _after_io, stepping this handler, sends after
            server._sent()
        return n


# ------------------------------------------------------------------ client

class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self, engine: Dtls, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.transport: asyncio.DatagramTransport | None = None
        self.handshake_done: asyncio.Future[None] = loop.create_future()
        self.flow = _FlowControl()
        self.timer = _Timer(loop, self._on_timer)
        self.connection: AsyncDtlsConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _read_size(transport)
        self._step(self.engine.handshake)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        readable = self.engine.feed(data)
        self._step(None)
        if readable and self.connection is not None:
            self.connection._wake(outside_tasks(self.connection._loop))

    def _step(self, action: Callable[[], Any] | None) -> None:
        engine = self.engine
        try:
            if action is not None:
                action()
            if not self.handshake_done.done():
                if engine.state.name in ("FAILED", "CLOSED", "PEER_CLOSED"):
                    engine.handshake()  # raises the reason
                elif engine.is_handshake_finished():
                    self.handshake_done.set_result(None)
        except DtlsError as exc:
            if not self.handshake_done.done():
                self.handshake_done.set_exception(exc)
        if self.connection is not None and engine.state.name in ("FAILED", "PEER_CLOSED"):
            self.connection._wake()  # recv() raises the reason
        self.send_datagrams()
        self.timer.arm(engine.get_timeout())

    def _on_timer(self) -> None:
        self._step(self.engine.handle_timeout)

    def send_datagrams(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        while (datagram := self.engine.pull()) is not None:
            self.transport.sendto(datagram)

    def write(self, data: bytes) -> int:
        n = self.engine.write(data)
        self.send_datagrams()
        return n

    def close(self) -> None:
        self.engine.close()
        self.send_datagrams()
        self.timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def error_received(self, exc: Exception) -> None:
        _log.debug("DTLS client socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        if not self.handshake_done.done():
            self.handshake_done.set_exception(ConnectionClosed("the socket closed"))
        if self.connection is not None:
            self.connection._end(ConnectionClosed("the socket closed"))

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()


async def connect(host: str, port: int, *, context: DtlsContext | None = None,
                  expected_peer_fingerprint: str | list[str] | None = None,
                  server_hostname: str | None = None, timeout: float | None = 30.0,
                  local_addr: tuple[str, int] | None = None,
                  session: bytes | None = None) -> AsyncDtlsConnection:
    """Open a UDP socket to ``host:port`` and complete a DTLS handshake.

    ``session=`` (bytes from an earlier connection's ``session()``) asks to
    resume. Cancelling (or the timeout) closes the socket and frees the
    association.
    """
    loop = asyncio.get_running_loop()
    engine = Dtls(context=context, expected_peer_fingerprint=expected_peer_fingerprint,
                  server_hostname=server_hostname, session=session)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _ClientProtocol(engine, loop), remote_addr=(host, port), family=family,
        local_addr=local_addr)
    try:
        await asyncio.wait_for(asyncio.shield(protocol.handshake_done), timeout)
    except BaseException:
        protocol.handshake_done.cancel()  # nobody will wait for it now
        protocol.close()
        raise
    connection = AsyncDtlsConnection(engine, transport.get_extra_info("peername"), protocol.write,
                                     protocol.close, protocol.flow, reads_engine=True)
    protocol.connection = connection
    return connection


# ------------------------------------------------------------------ server

class _ServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: AsyncDtlsServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server._transport = transport
        _read_size(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._core.feed(data, addr)
        self.server._after_io()

    def error_received(self, exc: Exception) -> None:
        _log.debug("DTLS server socket error: %s", exc)

    def pause_writing(self) -> None:
        self.server._flow.pause()

    def resume_writing(self) -> None:
        self.server._flow.resume()


class _SocketEndpoint:
    """The server's socket without a transport: ``add_reader`` + a ``ServerSocket``
    (``recvmmsg`` in, ``sendmmsg`` out; a ``recvfrom`` loop and ``sendto`` where the
    platform has no batches). Answers what ``AsyncDtlsServer`` asks of a transport.
    A full socket buffer keeps what did not go in the ``ServerSocket``'s bounded
    backlog, flushed when the socket is writable, ``drain()`` waiting meanwhile.
    """

    _PER_ITERATION = 256  # datagrams read per loop iteration: timers and handlers get their turn

    def __init__(self, server: AsyncDtlsServer, sock: socket.socket, batch_io: bool | None) -> None:
        self._server, self._sock = server, sock
        self._io = ServerSocket(server._core, sock, batch_io=batch_io)
        self._fd = sock.fileno()
        self._loop = server._loop
        self._closing = False
        self._waiting_writable = False
        self._loop.add_reader(self._fd, self._readable)

    @property
    def dropped(self) -> int:
        return self._io.dropped

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sock.getsockname()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def _readable(self) -> None:
        try:
            got = self._io.receive(self._PER_ITERATION)
        except OSError as exc:
            _log.debug("DTLS server socket error: %s", exc)
            return
        if got:
            self._server._after_io()

    def send_due(self) -> None:
        """Everything the server core has due, out (or waiting for a writable socket)."""
        if not self._waiting_writable and not self._io.flush():
            self._waiting_writable = True
            self._loop.add_writer(self._fd, self._writable)
            self._server._flow.pause()

    def _writable(self) -> None:
        if not self._io.flush():
            return
        self._waiting_writable = False
        self._loop.remove_writer(self._fd)
        self._server._flow.resume()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if self._waiting_writable:
            self._loop.remove_writer(self._fd)
            self._waiting_writable = False
        self._io.clear()
        self._sock.close()


Handler = Callable[[AsyncDtlsConnection], Awaitable[None]]


class AsyncDtlsServer:
    """Serves many peers on one socket; ``handler(connection)`` runs per peer."""

    def __init__(self, handler: Handler, context: DtlsContext, max_queued_records: int,
                 limits: dict[str, Any], export_on_close: bool = False) -> None:
        self._handler = handler
        self._core = DtlsServer(context, **limits)
        if export_on_close and self._core.association_store is None:
            raise ValueError("export_on_close needs association_store=")
        self._export_on_close = export_on_close
        self._loop = asyncio.get_running_loop()
        self._transport: Any = None  # a DatagramTransport, or a _SocketEndpoint
        self._batched = False  # recvmmsg/sendmmsg
        self._reading = False  # its own add_reader and ServerSocket, not a transport
        self._burst = 0  # records the last input woke handlers for: > 1 gathers the replies
        self._delivering = False  # handlers run inside _after_io: it sends their replies
        self._flush_pending = False
        self._timer = _Timer(self._loop, self._on_timer)
        self._flow = _FlowControl()
        self._connections: dict[Address, AsyncDtlsConnection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._max_queued = max_queued_records
        self._closed = asyncio.Event()
        self._core.wakeup = self._wake

    @property
    def core(self) -> DtlsServer:
        return self._core

    def _wake(self) -> None:
        """From any thread: send what ``core.send_threadsafe()`` queued."""
        self._loop.call_soon_threadsafe(self._after_io)  # also applies handshake workers' results

    @property
    def sockets(self) -> list[socket.socket]:
        sock = None if self._transport is None else self._transport.get_extra_info("socket")
        return [] if sock is None else [sock]

    @property
    def address(self) -> Any:
        assert self._transport is not None
        return self._transport.get_extra_info("sockname")

    @property
    def batched(self) -> bool:
        """Whether the socket is read and written with recvmmsg/sendmmsg."""
        return self._batched

    def _after_io(self) -> None:
        """The core's events to the connections, then its datagrams out.

        Outside any task (a socket, timer or thread wake-up) a handler waiting
        for a record is stepped right here, so the replies to one batch leave
        in one ``sendmmsg`` after it, in the same loop iteration. Called from a
        handler (``close()``), the others wake on the next iteration instead.
        """
        burst, connections, limit = 0, self._connections, self._max_queued
        inline = outside_tasks(self._loop)
        delivering, self._delivering = self._delivering, inline
        try:
            for event in self._core._take_events():
                if type(event) is DataReceived:  # the common case first, delivered here
                    connection = connections.get(event.address)
                    if connection is not None:
                        received = connection._received
                        if len(received) >= limit:
                            connection.dropped += 1
                        else:
                            received.append(event.data)
                            waiter = connection._waiter
                            callback = waiter._callback
                            if callback is not None:  # its handler waits
                                if inline:  # waiter.wake(True), less a call per record
                                    context = waiter._context
                                    waiter._callback = waiter._context = None
                                    context.run(callback, waiter)  # type: ignore[union-attr]
                                else:
                                    waiter.wake(False)
                        burst += 1
                else:
                    self._on_event(event)
        finally:
            self._delivering = delivering
        self._burst = 0 if inline else burst
        self._send_datagrams()
        if burst > 1 and not inline and self._reading:
            self._flush_soon()  # queued behind the handlers just woken: in the same iteration
        self._timer.arm(self._core.get_timeout())

    def _on_event(self, event: object) -> None:
        """Any event but a record: a connection starts, ends, or moves."""
        if isinstance(event, (ConnectionEstablished, ConnectionRestored)):
            engine = self._core.connection(event.address)
            assert engine is not None
            address = event.address
            conn = _ServerConnection(self, engine, address)
            self._connections[address] = conn
            running = self._handler(conn)
            # the handler's own coroutine is the task, without a wrapper frame
            # for every record to resume through; _handler_done does the rest
            task = self._loop.create_task(running if asyncio.iscoroutine(running)
                                          else self._await(running))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._handler_done, conn))
        elif isinstance(event, ConnectionTerminated):
            connection = self._connections.pop(event.address, None)
            if connection is not None:
                connection._end(event.error or ConnectionClosed(event.reason))
        elif isinstance(event, ConnectionEvicted):  # its handler ends; a restore starts one
            connection = self._connections.pop(event.address, None)
            if connection is not None:
                connection._end(ConnectionClosed("moved to the association store"))
        elif isinstance(event, AddressChanged):  # Connection ID: the peer moved
            connection = self._connections.pop(event.old_address, None)
            if connection is not None:
                connection.address = event.address
                connection._close = functools.partial(self._close_peer, event.address)
                self._connections[event.address] = connection

    def _flush_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._send_datagrams)

    @staticmethod
    async def _await(awaitable: Awaitable[None]) -> None:
        await awaitable

    def _handler_done(self, connection: AsyncDtlsConnection, task: asyncio.Task[None]) -> None:
        """A handler returned, raised or was cancelled: log a failure, end its association."""
        self._tasks.discard(task)
        if not task.cancelled():
            error = task.exception()
            # KeyboardInterrupt or SystemExit: the process stops (the loop gets it too)
            if error is not None and not isinstance(error, (ConnectionClosed, KeyboardInterrupt, SystemExit)):
                _log.error("DTLS connection handler for %s failed", connection.address,
                           exc_info=error)
        if not self._closed.is_set():
            connection._close_now()

    def _sent(self) -> None:
        """A handler queued a record outside ``_after_io``: out now, or with its batch's."""
        if self._burst > 1 and self._reading:
            # several handlers were woken by one batch: their replies leave together,
            # in one sendmmsg once they all ran
            if not self._flush_pending:
                self._flush_soon()
        else:
            self._send_datagrams()  # nothing else is coming: straight out

    def _close_peer(self, address: Address) -> None:
        self._core.close(address)
        self._after_io()

    def _send_datagrams(self) -> None:
        self._flush_pending = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._reading:
            transport.send_due()
            return
        for datagram, address in self._core.datagrams_to_send():
            transport.sendto(datagram, address)

    def _on_timer(self) -> None:
        self._core.handle_timeout()
        self._after_io()

    def close(self) -> None:
        """Close every association with close_notify, stop the handlers and the socket."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._export_on_close:
            moved = self._core.export_all()
            _log.info("pydtls_ossl: %d associations moved to the store at close", moved)
        self._core.close_all()
        self._after_io()
        self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Serve until ``close()``; with ``export_on_close``, SIGTERM closes too
        (on the main thread), so a restart keeps every established peer."""
        if self._export_on_close:
            try:
                self._loop.add_signal_handler(signal.SIGTERM, self.close)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here: close() stays the way
        try:
            await self._closed.wait()
        finally:
            self.close()

    async def __aenter__(self) -> AsyncDtlsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(handler: Handler, host: str, port: int, *, context: DtlsContext,
                max_queued_records: int = 1024, export_on_close: bool = False,
                reuse_port: bool = False, batch_io: bool | None = None,
                **limits: Any) -> AsyncDtlsServer:
    """Serve DTLS on ``host:port`` (IPv4 or IPv6), like ``asyncio.start_server``.

    ``limits`` go to ``DtlsServer`` (``max_handshakes``, ``idle_timeout``,
    ``association_store``, ``evict_after``, ...). A handler runs per peer: when
    its handshake completes, and again when an evicted or exported peer comes
    back from the association store. ``export_on_close`` moves every
    established peer into the store at ``close()`` (and SIGTERM during
    ``serve_forever()``) instead of closing it, for a restart the peers never see.
    ``reuse_port`` sets SO_REUSEPORT: several processes serve one port (give them
    one ``cookie_secret`` and one association store; see examples/cluster.py).
    ``batch_io``: None (the default) reads and writes the socket in batches
    (``recvmmsg``/``sendmmsg``) where the platform has them, unless
    ``PYDTLS_OSSL_BATCH_IO=0``. Elsewhere the server still reads its socket
    itself (``add_reader`` and a ``recvfrom`` loop: many datagrams per loop
    iteration), on a loop that has ``add_reader``. False keeps asyncio's
    datagram transport, as does a loop without ``add_reader``.
    """
    server = AsyncDtlsServer(handler, context, max_queued_records, limits, export_on_close)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if batch_io is not False:
        infos = await server._loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(infos[0][4])
            try:
                endpoint = _SocketEndpoint(server, sock, batch_io)
            except NotImplementedError:  # a loop without add_reader (Windows' proactor)
                endpoint = None
            if endpoint is not None:
                server._transport, server._reading = endpoint, True
                server._batched = endpoint._io.batched
                return server
        except BaseException:
            sock.close()
            raise
        sock.close()
    await server._loop.create_datagram_endpoint(lambda: _ServerProtocol(server),
                                                local_addr=(host, port), family=family,
                                                reuse_port=reuse_port or None)
    return server
