"""Certificate generation, loading and RFC 8122 fingerprint text."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import (Dtls, DtlsContext, certificate_fingerprint, fingerprints_equal,
                         format_fingerprint, generate_certificate, parse_fingerprint)
from pydtls_ossl.certs import load_certificates, x509_to_der

from .helpers import Pair


def test_generated_certificates_differ_and_are_pem() -> None:
    a, b = generate_certificate("a"), generate_certificate("a")
    assert a.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert a.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert a.fingerprint() != b.fingerprint(), "random keys and serials"


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_generated_certificates_handshake(key_type: str) -> None:
    cert = generate_certificate("peer", key_type=key_type)
    p = Pair(Dtls(expected_peer_fingerprint=cert.fingerprint()),
             Dtls(is_server=True, cert=cert.cert_pem, key=cert.key_pem))
    p.handshake()
    cipher = p.client.cipher()
    assert cipher is not None and ("ECDSA" if key_type == "ec" else "RSA") in cipher[0]


def test_fingerprint_matches_digest_of_der(certs: Any) -> None:
    import hashlib
    der = x509_to_der(load_certificates(certs.server.cert_pem)[0])
    for name, algorithm in (("sha-1", "sha1"), ("sha-256", "sha256"), ("sha-512", "sha512")):
        expected = format_fingerprint(hashlib.new(algorithm, der).digest())
        assert certs.server.fingerprint(name) == expected
        assert certificate_fingerprint(der, name) == expected


def test_format_and_parse_round_trip() -> None:
    digest = bytes(range(32))
    text = format_fingerprint(digest)
    assert text.startswith("00:01:02") and text == text.upper()
    assert parse_fingerprint(text) == ("sha-256", digest)
    assert parse_fingerprint(f"SHA-256 {text.lower()}") == ("sha-256", digest)
    assert parse_fingerprint(f"a=fingerprint:sha-256 {text}") == ("sha-256", digest)
    assert parse_fingerprint("sha1 " + format_fingerprint(bytes(20)))[0] == "sha-1"
    for bad in ("", "sha-256", "sha-256 0G", "sha-256 " + format_fingerprint(bytes(20)),
                "AB:CD:EF", "md5 " + format_fingerprint(bytes(16)), "a b c"):
        with pytest.raises(ValueError):
            parse_fingerprint(bad)


def test_fingerprints_equal_ignores_case_but_not_algorithm() -> None:
    fp = format_fingerprint(bytes(range(32)))
    assert fingerprints_equal(fp, "sha-256 " + fp.lower())
    assert not fingerprints_equal(fp, format_fingerprint(bytes(range(1, 33))))


def test_files_paths_der_and_text(tmp_path: Path, certs: Any) -> None:
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    certs.server.write(cert_path, key_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert DtlsContext(cert_path, str(key_path)).fingerprint() == certs.server.fingerprint()
    assert DtlsContext(certs.server.cert_pem.decode(), certs.server.key_pem.decode()).has_certificate
    der = x509_to_der(load_certificates(certs.server.cert_pem)[0])
    assert DtlsContext(der, certs.server.key_pem).fingerprint() == certs.server.fingerprint()
    with pytest.raises(TypeError):
        DtlsContext(12345, certs.server.key_pem)  # type: ignore[arg-type]


def test_chain_is_sent_and_verifies(certs: Any) -> None:
    intermediate = generate_certificate("Intermediate", issuer=certs.ca, is_ca=True)
    leaf = generate_certificate("localhost", issuer=intermediate, subject_alt_names=["DNS:localhost"])
    p = Pair(Dtls(context=DtlsContext(cadata=certs.ca.cert_pem), server_hostname="localhost"),
             Dtls(is_server=True, context=DtlsContext(leaf.cert_pem + intermediate.cert_pem,
                                                      leaf.key_pem)))
    p.handshake()
    assert p.client.get_peer_fingerprint() == leaf.fingerprint()


def test_generation_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        generate_certificate(key_type="dsa")
    with pytest.raises(ValueError):
        generate_certificate(days=0)
