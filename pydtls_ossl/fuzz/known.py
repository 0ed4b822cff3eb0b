"""Bugs the fuzzers found that are not fixed yet, as predicates on inputs.

A target that is about to report a finding first asks ``explain()`` whether
a known bug accounts for it; if so the input is counted under that bug's
name and the target starts over from fresh state, so a long run goes on
exploring instead of stopping at the same bug again. ``--strict`` (or
``PYDTLS_FUZZ_STRICT=1``) turns this off. Each bug has a failing regression
test in tests/test_fuzz_regressions.py; delete its entry here once fixed.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable, Iterable

from ._wire import framed_records

__all__ = ["ENGINE", "KNOWN", "LIBSSL_AEAD", "LIBSSL_CBC", "STATEFUL", "explain", "hits", "note",
           "strict"]

#: what OpenSSL's AEAD record layer needs before it can even try a record:
#: 8-byte explicit nonce and 16-byte tag (AES-GCM); ChaCha20-Poly1305 needs 16
_AEAD_MIN_BODY = 24
#: who carried an engine's records when a finding happened
ENGINE, LIBSSL_AEAD, LIBSSL_CBC = "engine", "libssl-aead", "libssl-cbc"


def _short_protected_record(datagrams: Iterable[bytes], records: str) -> bool:
    """openssl-short-aead-record: libssl answers a protected record (epoch 1 or
    later, any content type) whose body is 1..23 bytes with a fatal
    internal_error alert instead of dropping it, so one unauthenticated
    15-byte datagram kills any association whose records libssl carries,
    and every handshake (libssl carries the records until the handover).
    libssl skips a bad 13-byte header and reads on, so the record may sit
    at any offset: this looks at every one."""
    if records != LIBSSL_AEAD:
        return False
    for d in datagrams:
        for p in range(len(d) - 12):
            if d[p + 1] == 0xFE and (d[p + 3] or d[p + 4]):  # libssl checks only 0xFE
                length = int.from_bytes(d[p + 11:p + 13], "big")
                if 0 < length < _AEAD_MIN_BODY and p + 13 + length <= len(d):
                    return True
    return False


def _protected_record_under_etm(datagrams: Iterable[bytes], records: str) -> bool:
    """openssl-dtls-etm-fatal: with a CBC suite OpenSSL negotiates
    encrypt-then-MAC (RFC 7366), and libssl's DTLS record layer answers a
    protected record whose MAC is wrong (or that is shorter than a MAC) with
    a fatal bad_record_mac / decode_error alert instead of dropping it, as it
    does without encrypt-then-MAC: any spoofed epoch-1 record kills a CBC
    association."""
    if records != LIBSSL_CBC:
        return False
    for d in datagrams:
        for p in range(len(d) - 12):
            if d[p + 1] == 0xFE and (d[p + 3] or d[p + 4]):
                if p + 13 + int.from_bytes(d[p + 11:p + 13], "big") <= len(d):
                    return True
    return False


def _hello_with_slack(datagrams: Iterable[bytes], records: str) -> bool:  # noqa: ARG001
    """cookie-hello-slack: the cookie check (csrc/cookie.c pd_parse_hello) takes a
    ClientHello record whose body holds more than the one fragment, and the
    engine hands it to OpenSSL without the well-formedness check pd_feed
    applies elsewhere (pd_plausible); OpenSSL then fails the handshake with
    a fatal alert: a single engine with a cookie peer is dead before its
    handshake starts."""
    for d in datagrams:
        framed, _ = framed_records(d)
        if framed and framed[0].type == 22 and framed[0].epoch == 0 and \
                len(framed[0].body) >= 12 and framed[0].body[0] == 1:
            body = framed[0].body
            if int.from_bytes(body[9:12], "big") + 12 < len(body):
                return True
    return False


#: name -> predicate(datagrams fed to the engine, who carried its records)
KNOWN: dict[str, Callable[[Iterable[bytes], str], bool]] = {
    "openssl-short-aead-record": _short_protected_record,
    "openssl-dtls-etm-fatal": _protected_record_under_etm,
    "cookie-hello-slack": _hello_with_slack,
}

#: known bugs a target recognises by the state it finds, not by the input
STATEFUL = {
    "server-replacement-no-deadline": "DtlsServer gives a restart's replacement handshake "
                                      "no deadline and no timer: it never expires",
}

hits: Counter[str] = Counter()


def strict() -> bool:
    return os.environ.get("PYDTLS_FUZZ_STRICT", "") not in ("", "0")


def note(name: str) -> bool:
    """Count a hit of the stateful known bug ``name``; False in strict mode."""
    if strict():
        return False
    assert name in STATEFUL
    hits[name] += 1
    return True


def explain(datagrams: list[bytes], records: str) -> str | None:
    """The name of a known bug that explains a finding on these inputs, or None.
    ``records``: ENGINE, LIBSSL_AEAD or LIBSSL_CBC, who carried the records."""
    if strict():
        return None
    for name, predicate in KNOWN.items():
        if predicate(datagrams, records):
            hits[name] += 1
            return name
    return None
