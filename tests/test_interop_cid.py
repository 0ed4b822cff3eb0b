"""Connection ID (RFC 9146) against wolfSSL 5.9 (Debian unstable), and peers without CID.

The wolfSSL peer runs in a Debian sid root built by ``bash .ci/wolfssl``
(``tests/wolfssl.py``). CI sets PYDTLS_REQUIRE_WOLFSSL=1 so a missing peer
fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from pydtls_ossl import Dtls, DtlsContext, aio
from pydtls_ossl._pump import handshake, receive, send

from . import wolfssl
from .conftest import require_tool
from .interop import PeerProcess, free_udp_port

pytestmark = pytest.mark.interop
PSK_KEY = bytes(range(16))


@pytest.fixture(scope="module")
def wolf_ready() -> None:
    reason = wolfssl.available()
    if reason is not None:
        if os.environ.get("PYDTLS_REQUIRE_WOLFSSL"):
            pytest.fail(f"{reason} (PYDTLS_REQUIRE_WOLFSSL is set)")
        pytest.skip(reason)


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


# ------------------------------------------------- our client, wolfSSL server

@pytest.mark.parametrize("ours,theirs", [
    (b"\x01\x02", b"\xaa\xbb\xcc\xdd"),   # both ask for a CID
    (b"", b"\xaa\xbb\xcc\xdd"),           # we send theirs, want none
    (b"\x01\x02\x03", b""),               # they send ours, want none
    (True, b"\x10\x20\x30\x40\x50"),      # a generated 8-byte CID
])
def test_our_client_wolfssl_server(wolf_ready: None, pem_files: dict[str, Path], certs: Any,
                                   udp: socket.socket, ours: Any, theirs: bytes) -> None:
    with wolfssl.WolfPeer("server", cert=pem_files["server_cert"], key=pem_files["server_key"],
                          cid=theirs, timeout=20) as server:
        udp.connect(("127.0.0.1", server.port))
        client = Dtls(context=DtlsContext(connection_id=ours),
                      expected_peer_fingerprint=certs.server.fingerprint())
        handshake(client, udp)
        hs = server.expect_handshake()
        assert hs.cid and client.peer_connection_id == theirs == hs.rx_cid
        assert client.connection_id == hs.tx_cid
        if ours is True:
            assert len(hs.tx_cid) == 8
        for i in range(5):
            send(client, udp, b"hello %d" % i)
            assert server.expect_recv() == b"hello %d" % i
            assert receive(client, udp) == b"echo:hello %d" % i
        client.close()
        while (datagram := client.pull()) is not None:
            udp.send(datagram)
        server.expect("CLOSED")


def test_our_client_moves_and_wolfssl_follows(wolf_ready: None, pem_files: dict[str, Path],
                                              certs: Any, udp: socket.socket) -> None:
    """NAT rebinding towards wolfSSL: our records from a new port carry its CID."""
    with wolfssl.WolfPeer("server", cert=pem_files["server_cert"], key=pem_files["server_key"],
                          cid=b"\x0a\x0b\x0c", timeout=20) as server:
        udp.connect(("127.0.0.1", server.port))
        client = Dtls(context=DtlsContext(connection_id=b""),
                      expected_peer_fingerprint=certs.server.fingerprint())
        handshake(client, udp)
        assert server.expect_peer()[1] == udp.getsockname()[1]
        send(client, udp, b"before")
        assert receive(client, udp) == b"echo:before"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as moved:
            moved.bind(("127.0.0.1", 0))
            moved.connect(("127.0.0.1", server.port))
            send(client, moved, b"after the move")
            assert server.expect_peer()[1] == moved.getsockname()[1]
            assert receive(client, moved) == b"echo:after the move"
            send(client, moved, b"again")
            assert receive(client, moved) == b"echo:again"


def test_our_psk_client_wolfssl_server(wolf_ready: None, udp: socket.socket) -> None:
    with wolfssl.WolfPeer("server", psk_identity="device-7", psk_key=PSK_KEY,
                          cipher="PSK-CHACHA20-POLY1305", cid=b"\x42\x43", timeout=20) as server:
        udp.connect(("127.0.0.1", server.port))
        client = Dtls(context=DtlsContext(psk=("device-7", PSK_KEY), connection_id=b"\x99",
                                          ciphers="PSK-CHACHA20-POLY1305"))
        handshake(client, udp)
        hs = server.expect_handshake()
        assert (hs.tx_cid, hs.rx_cid) == (b"\x99", b"\x42\x43")
        send(client, udp, b"psk")
        assert receive(client, udp) == b"echo:psk"


# ------------------------------------------------- wolfSSL client, our servers

def _echo_listener(context: DtlsContext, done: threading.Event) -> tuple[Any, threading.Thread, list[Any]]:
    listener = context.listen(("127.0.0.1", 0))
    addresses: list[Any] = []

    def run() -> None:
        conn = listener.accept(timeout=15)
        while not done.is_set():
            try:
                data = conn.recv()
            except Exception:
                return
            addresses.append(conn.getpeername())
            conn.send(b"echo:" + data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread, addresses


@pytest.mark.parametrize("theirs", [b"\x01\x02\x03\x04", b""])
def test_wolfssl_client_our_listener_follows_rebinding(wolf_ready: None, certs: Any,
                                                       theirs: bytes) -> None:
    """The blocking listener routes by CID and answers at the client's new port."""
    context = DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=True)
    done = threading.Event()
    listener, thread, addresses = _echo_listener(context, done)
    try:
        port = listener.getsockname()[1]
        with wolfssl.WolfPeer("client", port=port, cid=theirs, timeout=20) as client:
            hs = client.expect_handshake()
            assert hs.cid and len(hs.tx_cid) == 8 and hs.rx_cid == theirs
            assert client.send_text("one") == "echo:one"
            first = client.port
            moved = client.rebind()
            assert moved != first
            assert client.send_text("two") == "echo:two"
            assert client.send_text("three") == "echo:three"
            assert addresses[0][1] == first and addresses[-1][1] == moved
            assert listener.core.stats.address_changes == 1
            assert client.close_association() == 0
    finally:
        done.set()
        listener.close()
        thread.join(5)


def test_wolfssl_client_aio_server_follows_rebinding(wolf_ready: None, certs: Any) -> None:
    context = DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=True)
    seen: list[Any] = []

    async def handler(conn: aio.AsyncDtlsConnection) -> None:
        async for data in conn:
            seen.append(conn.address)
            conn.send(b"echo:" + data)

    async def main() -> None:
        server = await aio.serve(handler, "127.0.0.1", 0, context=context)
        port = server.address[1]

        def drive() -> tuple[int, int]:
            with wolfssl.WolfPeer("client", port=port, cid=b"\x77", timeout=20) as client:
                client.expect_handshake()
                assert client.send_text("a") == "echo:a"
                first = client.port
                moved = client.rebind()
                assert client.send_text("b") == "echo:b"
                assert client.close_association() == 0
                return first, moved

        try:
            first, moved = await asyncio.get_running_loop().run_in_executor(None, drive)
        finally:
            server.close()
        assert [a[1] for a in seen] == [first, moved]

    asyncio.run(main())


def test_spoofed_cid_record_moves_nothing(wolf_ready: None, certs: Any) -> None:
    """A record with the right CID that does not authenticate, from another port."""
    context = DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=True)
    done = threading.Event()
    listener, thread, addresses = _echo_listener(context, done)
    try:
        port = listener.getsockname()[1]
        with wolfssl.WolfPeer("client", port=port, cid=b"\x05\x06", timeout=20) as client, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            hs = client.expect_handshake()
            assert client.send_text("genuine") == "echo:genuine"
            forged = (bytes([25, 0xFE, 0xFD, 0, 1]) + (2**40).to_bytes(6, "big") + hs.tx_cid
                      + (40).to_bytes(2, "big") + os.urandom(40))
            attacker.sendto(forged, ("127.0.0.1", port))
            assert client.send_text("still here") == "echo:still here"
            assert {a[1] for a in addresses} == {client.port}
            assert listener.core.stats.address_changes == 0
    finally:
        done.set()
        listener.close()
        thread.join(5)


# ------------------------------------------------- peers without CID

def test_openssl_server_ignores_our_offer(pem_files: dict[str, Path], certs: Any, udp: socket.socket) -> None:
    openssl = require_tool("openssl")
    port = free_udp_port()
    with PeerProcess([openssl, "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                      "-cert", str(pem_files["server_cert"]), "-key", str(pem_files["server_key"])]) as server:
        server.wait_for("ACCEPT")
        udp.connect(("127.0.0.1", port))
        client = Dtls(context=DtlsContext(connection_id=True),
                      expected_peer_fingerprint=certs.server.fingerprint())
        handshake(client, udp)
        assert client.connection_id is None and client.peer_connection_id is None
        send(client, udp, b"no cid here\n")
        server.wait_for("no cid here")
        server.send_line("fine")
        assert receive(client, udp) == b"fine\n"


def test_gnutls_server_ignores_our_offer(pem_files: dict[str, Path], certs: Any, udp: socket.socket) -> None:
    gnutls = require_tool("gnutls-serv")
    port = free_udp_port()
    with PeerProcess([gnutls, "--udp", "--echo", "-p", str(port), "--x509certfile",
                      str(pem_files["server_cert"]), "--x509keyfile", str(pem_files["server_key"])]) as server:
        server.wait_for("listening on IPv4")
        udp.connect(("127.0.0.1", port))
        client = Dtls(context=DtlsContext(connection_id=True),
                      expected_peer_fingerprint=certs.server.fingerprint())
        handshake(client, udp)
        assert client.connection_id is None
        send(client, udp, b"echo me")
        assert receive(client, udp) == b"echo me"


def test_openssl_client_with_our_cid_server(pem_files: dict[str, Path], certs: Any) -> None:
    openssl = require_tool("openssl")
    context = DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=True)
    done = threading.Event()
    listener, thread, addresses = _echo_listener(context, done)
    try:
        port = listener.getsockname()[1]
        with PeerProcess([openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}"]) as client:
            client.wait_for("Cipher is|New, ")
            client.send_line("plain peer")
            client.wait_for("echo:plain peer")
        assert listener.core.stats.address_changes == 0
    finally:
        done.set()
        listener.close()
        thread.join(5)


def test_cli_client_prints_the_cids_wolfssl_negotiated(wolf_ready: None, pem_files: dict[str, Path],
                                                       certs: Any) -> None:
    import subprocess
    import sys
    with wolfssl.WolfPeer("server", cert=pem_files["server_cert"], key=pem_files["server_key"],
                          cid=b"\xde\xad\xbe\xef", timeout=20) as server:
        done = subprocess.run([sys.executable, "-m", "pydtls_ossl", "client", "127.0.0.1",
                               str(server.port), "--fingerprint", certs.server.fingerprint(),
                               "--cid", "4", "--message", "via the cli", "--timeout", "10"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        hs = server.expect_handshake()
        assert f"connection ID      ours {hs.tx_cid.hex()}, peer's deadbeef" in done.stdout
        assert "received 16 bytes: b'echo:via the cli'" in done.stdout
