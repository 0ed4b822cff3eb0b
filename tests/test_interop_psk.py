"""PSK and CoAP suites against OpenSSL's apps and GnuTLS over UDP on 127.0.0.1, both roles."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import Dtls, DtlsContext
from pydtls_ossl._pump import handshake, receive, send

from .conftest import require_tool
from .interop import PeerProcess, accept_first, free_udp_port

pytestmark = pytest.mark.interop
IDENTITY, KEY = "coap-device-1", bytes.fromhex("0a1b2c3d4e5f60718293a4b5c6d7e8f9")
CERT_SUITE = "ECDHE-ECDSA-AES128-CCM8"
GNUTLS = {  # suite -> GnuTLS priority selecting exactly it
    "PSK-AES128-CCM8": "+PSK:+AES-128-CCM-8:+AEAD",
    "PSK-AES256-CCM8": "+PSK:+AES-256-CCM-8:+AEAD",
    "PSK-AES128-CCM": "+PSK:+AES-128-CCM:+AEAD",
    "PSK-AES128-GCM-SHA256": "+PSK:+AES-128-GCM:+AEAD",
    "PSK-AES256-GCM-SHA384": "+PSK:+AES-256-GCM:+AEAD",
    "PSK-CHACHA20-POLY1305": "+PSK:+CHACHA20-POLY1305:+AEAD",
    "ECDHE-PSK-CHACHA20-POLY1305": "+ECDHE-PSK:+CHACHA20-POLY1305:+AEAD",
    "ECDHE-PSK-AES128-CBC-SHA256": "+ECDHE-PSK:+AES-128-CBC:+SHA256",
    CERT_SUITE: "+ECDHE-ECDSA:+AES-128-CCM-8:+AEAD",
}
SUITES = list(GNUTLS)


def openssl_cipher(suite: str) -> str:
    """OpenSSL 3.2+ puts CCM_8 at security level 0; the openssl app (a third-party
    peer here) must be told so; 3.0 accepts the same string."""
    return suite + "@SECLEVEL=0" if "CCM8" in suite else suite


def expected_layer(suite: str) -> str:
    """The engine's own record layer carries every AEAD suite, CCM and CCM_8 included."""
    return "openssl" if "CBC" in suite else "engine"


def priority(suite: str) -> str:
    return "NONE:+VERS-DTLS1.2:+COMP-NULL:+SIGN-ALL:+GROUP-ALL:+CTYPE-ALL:" + GNUTLS[suite]


def client_context(suite: str, certs: Any) -> tuple[DtlsContext, dict[str, Any]]:
    if suite == CERT_SUITE:
        return DtlsContext(ciphers=suite), {"expected_peer_fingerprint": certs.server.fingerprint()}
    return DtlsContext(psk=(IDENTITY, KEY), ciphers=suite), {}


def server_engine(suite: str, certs: Any) -> Dtls:
    if suite == CERT_SUITE:
        ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, ciphers=suite)
    else:
        ctx = DtlsContext(psk_keys={IDENTITY: KEY}, ciphers=suite)
    return Dtls(is_server=True, context=ctx)


def our_client(port: int, suite: str, certs: Any) -> tuple[Dtls, socket.socket]:
    ctx, kw = client_context(suite, certs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    client = Dtls(context=ctx, **kw)
    handshake(client, sock)
    assert client.cipher()[0] == suite  # type: ignore[index]
    assert client.record_layer == expected_layer(suite)
    return client, sock


def serve_one(sock: socket.socket, suite: str, certs: Any) -> Dtls:
    server = server_engine(suite, certs)
    server.feed(accept_first(sock))
    handshake(server, sock)
    assert server.cipher()[0] == suite  # type: ignore[index]
    assert server.record_layer == expected_layer(suite)
    if suite != CERT_SUITE:
        assert server.psk_identity() == IDENTITY
    return server


def openssl_credentials(suite: str, pem: tuple[str, str], server: bool) -> list[str]:
    if suite == CERT_SUITE:
        return ["-cert", pem[0], "-key", pem[1]] if server else []
    args = ["-psk", KEY.hex(), "-psk_identity", IDENTITY]
    return args + (["-nocert"] if server else [])


@pytest.mark.parametrize("suite", SUITES)
def test_our_client_with_openssl_s_server(suite: str, pem: tuple[str, str], certs: Any) -> None:
    openssl = require_tool("openssl")
    port = free_udp_port()
    with PeerProcess([openssl, "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                      "-cipher", openssl_cipher(suite), *openssl_credentials(suite, pem, server=True)]) as peer:
        peer.wait_for("ACCEPT")
        client, sock = our_client(port, suite, certs)
        with sock:
            send(client, sock, b"GET /temp\n")
            peer.wait_for("GET /temp")
            peer.send_line("21.5C")
            assert receive(client, sock) == b"21.5C\n"


@pytest.mark.parametrize("suite", SUITES)
def test_openssl_s_client_with_our_server(suite: str, pem: tuple[str, str], certs: Any) -> None:
    openssl = require_tool("openssl")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with PeerProcess([openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
                          "-cipher", openssl_cipher(suite), *openssl_credentials(suite, pem, server=False)]) as peer:
            server = serve_one(sock, suite, certs)
            peer.wait_for(f"Cipher is {suite}")
            peer.send_line("from s_client")
            assert receive(server, sock) == b"from s_client\n"
            send(server, sock, b"from pydtls_ossl\n")
            peer.wait_for("from pydtls_ossl")


@pytest.mark.parametrize("suite", SUITES)
def test_our_client_with_gnutls_serv(suite: str, pem: tuple[str, str], certs: Any,
                                     tmp_path: Path) -> None:
    gnutls_serv = require_tool("gnutls-serv")
    port = free_udp_port()
    passwd = tmp_path / "psk.passwd"
    passwd.write_text(f"{IDENTITY}:{KEY.hex()}\n")
    credentials = (["--x509certfile", pem[0], "--x509keyfile", pem[1]] if suite == CERT_SUITE
                   else ["--pskpasswd", str(passwd)])
    with PeerProcess([gnutls_serv, "--udp", "--echo", "-p", str(port), "--priority", priority(suite),
                      *credentials]) as peer:
        peer.wait_for("listening on IPv4")
        client, sock = our_client(port, suite, certs)
        with sock:
            for message in (b"\x40\x01\x00\x01hello", b"second"):
                send(client, sock, message)
                assert receive(client, sock) == message


@pytest.mark.parametrize("suite", SUITES)
def test_gnutls_cli_with_our_server(suite: str, certs: Any) -> None:
    gnutls_cli = require_tool("gnutls-cli")
    credentials = (["--insecure"] if suite == CERT_SUITE
                   else [f"--pskusername={IDENTITY}", f"--pskkey={KEY.hex()}"])
    # gnutls-cli 3.7 segfaults right after any ECDHE-PSK handshake (against OpenSSL's
    # s_server too), so for those suites its debug trace proves the handshake instead.
    crashes_after_handshake = suite.startswith("ECDHE-PSK")
    debug = ["-d", "4"] if crashes_after_handshake else []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with PeerProcess([gnutls_cli, "--udp", "-p", str(port), "127.0.0.1",
                          "--priority", priority(suite), *credentials, *debug]) as peer:
            server = serve_one(sock, suite, certs)
            if crashes_after_handshake:
                peer.wait_for(r"FINISHED \(20\) was received")
                return
            peer.wait_for("Handshake was completed")
            peer.send_line("from gnutls")
            assert receive(server, sock) == b"from gnutls\n"
            send(server, sock, b"from pydtls_ossl\n")
            peer.wait_for("from pydtls_ossl")
