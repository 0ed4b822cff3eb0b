"""The socket and asyncio surfaces against OpenSSL's apps and GnuTLS, both roles."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import DtlsContext, aio

from .conftest import require_tool
from .interop import PeerProcess, free_udp_port
from .surfaces import BlockingEchoServer, async_echo

pytestmark = pytest.mark.interop


def peer_server(kind: str, port: int, pem: tuple[str, str]) -> PeerProcess:
    if kind == "openssl":
        args = [require_tool("openssl"), "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                "-cert", pem[0], "-key", pem[1]]
        ready = "ACCEPT"
    else:
        args = [require_tool("gnutls-serv"), "--udp", "--echo", "-p", str(port),
                "--x509certfile", pem[0], "--x509keyfile", pem[1]]
        ready = "listening on IPv4"
    peer = PeerProcess(args)
    peer.wait_for(ready)
    return peer


def exchange_with_peer_server(kind: str, peer: PeerProcess, send: Any, recv: Any) -> None:
    send(b"surface says hi\n")
    if kind == "openssl":
        peer.wait_for("surface says hi")
        peer.send_line("s_server says hi")
        assert recv() == b"s_server says hi\n"
    else:
        assert recv() == b"surface says hi\n"  # gnutls-serv --echo


@pytest.mark.parametrize("kind", ["openssl", "gnutls"])
def test_blocking_client_with_peer_server(kind: str, pem: tuple[str, str], certs: Any) -> None:
    port = free_udp_port()
    with peer_server(kind, port, pem) as peer:
        ctx = DtlsContext()
        sock = ctx.wrap_socket(socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                               expected_peer_fingerprint=certs.server.fingerprint())
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        with sock:
            exchange_with_peer_server(kind, peer, sock.send, sock.recv)


@pytest.mark.parametrize("kind", ["openssl", "gnutls"])
def test_asyncio_client_with_peer_server(kind: str, pem: tuple[str, str], certs: Any) -> None:
    port = free_udp_port()

    async def main(peer: PeerProcess) -> None:
        connection = await aio.connect("127.0.0.1", port, context=DtlsContext(),
                                       expected_peer_fingerprint=certs.server.fingerprint())
        async with connection:
            connection.send(b"surface says hi\n")
            if kind == "openssl":
                await asyncio.to_thread(peer.wait_for, "surface says hi")
                peer.send_line("s_server says hi")
            expected = b"s_server says hi\n" if kind == "openssl" else b"surface says hi\n"
            assert await asyncio.wait_for(connection.recv(), 10) == expected

    with peer_server(kind, port, pem) as peer:
        asyncio.run(main(peer))


def peer_client(kind: str, port: int) -> PeerProcess:
    if kind == "openssl":
        return PeerProcess([require_tool("openssl"), "s_client", "-dtls1_2",
                            "-connect", f"127.0.0.1:{port}"])
    return PeerProcess([require_tool("gnutls-cli"), "--udp", "-p", str(port), "127.0.0.1",
                        "--insecure"])


def drive_peer_client(kind: str, client: PeerProcess) -> None:
    client.wait_for("Cipher is ECDHE-ECDSA" if kind == "openssl" else "Handshake was completed")
    for i in range(3):
        client.send_line(f"echo me {i}")
        client.wait_for(f"^(- Received\\[\\d+\\]: )?echo me {i}$")


@pytest.mark.parametrize("kind", ["openssl", "gnutls"])
def test_peer_client_with_blocking_server(kind: str, certs: Any) -> None:
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    with BlockingEchoServer(ctx) as server, peer_client(kind, server.port) as client:
        drive_peer_client(kind, client)
    assert server.served == 1


@pytest.mark.parametrize("kind", ["openssl", "gnutls"])
def test_peer_client_with_asyncio_server(kind: str, certs: Any) -> None:
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)

    async def main() -> None:
        async with await aio.serve(async_echo, "127.0.0.1", 0, context=ctx) as server:
            with peer_client(kind, server.address[1]) as client:
                await asyncio.to_thread(drive_peer_client, kind, client)
            assert server.core.stats.handshakes_completed == 1
    asyncio.run(main())
