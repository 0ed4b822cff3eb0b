"""Echo servers for the over-the-wire benchmark, one per surface, as a user builds them.

    python benchmarks/wire_servers.py SURFACE PORT CERT KEY LIFETIME

SURFACE: ``plain`` (``DtlsServer`` + a recvfrom/sendto loop), ``batch``
(the same loop over ``ServerSocket``: recvmmsg/sendmmsg, records through C), ``aio``
(``aio.serve``), ``listen`` (``DtlsContext.listen()``, one thread per peer);
``aio-nobatch`` and ``listen-nobatch`` are the last two with ``batch_io=False``;
``aio-recvfrom`` is ``aio`` without batches (``PYDTLS_OSSL_BATCH_IO=0``, as on
platforms without recvmmsg), reading its socket in a recvfrom loop;
``aio2`` is ``aio`` in two SO_REUSEPORT worker processes (``pydtls_ossl.reuseport``).
Prints ``port=<n>`` once bound; exits after LIFETIME seconds at most.
Every Python server's socket gets a 4 MiB receive buffer (500 peers' requests
at once overflow Linux's default of 208 KiB); the C server has a socket per peer.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydtls_ossl import DtlsContext, ServerSocket, aio  # noqa: E402
from pydtls_ossl.server import DataReceived, DtlsServer  # noqa: E402

CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"
RCVBUF = 4 << 20


def bound(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind(("127.0.0.1", port))
    return sock


def ready(port: int) -> None:
    print(f"port={port}", flush=True)


def plain(ctx: DtlsContext, port: int) -> None:
    """The loop the README's server core section implies: select, recvfrom, feed, sendto."""
    server, sock = DtlsServer(ctx), bound(port)
    sock.setblocking(False)
    ready(sock.getsockname()[1])
    while True:
        select.select([sock], [], [], server.get_timeout())
        for _ in range(64):
            try:
                datagram, address = sock.recvfrom(65535)
            except BlockingIOError:
                break
            server.feed(datagram, address)
        server.handle_timeout()
        for event in server.events():
            if type(event) is DataReceived:
                server.send(event.address, event.data)
        for datagram, address in server.datagrams_to_send():
            sock.sendto(datagram, address)


def batch(ctx: DtlsContext, port: int) -> None:
    """The same loop over ``ServerSocket``: a batch per system call each way, and
    established peers' records through C (the loop its docstring shows)."""
    server, sock = DtlsServer(ctx), bound(port)
    io = ServerSocket(server, sock)
    ready(sock.getsockname()[1])
    send = server.send
    while True:
        select.select([sock], [sock] if io.blocked else [], [], server.get_timeout())
        io.receive()
        server.handle_timeout()
        for event in server.events():
            if type(event) is DataReceived:
                send(event.address, event.data)
        io.flush()


def asyncio_server(ctx: DtlsContext, port: int, batch_io: bool | None,
                   reuse_port: bool = False) -> None:
    async def echo(conn: aio.AsyncDtlsConnection) -> None:
        async for message in conn:
            conn.send(message)

    async def main() -> None:
        server = await aio.serve(echo, "127.0.0.1", port, context=ctx, batch_io=batch_io,
                                 reuse_port=reuse_port)
        server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        if not reuse_port:
            ready(server.address[1])
        await server.serve_forever()

    asyncio.run(main())


def asyncio_workers(ctx: DtlsContext, port: int, count: int, lifetime: float) -> None:
    """``aio`` in ``count`` processes on one port; ready once every worker has bound it."""
    from pydtls_ossl.reuseport import run_workers
    if port == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

    def worker(_index: int) -> None:
        signal.signal(signal.SIGALRM, lambda *a: os._exit(0))
        signal.alarm(int(lifetime) + 1)
        asyncio_server(ctx, port, None, reuse_port=True)

    def wait_bound(pids: list[int]) -> None:
        import time
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # each worker's socket shows in /proc/net/udp
            with open("/proc/net/udp") as f:
                bound = sum(1 for line in f if f":{port:04X} " in line.split()[1] + " ")
            if bound >= count:
                break
            time.sleep(0.02)
        ready(port)

    run_workers(count, worker, on_ready=wait_bound)


def listen(ctx: DtlsContext, port: int, batch_io: bool | None) -> None:
    with ctx.listen(("127.0.0.1", port), batch_io=batch_io) as listener:
        listener._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        ready(listener.address[1])

        def echo(conn) -> None:  # type: ignore[no-untyped-def]
            try:
                while True:
                    conn.send(conn.recv())
            except Exception:
                pass

        while True:
            conn = listener.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()


def main() -> int:
    surface, port, cert, key, lifetime = sys.argv[1:6]
    signal.signal(signal.SIGALRM, lambda *a: os._exit(0))
    signal.alarm(int(float(lifetime)) + 1)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    ctx = DtlsContext(Path(cert).read_bytes(), Path(key).read_bytes(), ciphers=CIPHER)
    if surface == "plain":
        plain(ctx, int(port))
    elif surface == "batch":
        batch(ctx, int(port))
    elif surface == "aio2":
        asyncio_workers(ctx, int(port), 2, float(lifetime))
    elif surface == "aio-recvfrom":  # as where the platform has no batches: a recvfrom loop
        os.environ["PYDTLS_OSSL_BATCH_IO"] = "0"
        asyncio_server(ctx, int(port), None)
    elif surface.startswith("aio"):
        asyncio_server(ctx, int(port), False if surface.endswith("nobatch") else None)
    elif surface.startswith("listen"):
        listen(ctx, int(port), False if surface.endswith("nobatch") else None)
    else:
        raise SystemExit(f"unknown surface {surface!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
