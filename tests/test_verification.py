"""Peer authentication: pins, CA chains, hostnames, bad certificates and keys."""

from __future__ import annotations

from typing import Any

import pytest

from pydtls_ossl import (AlertDescription, CertificateError, ConfigurationError, ConnectionState,
                         Dtls, DtlsError, DtlsContext, FingerprintMismatch, HandshakeError, Verify,
                         generate_certificate)

from .helpers import Pair
from .test_engine import assert_queue_empty


def run_to_failure(p: Pair) -> tuple[BaseException | None, BaseException | None]:
    """Drive a handshake expected to fail; return each side's exception."""
    errors: dict[str, BaseException] = {}
    p.client.handshake()
    for _ in range(20):
        for src, dst in ((p.client, p.server), (p.server, p.client)):
            while (datagram := src.pull()) is not None:
                dst.feed(datagram)
        for name, engine in (("client", p.client), ("server", p.server)):
            if name in errors:
                continue
            try:
                engine.handshake()
            except DtlsError as exc:
                errors[name] = exc
        if len(errors) == 2 or (p.client.is_handshake_finished() and p.server.is_handshake_finished()):
            break
    assert_queue_empty()
    return errors.get("client"), errors.get("server")


def ctx(cert: Any, **kw: Any) -> DtlsContext:
    return DtlsContext(cert.cert_pem, cert.key_pem, **kw)


def test_wrong_pin_fails_inside_handshake_with_bad_certificate(certs: Any) -> None:
    stranger = generate_certificate("stranger")
    p = Pair(Dtls(context=ctx(certs.client), expected_peer_fingerprint=stranger.fingerprint()),
             Dtls(is_server=True, context=ctx(certs.server)))
    client_error, server_error = run_to_failure(p)
    assert isinstance(client_error, FingerprintMismatch)
    assert client_error.alert is not None and not client_error.alert.received
    assert client_error.alert.description == AlertDescription.BAD_CERTIFICATE
    assert isinstance(server_error, HandshakeError)
    assert server_error.alert is not None and server_error.alert.received
    assert server_error.alert.description == AlertDescription.BAD_CERTIFICATE
    assert p.client.state is ConnectionState.FAILED
    for call in (p.client.handshake, p.client.read, lambda: p.client.write(b"x")):
        with pytest.raises(FingerprintMismatch):
            call()
    assert_queue_empty()


def test_server_pin_rejects_other_client_certificate(certs: Any) -> None:
    stranger = generate_certificate("stranger")
    p = Pair(Dtls(context=ctx(stranger), expected_peer_fingerprint=certs.server.fingerprint()),
             Dtls(is_server=True, context=ctx(certs.server),
                  expected_peer_fingerprint=certs.client.fingerprint()))
    client_error, server_error = run_to_failure(p)
    assert isinstance(server_error, FingerprintMismatch)
    assert isinstance(client_error, HandshakeError) and client_error.alert is not None
    assert client_error.alert.description == AlertDescription.BAD_CERTIFICATE


def test_server_pin_requires_a_client_certificate(certs: Any) -> None:
    p = Pair(Dtls(expected_peer_fingerprint=certs.server.fingerprint()),
             Dtls(is_server=True, context=ctx(certs.server),
                  expected_peer_fingerprint=certs.client.fingerprint()))
    client_error, server_error = run_to_failure(p)
    assert isinstance(server_error, HandshakeError)
    assert isinstance(client_error, HandshakeError)


@pytest.mark.parametrize("form", ["bare", "sdp", "sha-1", "sha-512", "lower", "list"])
def test_pin_forms(certs: Any, form: str) -> None:
    fp = certs.server.fingerprint()
    pin: Any = {
        "bare": fp,
        "sdp": f"sha-256 {fp}",
        "sha-1": certs.server.fingerprint("sha-1"),
        "sha-512": "SHA-512 " + certs.server.fingerprint("sha-512"),
        "lower": fp.lower(),
        "list": [generate_certificate().fingerprint(), fp],
    }[form]
    p = Pair(Dtls(context=ctx(certs.client), expected_peer_fingerprint=pin),
             Dtls(is_server=True, context=ctx(certs.server)))
    p.handshake()
    assert p.roundtrip(b"pinned") == b"pinned"


def test_bad_pin_text_is_a_value_error(certs: Any) -> None:
    for bad in ("", "zz:zz", "sha-256 AB:CD", "md5 AB"):
        with pytest.raises(ValueError):
            Dtls(expected_peer_fingerprint=bad)
    with pytest.raises(ValueError):
        Dtls(expected_peer_fingerprint=[])


def test_ca_verification_with_hostname(certs: Any) -> None:
    client_ctx = DtlsContext(cadata=certs.ca.cert_pem)
    assert client_ctx.verify is Verify.CA
    p = Pair(Dtls(context=client_ctx, server_hostname="localhost"),
             Dtls(is_server=True, context=ctx(certs.signed)))
    p.handshake()
    assert p.roundtrip(b"trusted") == b"trusted"


def test_ca_verification_wrong_hostname(certs: Any) -> None:
    p = Pair(Dtls(context=DtlsContext(cadata=certs.ca.cert_pem), server_hostname="example.org"),
             Dtls(is_server=True, context=ctx(certs.signed)))
    client_error, server_error = run_to_failure(p)
    assert isinstance(client_error, CertificateError)
    assert "hostname mismatch" in str(client_error)
    assert isinstance(server_error, HandshakeError)


def test_ca_verification_rejects_self_signed(certs: Any) -> None:
    p = Pair(Dtls(context=DtlsContext(cadata=certs.ca.cert_pem)),
             Dtls(is_server=True, context=ctx(certs.server)))
    client_error, _ = run_to_failure(p)
    assert isinstance(client_error, CertificateError)
    assert client_error.verify_code != 0


def test_expired_certificate_fails_with_certificate_error(certs: Any) -> None:
    expired = generate_certificate("localhost", issuer=certs.ca, not_before=-10 * 86400, days=1)
    p = Pair(Dtls(context=DtlsContext(cadata=certs.ca.cert_pem)),
             Dtls(is_server=True, context=ctx(expired)))
    client_error, server_error = run_to_failure(p)
    assert isinstance(client_error, CertificateError)
    assert "expired" in str(client_error)
    assert client_error.alert is not None
    assert client_error.alert.description == AlertDescription.CERTIFICATE_EXPIRED
    assert isinstance(server_error, HandshakeError)


def test_ca_file_path(certs: Any, tmp_path: Any) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(certs.ca.cert_pem)
    p = Pair(Dtls(context=DtlsContext(cafile=path)),
             Dtls(is_server=True, context=ctx(certs.signed)))
    p.handshake()


def test_client_must_choose_verification(certs: Any) -> None:
    with pytest.raises(ConfigurationError, match="authenticates the server"):
        Dtls()
    with pytest.raises(ConfigurationError, match="needs expected_peer_fingerprint"):
        Dtls(verify=Verify.FINGERPRINT)
    with pytest.raises(ConfigurationError, match="needs cafile"):
        DtlsContext(verify="ca")
    p = Pair(Dtls(verify=Verify.NONE), Dtls(is_server=True, context=ctx(certs.server)))
    p.handshake()
    assert p.server.get_peer_fingerprint() is None


def test_any_certificate_lets_the_application_check_later(certs: Any) -> None:
    p = Pair(Dtls(context=DtlsContext(certs.client.cert_pem, certs.client.key_pem,
                                      verify=Verify.ANY_CERTIFICATE)),
             Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                                                      verify="any-certificate")))
    p.handshake()
    assert p.server.get_peer_fingerprint() == certs.client.fingerprint()
    assert p.client.get_peer_fingerprint() == certs.server.fingerprint()


def test_server_needs_certificate() -> None:
    with pytest.raises(ConfigurationError, match="needs cert"):
        Dtls(is_server=True)


def test_garbage_and_mismatched_credentials(certs: Any, tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="no certificate"):
        DtlsContext(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
                    certs.server.key_pem)
    with pytest.raises(ConfigurationError):
        DtlsContext(b"\x30\x03garbage", certs.server.key_pem)
    with pytest.raises(ConfigurationError, match="do not match"):
        DtlsContext(certs.server.cert_pem, certs.client.key_pem)
    with pytest.raises(ConfigurationError, match="cannot load private key"):
        DtlsContext(certs.server.cert_pem, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigurationError, match="cannot read"):
        DtlsContext(str(tmp_path / "missing.pem"), certs.server.key_pem)
    with pytest.raises(ConfigurationError, match="cipher"):
        DtlsContext(certs.server.cert_pem, certs.server.key_pem, ciphers="NOT-A-CIPHER")
    with pytest.raises(ValueError, match="together"):
        DtlsContext(certs.server.cert_pem)
    assert_queue_empty()


def test_no_common_cipher_fails_cleanly(certs: Any) -> None:
    p = Pair(Dtls(context=DtlsContext(verify=Verify.NONE, ciphers="ECDHE-RSA-AES128-GCM-SHA256")),
             Dtls(is_server=True, context=ctx(certs.server)))
    client_error, server_error = run_to_failure(p)
    assert isinstance(server_error, HandshakeError) and "no shared cipher" in str(server_error)
    assert isinstance(client_error, HandshakeError)
    assert client_error.alert is not None and client_error.alert.received


def test_failing_feed_leaves_queue_empty_and_keeps_reasons(certs: Any) -> None:
    client = Dtls(context=DtlsContext(verify=Verify.NONE, ciphers="ECDHE-RSA-AES128-GCM-SHA256"))
    server = Dtls(is_server=True, context=ctx(certs.server))
    client.handshake()
    hello = client.pull()
    assert hello is not None
    assert server.feed(hello) == 0
    assert_queue_empty()
    other = Pair(Dtls(verify=Verify.NONE), Dtls(is_server=True, context=ctx(certs.server)))
    other.handshake()  # another engine's calls must not eat the first one's reasons
    with pytest.raises(HandshakeError, match="no shared cipher"):
        server.handshake()
    assert_queue_empty()
