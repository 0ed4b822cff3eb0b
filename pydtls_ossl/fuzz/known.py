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

__all__ = ["KNOWN", "STATEFUL", "explain", "hits", "note", "strict"]

#: what OpenSSL's AEAD record layer needs before it can even try a record:
#: 8-byte explicit nonce and 16-byte tag (AES-GCM); ChaCha20-Poly1305 needs 16
_AEAD_MIN_BODY = 24


def _short_protected_record(datagrams: Iterable[bytes], libssl_records: bool) -> bool:
    """openssl-short-aead-record: libssl answers a protected record (epoch 1)
    whose body is 1..23 bytes with a fatal internal_error alert instead of
    dropping it, so one unauthenticated 14-byte datagram kills any
    association whose records libssl carries."""
    if not libssl_records:
        return False
    for d in datagrams:
        records, _ = framed_records(d)
        if any(r.epoch >= 1 and 0 < len(r.body) < _AEAD_MIN_BODY for r in records):
            return True
    return False


def _hello_with_slack(datagrams: Iterable[bytes], libssl_records: bool) -> bool:
    """cookie-hello-slack: the cookie check (csrc/cookie.c pd_parse_hello) takes a
    ClientHello record whose body holds more than the one fragment, and the
    engine hands it to OpenSSL without the well-formedness check pd_feed
    applies elsewhere (pd_plausible); OpenSSL then fails the handshake with
    a fatal alert: a single engine with a cookie peer is dead before its
    handshake starts."""
    for d in datagrams:
        records, _ = framed_records(d)
        if records and records[0].type == 22 and records[0].epoch == 0 and \
                len(records[0].body) >= 12 and records[0].body[0] == 1:
            body = records[0].body
            if int.from_bytes(body[9:12], "big") + 12 < len(body):
                return True
    return False


#: name -> predicate(datagrams fed to the engine, whether libssl carried its records)
KNOWN: dict[str, Callable[[Iterable[bytes], bool], bool]] = {
    "openssl-short-aead-record": _short_protected_record,
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


def explain(datagrams: list[bytes], libssl_records: bool) -> str | None:
    """The name of a known bug that explains a finding on these inputs, or None."""
    if strict():
        return None
    for name, predicate in KNOWN.items():
        if predicate(datagrams, libssl_records):
            hits[name] += 1
            return name
    return None
