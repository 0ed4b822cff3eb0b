"""Certificates in memory: generate, load, and fingerprint them (RFC 8122).

Generation goes through the same libssl binding, so a user needs neither the
``openssl`` command nor another package to start. Keys are ECDSA P-256 by
default (what WebRTC endpoints use) or RSA.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

from ._errors import ConfigurationError, InternalError
from ._ffi import check, check_ptr, drain_errors, ffi, lib

__all__ = [
    "Certificate",
    "CertificateSource",
    "FINGERPRINT_ALGORITHMS",
    "certificate_fingerprint",
    "certificate_summary",
    "fingerprints_equal",
    "format_fingerprint",
    "generate_certificate",
    "parse_fingerprint",
]

#: PEM or DER bytes, PEM text, or a path to a PEM/DER file.
CertificateSource = Union[bytes, str, "os.PathLike[str]"]

#: RFC 8122 hash names and OpenSSL's names for them.
FINGERPRINT_ALGORITHMS: dict[str, str] = {
    "sha-1": "SHA1",
    "sha-224": "SHA224",
    "sha-256": "SHA256",
    "sha-384": "SHA384",
    "sha-512": "SHA512",
}
_ALGORITHM_BY_LENGTH = {20: "sha-1", 28: "sha-224", 32: "sha-256", 48: "sha-384", 64: "sha-512"}
_HEX_PAIRS = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})*$")


def _normalize_algorithm(algorithm: str) -> str:
    name = algorithm.strip().lower()
    if name in FINGERPRINT_ALGORITHMS:
        return name
    compact = name.replace("-", "")
    for known in FINGERPRINT_ALGORITHMS:
        if known.replace("-", "") == compact:
            return known
    raise ValueError(f"unknown fingerprint algorithm {algorithm!r}; "
                     f"use one of {', '.join(FINGERPRINT_ALGORITHMS)}")


def digest_for(algorithm: str) -> Any:
    """OpenSSL's EVP_MD for an RFC 8122 hash name ('sha-256', 'SHA256', ...)."""
    name = FINGERPRINT_ALGORITHMS[_normalize_algorithm(algorithm)]
    return check_ptr(lib.EVP_get_digestbyname(name.encode()), InternalError,
                     f"digest {name} unavailable")


def format_fingerprint(digest: bytes) -> str:
    """``b'\\xab\\xcd'`` -> ``'AB:CD'`` (RFC 8122 upper-case colon hex)."""
    return ":".join(f"{b:02X}" for b in digest)


def parse_fingerprint(text: str) -> tuple[str, bytes]:
    """Parse ``'sha-256 AB:CD:…'`` or bare ``'AB:CD:…'`` into (algorithm, digest).

    A bare fingerprint's algorithm is inferred from its length, which is
    unambiguous across the RFC 8122 hashes.
    """
    parts = text.strip().split()
    if parts and parts[0].lower().startswith("a=fingerprint:"):
        parts[0] = parts[0].split(":", 1)[1]
    if len(parts) == 2:
        algorithm, hexpart = _normalize_algorithm(parts[0]), parts[1]
    elif len(parts) == 1:
        algorithm, hexpart = "", parts[0]
    else:
        raise ValueError(f"not a fingerprint: {text!r}")
    if not _HEX_PAIRS.match(hexpart):
        raise ValueError(f"fingerprint must be colon-separated hex pairs: {text!r}")
    digest = bytes.fromhex(hexpart.replace(":", ""))
    inferred = _ALGORITHM_BY_LENGTH.get(len(digest))
    if not algorithm:
        if inferred is None:
            raise ValueError(f"fingerprint of {len(digest)} bytes matches no known hash")
        algorithm = inferred
    elif inferred != algorithm:
        raise ValueError(f"{algorithm} fingerprint must be "
                         f"{lib.EVP_MD_get_size(digest_for(algorithm))} bytes, got {len(digest)}")
    return algorithm, digest


def fingerprints_equal(a: str, b: str) -> bool:
    """Compare two fingerprints in constant time, ignoring case and form."""
    alg_a, dig_a = parse_fingerprint(a)
    alg_b, dig_b = parse_fingerprint(b)
    return alg_a == alg_b and hmac.compare_digest(dig_a, dig_b)


# ------------------------------------------------------------------ loading

def _read_source(source: CertificateSource) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode()
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {os.fspath(source)!r}: {exc.strerror}") from None
    raise TypeError(f"expected bytes, PEM text or a path, got {type(source).__name__}")


def _mem_bio(data: bytes) -> Any:
    buf = ffi.from_buffer(data)
    bio = check_ptr(lib.BIO_new_mem_buf(buf, len(data)), InternalError, "BIO_new_mem_buf")
    return ffi.gc(bio, lib.BIO_free), buf


def load_certificates(source: CertificateSource) -> list[Any]:
    """One or more X509 (leaf first) from PEM (a chain) or DER; each owned."""
    data = _read_source(source)
    certs: list[Any] = []
    if b"-----BEGIN" in data:
        bio, _keep = _mem_bio(data)
        while True:
            x509 = lib.PEM_read_bio_X509(bio, ffi.NULL, ffi.NULL, ffi.NULL)
            if x509 == ffi.NULL:
                break
            certs.append(ffi.gc(x509, lib.X509_free))
        reasons = drain_errors()  # the end of the PEM run leaves "no start line"
        if not certs:
            raise ConfigurationError("no certificate found in PEM data", reasons)
        return certs
    ptr = ffi.new("const unsigned char **", ffi.from_buffer(data))
    x509 = lib.d2i_X509(ffi.NULL, ptr, len(data))
    return [ffi.gc(check_ptr(x509, ConfigurationError, "not a PEM or DER certificate"),
                   lib.X509_free)]


def load_private_key(source: CertificateSource, password: bytes | None = None) -> Any:
    """An owned EVP_PKEY from PEM (optionally encrypted) or DER."""
    data = _read_source(source)
    if b"-----BEGIN" in data:
        bio, _keep = _mem_bio(data)
        secret = ffi.new("char[]", password or b"")  # never let OpenSSL prompt
        pkey = lib.PEM_read_bio_PrivateKey(bio, ffi.NULL, ffi.NULL, secret)
        what = "cannot load private key (wrong password or not a key)"
    else:
        ptr = ffi.new("const unsigned char **", ffi.from_buffer(data))
        pkey = lib.d2i_AutoPrivateKey(ffi.NULL, ptr, len(data))
        what = "not a PEM or DER private key"
    return ffi.gc(check_ptr(pkey, ConfigurationError, what), lib.EVP_PKEY_free)


def x509_digest(x509: Any, algorithm: str) -> bytes:
    """Digest of a certificate's DER encoding."""
    out = ffi.new("unsigned char[64]")
    size = ffi.new("unsigned int *")
    check(lib.X509_digest(x509, digest_for(algorithm), out, size), InternalError, "X509_digest")
    return bytes(ffi.buffer(out, size[0]))


def x509_to_der(x509: Any) -> bytes:
    out = ffi.new("unsigned char **")
    size = check(lib.i2d_X509(x509, out), InternalError, "i2d_X509")
    try:
        return bytes(ffi.buffer(out[0], size))
    finally:
        lib.CRYPTO_free(out[0], b"pydtls_ossl", 0)


def _name_text(name: Any) -> str:
    return _bio_text(lambda bio: lib.X509_NAME_print_ex(bio, name, 0, lib.XN_FLAG_RFC2253),
                     may_be_empty=True).decode(errors="replace")


def certificate_summary(source: CertificateSource) -> dict[str, str]:
    """Subject, issuer (RFC 2253 text) and SHA-256 fingerprint of a certificate."""
    x509 = load_certificates(source)[0]
    return {"subject": _name_text(lib.X509_get_subject_name(x509)),
            "issuer": _name_text(lib.X509_get_issuer_name(x509)),
            "fingerprint": format_fingerprint(x509_digest(x509, "sha-256"))}


def certificate_fingerprint(source: CertificateSource, algorithm: str = "sha-256") -> str:
    """Fingerprint of a certificate (the leaf of a chain), without a handshake."""
    return format_fingerprint(x509_digest(load_certificates(source)[0], algorithm))


# --------------------------------------------------------------- generation

def _bio_text(write: Any, may_be_empty: bool = False) -> bytes:
    bio = ffi.gc(check_ptr(lib.BIO_new(lib.BIO_s_mem()), InternalError, "BIO_new"), lib.BIO_free)
    written = write(bio)
    if written < 0 or (written == 0 and not may_be_empty):
        raise InternalError("writing to a memory BIO failed", drain_errors())
    ptr = ffi.new("char **")
    size = lib.BIO_get_mem_data(bio, ptr)
    return bytes(ffi.buffer(ptr[0], size))


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def fingerprint(self, algorithm: str = "sha-256") -> str:
        """RFC 8122 fingerprint of the certificate, e.g. for SDP ``a=fingerprint``."""
        return certificate_fingerprint(self.cert_pem, algorithm)

    def write(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> None:
        """Save as two PEM files, the key readable by its owner only."""
        with open(cert_path, "wb") as f:
            f.write(self.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)


def _add_extension(x509: Any, v3ctx: Any, nid: int, value: str) -> None:
    ext = lib.X509V3_EXT_conf_nid(ffi.NULL, v3ctx, nid, value.encode())
    ext = check_ptr(ext, ConfigurationError, f"bad certificate extension {value!r}")
    try:
        check(lib.X509_add_ext(x509, ext, -1), InternalError, "X509_add_ext")
    finally:
        lib.X509_EXTENSION_free(ext)


def _new_key(key_type: str) -> Any:
    if key_type == "ec":
        pkey = lib.EVP_EC_gen(b"P-256")
    elif key_type == "rsa":
        pkey = lib.EVP_RSA_gen(2048)
    else:
        raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")
    return ffi.gc(check_ptr(pkey, InternalError, "key generation failed"), lib.EVP_PKEY_free)


def generate_certificate(
    common_name: str = "pydtls_ossl",
    *,
    key_type: str = "ec",
    days: float = 30,
    not_before: float = -3600,
    issuer: Certificate | None = None,
    is_ca: bool = False,
    subject_alt_names: Sequence[str] = (),
) -> Certificate:
    """Make a certificate signed by ``issuer``, or self-signed when it is None.

    ``not_before`` is seconds from now (negative: in the past) and ``days`` the
    validity after that, so an already expired certificate for tests is
    ``not_before=-10 * 86400, days=1``. ``subject_alt_names`` take OpenSSL's
    form: ``"DNS:localhost"``, ``"IP:127.0.0.1"``. Serial numbers are random.
    """
    if days <= 0:
        raise ValueError("days must be positive")
    pkey = _new_key(key_type)
    x509 = ffi.gc(check_ptr(lib.X509_new(), InternalError, "X509_new"), lib.X509_free)
    check(lib.X509_set_version(x509, 2), InternalError, "X509_set_version")

    bn = ffi.gc(check_ptr(lib.BN_new(), InternalError, "BN_new"), lib.BN_free)
    check(lib.BN_rand(bn, 159, -1, 0), InternalError, "BN_rand")
    serial = check_ptr(lib.BN_to_ASN1_INTEGER(bn, ffi.NULL), InternalError, "serial")
    try:
        check(lib.X509_set_serialNumber(x509, serial), InternalError, "serial")
    finally:
        lib.ASN1_INTEGER_free(serial)

    start = int(not_before)
    check_ptr(lib.X509_gmtime_adj(lib.X509_getm_notBefore(x509), start), InternalError, "notBefore")
    check_ptr(lib.X509_gmtime_adj(lib.X509_getm_notAfter(x509), start + int(days * 86400)),
              InternalError, "notAfter")
    check(lib.X509_set_pubkey(x509, pkey), InternalError, "X509_set_pubkey")
    # A name of our own: OpenSSL 4.0 hands out the certificate's as const.
    name = ffi.gc(check_ptr(lib.X509_NAME_new(), InternalError, "X509_NAME_new"), lib.X509_NAME_free)
    check(lib.X509_NAME_add_entry_by_txt(name, b"CN", lib.MBSTRING_UTF8,
                                         common_name.encode(), -1, -1, 0),
          ConfigurationError, "bad common name")
    check(lib.X509_set_subject_name(x509, name), InternalError, "X509_set_subject_name")

    if issuer is None:
        signer_cert, signer_key = x509, pkey
    else:
        signer_cert = load_certificates(issuer.cert_pem)[0]
        signer_key = load_private_key(issuer.key_pem)
    check(lib.X509_set_issuer_name(x509, lib.X509_get_subject_name(signer_cert)),
          InternalError, "X509_set_issuer_name")

    v3ctx = ffi.new("X509V3_CTX *")
    lib.X509V3_set_ctx(v3ctx, signer_cert, x509, ffi.NULL, ffi.NULL, 0)
    _add_extension(x509, v3ctx, lib.NID_basic_constraints,
                   "critical,CA:TRUE" if is_ca else "critical,CA:FALSE")
    if is_ca:
        _add_extension(x509, v3ctx, lib.NID_key_usage, "critical,keyCertSign,cRLSign")
    _add_extension(x509, v3ctx, lib.NID_subject_key_identifier, "hash")
    if subject_alt_names:
        _add_extension(x509, v3ctx, lib.NID_subject_alt_name, ",".join(subject_alt_names))

    check(lib.X509_sign(x509, signer_key, lib.EVP_sha256()), InternalError, "X509_sign")
    cert_pem = _bio_text(lambda bio: lib.PEM_write_bio_X509(bio, x509))
    key_pem = _bio_text(lambda bio: lib.PEM_write_bio_PKCS8PrivateKey(
        bio, pkey, ffi.NULL, ffi.NULL, 0, ffi.NULL, ffi.NULL))
    return Certificate(cert_pem, key_pem)
