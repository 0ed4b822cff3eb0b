"""Session resumption: client sessions, server caches, tickets, stores, and their security."""

from __future__ import annotations

import logging
import os
import time
import random
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import (ConfigurationError, ConnectionEstablished, Dtls, DtlsContext, DtlsServer,
                         MemorySessionStore, ResumptionWarning, SessionStore, generate_certificate)
from pydtls_ossl.stores import SessionStore as StoreProtocol

from .helpers import LossyLink, Pair, lossy_handshake
from .interop import PeerProcess
from .test_server import Net, addr

LAYERS = ["engine", "openssl"]


def full_then_resumed(client_ctx: DtlsContext, server_ctx: DtlsContext,
                      **client_kw: Any) -> tuple[Pair, Pair]:
    first = Pair(Dtls(context=client_ctx, **client_kw), Dtls(is_server=True, context=server_ctx))
    first.handshake()
    session = first.client.session()
    assert session is not None
    second = Pair(Dtls(context=client_ctx, session=session, **client_kw),
                  Dtls(is_server=True, context=server_ctx))
    second.handshake()
    return first, second


def datagrams(pair: Pair) -> int:
    return len(pair.sizes)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("how", ["tickets", "cache"])
def test_resume_through_internal_cache_and_tickets(certs: Any, layer: str, how: str) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, record_layer=layer,  # type: ignore[arg-type]
                             session_tickets=how == "tickets")
    client_ctx = DtlsContext(verify="none", record_layer=layer)  # type: ignore[arg-type]
    first, second = full_then_resumed(client_ctx, server_ctx)
    assert not first.client.session_reused() and not first.server.session_reused()
    assert second.client.session_reused() and second.server.session_reused()
    assert datagrams(second) < datagrams(first)
    assert second.client.record_layer == layer
    assert second.roundtrip(b"after resumption") == b"after resumption"
    assert second.roundtrip(b"and back", "server") == b"and back"
    assert second.client.session() is not None  # saved again for the next time


def test_on_new_session_fires_on_both_sides(certs: Any) -> None:
    client_seen: list[tuple[bytes, bytes]] = []
    server_seen: list[tuple[bytes, bytes]] = []
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_tickets=False,
                             on_new_session=lambda i, s: server_seen.append((i, s)))
    client_ctx = DtlsContext(verify="none", on_new_session=lambda i, s: client_seen.append((i, s)))
    first, second = full_then_resumed(client_ctx, server_ctx)
    assert second.client.session_reused()
    assert len(server_seen) == 1 and len(client_seen) == 1  # the resumed handshake adds none
    assert client_seen[0][0] == server_seen[0][0] and len(client_seen[0][0]) == 32
    # What the callback handed over resumes too.
    third = Pair(Dtls(context=client_ctx, session=client_seen[0][1]),
                 Dtls(is_server=True, context=server_ctx))
    third.handshake()
    assert third.client.session_reused()


class CountingStore:
    def __init__(self) -> None:
        self.inner = MemorySessionStore()
        self.calls: list[str] = []

    def get(self, key: bytes) -> bytes | None:
        self.calls.append("get")
        return self.inner.get(key)

    def put(self, key: bytes, value: bytes, ttl: float) -> None:
        self.calls.append(f"put {ttl:g}")
        self.inner.put(key, value, ttl)

    def delete(self, key: bytes) -> None:
        self.calls.append("delete")
        self.inner.delete(key)


@pytest.mark.parametrize("layer", LAYERS)
def test_external_callbacks(certs: Any, layer: str) -> None:
    stored: dict[bytes, bytes] = {}
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_tickets=False,
                             record_layer=layer, session_context_id=b"svc",  # type: ignore[arg-type]
                             session_get=stored.get, session_new=stored.__setitem__,
                             session_remove=lambda k: stored.pop(k, None))
    first, second = full_then_resumed(DtlsContext(verify="none"), server_ctx)
    assert len(stored) == 1
    assert second.client.session_reused() and second.server.session_reused()


def test_memory_store_in_one_argument(certs: Any) -> None:
    store = CountingStore()
    assert isinstance(store, StoreProtocol) and isinstance(MemorySessionStore(), SessionStore)
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_tickets=False,
                             session_context_id=b"svc", session_store=store, session_timeout=120)
    first, second = full_then_resumed(DtlsContext(verify="none"), server_ctx)
    assert second.client.session_reused()
    assert store.calls[:2] == ["put 120", "get"]


def test_a_second_server_context_shares_the_store(certs: Any) -> None:
    store = MemorySessionStore()

    def server() -> DtlsContext:
        return DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_tickets=False,
                           session_context_id=b"svc", session_store=store)

    client_ctx = DtlsContext(verify="none")
    a, b = server(), server()
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=a))
    first.handshake()
    second = Pair(Dtls(context=client_ctx, session=first.client.session()),
                  Dtls(is_server=True, context=b))
    second.handshake()
    assert second.server.session_reused()


def test_store_failures_are_misses(certs: Any, caplog: pytest.LogCaptureFixture) -> None:
    def broken_get(key: bytes) -> bytes | None:
        raise ConnectionError("cache offline")

    stored: dict[bytes, bytes] = {}
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_tickets=False,
                             session_context_id=b"svc", session_get=broken_get,
                             session_new=stored.__setitem__)
    with caplog.at_level(logging.ERROR, logger="pydtls_ossl"):
        first, second = full_then_resumed(DtlsContext(verify="none"), server_ctx)
    assert not second.client.session_reused() and second.client.is_handshake_finished()
    assert any("session_get failed" in r.getMessage() for r in caplog.records)


def test_configuration_errors(certs: Any) -> None:
    cert = (certs.server.cert_pem, certs.server.key_pem)
    with pytest.raises(ConfigurationError, match="session_new"):
        DtlsContext(*cert, session_get=lambda k: None, session_context_id=b"x")
    with pytest.raises(ConfigurationError, match="session_context_id"):
        DtlsContext(*cert, session_get=lambda k: None, session_new=lambda k, v: None)
    with pytest.raises(ConfigurationError, match="session_context_id"):
        DtlsContext(*cert, verify="any-certificate", ticket_secret=os.urandom(32))
    fleet = DtlsContext(*cert, ticket_secret=os.urandom(32))
    with pytest.raises(ConfigurationError, match="session_context_id"):
        Dtls(is_server=True, context=fleet, expected_peer_fingerprint=certs.client.fingerprint())
    with pytest.raises(ConfigurationError, match="session_context_id"):
        DtlsServer(fleet, expected_peer_fingerprint={})
    named = DtlsContext(*cert, ticket_secret=os.urandom(32), session_context_id=b"svc")
    Dtls(is_server=True, context=named, expected_peer_fingerprint=certs.client.fingerprint())
    with pytest.raises(ValueError, match="32 bytes"):
        DtlsContext(*cert, ticket_secret=b"short")
    with pytest.raises(ValueError):
        DtlsContext(*cert, session_store=MemorySessionStore(), session_get=lambda k: None)
    with pytest.raises(ValueError, match="for clients"):
        Dtls(is_server=True, context=named, session=b"x")


# ------------------------------------------------------------- fleet tickets


def test_fleet_tickets_in_one_process(certs: Any) -> None:
    secret = os.urandom(48)

    def server(ticket_secret: bytes) -> DtlsContext:
        return DtlsContext(certs.server.cert_pem, certs.server.key_pem, ticket_secret=ticket_secret,
                           session_context_id=b"fleet")

    client_ctx = DtlsContext(verify="none")
    a, b, other = server(secret), server(secret), server(os.urandom(32))
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=a))
    first.handshake()
    ticket_session = first.client.session()
    on_b = Pair(Dtls(context=client_ctx, session=ticket_session), Dtls(is_server=True, context=b))
    on_b.handshake()
    assert on_b.server.session_reused() and on_b.client.session_reused()
    on_other = Pair(Dtls(context=client_ctx, session=ticket_session),
                    Dtls(is_server=True, context=other))
    on_other.handshake()  # no error: a full handshake
    assert not on_other.server.session_reused() and on_other.server.is_handshake_finished()


def test_random_ticket_keys_without_a_secret(certs: Any) -> None:
    client_ctx = DtlsContext(verify="none")
    a = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_cache=False)
    b = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_cache=False)
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=a))
    first.handshake()
    other = Pair(Dtls(context=client_ctx, session=first.client.session()),
                 Dtls(is_server=True, context=b))
    other.handshake()
    assert not other.server.session_reused()


def server_process(certs: Any, tmp_path: Path, *extra: str) -> PeerProcess:
    cert, key = tmp_path / "s.pem", tmp_path / "s.key"
    if not cert.exists():
        certs.server.write(cert, key)
    script = Path(__file__).resolve().parent / "resume_server.py"
    return PeerProcess([sys.executable, str(script), str(cert), str(key), *extra])


def connect_once(port: int, session: bytes | None = None,
                 ctx: DtlsContext | None = None) -> tuple[bytes | None, bool]:
    ctx = ctx or DtlsContext(verify="none", initial_rto=0.2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResumptionWarning)
            wrapped = ctx.wrap_socket(sock, session=session)
        wrapped.send(b"hello")
        assert wrapped.recv() == b"hello"
        result = (wrapped.session(), wrapped.session_reused())
        wrapped.close()
    return result


def test_fleet_tickets_across_processes(certs: Any, tmp_path: Path) -> None:
    secret = os.urandom(32).hex()
    with server_process(certs, tmp_path, "--ticket-secret", secret) as a, \
            server_process(certs, tmp_path, "--ticket-secret", secret) as b, \
            server_process(certs, tmp_path, "--ticket-secret", os.urandom(32).hex()) as c:
        ports = [int(p.wait_for(r"ready (\d+)").group(1)) for p in (a, b, c)]
        session, reused = connect_once(ports[0])
        assert not reused and session is not None
        a.wait_for("established resumed=False")
        session_b, reused_b = connect_once(ports[1], session)
        assert reused_b
        b.wait_for("established resumed=True")
        _, reused_c = connect_once(ports[2], session)
        assert not reused_c  # another secret: a full handshake, no error
        c.wait_for("established resumed=False")


# --------------------------------------------------------------- Redis


def test_redis_store_across_processes(certs: Any, tmp_path: Path, redis_server: Any) -> None:
    url = redis_server.url
    with server_process(certs, tmp_path, "--redis", url, "--no-tickets") as a, \
            server_process(certs, tmp_path, "--redis", url, "--no-tickets") as b:
        port_a, port_b = (int(p.wait_for(r"ready (\d+)").group(1)) for p in (a, b))
        session, reused = connect_once(port_a)
        assert not reused
        _, reused = connect_once(port_b, session)
        assert reused
        b.wait_for("established resumed=True")
        redis_server.stop()  # Redis goes away mid-test
        _, reused = connect_once(port_b, session)
        assert not reused  # a full handshake: no crash, no hang
        session2, reused = connect_once(port_a)
        assert not reused and session2 is not None
        redis_server.start()  # back, empty
        time.sleep(1.2)  # each store skips Redis for retry_after (1 s) after a failure
        _, reused = connect_once(port_b, session2)
        assert not reused
        session3, _ = connect_once(port_a)
        _, reused = connect_once(port_b, session3)
        assert reused  # working again once Redis is


# ------------------------------------------------------------ client side


def test_damaged_session_bytes_warn_and_fall_back(certs: Any) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    client_ctx = DtlsContext(verify="none")
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    first.handshake()
    good = first.client.session()
    assert good is not None
    rng = random.Random(5)
    candidates = [b"", b"\x00", good[:-1], good[: len(good) // 2], good + b"\x00", os.urandom(300)]
    for _ in range(60):
        damaged = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        candidates.append(bytes(damaged))
    for damaged in candidates:
        with pytest.warns(ResumptionWarning):
            pair = Pair(Dtls(context=client_ctx, session=damaged),
                        Dtls(is_server=True, context=server_ctx))
        pair.handshake()  # a full handshake, every time
        assert pair.client.is_handshake_finished() and not pair.client.session_reused()
    # Bare DER (what other tools write) is taken as it is, and resumes.
    bare = good[:good.rindex(b"\x00pydtls-session\x00")]
    pair = Pair(Dtls(context=client_ctx, session=bare), Dtls(is_server=True, context=server_ctx))
    pair.handshake()
    assert pair.client.session_reused()


def test_foreign_and_tls_sessions(certs: Any) -> None:
    client_ctx = DtlsContext(verify="none")
    other = generate_certificate("other")
    other_server = DtlsContext(other.cert_pem, other.key_pem)
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True,
                                                context=DtlsContext(certs.server.cert_pem,
                                                                    certs.server.key_pem)))
    first.handshake()
    foreign = Pair(Dtls(context=client_ctx, session=first.client.session()),
                   Dtls(is_server=True, context=other_server))
    foreign.handshake()  # the other server does not know it: a full handshake
    assert not foreign.client.session_reused()


def test_expired_session_warns(certs: Any) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_timeout=1)
    client_ctx = DtlsContext(verify="none")
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    first.handshake()
    session = first.client.session()
    time.sleep(2.1)
    with pytest.warns(ResumptionWarning, match="expired"):
        second = Pair(Dtls(context=client_ctx, session=session),
                      Dtls(is_server=True, context=server_ctx))
    second.handshake()
    assert not second.client.session_reused()


def test_pinned_client_never_resumes_another_certificate(certs: Any) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    first = Pair(Dtls(context=DtlsContext(verify="none")), Dtls(is_server=True, context=server_ctx))
    first.handshake()
    session = first.client.session()
    # A client pinning another certificate: the saved session's server would not pass the pin.
    with pytest.warns(ResumptionWarning, match="pinned fingerprint"):
        pinned = Dtls(context=DtlsContext(), session=session,
                      expected_peer_fingerprint=generate_certificate("x").fingerprint())
    assert pinned.state.name == "NEW"
    # The right pin resumes.
    right = Pair(Dtls(context=DtlsContext(), session=session,
                      expected_peer_fingerprint=certs.server.fingerprint()),
                 Dtls(is_server=True, context=server_ctx))
    right.handshake()
    assert right.client.session_reused()


def test_ca_client_reverifies_the_session_certificate(certs: Any) -> None:
    server_ctx = DtlsContext(certs.signed.cert_pem, certs.signed.key_pem)
    ca = DtlsContext(cadata=certs.ca.cert_pem)
    first = Pair(Dtls(context=ca, server_hostname="localhost"), Dtls(is_server=True, context=server_ctx))
    first.handshake()
    session = first.client.session()
    again = Pair(Dtls(context=ca, session=session, server_hostname="localhost"),
                 Dtls(is_server=True, context=server_ctx))
    again.handshake()
    assert again.client.session_reused()
    with pytest.warns(ResumptionWarning, match="no longer verifies"):
        Dtls(context=ca, session=session, server_hostname="elsewhere.test")
    with pytest.warns(ResumptionWarning, match="no longer verifies"):
        Dtls(context=DtlsContext(cadata=generate_certificate("Other CA", is_ca=True).cert_pem),
             session=session)


def test_server_pinning_clients_does_not_resume_under_another_pin(certs: Any) -> None:
    other = generate_certificate("other client")

    def client(cert: Any, session: bytes | None = None) -> Dtls:
        return Dtls(context=DtlsContext(cert.cert_pem, cert.key_pem), session=session,
                    expected_peer_fingerprint=certs.server.fingerprint())

    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    first = Pair(client(certs.client), Dtls(is_server=True, context=server_ctx,
                                            expected_peer_fingerprint=certs.client.fingerprint()))
    first.handshake()
    session = first.client.session()
    same_pin = Pair(client(certs.client, session),
                    Dtls(is_server=True, context=server_ctx,
                         expected_peer_fingerprint=certs.client.fingerprint()))
    same_pin.handshake()
    assert same_pin.server.session_reused()
    assert same_pin.server.get_peer_fingerprint() == certs.client.fingerprint()
    # The session holds certs.client's certificate: a server now pinning another never resumes it.
    other_pin = Pair(client(other, session), Dtls(is_server=True, context=server_ctx,
                                                  expected_peer_fingerprint=other.fingerprint()))
    other_pin.handshake()
    assert not other_pin.server.session_reused()
    assert other_pin.server.get_peer_fingerprint() == other.fingerprint()
    # Nor does a server of this context that does not pin at all (other verification settings).
    unpinned = Pair(client(certs.client, session), Dtls(is_server=True, context=server_ctx))
    unpinned.handshake()
    assert not unpinned.server.session_reused()


def test_other_session_context_id_is_not_resumed(certs: Any) -> None:
    store = MemorySessionStore()

    def server(context_id: bytes) -> DtlsContext:
        return DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_tickets=False,
                           session_context_id=context_id, session_store=store)

    client_ctx = DtlsContext(verify="none")
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server(b"billing")))
    first.handshake()
    other = Pair(Dtls(context=client_ctx, session=first.client.session()),
                 Dtls(is_server=True, context=server(b"telemetry")))
    other.handshake()
    assert not other.server.session_reused() and other.server.is_handshake_finished()


def test_what_a_resumed_association_reports(certs: Any) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                             srtp_profiles=["SRTP_AEAD_AES_128_GCM"], alpn_protocols=["webrtc"])
    client_ctx = DtlsContext(certs.client.cert_pem, certs.client.key_pem,
                             srtp_profiles=["SRTP_AEAD_AES_128_GCM"], alpn_protocols=["webrtc"])
    pins = {"expected_peer_fingerprint": certs.server.fingerprint()}
    first = Pair(Dtls(context=client_ctx, **pins),
                 Dtls(is_server=True, context=server_ctx,
                      expected_peer_fingerprint=certs.client.fingerprint()))
    first.handshake()
    second = Pair(Dtls(context=client_ctx, session=first.client.session(), **pins),
                  Dtls(is_server=True, context=server_ctx,
                       expected_peer_fingerprint=certs.client.fingerprint()))
    second.handshake()
    assert second.client.session_reused() and second.server.session_reused()
    for a, b in ((first.client, second.client), (first.server, second.server)):
        assert b.get_peer_fingerprint() == a.get_peer_fingerprint() is not None
        assert b.selected_srtp_profile() == a.selected_srtp_profile() is not None
        assert b.selected_alpn_protocol() == a.selected_alpn_protocol() == "webrtc"
        assert b.cipher() == a.cipher()
        assert b.extended_master_secret and a.extended_master_secret
        # New randoms: the keys of the new association are not the first one's.
        assert b.export_keys("EXTRACTOR-dtls_srtp", 56) != a.export_keys("EXTRACTOR-dtls_srtp", 56)
    assert second.client.srtp_keys().local_master == second.server.srtp_keys().remote_master


def test_psk_session_resumes_with_its_identity() -> None:
    key = bytes(range(16))
    server_ctx = DtlsContext(psk_keys={"dev-9": key})
    client_ctx = DtlsContext(psk=("dev-9", key))
    first, second = full_then_resumed(client_ctx, server_ctx)
    assert second.client.session_reused()
    assert second.server.psk_identity() == "dev-9" == second.client.psk_identity()


def test_verify_peer_servers_do_full_handshakes(certs: Any) -> None:
    """The hook must see every peer, so sessions are never resumed past it."""
    asked: list[Any] = []
    server = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.05),
                        verify_peer=lambda a, f, i: asked.append(a) is None)
    net = Net(server)
    client_ctx = DtlsContext(certs.client.cert_pem, certs.client.key_pem, initial_rto=0.05)
    first = net.add(addr(1), Dtls(context=client_ctx, expected_peer_fingerprint=certs.server.fingerprint()))
    net.run(lambda: first.is_handshake_finished() and server.handshaking == 0)
    second = net.add(addr(2), Dtls(context=client_ctx, session=first.session(),
                                   expected_peer_fingerprint=certs.server.fingerprint()))
    net.run(lambda: second.is_handshake_finished() and server.handshaking == 0)
    assert not second.session_reused() and asked == [addr(1), addr(2)]


def test_resumption_through_the_server_core_with_cookies(certs: Any) -> None:
    server = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.05))
    net = Net(server)
    client_ctx = DtlsContext(verify="none", initial_rto=0.05)
    first = net.add(addr(1), Dtls(context=client_ctx))
    net.run(lambda: first.is_handshake_finished() and server.handshaking == 0)
    second = net.add(addr(2), Dtls(context=client_ctx, session=first.session()))
    net.run(lambda: second.is_handshake_finished() and server.handshaking == 0)
    assert second.session_reused()
    assert server.connection(addr(2)).session_reused()  # type: ignore[union-attr]
    assert server.stats.hello_verify_requests == 2


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("seed", range(6))
def test_resumption_under_loss(certs: Any, layer: str, seed: int) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.02,
                             max_rto=0.2, record_layer=layer)  # type: ignore[arg-type]
    client_ctx = DtlsContext(verify="none", initial_rto=0.02, max_rto=0.2,
                             record_layer=layer)  # type: ignore[arg-type]
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    first.handshake()
    client = Dtls(context=client_ctx, session=first.client.session())
    server = Dtls(is_server=True, context=server_ctx)
    lossy_handshake(client, server, LossyLink(seed, 0.2), LossyLink(seed + 50, 0.2))
    assert client.session_reused() and server.session_reused()
    # The client sent the last flight; a lost Finished was resent when the server asked again.
    pair = Pair(client, server)
    for _ in range(3):
        client.write(b"x")
        pair.transfer()
    got = []
    while (data := server.read()) is not None:
        got.append(data)
    assert got == [b"x"] * 3


def test_client_resends_its_finished_when_the_server_retransmits(certs: Any) -> None:
    """Abbreviated handshake: the client's Finished is lost; the server's retransmission
    of its flight makes the (finished) client send it again."""
    for layer in LAYERS:
        server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.02,
                                 record_layer=layer)  # type: ignore[arg-type]
        client_ctx = DtlsContext(verify="none", record_layer=layer)  # type: ignore[arg-type]
        first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
        first.handshake()
        client = Dtls(context=client_ctx, session=first.client.session())
        server = Dtls(is_server=True, context=server_ctx)
        client.handshake()
        server.feed(client.pull())  # type: ignore[arg-type]
        for datagram in iter(server.pull, None):
            client.feed(datagram)
        assert client.handshake() and client.session_reused()
        lost = list(iter(client.pull, None))  # CCS + Finished: dropped
        assert lost and not server.is_handshake_finished()
        time.sleep(server.get_timeout() or 0)
        server.handle_timeout()
        for datagram in iter(server.pull, None):
            client.feed(datagram)
        resent = list(iter(client.pull, None))
        assert resent, f"{layer}: the client did not resend its Finished"
        for datagram in resent:
            server.feed(datagram)
        assert server.is_handshake_finished() and server.session_reused()


def test_asyncio_and_blocking_clients_resume(certs: Any) -> None:
    import asyncio

    from pydtls_ossl import aio

    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)

    async def echo(conn: Any) -> None:
        async for message in conn:
            conn.send(message)

    async def main() -> None:
        async with await aio.serve(echo, "127.0.0.1", 0, context=ctx) as server:
            port = server.address[1]
            session = None
            for attempt in range(2):
                conn = await aio.connect("127.0.0.1", port, context=DtlsContext(verify="none"),
                                         session=session)
                assert conn.session_reused() is (attempt == 1)
                conn.send(b"x")
                assert await asyncio.wait_for(conn.recv(), 10) == b"x"
                session = conn.session()
                await conn.close()
            # and a blocking client, with the asyncio client's session
            _, reused = await asyncio.to_thread(connect_once, port, session)
            assert reused

    asyncio.run(main())


def test_sessions_survive_engines_dropped_without_close(certs: Any) -> None:
    """Freed without close_notify, libssl would drop the session from its cache: on
    either record layer, an association that ended well keeps its session resumable."""
    for layer in LAYERS:
        server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_tickets=False,
                                 record_layer=layer)  # type: ignore[arg-type]
        client_ctx = DtlsContext(verify="none", record_layer=layer)  # type: ignore[arg-type]
        first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
        first.handshake()
        session = first.client.session()
        del first  # no close()
        import gc
        gc.collect()
        second = Pair(Dtls(context=client_ctx, session=session),
                      Dtls(is_server=True, context=server_ctx))
        second.handshake()
        assert second.server.session_reused(), layer


def test_offering_a_session_decodes_it_once_per_context(certs: Any) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    client_ctx = DtlsContext(verify="none")
    first = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    first.handshake()
    session = first.client.session()
    for _ in range(3):
        pair = Pair(Dtls(context=client_ctx, session=session), Dtls(is_server=True, context=server_ctx))
        pair.handshake()
        assert pair.client.session_reused()
    assert len(client_ctx.resumption._decoded) == 1
