"""Interop over real UDP on 127.0.0.1 with OpenSSL's own s_server and s_client."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import ConnectionClosed, Dtls, DtlsContext
from pydtls_ossl._pump import handshake, receive, send

from .conftest import require_tool
from .interop import PeerProcess, accept_first, free_udp_port

pytestmark = pytest.mark.interop
LABEL = "EXTRACTOR-dtls_srtp"
KEYMAT = ["-keymatexport", LABEL, "-keymatexportlen", "60"]


def test_our_client_with_openssl_s_server(pem_files: dict[str, Path], certs: Any) -> None:
    openssl = require_tool("openssl")
    port = free_udp_port()
    with PeerProcess([openssl, "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                      "-cert", str(pem_files["server_cert"]), "-key", str(pem_files["server_key"]),
                      *KEYMAT]) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        server.wait_for("ACCEPT")
        sock.connect(("127.0.0.1", port))
        client = Dtls(expected_peer_fingerprint=certs.server.fingerprint())
        handshake(client, sock)
        assert client.version() == "DTLSv1.2"
        theirs = server.wait_for(r"Keying material: ([0-9A-F]+)").group(1)
        assert client.export_keys(LABEL, 60).hex().upper() == theirs
        send(client, sock, b"hello from pydtls_ossl\n")
        server.wait_for("hello from pydtls_ossl")
        server.send_line("hello from openssl")
        assert receive(client, sock) == b"hello from openssl\n"
        for i in range(20):
            server.send_line(f"line {i}")
            assert receive(client, sock) == f"line {i}\n".encode()
        client.close()
        send_all(client, sock)
        server.wait_for("shutting down SSL|CONNECTION CLOSED|DONE")


def send_all(engine: Dtls, sock: socket.socket) -> None:
    while (datagram := engine.pull()) is not None:
        sock.send(datagram)


def test_openssl_s_client_with_our_server(pem_files: dict[str, Path], certs: Any) -> None:
    openssl = require_tool("openssl")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem),
                      expected_peer_fingerprint=certs.client.fingerprint())
        with PeerProcess([openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
                          "-cert", str(pem_files["client_cert"]),
                          "-key", str(pem_files["client_key"]), *KEYMAT]) as client:
            server.feed(accept_first(sock))
            handshake(server, sock)
            assert server.get_peer_fingerprint() == certs.client.fingerprint()
            theirs = client.wait_for(r"Keying material: ([0-9A-F]+)").group(1)
            assert server.export_keys(LABEL, 60).hex().upper() == theirs
            client.send_line("hello from s_client")
            assert receive(server, sock) == b"hello from s_client\n"
            send(server, sock, b"hello from pydtls_ossl\n")
            client.wait_for("hello from pydtls_ossl")
            client.send_line("Q")  # s_client closes the association on a line 'Q'
            with pytest.raises(ConnectionClosed):
                for _ in range(10):
                    receive(server, sock, timeout=5)
