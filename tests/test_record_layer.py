"""The engine's own record layer, taken over from OpenSSL after the handshake.

Every other test runs on it too (it is the default); these check what is
specific to it, mostly against an association whose other end keeps
libssl's record layer, so each side is checked against OpenSSL itself.
"""

from __future__ import annotations

import time
from itertools import product
from typing import Any

import pytest

from pydtls_ossl import Dtls, DtlsContext, SrtpProfile
from pydtls_ossl._ffi import ffi, lib

from .helpers import Pair, drain

LAYERS = ("engine", "openssl")


def make(certs: Any, client_layer: Any = "engine", server_layer: Any = "engine",
         **options: Any) -> Pair:
    server = Dtls(is_server=True, context=DtlsContext(
        certs.server.cert_pem, certs.server.key_pem, record_layer=server_layer, **options),
        expected_peer_fingerprint=certs.client.fingerprint())
    client = Dtls(context=DtlsContext(
        certs.client.cert_pem, certs.client.key_pem, record_layer=client_layer, **options),
        expected_peer_fingerprint=certs.server.fingerprint())
    return Pair(client, server)


def test_both_roles_hand_over_and_free_the_ssl_object(certs: Any) -> None:
    p = make(certs)
    assert p.client.record_layer == p.server.record_layer == "openssl"  # during the handshake
    p.handshake()
    for engine in (p.client, p.server):
        assert engine.record_layer == "engine"
        assert engine._conn.ssl == ffi.NULL
    assert p.roundtrip(b"ping") == b"ping"
    assert p.roundtrip(b"pong", sender="server") == b"pong"


@pytest.mark.parametrize("client_layer,server_layer", list(product(LAYERS, LAYERS)))
def test_either_layer_talks_to_either(certs: Any, client_layer: str, server_layer: str) -> None:
    p = make(certs, client_layer, server_layer,
             srtp_profiles=[SrtpProfile.AEAD_AES_128_GCM], alpn_protocols=["coap"])
    p.handshake()
    assert (p.client.record_layer, p.server.record_layer) == (client_layer, server_layer)
    for size in (1, 100, p.client.max_write_size):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert p.roundtrip(data) == data
        assert p.roundtrip(data[::-1], sender="server") == data[::-1]
    for context in (None, b"", b"ctx"):
        assert p.client.export_keys("EXPERIMENTAL-x", 77, context) == \
            p.server.export_keys("EXPERIMENTAL-x", 77, context)
    assert p.client.export_keys("EXPERIMENTAL-x", 32, None) != \
        p.client.export_keys("EXPERIMENTAL-x", 32, b"")
    assert p.client.srtp_keys().local_master == p.server.srtp_keys().remote_master
    assert p.client.selected_alpn_protocol() == p.server.selected_alpn_protocol() == "coap"
    assert p.server.get_peer_fingerprint() == certs.client.fingerprint()
    assert p.client.get_peer_fingerprint("sha-1") == certs.server.fingerprint("sha-1")
    assert p.client.version() == p.server.version() == "DTLSv1.2"
    p.client.close()
    for datagram in drain(p.client):
        p.server.feed(datagram)
    assert p.server.state.name == "PEER_CLOSED"
    assert len(drain(p.server)) == 1, "close_notify is answered"


@pytest.mark.parametrize("suite,max_write", [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", 1163),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", 1163),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", 1171),
])
@pytest.mark.parametrize("engine_side", ["client", "server"])
def test_each_aead_suite_against_libssl(certs: Any, suite: str, max_write: int,
                                        engine_side: str) -> None:
    layers = ("engine", "openssl") if engine_side == "client" else ("openssl", "engine")
    p = make(certs, *layers, ciphers=suite)
    p.handshake()
    ours = p.client if engine_side == "client" else p.server
    assert ours.record_layer == "engine"
    assert ours.cipher()[0] == p.client.cipher()[0] == p.server.cipher()[0] == suite  # type: ignore[index]
    assert p.client.max_write_size == p.server.max_write_size == max_write
    for sender in ("client", "server"):
        src = p.client if sender == "client" else p.server
        assert src.write(b"m" * max_write) == max_write
        (datagram,) = drain(src)
        assert len(datagram) == 1200, "the largest record fills the MTU exactly"
        (p.server if sender == "client" else p.client).feed(datagram)
        assert (p.server if sender == "client" else p.client).read() == b"m" * max_write
    assert p.client.export_keys("EXTRACTOR-dtls_srtp", 60) == \
        p.server.export_keys("EXTRACTOR-dtls_srtp", 60)


def test_cbc_suites_stay_with_libssl(certs: Any) -> None:
    p = make(certs, ciphers="ECDHE-ECDSA-AES128-SHA256")
    p.handshake()
    assert p.client.record_layer == p.server.record_layer == "openssl"
    assert p.roundtrip(b"cbc") == b"cbc"


@pytest.mark.parametrize("layer", LAYERS)
def test_replay_window_matches_libssl(certs: Any, layer: str) -> None:
    p = make(certs, server_layer=layer)
    p.handshake()
    records = []
    for i in range(100):
        p.client.write(b"%d" % i)
        records.append(p.client.pull())
    delivered: list[bytes] = []

    def feed(i: int) -> None:
        p.server.feed(records[i])  # type: ignore[arg-type]
        while (data := p.server.read()) is not None:
            delivered.append(data)

    for i in (99, 50, 30, 50, 99):
        feed(i)
    assert delivered == [b"99", b"50"], "30 is outside the 64-record window; repeats are replays"
    for i in range(100):
        feed(i)
    assert delivered[2:] == [b"%d" % i for i in range(36, 99) if i != 50]
    assert lib.ERR_peek_error() == 0


@pytest.mark.parametrize("layer", LAYERS)
def test_data_that_overtakes_the_finished_flight_is_read_once(certs: Any, layer: str) -> None:
    p = make(certs, client_layer=layer)
    p.client.handshake()
    while not p.server.is_handshake_finished():  # up to the server's last flight
        for datagram in drain(p.client):
            p.server.feed(datagram)
        if not p.server.is_handshake_finished():
            for datagram in drain(p.server):
                p.client.feed(datagram)
    assert p.server.is_handshake_finished() and not p.client.is_handshake_finished()
    last_flight = drain(p.server)
    p.server.write(b"overtaking")
    (early,) = drain(p.server)
    p.client.feed(early)
    assert p.client.read() is None, "not readable before the handshake finishes"
    for datagram in last_flight:
        p.client.feed(datagram)
    assert p.client.is_handshake_finished() and p.client.record_layer == layer
    assert p.client.read() == b"overtaking"
    p.client.feed(early)
    assert p.client.read() is None, "a replay of it is dropped"
    assert p.roundtrip(b"after") == b"after"


def test_lost_last_flight_is_resent_under_new_sequence_numbers(certs: Any) -> None:
    p = make(certs, initial_rto=0.02)
    p.client.handshake()
    while not p.server.is_handshake_finished():
        for datagram in drain(p.client):
            p.server.feed(datagram)
        if not p.server.is_handshake_finished():
            for datagram in drain(p.server):
                p.client.feed(datagram)
    lost = drain(p.server)
    assert p.server.record_layer == "engine"
    time.sleep(0.03)
    assert p.client.handle_timeout()
    retransmitted = drain(p.client)
    for datagram in retransmitted:
        p.server.feed(datagram)
    resent = drain(p.server)
    assert resent and resent != lost, "same messages, new record sequence numbers"
    for datagram in retransmitted:
        p.server.feed(datagram)
    assert drain(p.server) == [], "a replayed retransmission is not answered again"
    for datagram in resent:
        p.client.feed(datagram)
    assert p.client.is_handshake_finished()
    assert p.roundtrip(b"recovered") == b"recovered"


@pytest.mark.parametrize("layer", LAYERS)
def test_exporter_refuses_reserved_labels(certs: Any, layer: str) -> None:
    p = make(certs, layer, layer)
    p.handshake()
    for label in ("key expansion", "master secret", "client finished", "server finished",
                  "extended master secret"):
        with pytest.raises(ValueError, match="reserved"):
            p.client.export_keys(label, 16)
    with pytest.raises(ValueError):
        p.client.export_keys("EXPERIMENTAL-x", 16, bytes(65536))
    assert lib.ERR_peek_error() == 0


def test_record_layer_option_is_checked() -> None:
    with pytest.raises(ValueError, match="record_layer"):
        DtlsContext(verify="none", record_layer="kernel")  # type: ignore[arg-type]
