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


#: name -> predicate(datagrams fed to the engine, who carried its records)
KNOWN: dict[str, Callable[[Iterable[bytes], str], bool]] = {}
# Fixed, each with its regression test in tests/test_fuzz_regressions.py:
# openssl-short-aead-record, openssl-dtls-etm-fatal, cookie-hello-slack,
# server-replacement-no-deadline, stale-retransmission-packed-with-a-flight.

#: known bugs a target recognises by the state it finds, not by the input
STATEFUL: dict[str, str] = {}

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
