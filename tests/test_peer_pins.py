"""Per-peer verification in the server core: pinned fingerprints and verify_peer.

A WebRTC-style server learns each client's certificate fingerprint from
signalling; the handshake must fail inside it, with bad_certificate, when the
client presents another certificate. ``verify_peer`` gets the last word on a
peer's certificate or PSK identity, with the address at hand.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import (CertificateError, Dtls, DtlsContext, FingerprintMismatch, HandshakeError,
                         aio, generate_certificate)
from pydtls_ossl._pump import serve
from pydtls_ossl.server import (ConnectionEstablished, ConnectionTerminated, DataReceived,
                                DtlsServer, ServerEvent)

from .conftest import require_tool
from .interop import PeerProcess, free_udp_port
from .test_server import Net, addr


@pytest.fixture
def server_ctx(certs: Any) -> DtlsContext:
    return DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.05)


def cert_client(certs: Any, cert: Any) -> Dtls:
    return Dtls(context=DtlsContext(cert.cert_pem, cert.key_pem, initial_rto=0.05),
                expected_peer_fingerprint=certs.server.fingerprint())


def settle(net: Net, clients: list[Dtls]) -> None:
    net.run(lambda: all(c.state.name not in ("NEW", "HANDSHAKING") for c in clients)
            and net.server.handshaking == 0)


def outcome(net: Net, address: Any) -> Any:
    for event in net.events:
        if event.address == address and isinstance(event, (ConnectionEstablished,
                                                           ConnectionTerminated)):
            return event
    raise AssertionError(f"no outcome for {address}")


def client_error(client: Dtls) -> BaseException:
    with pytest.raises(Exception) as info:
        client.handshake()
    return info.value


def test_pins_by_mapping(certs: Any, server_ctx: DtlsContext) -> None:
    other = generate_certificate("impostor")
    pins = {addr(1): certs.client.fingerprint(), addr(2): certs.client.fingerprint()}
    server = DtlsServer(server_ctx, expected_peer_fingerprint=pins)
    net = Net(server)
    good = net.add(addr(1), cert_client(certs, certs.client))
    bad = net.add(addr(2), cert_client(certs, other))
    settle(net, [good, bad])
    established = outcome(net, addr(1))
    assert isinstance(established, ConnectionEstablished)
    assert established.peer_fingerprint == certs.client.fingerprint()
    failed = outcome(net, addr(2))
    assert isinstance(failed, ConnectionTerminated) and failed.reason == "handshake failed"
    assert isinstance(failed.error, FingerprintMismatch)
    assert failed.error.alert is not None and failed.error.alert.description == 42  # bad_certificate
    error = client_error(bad)
    assert isinstance(error, HandshakeError) and "bad certificate" in str(error)
    assert good.is_handshake_finished() and len(server) == 1


def test_pins_by_function_and_no_pin(certs: Any, server_ctx: DtlsContext) -> None:
    asked: list[Any] = []

    def pins(address: Any) -> Any:
        asked.append(address)
        return [certs.client.fingerprint()] if address == addr(1) else None

    server = DtlsServer(server_ctx, expected_peer_fingerprint=pins)
    net = Net(server)
    pinned = net.add(addr(1), cert_client(certs, certs.client))
    unpinned = net.add(addr(2), cert_client(certs, generate_certificate("anyone")))
    settle(net, [pinned, unpinned])
    assert isinstance(outcome(net, addr(1)), ConnectionEstablished)
    free = outcome(net, addr(2))
    # No pin: the context's own verification (none, for this server): no certificate asked for.
    assert isinstance(free, ConnectionEstablished) and free.peer_fingerprint is None
    assert sorted(asked) == [addr(1), addr(2)]


def test_verify_peer_sees_address_and_fingerprint(certs: Any, server_ctx: DtlsContext) -> None:
    seen: list[tuple[Any, Any, Any]] = []
    refused = generate_certificate("refused")

    def verify(address: Any, fingerprint: str | None, identity: str | None) -> bool:
        seen.append((address, fingerprint, identity))
        return fingerprint != refused.fingerprint()

    server = DtlsServer(server_ctx, verify_peer=verify)
    net = Net(server)
    ok = net.add(addr(1), cert_client(certs, certs.client))
    no = net.add(addr(2), cert_client(certs, refused))
    settle(net, [ok, no])
    assert sorted(seen) == sorted([(addr(1), certs.client.fingerprint(), None),
                                   (addr(2), refused.fingerprint(), None)])
    assert outcome(net, addr(1)).peer_fingerprint == certs.client.fingerprint()
    failed = outcome(net, addr(2))
    assert isinstance(failed.error, CertificateError)
    assert "refused by verify_peer" in str(failed.error)
    assert "bad certificate" in str(client_error(no))


def test_verify_peer_after_the_pin(certs: Any, server_ctx: DtlsContext) -> None:
    """A pin mismatch fails before the hook is asked; a match is then put to the hook."""
    calls: list[Any] = []
    server = DtlsServer(server_ctx, expected_peer_fingerprint=lambda a: certs.client.fingerprint(),
                        verify_peer=lambda a, f, i: calls.append(a) is None and a == addr(1))
    net = Net(server)
    clients = [net.add(addr(1), cert_client(certs, certs.client)),
               net.add(addr(2), cert_client(certs, certs.client)),
               net.add(addr(3), cert_client(certs, generate_certificate("x")))]
    settle(net, clients)
    assert isinstance(outcome(net, addr(1)), ConnectionEstablished)
    assert isinstance(outcome(net, addr(2)).error, CertificateError)
    assert not isinstance(outcome(net, addr(2)).error, FingerprintMismatch)
    assert isinstance(outcome(net, addr(3)).error, FingerprintMismatch)
    assert sorted(calls) == [addr(1), addr(2)]


def test_verify_peer_psk_identity(certs: Any) -> None:
    keys = {"dev-ok": b"k" * 16, "dev-banned": b"b" * 16}
    server = DtlsServer(DtlsContext(psk_keys=keys, initial_rto=0.05),
                        verify_peer=lambda a, f, identity: identity != "dev-banned")
    net = Net(server)
    ok = net.add(addr(1), Dtls(context=DtlsContext(psk=("dev-ok", keys["dev-ok"]), initial_rto=0.05)))
    no = net.add(addr(2), Dtls(context=DtlsContext(psk=("dev-banned", keys["dev-banned"]),
                                                   initial_rto=0.05)))
    settle(net, [ok, no])
    assert outcome(net, addr(1)).psk_identity == "dev-ok"
    failed = outcome(net, addr(2))
    assert isinstance(failed.error, HandshakeError) and "PSK identity refused" in str(failed.error)
    assert "unknown psk identity" in str(client_error(no))


def test_verify_peer_that_raises_fails_that_handshake_only(certs: Any,
                                                          server_ctx: DtlsContext) -> None:
    def verify(address: Any, fingerprint: str | None, identity: str | None) -> bool:
        if address == addr(2):
            raise RuntimeError("directory offline")
        return True

    server = DtlsServer(server_ctx, verify_peer=verify)
    net = Net(server)
    clients = [net.add(addr(1), cert_client(certs, certs.client)),
               net.add(addr(2), cert_client(certs, certs.client))]
    settle(net, clients)
    assert isinstance(outcome(net, addr(1)), ConnectionEstablished)
    error = outcome(net, addr(2)).error
    assert isinstance(error, CertificateError) and "directory offline" in str(error)
    assert isinstance(error.__cause__, RuntimeError)


def test_bad_arguments(server_ctx: DtlsContext) -> None:
    with pytest.raises(TypeError):
        DtlsServer(server_ctx, expected_peer_fingerprint="AB:CD")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DtlsServer(server_ctx, verify_peer=42)  # type: ignore[arg-type]


# ------------------------------------------------------------ surfaces


def test_blocking_listener_passes_pins_through(certs: Any) -> None:
    other = generate_certificate("intruder")
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    with ctx.listen(("127.0.0.1", 0),
                    expected_peer_fingerprint=lambda a: certs.client.fingerprint()) as listener:
        port = listener.address[1]
        import threading
        accepted: list[Any] = []
        thread = threading.Thread(target=lambda: accepted.append(
            listener.accept(timeout=10).get_peer_fingerprint()))
        thread.start()
        for cert, should_pass in ((other, False), (certs.client, True)):
            client_ctx = DtlsContext(cert.cert_pem, cert.key_pem, initial_rto=0.1)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.connect(("127.0.0.1", port))
                if should_pass:
                    wrapped = client_ctx.wrap_socket(
                        sock, expected_peer_fingerprint=certs.server.fingerprint())
                    wrapped.close()
                else:
                    with pytest.raises(HandshakeError, match="bad certificate"):
                        client_ctx.wrap_socket(sock, expected_peer_fingerprint=certs.server.fingerprint())
        thread.join(10)
    assert accepted == [certs.client.fingerprint()]
    assert listener.core.stats.handshakes_failed == 1


def test_asyncio_server_passes_pins_through(certs: Any) -> None:
    other = generate_certificate("intruder")
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)

    async def handler(conn: Any) -> None:
        conn.send(b"welcome " + conn.get_peer_fingerprint().encode()[:5])
        await conn.close()

    async def main() -> None:
        pins: dict[Any, str] = {}
        async with await aio.serve(handler, "127.0.0.1", 0, context=ctx,
                                   expected_peer_fingerprint=pins) as server:
            port = server.address[1]
            for cert, should_pass in ((other, False), (certs.client, True)):
                local = ("127.0.0.1", free_udp_port())
                pins[local] = certs.client.fingerprint()  # learnt from "signalling"
                client_ctx = DtlsContext(cert.cert_pem, cert.key_pem, initial_rto=0.1)
                if should_pass:
                    conn = await aio.connect("127.0.0.1", port, context=client_ctx, local_addr=local,
                                             expected_peer_fingerprint=certs.server.fingerprint())
                    assert (await asyncio.wait_for(conn.recv(), 10)).startswith(b"welcome")
                    await conn.close()
                else:
                    with pytest.raises(HandshakeError, match="bad certificate"):
                        await aio.connect("127.0.0.1", port, context=client_ctx, local_addr=local,
                                          expected_peer_fingerprint=certs.server.fingerprint())
            assert server.core.stats.handshakes_failed == 1
            assert server.core.stats.handshakes_completed == 1

    asyncio.run(main())


# -------------------------------------------------------------- interop


def run_core(server: DtlsServer, sock: socket.socket, seen: list[ServerEvent]) -> None:
    def on_event(event: ServerEvent) -> None:
        seen.append(event)
        if isinstance(event, DataReceived):
            server.send(event.address, b"echo: " + event.data)
    serve(server, sock, on_event,
          lambda: any(isinstance(e, (ConnectionEstablished, ConnectionTerminated)) for e in seen))


def peer_args(tool: str, port: int, cert: Path, key: Path) -> list[str]:
    if tool == "openssl":
        return [require_tool("openssl"), "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
                "-cert", str(cert), "-key", str(key)]
    return [require_tool("gnutls-cli"), "--udp", "-p", str(port), "127.0.0.1", "--insecure",
            "--x509certfile", str(cert), "--x509keyfile", str(key)]


@pytest.mark.interop
@pytest.mark.parametrize("tool", ["openssl", "gnutls"])
@pytest.mark.parametrize("right_pin", [True, False])
def test_third_party_clients_against_per_peer_pins(tool: str, right_pin: bool, certs: Any,
                                                   tmp_path: Path) -> None:
    presented = certs.client if right_pin else generate_certificate("not-the-one")
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    presented.write(cert, key)
    server = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem),
                        expected_peer_fingerprint=lambda a: certs.client.fingerprint())
    seen: list[ServerEvent] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with PeerProcess(peer_args(tool, sock.getsockname()[1], cert, key)) as peer:
            run_core(server, sock, seen)
            outcome = next(e for e in seen if isinstance(e, (ConnectionEstablished,
                                                              ConnectionTerminated)))
            if right_pin:
                assert isinstance(outcome, ConnectionEstablished)
                assert outcome.peer_fingerprint == certs.client.fingerprint()
                peer.wait_for("Cipher is ECDHE-ECDSA" if tool == "openssl"
                              else "Handshake was completed")
                peer.send_line("pinned hello")
                serve(server, sock, lambda e: (seen.append(e), isinstance(e, DataReceived)
                                               and server.send(e.address, b"echo: " + e.data)),
                      lambda: any(isinstance(e, DataReceived) for e in seen))
                peer.wait_for("echo: pinned hello")
            else:
                assert isinstance(outcome, ConnectionTerminated)
                assert isinstance(outcome.error, FingerprintMismatch)
                for datagram, address in server.datagrams_to_send():
                    sock.sendto(datagram, address)
                peer.wait_for("(?i)bad.certificate|bad_certificate|certificate is bad")
