"""Blocking sockets in the manner of Python's ``ssl`` module, on the one engine.

``DtlsContext.wrap_socket(sock)`` turns a UDP socket into a DTLS client
(``connect``, ``send``, ``recv``, ``settimeout``, ``close``);
``DtlsContext.listen(address)`` gives a ``DtlsListener`` whose ``accept()``
returns one ``DtlsConnection`` per peer, served by the sans-IO
``DtlsServer`` core (stateless cookies and limits included). No DTLS logic
lives here: these classes only move datagrams and wait on timers.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from _thread import LockType as _Wake, allocate_lock as _allocate_wake
from collections import deque
from typing import Any

from .server_socket import ServerSocket
from ._errors import ConnectionClosed
from ._pump import flush, handshake, receive
from .context import DtlsContext
from .engine import Dtls
from .server import (Address, AddressChanged, ConnectionEstablished, ConnectionEvicted, ConnectionRestored,
                     ConnectionTerminated, DataReceived, DtlsServer)
from .srtp import SrtpProfile

__all__ = ["DtlsConnection", "DtlsListener", "DtlsSocket", "Introspection", "peer_certificate_info"]

_log = logging.getLogger("pydtls_ossl")
_MAX_DATAGRAM = 65535


def peer_certificate_info(engine: Dtls, binary_form: bool = False) -> Any:
    """``getpeercert()``: DER bytes, or a dict with the subject, issuer and fingerprint."""
    der = engine.peer_certificate()
    if der is None or binary_form:
        return der
    from .certs import certificate_summary
    return certificate_summary(der)


class Introspection:
    """What every DTLS socket-like object answers about its association."""

    _engine: Dtls

    def version(self) -> str | None:
        return self._engine.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._engine.cipher()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return peer_certificate_info(self._engine, binary_form)

    def get_peer_fingerprint(self, algorithm: str = "sha-256") -> str | None:
        return self._engine.get_peer_fingerprint(algorithm)

    def export_keys(self, label: str, length: int, context: bytes | None = None) -> bytes:
        return self._engine.export_keys(label, length, context)

    def selected_srtp_profile(self) -> SrtpProfile | None:
        return self._engine.selected_srtp_profile()

    def selected_alpn_protocol(self) -> str | None:
        return self._engine.selected_alpn_protocol()

    def psk_identity(self) -> str | None:
        return self._engine.psk_identity()

    def session(self) -> bytes | None:
        """A client's session, to pass as ``session=`` when reconnecting."""
        return self._engine.session()

    def session_reused(self) -> bool:
        return self._engine.session_reused()

    @property
    def engine(self) -> Dtls:
        """The sans-IO engine underneath, for everything else."""
        return self._engine


class DtlsSocket(Introspection):
    """A DTLS client (or pre-demultiplexed server) on one connected UDP socket.

    Timeouts follow ``socket``: ``settimeout(None)`` blocks (OpenSSL gives up a
    handshake after its retransmissions), a number raises ``TimeoutError``.
    """

    def __init__(self, sock: socket.socket, engine: Dtls, do_handshake_on_connect: bool = True) -> None:
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError("DTLS needs a SOCK_DGRAM socket")
        self._sock = sock
        self._engine = engine
        self._timeout: float | None = sock.gettimeout()
        self._do_handshake_on_connect = do_handshake_on_connect
        self._pending: bytes | None = None
        try:
            sock.getpeername()
            connected = True
        except OSError:
            connected = False
        if connected and do_handshake_on_connect:
            self.do_handshake()

    def connect(self, address: Address) -> None:
        self._sock.connect(address)
        if self._do_handshake_on_connect:
            self.do_handshake()

    def do_handshake(self) -> None:
        _log.debug("DTLS handshake with %s", self._sock.getpeername())
        handshake(self._engine, self._sock, self._timeout)
        _log.debug("DTLS handshake done: %s %s", self._engine.version(), self._engine.cipher())

    def send(self, data: bytes) -> int:
        """Send ``data`` as one record (an empty ``data`` sends nothing)."""
        n = self._engine.write(data)
        flush(self._engine, self._sock)
        return n

    sendall = send

    def recv(self, bufsize: int = _MAX_DATAGRAM) -> bytes:
        """The next record's plaintext. A record longer than ``bufsize`` raises
        ``ValueError`` and stays queued: nothing is silently truncated."""
        data = self._pending if self._pending is not None else receive(
            self._engine, self._sock, self._timeout)
        if len(data) > bufsize:
            self._pending = data
            raise ValueError(f"the next record has {len(data)} bytes, more than bufsize={bufsize}")
        self._pending = None
        return data

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def fileno(self) -> int:
        return self._sock.fileno()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def close(self) -> None:
        """Send close_notify and close the socket."""
        try:
            self._engine.close()
            flush(self._engine, self._sock)
        except OSError:
            pass
        finally:
            self._sock.close()

    def __enter__(self) -> DtlsSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DtlsListener:
    """Many peers on one bound UDP socket, served by a ``DtlsServer`` core.

    ``accept()`` returns each peer once its handshake is done. Blocking calls
    on the listener or on any of its connections take turns driving the
    socket, so there is no background thread to manage: one caller at a time
    waits for the socket (without holding the listener's lock, so ``send()``
    from other threads goes straight out), processes what arrived, and wakes
    the callers whose data or peer it brought. Nothing polls: a datagram is
    answered as soon as it arrives.

    On Linux the socket is read and written in batches (``recvmmsg`` /
    ``sendmmsg``: one system call for up to 64 datagrams each way);
    ``batch_io=False``, or ``PYDTLS_OSSL_BATCH_IO=0`` in the environment,
    keeps one ``recvfrom``/``sendto`` per datagram.
    """

    def __init__(self, context: DtlsContext, address: Address, *, export_on_close: bool = False,
                 reuse_port: bool = False, batch_io: bool | None = None, **limits: Any) -> None:
        family = socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if reuse_port:  # several processes on one port: the kernel spreads the peers
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._sock.bind(address)
        except OSError:
            self._sock.close()
            raise
        self.core = DtlsServer(context, **limits)
        self._io = ServerSocket(self.core, self._sock, batch_io=batch_io)
        if export_on_close and self.core.association_store is None:
            self._sock.close()
            raise ValueError("export_on_close needs association_store=")
        self._export_on_close = export_on_close
        self._lock = threading.RLock()
        self._turn = threading.Condition(self._lock)  # the driver finished (close() waits on it)
        self._pumping = False
        # callers waiting while another drives, oldest first: each blocks on a lock of its
        # own, which a round releases when it brought that caller's connection (or accept())
        # something, or when it is that caller's turn to drive; the value is the list of
        # locks the caller waits among (a connection's, or the acceptors')
        self._waiting: dict[_Wake, list[_Wake]] = {}
        self._ready: list[list[_Wake]] = []
        self._acceptors: list[_Wake] = []
        # send_threadsafe() from any thread interrupts the wait through this pair
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.core.wakeup = self._wake
        self._accepted: deque[DtlsConnection] = deque()
        self._connections: dict[Address, DtlsConnection] = {}
        self._closed = False

    @property
    def address(self) -> Any:
        return self._sock.getsockname()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def accept(self, timeout: float | None = None) -> DtlsConnection:
        """The next peer whose handshake completed; ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            try:
                while True:
                    if self._accepted:
                        return self._accepted.popleft()
                    if self._closed:
                        raise ConnectionClosed("the listener is closed")
                    self._take_turn(deadline, self._acceptors)
            finally:
                self._pass_turn()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # a wake-up is already pending, or the listener is closed

    def _take_turn(self, deadline: float | None, party: list[_Wake]) -> None:
        """With the lock held: drive the socket once, or wait among ``party`` while
        another caller does.

        Returns after something may have changed for the caller; raises
        ``TimeoutError`` once ``deadline`` passes.
        """
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("timed out")
        if self._pumping:
            wake = _allocate_wake()
            wake.acquire()
            self._waiting[wake] = party
            party.append(wake)
            self._lock.release()
            try:  # released by a round that brought something, or to drive
                wake.acquire(True, -1 if left is None else left)
            finally:
                self._lock.acquire()
                if self._waiting.pop(wake, None) is not None:
                    party.remove(wake)  # timed out or interrupted: nobody released it
            return
        self._pumping = True
        try:
            timer = self.core.get_timeout()
            waits = [w for w in (timer, left) if w is not None]
            self._lock.release()
            try:
                readable, _, _ = select.select([self._sock, self._wake_r],
                                               [self._sock] if self._io.blocked else [], [],
                                               max(0.0, min(waits)) if waits else None)
            finally:
                self._lock.acquire()
            if self._closed:
                return
            if self._wake_r in readable:
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            if self._sock in readable:
                self._receive()
            self.core.handle_timeout()
            self._route_events()
            self._send_due()
        finally:
            self._pumping = False
            if self._closed:
                self._turn.notify_all()
            self._wake_ready()

    def _wake_ready(self) -> None:
        """Release every caller waiting for a connection (or accept()) that got something."""
        waiting = self._waiting
        for party in self._ready:
            for wake in party:
                if waiting.pop(wake, None) is not None:
                    wake.release()
            party.clear()
        self._ready.clear()

    def _pass_turn(self) -> None:
        """A caller leaves recv()/accept(): if nobody drives the socket now, the
        oldest waiting caller is woken to (one wake-up, not one per waiter)."""
        if not self._pumping and self._waiting:
            wake = next(iter(self._waiting))
            self._waiting.pop(wake).remove(wake)
            wake.release()

    @property
    def batched(self) -> bool:
        """Whether the socket is read and written with recvmmsg/sendmmsg."""
        return self._io.batched

    def _receive(self) -> None:
        self._io.receive(64)  # a burst, but timers and senders get their turn

    def _route_events(self) -> None:
        for event in self.core._take_events():
            if isinstance(event, (ConnectionEstablished, ConnectionRestored)):
                engine = self.core.connection(event.address)
                assert engine is not None
                connection = DtlsConnection(self, event.address, engine)
                self._connections[event.address] = connection
                self._accepted.append(connection)
                self._ready.append(self._acceptors)
            elif isinstance(event, DataReceived):
                conn = self._connections.get(event.address)
                if conn is not None:
                    conn._received.append(event.data)
                    self._ready.append(conn._waiters)
            elif isinstance(event, ConnectionTerminated):
                conn = self._connections.pop(event.address, None)
                if conn is not None:
                    conn._terminated = event
                    self._ready.append(conn._waiters)
            elif isinstance(event, ConnectionEvicted):  # accept() returns it again when it is back
                conn = self._connections.pop(event.address, None)
                if conn is not None:
                    conn._terminated = ConnectionTerminated(event.address, "moved to the association store")
                    self._ready.append(conn._waiters)
            elif isinstance(event, AddressChanged):  # Connection ID: the peer moved
                conn = self._connections.pop(event.old_address, None)
                if conn is not None:
                    conn.address = event.address
                    self._connections[event.address] = conn

    def _send_due(self) -> None:
        self._io.flush()  # what a full socket buffer does not take waits for it to drain

    def close(self) -> None:
        """Close every association (close_notify) and the socket; with
        ``export_on_close``, established ones move to the association store instead."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._export_on_close:
                self.core.export_all()
            self.core.close_all()
            self._route_events()
            self._send_due()
            self._wake()  # a caller waiting in select() notices
            for wake, party in self._waiting.items():
                party.clear()
                wake.release()
            self._waiting.clear()
            while self._pumping:
                self._turn.wait(1.0)
            self._sock.close()
            self._wake_r.close()
            self._wake_w.close()

    def __enter__(self) -> DtlsListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DtlsConnection(Introspection):
    """One peer of a ``DtlsListener``."""

    def __init__(self, listener: DtlsListener, address: Address, engine: Dtls) -> None:
        self._listener = listener
        self.address = address
        self._engine = engine
        self._received: deque[bytes] = deque()
        self._terminated: ConnectionTerminated | None = None
        self._timeout: float | None = None
        self._waiters: list[_Wake] = []  # recv() callers waiting for this peer

    def getpeername(self) -> Any:
        return self.address

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def send(self, data: bytes) -> int:
        with self._listener._lock:
            if self._terminated is not None:
                raise ConnectionClosed(f"association ended: {self._terminated.reason}")
            n = self._listener.core.send(self.address, data)
            self._listener._send_due()
            return n

    sendall = send

    def recv(self, bufsize: int = _MAX_DATAGRAM) -> bytes:
        """The next record from this peer; ``ConnectionClosed`` once it is gone."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        listener = self._listener
        with listener._lock:
            try:
                while True:
                    if self._received:
                        if len(self._received[0]) > bufsize:
                            raise ValueError(f"the next record has {len(self._received[0])} bytes, "
                                             f"more than bufsize={bufsize}")
                        return self._received.popleft()
                    if self._terminated is not None:
                        error = self._terminated.error
                        raise ConnectionClosed(f"association ended: {self._terminated.reason}") from error
                    if listener._closed:
                        raise ConnectionClosed("the listener is closed")
                    listener._take_turn(deadline, self._waiters)
            finally:
                listener._pass_turn()

    def close(self) -> None:
        with self._listener._lock:
            if self._terminated is None and not self._listener._closed:
                self._listener.core.close(self.address)
                self._listener._route_events()
                self._listener._send_due()
                self._listener._wake_ready()  # another thread in recv() learns at once,
                if self._listener._pumping:  # even the one waiting for the socket
                    self._listener._wake()

    def __enter__(self) -> DtlsConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
