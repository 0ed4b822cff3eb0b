"""Engines free their OpenSSL memory: RSS stays flat over many life cycles."""

from __future__ import annotations

from typing import Any

import pytest

from pydtls_ossl import Dtls, DtlsContext, HandshakeError, generate_certificate

from .helpers import Pair


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def full_cycle(client_ctx: DtlsContext, server_ctx: DtlsContext, pin: str) -> None:
    p = Pair(Dtls(context=client_ctx, expected_peer_fingerprint=pin),
             Dtls(is_server=True, context=server_ctx))
    p.handshake()
    assert p.roundtrip(b"ping") == b"ping"
    p.client.close()
    p.transfer()
    p.server.close()


def failing_cycle(client_ctx: DtlsContext, server_ctx: DtlsContext, wrong_pin: str) -> None:
    p = Pair(Dtls(context=client_ctx, expected_peer_fingerprint=wrong_pin),
             Dtls(is_server=True, context=server_ctx))
    with pytest.raises(HandshakeError):
        p.handshake()
    p.transfer()
    p.client.close()
    p.server.close()


@pytest.mark.slow
def test_rss_flat_over_10000_handshake_cycles(certs: Any) -> None:
    # A small session cache, full after the warm-up: its evictions are exercised,
    # and its (bounded) growth does not hide a leak.
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_cache_size=100)
    client_ctx = DtlsContext(certs.client.cert_pem, certs.client.key_pem)
    pin, wrong = certs.server.fingerprint(), generate_certificate().fingerprint()
    for _ in range(500):
        full_cycle(client_ctx, server_ctx, pin)
        failing_cycle(client_ctx, server_ctx, wrong)
    before = rss_bytes()
    for i in range(10_000):
        full_cycle(client_ctx, server_ctx, pin)
        if i % 5 == 0:
            failing_cycle(client_ctx, server_ctx, wrong)
    growth = rss_bytes() - before
    # 4 MiB over 12,000 cycles: any leak of ~350 bytes per cycle or more fails.
    assert growth < 4 * 1024 * 1024, f"RSS grew by {growth / 1024:.0f} KiB"
