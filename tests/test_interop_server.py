"""The server core over a real UDP socket with OpenSSL's s_client (which does cookies)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from pydtls_ossl import DtlsContext
from pydtls_ossl._pump import serve
from pydtls_ossl.server import (ConnectionEstablished, ConnectionTerminated, DataReceived,
                                DtlsServer, ServerEvent)

from .conftest import require_tool
from .interop import PeerProcess

pytestmark = pytest.mark.interop


def test_openssl_s_client_through_the_server_core(certs: Any) -> None:
    openssl = require_tool("openssl")
    server = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem))
    seen: list[ServerEvent] = []

    def on_event(event: ServerEvent) -> None:
        seen.append(event)
        if isinstance(event, DataReceived):
            server.send(event.address, b"echo: " + event.data)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with PeerProcess([openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}"]) as peer:
            serve(server, sock, on_event, lambda: any(isinstance(e, ConnectionEstablished) for e in seen))
            peer.wait_for("Cipher is ECDHE-ECDSA")
            peer.send_line("ping through the core")
            serve(server, sock, on_event, lambda: any(isinstance(e, DataReceived) for e in seen))
            peer.wait_for("echo: ping through the core")
            peer.send_line("Q")
            serve(server, sock, on_event, lambda: any(isinstance(e, ConnectionTerminated) for e in seen))
    assert server.stats.hello_verify_requests >= 1, "s_client went through the cookie exchange"
    assert server.stats.handshakes_completed == 1 and len(server) == 0
    assert [e.reason for e in seen if isinstance(e, ConnectionTerminated)] == ["peer closed"]
