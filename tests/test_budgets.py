"""Memory budgets in bytes: stale handshakes make room, the established budget refuses,
and the accounting returns to zero. Real engines on both sides, the server's clock injected."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pydtls_ossl import ConnectionTerminated, Dtls, DtlsContext, DtlsServer
from pydtls_ossl._ffi import lib

from .helpers import drain
from .test_server import FakeClock, Net, addr, cookie_hello

PSK = bytes(range(16))


def psk_contexts() -> tuple[DtlsContext, DtlsContext]:
    return (DtlsContext(psk_keys=lambda identity: PSK, initial_rto=0.05),
            DtlsContext(psk=("device", PSK), initial_rto=0.05))


def hello(server: DtlsServer, cctx: DtlsContext, address: Any) -> None:
    """A new client's hello with a valid cookie, fed; the server's answers are dropped."""
    server.feed(cookie_hello(server, Dtls(context=cctx), address), address)
    server.datagrams_to_send()


def hello_cost(sctx: DtlsContext, cctx: DtlsContext) -> int:
    """What one handshake in progress costs the budget, measured on a server of its own."""
    probe = DtlsServer(sctx)
    probe.feed(cookie_hello(probe, Dtls(context=cctx), addr(0)), addr(0))
    cost = probe.stats.handshake_memory
    probe.close_all()
    assert probe.stats.handshake_memory == 0
    return cost


def test_stale_handshakes_are_cancelled_oldest_first_for_fresh_hellos() -> None:
    sctx, cctx = psk_contexts()
    cost = hello_cost(sctx, cctx)
    assert lib.PD_MEM_SSL_HANDSHAKE < cost < 2 * lib.PD_MEM_SSL_HANDSHAKE
    clock = FakeClock()
    server = DtlsServer(sctx, max_handshakes=10_000, max_handshake_memory=1000 * cost + cost // 2,
                        clock=clock)
    assert server.handshake_stale_after == 1.0  # max(1 s, initial_rto)
    old = [addr(i) for i in range(1000)]
    for i, address in enumerate(old):
        hello(server, cctx, address)
        clock.now += 0.0001  # admitted one after another
    server.datagrams_to_send()
    assert server.handshaking == 1000 and server.stats.refused_handshake_memory == 0
    assert 1000 * cost - 1000 <= server.stats.handshake_memory <= 1000 * cost + cost // 2

    # full, and nobody is stale yet: a fresh hello is refused, nothing allocated
    hello(server, cctx, addr(5000))
    assert server.stats.refused_handshake_memory == 1 and addr(5000) not in server
    assert server.stats.handshakes_cancelled_stale == 0

    clock.now += 1.0  # every old handshake has been quiet for a second: stale
    fresh = [addr(2000 + i) for i in range(1000)]
    for address in fresh:
        hello(server, cctx, address)
    cancelled = [e for e in server.events() if isinstance(e, ConnectionTerminated)]
    assert [e.address for e in cancelled] == old, "oldest first, each one for one fresh hello"
    assert all("stale" in e.reason for e in cancelled)
    assert server.stats.handshakes_cancelled_stale == 1000
    assert server.handshaking == 1000 and all(a in server for a in fresh)
    assert not any(a in server for a in old)
    assert server.stats.refused_handshake_memory == 1

    # the fresh ones have just spoken: none is stale, so the next hello is refused
    hello(server, cctx, addr(5001))
    assert server.stats.refused_handshake_memory == 2 and server.handshaking == 1000
    server.close_all()
    assert server.stats.handshake_memory == 0


def test_a_handshake_that_progresses_is_not_stale() -> None:
    sctx, cctx = psk_contexts()
    cost = hello_cost(sctx, cctx)
    clock = FakeClock()
    server = DtlsServer(sctx, max_handshake_memory=3 * cost + cost // 2, clock=clock)
    hellos = {}
    for i in range(3):
        hellos[i] = cookie_hello(server, Dtls(context=cctx), addr(i))
        server.feed(hellos[i], addr(i))
        server.datagrams_to_send()
        clock.now += 0.1
    clock.now += 2.0
    server.feed(hellos[0], addr(0))  # peer 0 retransmits its hello: it is alive
    for j in range(2):
        hello(server, cctx, addr(10 + j))
    assert [e.address for e in server.events() if isinstance(e, ConnectionTerminated)] == [addr(1), addr(2)]
    assert addr(0) in server
    hello(server, cctx, addr(20))
    assert server.stats.refused_handshake_memory == 1  # peer 0 is the oldest, and not stale


def test_the_established_budget_refuses_new_peers() -> None:
    sctx, cctx = psk_contexts()
    server = DtlsServer(sctx, max_connection_memory=25_000)
    net = Net(server)
    admitted = 0
    for i in range(10):
        client = net.add(addr(i), Dtls(context=cctx))
        while net.step():  # lossless and in memory: no timer is needed
            pass
        if server.stats.refused_connection_memory:
            assert not client.is_handshake_finished()
            net.clients.pop(addr(i))
            break
        assert client.is_handshake_finished()
        admitted += 1
    assert 2 <= admitted < 10
    assert server.stats.refused_connection_memory == 1, "a clear stat says why"
    assert server.stats.refused_by_limit == 0 and server.stats.refused_handshake_memory == 0
    assert len(server) == admitted and addr(admitted) not in server
    assert 0 < server.stats.connection_memory <= 25_000
    # one peer leaves: the next hello finds room
    net.clients.pop(addr(0))
    server.close(addr(0))
    latecomer = net.add(addr(50), Dtls(context=cctx))
    net.run(lambda: latecomer.is_handshake_finished() and server.handshaking == 0)
    assert addr(50) in server


@pytest.mark.parametrize("workers", [None, 2])
def test_memory_accounting_returns_to_zero(workers: Any) -> None:
    sctx, cctx = psk_contexts()
    clock = FakeClock()
    server = DtlsServer(sctx, release_after=5.0, max_handshake_memory=10**9,
                        max_connection_memory=10**9, handshake_workers=workers, clock=clock)
    net = Net(server)
    clients = {addr(i): net.add(addr(i), Dtls(context=cctx)) for i in range(20)}
    net.run(lambda: all(c.is_handshake_finished() for c in clients.values()) and server.handshaking == 0)
    stats = server.stats
    assert stats.handshake_memory == 0
    active = stats.connection_memory / 20
    assert 2_000 < active < 20_000
    clock.now += 10.0  # quiet: buffers and cipher contexts go
    server.handle_timeout()
    idle = server.stats.connection_memory / 20
    assert 1_000 < idle < active - 2 * lib.PD_MEM_CIPHER_CTX + 500
    for address in list(clients)[:5]:  # these come back to life
        server.send(address, b"ping")
        clients[address].write(b"pong")
        for datagram in drain(clients[address]):
            server.feed(datagram, address)
    assert server.stats.connection_memory > idle * 20 + 5 * lib.PD_MEM_CIPHER_CTX
    for address in list(clients)[5:10]:  # these say goodbye
        clients.pop(address).close()
        for datagram in drain(net.clients.pop(address)):
            server.feed(datagram, address)
    assert len(server) == 15
    server.datagrams_to_send()  # the pings, to nobody
    half = [addr(100 + i) for i in range(3)]  # and these never finish
    for address in half:
        hello(server, cctx, address)
    deadline = time.monotonic() + 30
    while not all(server.connection(a) for a in half):  # workers: their steps are applied here
        assert time.monotonic() < deadline
        time.sleep(0.001)
        server.datagrams_to_send()
    assert server.stats.handshake_memory > 3 * lib.PD_MEM_SSL_HANDSHAKE
    server.close_all()
    assert server.stats.handshake_memory == 0 and server.stats.connection_memory == 0


def test_budgets_validation() -> None:
    sctx, _ = psk_contexts()
    for bad in ({"max_handshake_memory": 0}, {"max_connection_memory": -1},
                {"handshake_stale_after": 0.0}, {"handshake_workers": -1}):
        with pytest.raises(ValueError):
            DtlsServer(sctx, **bad)
