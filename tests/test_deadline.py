"""Handshake deadlines (DtlsContext(handshake_timeout=...)) and named CCM_8 suites.

A wrong PSK looks like loss in DTLS: records that fail to authenticate are
dropped silently, so without a deadline both sides retransmit for minutes.
The deadline is enforced through get_timeout()/handle_timeout(), so a
sans-IO caller gets it by driving the timers it already drives.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import pytest

from pydtls_ossl import Dtls, DtlsContext, HandshakeError, openssl_version
from pydtls_ossl.context import DEFAULT_CIPHERS
from pydtls_ossl.server import ConnectionTerminated, DtlsServer

from .helpers import Pair, drain
from .test_server import FakeClock, Net, addr

KEY = bytes(range(16))


def drive_until_failure(*engines: Dtls, limit: float = 10.0) -> dict[Dtls, HandshakeError]:
    """Move datagrams between two engines and run their timers until both fail."""
    a, b = engines
    errors: dict[Dtls, HandshakeError] = {}
    end = time.monotonic() + limit
    a.handshake()
    while len(errors) < 2:
        assert time.monotonic() < end, "no deadline fired"
        for src, dst in ((a, b), (b, a)):
            for datagram in drain(src):
                if dst not in errors:
                    dst.feed(datagram)
        for engine in engines:
            if engine in errors:
                continue
            try:
                engine.handshake()
                timeout = engine.get_timeout()
                if timeout == 0:
                    engine.handle_timeout()
            except HandshakeError as exc:
                errors[engine] = exc
        timers = [t for e in engines if e not in errors and (t := e.get_timeout()) is not None]
        time.sleep(min(timers + [0.05]))
    return errors


def test_wrong_psk_fails_at_the_deadline_and_says_why() -> None:
    # Default timers (1 s RTO, doubling): without a deadline this retransmits for minutes.
    client = Dtls(context=DtlsContext(psk=("device-1", b"\x01" * 16), handshake_timeout=0.8))
    server = Dtls(is_server=True, context=DtlsContext(psk_keys={"device-1": KEY},
                                                      handshake_timeout=0.8))
    errors = drive_until_failure(client, server)
    for error in errors.values():
        assert "deadline passed" in str(error)
    assert "records from the peer failed authentication: a wrong pre-shared key is the usual " \
           "cause" in str(errors[server])
    assert "wrong pre-shared key" in str(errors[client])
    for engine in (client, server):
        with pytest.raises(HandshakeError, match="deadline passed"):
            engine.handshake()  # a dead association keeps saying why


def test_deadline_shows_in_get_timeout_of_a_peer_that_never_answers() -> None:
    client = Dtls(context=DtlsContext(verify="none", handshake_timeout=0.3))
    assert client.get_timeout() is None  # nothing started yet
    client.handshake()
    timeout = client.get_timeout()
    assert timeout is not None and timeout <= 0.3  # the deadline, not the 1 s RTO
    time.sleep(timeout)
    with pytest.raises(HandshakeError, match="deadline passed") as info:
        client.handle_timeout()
    assert "failed authentication" not in str(info.value)
    assert client.state.name == "FAILED" and client.get_timeout() is None


def test_engine_override_and_none() -> None:
    ctx = DtlsContext(verify="none", handshake_timeout=0.3)
    client = Dtls(context=ctx, handshake_timeout=None)
    client.handshake()
    assert client.get_timeout() == pytest.approx(1.0, abs=0.05)  # OpenSSL's timer alone
    assert DtlsContext(verify="none").handshake_timeout == 30.0
    for bad in (0, -1, 10**6):
        with pytest.raises(ValueError):
            DtlsContext(verify="none", handshake_timeout=bad)
        with pytest.raises(ValueError):
            Dtls(context=ctx, handshake_timeout=bad)


def test_established_associations_have_no_deadline(certs: Any) -> None:
    p = Pair(Dtls(context=DtlsContext(verify="none", handshake_timeout=0.2)),
             Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                                                      handshake_timeout=0.2)))
    p.handshake()
    time.sleep(0.25)
    for engine in (p.client, p.server):
        assert engine.get_timeout() is None
        assert engine.handle_timeout() is False
    assert p.roundtrip(b"still here") == b"still here"


def test_server_core_uses_the_context_deadline_and_explains_it() -> None:
    clock = FakeClock()
    server = DtlsServer(DtlsContext(psk_keys={"device-1": KEY}, initial_rto=0.05,
                                    handshake_timeout=5.0), clock=clock)
    assert server.handshake_timeout == 5.0
    assert DtlsServer(DtlsContext(psk_keys={"d": KEY}), handshake_timeout=2.0).handshake_timeout == 2.0
    net = Net(server)
    net.add(addr(1), Dtls(context=DtlsContext(psk=("device-1", b"\x09" * 16), initial_rto=0.05,
                                              handshake_timeout=None)))
    for _ in range(20):  # the wrong key's Finished reaches the server, which drops it
        net.step()
        time.sleep(0.01)
    clock.now += 6
    server.handle_timeout()
    net.events.extend(server.events())
    [ended] = [e for e in net.events if isinstance(e, ConnectionTerminated)]
    assert ended.reason == "handshake timeout"
    assert isinstance(ended.error, HandshakeError)
    assert "deadline passed" in str(ended.error)
    assert "wrong pre-shared key is the usual cause" in str(ended.error)
    assert len(server) == 0 and server.handshaking == 0


def test_blocking_socket_gives_up_at_the_deadline() -> None:
    ctx = DtlsContext(verify="none", handshake_timeout=0.3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        silent.bind(("127.0.0.1", 0))  # a black hole: receives, never answers
        sock.connect(silent.getsockname())
        wrapped = ctx.wrap_socket(sock, do_handshake_on_connect=False)
        wrapped.settimeout(None)  # no socket timeout: the context's deadline ends it
        with pytest.raises(HandshakeError, match="deadline passed"):
            wrapped.do_handshake()


# ------------------------------------------------------ named CCM_8 suites


def at_least(major: int, minor: int) -> bool:
    version = openssl_version().split()[1]
    parts = tuple(int(x) for x in version.split(".")[:2])
    return parts >= (major, minor)


@pytest.mark.parametrize("suite", ["PSK-AES128-CCM8", "PSK-AES256-CCM8"])
def test_named_ccm8_psk_suite_negotiates(suite: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pydtls_ossl"):
        client_ctx = DtlsContext(psk=("device-1", KEY), ciphers=suite)
        server_ctx = DtlsContext(psk_keys={"device-1": KEY}, ciphers=suite)
    p = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    p.handshake()
    assert p.client.cipher()[0] == suite  # type: ignore[index]
    assert p.roundtrip(b"\x40\x01coap") == b"\x40\x01coap"
    lowered = [r for r in caplog.records if "security level lowered" in r.getMessage()]
    if at_least(3, 5):  # OpenSSL 3.5 rates CCM_8 at 64 bits: below level 1
        assert client_ctx.security_level == server_ctx.security_level == 0
        assert len(lowered) == 2 and suite in lowered[0].getMessage()
    else:
        assert lowered == [] and client_ctx.security_level >= 1


def test_named_ccm8_certificate_suite_negotiates(certs: Any) -> None:
    suite = "ECDHE-ECDSA-AES128-CCM8"
    p = Pair(Dtls(context=DtlsContext(verify="none", ciphers=suite)),
             Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                                                      ciphers=suite)))
    p.handshake()
    assert p.client.cipher()[0] == suite  # type: ignore[index]


def test_default_and_strong_named_suites_never_lower_the_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pydtls_ossl"):
        base = DtlsContext(verify="none").security_level
        assert DtlsContext(verify="none", ciphers=DEFAULT_CIPHERS).security_level == base
        assert DtlsContext(psk=("a", KEY)).security_level == base  # the PSK defaults list CCM8 last
        assert DtlsContext(psk=("a", KEY), ciphers="PSK-AES128-CCM8",
                           security_level=3).security_level == 3  # an explicit level is kept
    assert not [r for r in caplog.records if "security level lowered" in r.getMessage()]
