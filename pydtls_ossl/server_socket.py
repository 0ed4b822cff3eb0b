"""A ``DtlsServer`` over one bound UDP socket, a batch of datagrams per system call.

The loop the blocking listener and ``aio.serve`` run, for an application
that drives the server core itself::

    server = DtlsServer(context)
    io = ServerSocket(server, sock)           # sock: bound, any blocking mode
    while True:
        select.select([sock], [sock] if io.blocked else [], [], server.get_timeout())
        io.receive()
        server.handle_timeout()
        for event in server.events():
            if type(event) is DataReceived:
                server.send(event.address, event.data)
        io.flush()

On Linux it reads with ``recvmmsg`` and writes with ``sendmmsg``, and keeps
established peers' records on a C path both ways (``_fast.py``): a batch is
decrypted in one call, and what ``server.send()`` queued for those peers
leaves in one call. Elsewhere (or with ``batch_io=False``, or
``PYDTLS_OSSL_BATCH_IO=0``) it is ``recvfrom``/``sendto`` with the same
interface. Datagram semantics hold either way: one record per ``send()``,
nothing cut, a datagram the socket buffer cannot take waits, never split.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

from ._batch_io import datagram_io
from .server import DtlsServer

__all__ = ["ServerSocket"]

Address = Any


class ServerSocket:
    """Receive into, and send from, ``server`` on ``sock`` (set non-blocking here).

    ``backlog``: datagrams kept while the socket buffer is full (newer ones are
    dropped past it, as the kernel would, and counted in ``dropped``).
    """

    def __init__(self, server: DtlsServer, sock: socket.socket, *, batch_io: bool | None = None,
                 backlog: int = 4096) -> None:
        if backlog <= 0:
            raise ValueError("backlog must be positive")
        sock.setblocking(False)
        self.server = server
        self.sock = sock
        self._io = datagram_io(sock, batch_io)
        self._fd = sock.fileno()
        self._backlog: deque[tuple[bytes, Address]] = deque()
        self._backlog_max = backlog
        self.dropped = 0
        #: True after ``flush()`` left datagrams waiting: wait for the socket to be
        #: writable, then ``flush()`` again.
        self.blocked = False
        if self._io.batched:
            server._use_fast()

    @property
    def batched(self) -> bool:
        """Whether the socket is read and written with recvmmsg/sendmmsg."""
        return self._io.batched

    def fileno(self) -> int:
        return self._fd

    def receive(self, limit: int = 256) -> int:
        """Feed the server up to ``limit`` datagrams waiting on the socket; return how many."""
        return self._io.receive_into(self.server, limit)

    def flush(self) -> bool:
        """Send every datagram due; False (and ``blocked``) when the socket buffer filled."""
        backlog, server = self._backlog, self.server
        if not (backlog or server._python_output()):
            self.blocked = not server._send_fast(self._fd)  # the common case: C's queue, if anything
            return not self.blocked
        if backlog:
            pending = list(backlog)
            backlog.clear()
            sent = self._io.send(pending)
            if sent < len(pending):
                backlog.extend(pending[sent:])
                self.blocked = True
                return False
        datagrams = server._datagrams()
        if datagrams:
            sent = self._io.send(datagrams)
            if sent < len(datagrams):
                self._keep(datagrams[sent:])
                self.blocked = True
                return False
        self.blocked = not server._send_fast(self._fd)
        return not self.blocked

    def _keep(self, datagrams: list[tuple[bytes, Address]]) -> None:
        room = self._backlog_max - len(self._backlog)
        if room < len(datagrams):
            self.dropped += len(datagrams) - max(room, 0)
            datagrams = datagrams[:max(room, 0)]
        self._backlog.extend(datagrams)

    def clear(self) -> None:
        """Forget the datagrams waiting for a full socket buffer (the socket is closing)."""
        self._backlog.clear()
        self.blocked = False
