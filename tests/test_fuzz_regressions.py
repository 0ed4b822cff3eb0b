"""Bugs the fuzzers found, each with its minimized input; all fixed, kept as regressions.

While a bug was open, an entry in pydtls_ossl/fuzz/known.py let long fuzz runs
go on past it; the entries went with the fixes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from pydtls_ossl import ConnectionState, Dtls, DtlsContext, Verify
from pydtls_ossl._ffi import lib
from pydtls_ossl.fuzz._runner import replay
from pydtls_ossl.server import DtlsServer

from .helpers import Pair, drain

#: feed_client, minimized: an alert record at epoch 1 (sequence 0x99ad00000000)
#: whose 2-byte body cannot hold AES-GCM's 8-byte nonce and 16-byte tag
SHORT_PROTECTED = bytes.fromhex("15fefd000199ad000000000002001a")


def make(certs: Any, layer: str = "engine", rto: float = 1.0, ciphers: str | None = None) -> Pair:
    server = Dtls(is_server=True, context=DtlsContext(
        certs.server.cert_pem, certs.server.key_pem, record_layer=layer,  # type: ignore[arg-type]
        initial_rto=rto, ciphers=ciphers), expected_peer_fingerprint=certs.client.fingerprint())
    client = Dtls(context=DtlsContext(
        certs.client.cert_pem, certs.client.key_pem, record_layer=layer,  # type: ignore[arg-type]
        initial_rto=rto, ciphers=ciphers), expected_peer_fingerprint=certs.server.fingerprint())
    return Pair(client, server)


# ------------------------------------------ known: openssl-short-aead-record

@pytest.mark.parametrize("victim", ["client", "server"])
def test_short_protected_record_does_not_kill_a_libssl_association(certs: Any, victim: str) -> None:
    """libssl (3.0.19) answers a protected record too short for the AEAD's
    nonce and tag with a fatal internal_error instead of dropping it."""
    p = make(certs, layer="openssl")
    p.handshake()
    engine = p.client if victim == "client" else p.server
    assert engine.feed(SHORT_PROTECTED) == 0
    assert lib.ERR_peek_error() == 0
    assert engine.state is ConnectionState.ESTABLISHED, "one unauthenticated datagram ended it"
    assert p.roundtrip(b"still up") == b"still up"


@pytest.mark.parametrize("victim", ["client", "server"])
def test_short_protected_record_does_not_kill_a_handshake(certs: Any, victim: str) -> None:
    """The same record during the handshake (default record layer: libssl
    carries the records until the handover) is buffered for epoch 1, then
    fails the handshake once the keys are in place."""
    p = make(certs)
    p.client.handshake()
    for datagram in drain(p.client):  # ClientHello
        p.server.feed(datagram)
    (p.client if victim == "client" else p.server).feed(SHORT_PROTECTED)
    p.handshake()  # raises HandshakeError/DtlsError today (internal_error)
    assert p.roundtrip(b"still up") == b"still up"


# ------------------------------------- known: server-replacement-no-deadline

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cookie_hello(server: DtlsServer, client: Dtls, address: Any) -> bytes:
    client.handshake()
    server.feed(drain(client)[0], address)
    [(hvr, _)] = server.datagrams_to_send()
    client.feed(hvr)
    return drain(client)[0]


def test_a_restarts_replacement_handshake_expires(certs: Any) -> None:
    """server (minimized): a real client at an address, then a ClientHello with
    a valid cookie from that address (a restarted peer whose handshake is then
    lost) starts a replacement handshake that nothing ever expires: it holds
    a handshake slot and blocks every later restart from that address."""
    clock = FakeClock()
    server = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem),
                        handshake_timeout=5.0, clock=clock)
    address = ("192.0.2.7", 5684)
    first = Dtls(context=DtlsContext(verify=Verify.NONE))
    server.feed(_cookie_hello(server, first, address), address)
    while not first.is_handshake_finished():
        for datagram, _ in server.datagrams_to_send():
            first.feed(datagram)
        first.handshake()
        for datagram in drain(first):
            server.feed(datagram, address)
    assert server.handshaking == 0 and len(server) == 1
    restarted = Dtls(context=DtlsContext(verify=Verify.NONE))
    server.feed(_cookie_hello(server, restarted, address), address)
    assert server.handshaking == 1  # the replacement; its flight is lost
    server.datagrams_to_send()
    clock.now += 6.0
    server.handle_timeout()
    assert server.handshaking == 0, "the replacement outlived the handshake deadline"
    again = Dtls(context=DtlsContext(verify=Verify.NONE))
    server.feed(_cookie_hello(server, again, address), address)
    assert server.handshaking == 1, "a later restart from the same address is refused"


# --------------------------------------- stale retransmission packed with a flight

def test_a_stale_retransmission_does_not_hide_the_next_flight(certs: Any) -> None:
    """Found by record_layer as a lossless handshake that stalled: when the
    client's timer has run out by the time the server's flight arrives,
    OpenSSL retransmits the ClientHello inside that read and then writes the
    next flight; pd_pull packs both into one datagram, and OpenSSL's server,
    seeing the stale ClientHello first, resends its flight and drops the rest
    of the datagram. The handshake then waits a whole retransmission timeout."""
    p = make(certs, rto=0.02)
    p.client.handshake()
    for datagram in drain(p.client):
        p.server.feed(datagram)
    flight = drain(p.server)
    time.sleep(0.05)  # the client's 20 ms timer runs out before the flight arrives
    for datagram in flight:
        p.client.feed(datagram)
    p.client.handshake()
    for datagram in drain(p.client):  # today: one datagram, ClientHello first
        p.server.feed(datagram)
    p.server.handshake()
    assert p.server.is_handshake_finished(), "the server dropped the client's last flight"


# ------------------------------------------------------ known: cookie-hello-slack

def test_cookie_hello_with_slack_in_its_record_is_dropped() -> None:
    """feed_server, state fresh-cookie (minimized): the recorded ClientHello
    with a valid cookie, its record one byte longer than the hello fragment
    (a zero byte after it). The cookie path accepts it without the check that
    pd_feed makes elsewhere (pd_plausible) and OpenSSL fails the engine."""
    from pydtls_ossl.fuzz._world import COOKIE_ADDRESS, world

    w = world("engine")
    client = w.client()
    server = Dtls(is_server=True, context=w.server_ctx, peer_address=COOKIE_ADDRESS)
    client.handshake()
    server.feed(drain(client)[0])
    client.feed(drain(server)[0])  # HelloVerifyRequest
    hello = drain(client)[0]
    length = int.from_bytes(hello[11:13], "big")
    slack = hello[:11] + (length + 1).to_bytes(2, "big") + hello[13:] + b"\x00"
    server.feed(slack)
    assert lib.ERR_peek_error() == 0
    assert server.state is not ConnectionState.FAILED, "an invalid record failed the engine"
    server.feed(hello)
    p = Pair(client, server)
    p.handshake()
    assert p.roundtrip(b"up") == b"up"


def test_fuzz_replays_of_the_minimized_inputs_fail_in_strict_mode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The inputs as the targets saw them (strict: known bugs are reported)."""
    monkeypatch.setenv("PYDTLS_FUZZ_STRICT", "1")
    # feed_client state 3 (established) / 4 (established-openssl): the record above
    replay("feed_client", [bytes([4]) + SHORT_PROTECTED])


def test_short_record_behind_a_garbage_header_is_dropped() -> None:
    """feed_client, state established-openssl, as found (28 bytes): libssl
    skips the bad 13-byte header and reads a short record at epoch 1 (content
    type 0x4a) behind it; same internal_error as above."""
    from pydtls_ossl.fuzz._world import record_handshake

    pair = record_handshake("openssl")
    pair.client.feed(bytes.fromhex("dd00ffffffffffffff32ffff324afefd0001004a00fffd3800020000"))
    assert pair.client.state is ConnectionState.ESTABLISHED


# ------------------------------------------------- known: openssl-dtls-etm-fatal

#: feed_client / feed_server, state established-cbc, minimized: one application
#: data record at epoch 1 of any length (here 32 zero bytes) that does not
#: authenticate
GARBAGE_PROTECTED = bytes.fromhex("17fefd0001000000000100" "0020") + bytes(32)


@pytest.mark.parametrize("victim", ["client", "server"])
def test_garbage_protected_record_does_not_kill_a_cbc_association(certs: Any, victim: str) -> None:
    """With a CBC suite OpenSSL negotiates encrypt-then-MAC, and its DTLS
    record layer then answers a record with a wrong MAC with a fatal
    bad_record_mac (a shorter one: decode_error) instead of dropping it."""
    p = make(certs, ciphers="ECDHE-ECDSA-AES128-SHA256")
    p.handshake()
    assert p.client.record_layer == "openssl"
    engine = p.client if victim == "client" else p.server
    assert engine.feed(GARBAGE_PROTECTED) == 0
    assert engine.feed(GARBAGE_PROTECTED[:11] + b"\x00\x02\x00\x00") == 0
    assert lib.ERR_peek_error() == 0
    assert engine.state is ConnectionState.ESTABLISHED, "one unauthenticated datagram ended it"
    assert p.roundtrip(b"still up") == b"still up"
