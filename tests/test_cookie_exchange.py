"""A single server engine's cookie exchange, however the caller drives it.

``Dtls(is_server=True, peer_address=...)`` answers a cookieless ClientHello
with a HelloVerifyRequest and starts the handshake only for a hello that
carries a valid cookie. Calling ``handshake()`` or ``handle_timeout()`` early
must not move it out of that mode (it once did, and the engine then ignored
the cookie-bearing hello for good).
"""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import Any

import pytest

from pydtls_ossl import Dtls, DtlsContext

from .helpers import LossyLink, drain

PEER = ("127.0.0.1", 40000)


def is_hvr(datagram: bytes) -> bool:
    return len(datagram) > 13 and datagram[0] == 22 and datagram[13] == 3


def is_client_hello(datagram: bytes) -> bool:
    return len(datagram) > 13 and datagram[0] == 22 and datagram[13] == 1


def has_cookie(hello: bytes) -> bool:
    """Whether a (whole, unfragmented) ClientHello carries a non-empty cookie."""
    body = 13 + 12
    sid = hello[body + 34]
    return hello[body + 35 + sid] > 0


@pytest.fixture
def server_ctx(certs: Any) -> DtlsContext:
    return DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.02, max_rto=0.1)


@pytest.fixture
def client_ctx(certs: Any) -> DtlsContext:
    return DtlsContext(verify="none", initial_rto=0.02, max_rto=0.1)


def test_readme_loop_with_early_server_handshake(server_ctx: DtlsContext,
                                                 client_ctx: DtlsContext) -> None:
    """The README tour's loop, calling server.handshake() after every feed."""
    server = Dtls(is_server=True, context=server_ctx, peer_address=PEER)
    client = Dtls(context=client_ctx)
    server.handshake()  # before anything arrived: must stay in cookie mode
    client.handshake()
    hvrs = 0
    for _ in range(20):
        for datagram in drain(client):
            server.feed(datagram)
            server.handshake()
        for datagram in drain(server):
            hvrs += is_hvr(datagram)
            client.feed(datagram)
        client.handshake()
        if client.is_handshake_finished() and server.is_handshake_finished():
            break
    assert client.is_handshake_finished() and server.is_handshake_finished()
    assert hvrs == 1
    assert client.write(b"ping") == 4
    for datagram in drain(client):
        server.feed(datagram)
    assert server.read() == b"ping"


def test_every_cookieless_hello_gets_one_hello_verify_request(server_ctx: DtlsContext,
                                                              client_ctx: DtlsContext) -> None:
    server = Dtls(is_server=True, context=server_ctx, peer_address=PEER)
    client = Dtls(context=client_ctx)
    client.handshake()
    hello = drain(client)[0]
    assert not has_cookie(hello)
    for _ in range(3):
        server.feed(hello)
        server.handshake()
        assert server.handle_timeout() is False
        replies = drain(server)
        assert len(replies) == 1 and is_hvr(replies[0])
    assert server.state.name == "NEW" and server.get_timeout() is None


OPS = ("feed", "handshake", "handle_timeout", "client")


@pytest.mark.parametrize("seed", range(12))
def test_any_interleaving_under_loss_completes(server_ctx: DtlsContext, client_ctx: DtlsContext,
                                               seed: int) -> None:
    """Random orders of feed/handshake/handle_timeout on the server, 20% loss both ways."""
    rng = random.Random(seed)
    server = Dtls(is_server=True, context=server_ctx, peer_address=PEER)
    client = Dtls(context=client_ctx)
    up, down = LossyLink(seed, 0.2), LossyLink(seed + 100, 0.2)
    in_flight: list[bytes] = []
    client.handshake()
    deadline = time.monotonic() + 20
    cookie_hellos_accepted = False
    while not (client.is_handshake_finished() and server.is_handshake_finished()):
        assert time.monotonic() < deadline, "the cookie exchange stalled"
        op = rng.choice(OPS)
        if op == "feed":
            in_flight += up.carry(drain(client))
            if in_flight:
                datagram = in_flight.pop(0)
                cookie_hellos_accepted |= is_client_hello(datagram) and has_cookie(datagram)
                server.feed(datagram)
        elif op == "handshake":
            server.handshake()
        elif op == "handle_timeout":
            server.handle_timeout()
        else:
            for datagram in down.carry(drain(server)):
                client.feed(datagram)
            client.handshake()
            timers = [t for t in (client.get_timeout(), server.get_timeout()) if t is not None]
            if timers and min(timers) > 0:
                time.sleep(min(min(timers), 0.02))
            client.handle_timeout()
    assert cookie_hellos_accepted


def test_wrap_socket_server_side_does_the_cookie_exchange(certs: Any) -> None:
    """Counted on the wire: the server's first reply is a HelloVerifyRequest."""
    _run_wrapped_server(certs, cookies=True, expect_hvr=True)


def test_wrap_socket_server_side_cookies_false_skips_it(certs: Any) -> None:
    _run_wrapped_server(certs, cookies=False, expect_hvr=False)


def _run_wrapped_server(certs: Any, cookies: bool, expect_hvr: bool) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    cli.bind(("127.0.0.1", 0))
    srv.connect(cli.getsockname())
    cli.connect(srv.getsockname())
    cli.settimeout(5)
    result: dict[str, Any] = {}

    def serve() -> None:
        try:
            wrapped = server_ctx.wrap_socket(srv, server_side=True, cookies=cookies)
            wrapped.settimeout(10)
            wrapped.send(wrapped.recv().upper())
            result["ok"] = True
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = Dtls(context=DtlsContext(verify="none"))
        client.handshake()
        replies: list[bytes] = []
        for _ in range(50):
            for datagram in drain(client):
                cli.send(datagram)
            if client.is_handshake_finished():
                break
            datagram = cli.recv(65535)
            replies.append(datagram)
            client.feed(datagram)
            client.handshake()
        assert client.is_handshake_finished()
        assert is_hvr(replies[0]) is expect_hvr
        assert sum(map(is_hvr, replies)) == (1 if expect_hvr else 0)
        client.write(b"hello")
        for datagram in drain(client):
            cli.send(datagram)
        while (data := client.read()) is None:
            client.feed(cli.recv(65535))
        assert data == b"HELLO"
    finally:
        thread.join(15)
        srv.close()
        cli.close()
    assert result.get("ok"), result.get("error")


def test_wrap_socket_server_side_needs_a_connected_socket(certs: Any) -> None:
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError, match="connect"):
            ctx.wrap_socket(sock, server_side=True)
