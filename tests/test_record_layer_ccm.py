"""AES-CCM and CCM_8 on the engine's record layer; idle cipher contexts; nonces.

Each suite is checked against libssl's record layer on the other side, so
both directions are checked against OpenSSL itself.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from pydtls_ossl import Dtls, DtlsContext
from pydtls_ossl._ffi import lib

from .helpers import Pair, drain
from .test_deadline import at_least

PSK = ("device-1", bytes(range(16)))
#: suite, max_write_size at MTU 1200, certificate suite?
SUITES = [
    ("PSK-AES128-CCM8", 1171, False),
    ("PSK-AES256-CCM8", 1171, False),
    ("PSK-AES128-CCM", 1163, False),
    ("PSK-AES256-CCM", 1163, False),
    ("ECDHE-ECDSA-AES128-CCM8", 1171, True),
    ("ECDHE-ECDSA-AES256-CCM8", 1171, True),
    ("ECDHE-ECDSA-AES128-CCM", 1163, True),
    ("ECDHE-ECDSA-AES256-CCM", 1163, True),
]


def make(certs: Any, suite: str, with_cert: bool, client_layer: str = "engine",
         server_layer: str = "engine", **options: Any) -> Pair:
    if with_cert:
        server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, ciphers=suite,
                                 record_layer=server_layer, **options)  # type: ignore[arg-type]
        client = Dtls(context=DtlsContext(ciphers=suite, record_layer=client_layer,  # type: ignore[arg-type]
                                          **options),
                      expected_peer_fingerprint=certs.server.fingerprint())
    else:
        server_ctx = DtlsContext(psk_keys={PSK[0]: PSK[1]}, ciphers=suite,
                                 record_layer=server_layer, **options)  # type: ignore[arg-type]
        client = Dtls(context=DtlsContext(psk=PSK, ciphers=suite, record_layer=client_layer,  # type: ignore[arg-type]
                                          **options))
    return Pair(client, Dtls(is_server=True, context=server_ctx))


@pytest.mark.parametrize("suite,max_write,with_cert", SUITES)
@pytest.mark.parametrize("engine_side", ["client", "server", "both"])
def test_ccm_suite_on_the_engine_layer(certs: Any, suite: str, max_write: int, with_cert: bool,
                                       engine_side: str) -> None:
    layers = {"client": ("engine", "openssl"), "server": ("openssl", "engine"),
              "both": ("engine", "engine")}[engine_side]
    p = make(certs, suite, with_cert, *layers)
    p.handshake()
    assert (p.client.record_layer, p.server.record_layer) == layers
    assert p.client.cipher()[0] == p.server.cipher()[0] == suite  # type: ignore[index]
    assert p.client.max_write_size == p.server.max_write_size == max_write
    for sender, receiver in ((p.client, p.server), (p.server, p.client)):
        for size in (0, 1, 77, max_write):
            data = random.Random(size).randbytes(size)
            assert sender.write(data) == size
            datagrams = drain(sender)
            if size == 0:
                assert datagrams == []
                continue
            (datagram,) = datagrams
            if size == max_write:
                assert len(datagram) == 1200, "the largest record fills the MTU exactly"
            receiver.feed(datagram)
            assert receiver.read() == data
    for context in (None, b"ctx"):
        assert p.client.export_keys("EXPERIMENTAL-ccm", 40, context) == \
            p.server.export_keys("EXPERIMENTAL-ccm", 40, context)
    p.client.close()
    for datagram in drain(p.client):
        p.server.feed(datagram)
    assert p.server.state.name == "PEER_CLOSED"


@pytest.mark.parametrize("suite", ["PSK-AES128-CCM8", "PSK-AES128-CCM"])
def test_replays_truncations_and_bit_flips_are_dropped(certs: Any, suite: str) -> None:
    p = make(certs, suite, False)
    p.handshake()
    p.client.write(b"genuine")
    (record,) = drain(p.client)
    p.server.feed(record)
    assert p.server.read() == b"genuine"
    p.server.feed(record)
    assert p.server.read() is None, "a replay is dropped"
    p.client.write(b"second")
    (second,) = drain(p.client)
    for cut in range(1, len(second)):
        p.server.feed(second[:cut])
    for bit in range(13 * 8, len(second) * 8, 3):  # every third bit of nonce, body and tag
        flipped = bytearray(second)
        flipped[bit // 8] ^= 1 << (bit % 8)
        p.server.feed(bytes(flipped))
    assert p.server.read() is None and p.server.state.name == "ESTABLISHED"
    p.server.feed(second)
    assert p.server.read() == b"second"
    assert lib.ERR_peek_error() == 0


@pytest.mark.parametrize("suite,with_cert", [("PSK-AES128-CCM8", False),
                                             ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
                                             ("ECDHE-ECDSA-CHACHA20-POLY1305", True)])
def test_release_and_rebuild_cipher_contexts_mid_stream(certs: Any, suite: str,
                                                        with_cert: bool) -> None:
    p = make(certs, suite, with_cert, client_layer="openssl")
    p.handshake()
    assert p.server.record_layer == "engine"
    in_flight = []
    for i in range(3):
        p.client.write(b"before %d" % i)
        in_flight += drain(p.client)
    p.server.feed(in_flight[0])
    assert p.server.release_buffers()  # both cipher contexts freed, keys kept
    for datagram in in_flight[1:]:
        p.server.feed(datagram)  # records sealed before the release, opened after it
    assert [p.server.read() for _ in range(3)] == [b"before 0", b"before 1", b"before 2"]
    for i in range(5):
        assert p.server.release_buffers()
        assert p.roundtrip(b"after %d" % i, "server") == b"after %d" % i
        assert p.server.release_buffers()
        assert p.roundtrip(b"in %d" % i) == b"in %d" % i
    p.client.write(b"x")
    (late,) = drain(p.client)
    p.server.feed(late)
    p.server.release_buffers()
    p.server.feed(late)
    assert p.server.read() == b"x" and p.server.read() is None, "the replay window survives"


def test_gcm_explicit_nonce_is_the_sequence_number(certs: Any) -> None:
    p = make(certs, "ECDHE-ECDSA-AES128-GCM-SHA256", True)
    p.handshake()
    for engine in (p.client, p.server):
        for _ in range(3):
            engine.write(b"n")
            engine.release_buffers()  # a rebuilt context continues the same counter
            (datagram,) = drain(engine)
            assert datagram[13:21] == datagram[3:11], "explicit nonce == epoch || sequence"
    assert p.roundtrip(b"still fine") == b"still fine"


def test_ccm8_named_suite_is_on_the_engine_layer_everywhere(certs: Any) -> None:
    """The CoAP suite negotiates on every OpenSSL (the level is lowered on 3.5+) and
    is carried by the engine's layer."""
    p = make(certs, "PSK-AES128-CCM8", False)
    p.handshake()
    assert p.client.record_layer == p.server.record_layer == "engine"
    if at_least(3, 5):
        assert p.client.context.security_level == 0


@pytest.mark.parametrize("keep", [False, True])
def test_idle_association_keeps_only_the_peer_fingerprint(certs: Any, keep: bool) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, keep_peer_certificate=keep)
    p = Pair(Dtls(context=DtlsContext(certs.client.cert_pem, certs.client.key_pem),
                  expected_peer_fingerprint=certs.server.fingerprint()),
             Dtls(is_server=True, context=server_ctx,
                  expected_peer_fingerprint=certs.client.fingerprint()))
    p.handshake()
    der = p.server.peer_certificate()
    assert der is not None
    assert p.server.release_buffers()
    assert p.server.get_peer_fingerprint() == certs.client.fingerprint()
    if keep:
        assert p.server.peer_certificate() == der
        assert p.server.get_peer_fingerprint("sha-1") == certs.client.fingerprint("sha-1")
    else:
        with pytest.raises(ValueError, match="keep_peer_certificate"):
            p.server.peer_certificate()
        with pytest.raises(ValueError, match="keep_peer_certificate"):
            p.server.get_peer_fingerprint("sha-1")
    assert p.roundtrip(b"after compaction") == b"after compaction"
    assert p.server.get_peer_fingerprint() == certs.client.fingerprint()
