"""The pyOpenSSL column: the same work through ``OpenSSL.SSL.Connection(ctx, None)``
with ``bio_write``/``bio_read`` and ``DTLS_METHOD``, as a pyOpenSSL user writes it.

Run by ``run.py`` under whichever interpreter has pyOpenSSL (Debian's
``python3-openssl`` uses the system libssl; a pip wheel brings its own):

    python pyopenssl_column.py METRIC SECONDS CERT KEY [ARG]   (SECONDS may be nCOUNT)

Prints one line ``rate=...`` or ``bytes=...``; ``version`` prints the libssl.
``resume`` (ARG ``cache`` or ``ticket``) takes the session of one full
handshake with ``get_session()`` and measures handshakes that
``set_session()`` it, failing unless every one resumed.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
import threading
import time

from OpenSSL import SSL
from OpenSSL._util import lib as _lib  # SSL_session_reused: pyOpenSSL has no method for it

CIPHER = b"ECDHE-ECDSA-AES128-GCM-SHA256"
LIMIT = 0  # "nCOUNT" instead of SECONDS: exactly COUNT operations


def more(done: int, end: float) -> bool:
    return done < LIMIT if LIMIT else time.perf_counter() < end
MTU = 1200
SECRET = b"k" * 32


def contexts(cert: str, key: str) -> tuple[SSL.Context, SSL.Context]:
    server = SSL.Context(SSL.DTLS_METHOD)
    client = SSL.Context(SSL.DTLS_METHOD)
    for ctx in (server, client):
        ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
        ctx.set_cipher_list(CIPHER)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    server.use_certificate_file(cert)
    server.use_privatekey_file(key)
    client.load_verify_locations(cert)
    client.set_verify(SSL.VERIFY_PEER)
    return server, client


def connection(ctx: SSL.Context, server: bool) -> SSL.Connection:
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state() if server else conn.set_connect_state()
    conn.set_ciphertext_mtu(MTU)
    return conn


def move(src: SSL.Connection, dst: SSL.Connection) -> None:
    while True:
        try:
            dst.bio_write(src.bio_read(65536))
        except SSL.WantReadError:
            return


def step(conn: SSL.Connection) -> bool:
    try:
        conn.do_handshake()
        return True
    except SSL.WantReadError:
        return False


def handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    for _ in range(50):
        done_client = step(client)
        move(client, server)
        done_server = step(server)
        move(server, client)
        if done_client and done_server:
            return
    raise RuntimeError("handshake did not finish")


def handshake_loop(sctx: SSL.Context, cctx: SSL.Context, seconds: float) -> int:
    count, end = 0, time.perf_counter() + seconds
    while more(count, end):
        for _ in range(10):
            handshake(connection(cctx, False), connection(sctx, True))
            count += 1
    return count


def resumable(sctx: SSL.Context, how: str) -> None:
    """The server context resumes through its session cache or through tickets."""
    if how == "cache":
        sctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        sctx.set_options(SSL.OP_NO_TICKET)
    elif how != "ticket":
        raise SystemExit("resume: cache or ticket")
    sctx.set_session_id(b"pyopenssl_column")


def reused(conn: SSL.Connection) -> bool:
    return bool(_lib.SSL_session_reused(conn._ssl))


def closed(*conns: SSL.Connection) -> None:
    """Freed without a shutdown, an SSL takes its session out of the cache and
    makes it unresumable; mark the shutdown done (no alert), as pydtls_ossl does."""
    for conn in conns:
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)


def resume_loop(sctx: SSL.Context, cctx: SSL.Context, seconds: float) -> int:
    client, server = connection(cctx, False), connection(sctx, True)
    handshake(client, server)
    session = client.get_session()
    if session is None:
        raise RuntimeError("the first handshake left no session")
    closed(client, server)
    count, end = 0, time.perf_counter() + seconds
    while more(count, end):
        for _ in range(10):
            client, server = connection(cctx, False), connection(sctx, True)
            client.set_session(session)
            handshake(client, server)
            if not (reused(client) and reused(server)):
                raise RuntimeError("a measured handshake did not resume the session")
            closed(client, server)
            count += 1
    return count


def cookie(conn: SSL.Connection) -> bytes:
    return hmac.new(SECRET, b"127.0.0.1\x0040000" + b"\x5a" * 85, hashlib.sha256).digest()


def with_cookies(sctx: SSL.Context) -> None:
    sctx.set_options(SSL.OP_COOKIE_EXCHANGE)
    sctx.set_cookie_generate_callback(cookie)
    sctx.set_cookie_verify_callback(lambda conn, value: hmac.compare_digest(value, cookie(conn)))


def listen(server: SSL.Connection) -> bool:
    try:
        server.DTLSv1_listen()
        return True
    except SSL.WantReadError:
        return False


def main(argv: list[str]) -> None:
    global LIMIT
    metric, cert, key = argv[0], argv[2], argv[3]
    if argv[1].startswith("n"):
        LIMIT, seconds = int(argv[1][1:]), 1e9
    else:
        seconds = float(argv[1])
    arg = argv[4] if len(argv) > 4 else None
    if metric == "version":
        print("version=" + SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode())
        return
    sctx, cctx = contexts(cert, key)
    start = time.perf_counter()
    if metric == "handshake":
        threads = int(arg or 1)
        counts = [0] * threads

        def run(i: int) -> None:
            counts[i] = handshake_loop(sctx, cctx, seconds)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        print(f"rate={sum(counts) / (time.perf_counter() - start):.1f}")
    elif metric == "resume":
        resumable(sctx, arg or "")
        start = time.perf_counter()
        count = resume_loop(sctx, cctx, seconds)
        print(f"rate={count / (time.perf_counter() - start):.1f}")
    elif metric == "cookie-handshake":
        with_cookies(sctx)
        count, end = 0, start + seconds
        while more(count, end):
            client, server = connection(cctx, False), connection(sctx, True)
            while True:
                step(client)
                move(client, server)
                done = listen(server)
                move(server, client)
                if done:
                    break
            server.set_ciphertext_mtu(MTU)
            handshake(client, server)
            count += 1
        print(f"rate={count / (time.perf_counter() - start):.1f}")
    elif metric == "listen":
        with_cookies(sctx)
        client = connection(cctx, False)
        step(client)
        hello = client.bio_read(65536)
        server = connection(sctx, True)
        count, end = 0, start + seconds
        while more(count, end):
            for _ in range(1000):
                server.bio_write(hello)
                listen(server)
                server.bio_read(65536)
            count += 1000
        print(f"rate={count / (time.perf_counter() - start):.1f}")
    elif metric == "records":
        size = int(arg or 100)
        client, server = connection(cctx, False), connection(sctx, True)
        handshake(client, server)
        data, count, end = b"x" * size, 0, start + seconds
        send, bio_read, bio_write, recv = client.send, client.bio_read, server.bio_write, server.recv
        while more(count, end):
            for _ in range(1000):
                send(data)
                bio_write(bio_read(65536))
                recv(65536)
            count += 1000
        print(f"rate={count / (time.perf_counter() - start):.1f}")
    elif metric == "memory":
        count = int(seconds)
        keep = []
        before = rss()
        for _ in range(count):
            client, server = connection(cctx, False), connection(sctx, True)
            handshake(client, server)
            client.send(b"ping")
            move(client, server)
            server.recv(64)
            server.send(b"pong")
            move(server, client)
            client.recv(64)
            keep.append(server)
        print(f"bytes={(rss() - before) / count:.1f}")
    else:
        raise SystemExit(f"unknown metric {metric}")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


if __name__ == "__main__":
    main(sys.argv[1:])
