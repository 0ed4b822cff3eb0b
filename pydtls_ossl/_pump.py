"""Drive an engine, or a server core, over a blocking UDP socket.

The smallest correct loop: send what the engine queued, wait for a datagram
no longer than the engine's retransmission timer, feed it, repeat. The demo
and the interop tests use it; the socket surfaces build on the same steps.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Callable

from .engine import Dtls
from .server import DtlsServer, ServerEvent

__all__ = ["flush", "handshake", "receive", "send", "serve"]

_MAX_DATAGRAM = 65535


def flush(engine: Dtls, sock: socket.socket) -> int:
    """Send every datagram the engine has queued; return how many."""
    sent = 0
    while (datagram := engine.pull()) is not None:
        sock.send(datagram)
        sent += 1
    return sent


def _wait_and_feed(engine: Dtls, sock: socket.socket, deadline: float | None) -> int:
    """Feed one datagram if it arrives before the timer or deadline; drive timers.
    With no deadline, waits for the peer (or for OpenSSL to give up retransmitting)."""
    now = time.monotonic()
    if deadline is not None and now >= deadline:
        raise TimeoutError("DTLS peer did not answer in time")
    timer = engine.get_timeout()
    limit = None if deadline is None else deadline - now
    waits = [w for w in (timer, limit) if w is not None]
    sock.settimeout(max(min(waits), 0.0005) if waits else None)
    try:
        datagram = sock.recv(_MAX_DATAGRAM)
    except (socket.timeout, BlockingIOError):
        engine.handle_timeout()
        flush(engine, sock)
        return 0
    except ConnectionRefusedError:
        return 0  # ICMP port unreachable: the peer may not be listening yet
    readable = engine.feed(datagram)
    flush(engine, sock)
    return readable


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def handshake(engine: Dtls, sock: socket.socket, timeout: float | None = 10.0) -> None:
    """Complete the handshake or raise ``HandshakeError``/``TimeoutError``."""
    deadline = _deadline(timeout)
    engine.handshake()
    flush(engine, sock)
    while not engine.handshake_finished:
        _wait_and_feed(engine, sock, deadline)
        engine.handshake()
        flush(engine, sock)


def send(engine: Dtls, sock: socket.socket, data: bytes) -> int:
    """Write one record and send it."""
    n = engine.write(data)
    flush(engine, sock)
    return n


def receive(engine: Dtls, sock: socket.socket, timeout: float | None = 10.0) -> bytes:
    """The next record's plaintext; raises ``ConnectionClosed`` at close_notify."""
    deadline = _deadline(timeout)
    while (data := engine.read()) is None:
        _wait_and_feed(engine, sock, deadline)
    return data


def serve(server: DtlsServer, sock: socket.socket, on_event: Callable[[ServerEvent], None],
          until: Callable[[], bool], poll: float = 0.05) -> None:
    """Drive a ``DtlsServer`` over a bound UDP socket until ``until()`` is true."""
    while not until():
        timer = server.get_timeout()
        readable, _, _ = select.select([sock], [], [], poll if timer is None else min(timer, poll))
        if readable:
            try:
                datagram, address = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            server.feed(datagram, address)
        server.handle_timeout()
        for event in server.events():
            on_event(event)
        for datagram, address in server.datagrams_to_send():
            sock.sendto(datagram, address)
