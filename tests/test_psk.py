"""Pre-shared keys: suites, callbacks, refusals, mixed mode, the server core."""

from __future__ import annotations

from typing import Any

import pytest

from pydtls_ossl import (AlertDescription, CertificateError, ConfigurationError, Dtls, DtlsContext,
                         HandshakeError, Verify)
from pydtls_ossl.server import ConnectionEstablished, DtlsServer

from .helpers import Pair
from .test_engine import assert_queue_empty
from .test_verification import run_to_failure

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
PSK_SUITES = ["PSK-AES128-CCM8", "PSK-AES128-GCM-SHA256", "PSK-AES256-GCM-SHA384",
              "PSK-CHACHA20-POLY1305", "ECDHE-PSK-CHACHA20-POLY1305", "ECDHE-PSK-AES128-CBC-SHA256"]


def psk_pair(client_psk: Any = ("device-1", KEY), server_keys: Any = None, ciphers: str | None = None,
             **client_kw: Any) -> Pair:
    keys = {"device-1": KEY} if server_keys is None else server_keys
    return Pair(Dtls(context=DtlsContext(psk=client_psk, ciphers=ciphers, **client_kw)),
                Dtls(is_server=True, context=DtlsContext(psk_keys=keys, ciphers=ciphers,
                                                         psk_identity_hint="gateway-7")))


@pytest.mark.parametrize("suite", PSK_SUITES)
def test_each_psk_suite(suite: str) -> None:
    p = psk_pair(ciphers=suite)
    p.handshake()
    assert p.client.cipher()[0] == suite  # type: ignore[index]
    assert p.server.psk_identity() == "device-1" == p.client.psk_identity()
    assert p.client.get_peer_fingerprint() is None
    assert p.roundtrip(b"\x40\x01\x12\x34" + b"temp=21.5") == b"\x40\x01\x12\x34" + b"temp=21.5"
    assert p.roundtrip(b"ack", sender="server") == b"ack"


def test_ecdhe_ecdsa_ccm8_certificate_suite(certs: Any) -> None:
    suite = "ECDHE-ECDSA-AES128-CCM8"
    p = Pair(Dtls(context=DtlsContext(ciphers=suite), expected_peer_fingerprint=certs.server.fingerprint()),
             Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                                                      ciphers=suite)))
    p.handshake()
    assert p.client.cipher()[0] == suite  # type: ignore[index]
    assert p.client.max_write_size == 1200 - 13 - 8 - 8, "explicit nonce and an 8-byte tag"


def test_default_psk_suites_are_aead() -> None:
    p = psk_pair()
    p.handshake()
    assert p.client.cipher()[0] == "ECDHE-PSK-CHACHA20-POLY1305"  # type: ignore[index]


def test_callbacks_see_hint_and_identity() -> None:
    hints: list[str | None] = []
    identities: list[str] = []

    def client(hint: str | None) -> tuple[str, bytes]:
        hints.append(hint)
        return "sensor-42", KEY

    def server(identity: str) -> bytes | None:
        identities.append(identity)
        return KEY if identity.startswith("sensor-") else None

    p = psk_pair(client_psk=client, server_keys=server, ciphers="PSK-AES128-CCM8")
    p.handshake()
    assert hints == ["gateway-7"] and identities == ["sensor-42"]
    assert p.server.psk_identity() == "sensor-42"


def test_unknown_identity_is_refused_with_unknown_psk_identity() -> None:
    p = psk_pair(client_psk=("intruder", KEY))
    client_error, server_error = run_to_failure(p)
    assert isinstance(server_error, HandshakeError) and server_error.alert is not None
    assert server_error.alert.description == AlertDescription.UNKNOWN_PSK_IDENTITY
    assert isinstance(client_error, HandshakeError) and client_error.alert is not None
    assert client_error.alert.received
    assert client_error.alert.description == AlertDescription.UNKNOWN_PSK_IDENTITY
    assert_queue_empty()


def test_wrong_key_fails_cleanly_on_both_sides() -> None:
    p = Pair(Dtls(context=DtlsContext(psk=("device-1", b"\x01" * 16), initial_rto=0.02, max_rto=0.05)),
             Dtls(is_server=True, context=DtlsContext(psk_keys={"device-1": KEY},
                                                      initial_rto=0.02, max_rto=0.05)))
    from .helpers import LossyLink, lossy_handshake
    with pytest.raises(HandshakeError, match="wrong pre-shared key"):
        lossy_handshake(p.client, p.server, LossyLink(1, 0.0), LossyLink(2, 0.0), limit=10)
    for engine in (p.client, p.server):
        with pytest.raises(HandshakeError, match="timed out|decrypt"):
            for _ in range(100):
                engine.handshake()
                timeout = engine.get_timeout()
                if timeout is None:
                    break
                import time
                time.sleep(timeout)
                engine.handle_timeout()
    assert_queue_empty()


def test_raising_server_callback_fails_the_handshake_and_is_reported() -> None:
    def broken(identity: str) -> bytes:
        raise RuntimeError("key store offline")

    client_error, server_error = run_to_failure(psk_pair(server_keys=broken))
    assert isinstance(server_error, HandshakeError) and "key store offline" in str(server_error)
    assert isinstance(server_error.__cause__, RuntimeError)
    assert isinstance(client_error, HandshakeError)
    assert_queue_empty()


def test_raising_client_callback_fails_the_handshake_and_is_reported() -> None:
    def broken(hint: str | None) -> tuple[str, bytes]:
        raise KeyError("no credentials provisioned")

    client_error, _ = run_to_failure(psk_pair(client_psk=broken))
    assert isinstance(client_error, HandshakeError)
    assert isinstance(client_error.__cause__, KeyError)
    assert "no credentials provisioned" in str(client_error)


def test_mixed_mode_server_accepts_psk_and_certificate_clients(certs: Any) -> None:
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, psk_keys={"device-1": KEY})
    assert "PSK" in ctx.ciphers and "ECDHE-ECDSA" in ctx.ciphers
    psk_client = Pair(Dtls(context=DtlsContext(psk=("device-1", KEY))),
                      Dtls(is_server=True, context=ctx))
    psk_client.handshake()
    assert "PSK" in psk_client.client.cipher()[0]  # type: ignore[index]
    cert_client = Pair(Dtls(expected_peer_fingerprint=certs.server.fingerprint()),
                       Dtls(is_server=True, context=ctx))
    cert_client.handshake()
    assert cert_client.client.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"  # type: ignore[index]
    assert cert_client.server.psk_identity() is None


def test_psk_client_refuses_a_certificate_suite(certs: Any) -> None:
    both = "ECDHE-ECDSA-AES128-GCM-SHA256:PSK-AES128-GCM-SHA256"
    client_ctx = DtlsContext(psk=("device-1", KEY), ciphers=both)
    assert client_ctx.verify is Verify.PSK
    p = Pair(Dtls(context=client_ctx),
             Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                                                      ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")))
    client_error, _ = run_to_failure(p)
    assert isinstance(client_error, CertificateError), "no silent trust in an unverified certificate"


def test_security_level_refusal_is_explained() -> None:
    strict = Dtls(context=DtlsContext(psk=("device-1", KEY), ciphers="PSK-AES128-CCM8",
                                      security_level=5))
    with pytest.raises(HandshakeError, match=r"security level 5 .*security_level="):
        strict.handshake()
    assert_queue_empty()
    assert DtlsContext(psk=("d", KEY)).security_level == 2
    with pytest.raises(ValueError):
        DtlsContext(psk=("d", KEY), security_level=9)


def test_psk_argument_shapes_are_checked() -> None:
    with pytest.raises(TypeError):
        DtlsContext(psk=b"just a key")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="psk_keys"):
        Dtls(is_server=True)


def test_server_core_reports_psk_identity() -> None:
    server = DtlsServer(DtlsContext(psk_keys={"device-1": KEY}))
    client = Dtls(context=DtlsContext(psk=("device-1", KEY)))
    client.handshake()
    address = ("127.0.0.1", 5683)
    for _ in range(10):
        while (datagram := client.pull()) is not None:
            server.feed(datagram, address)
        for datagram, _ in server.datagrams_to_send():
            client.feed(datagram)
        client.handshake()
        events = [e for e in server.events() if isinstance(e, ConnectionEstablished)]
        if events:
            assert events[0].psk_identity == "device-1" and events[0].peer_fingerprint is None
            return
    raise AssertionError("PSK handshake through the server core did not finish")
