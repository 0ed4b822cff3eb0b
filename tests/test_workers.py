"""Handshakes offloaded to worker threads: they complete, each peer's datagrams are applied
in order, closing stops the threads, and a failing step fails only its own handshake."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any, Callable

import pytest

from pydtls_ossl import (ConnectionEstablished, ConnectionTerminated, DataReceived, Dtls,
                         DtlsContext, DtlsServer, HandshakeError, Verify)
from pydtls_ossl import server as server_module

from .helpers import drain
from .test_server import Net, addr

PSK = bytes(range(16))


class WorkerNet(Net):
    """``Net`` whose idle wait is the server's ``wakeup`` (a worker finished a step)."""

    def __init__(self, server: DtlsServer) -> None:
        super().__init__(server)
        self.woken = threading.Event()
        server.wakeup = self.woken.set

    def run(self, until: Callable[[], bool], limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while not until():
            assert time.monotonic() < deadline, "network did not settle"
            if self.step():
                continue
            self.woken.wait(0.05)
            self.woken.clear()
            for client in self.clients.values():
                if client.get_timeout() == 0:
                    client.handle_timeout()
            self.server.handle_timeout()


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pydtls-handshake-")]


def test_500_ecdhe_handshakes_on_2_workers(certs: Any) -> None:
    server = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.5),
                        handshake_workers=2)
    net = WorkerNet(server)
    cctx = DtlsContext(verify=Verify.NONE, initial_rto=0.5)
    clients = {addr(i): net.add(addr(i), Dtls(context=cctx)) for i in range(500)}
    net.run(lambda: all(c.is_handshake_finished() for c in clients.values()) and server.handshaking == 0)
    established = [e.address for e in net.events if isinstance(e, ConnectionEstablished)]
    assert sorted(established) == sorted(clients) and len(server) == 500
    assert server.stats.handshakes_completed == 500 and server.stats.handshakes_failed == 0
    assert {t.name for t in worker_threads()} >= {"pydtls-handshake-0", "pydtls-handshake-1"}
    for address, client in list(clients.items())[:20]:  # and records flow as ever
        client.write(b"hello %d" % address[1])
        for datagram in drain(client):
            server.feed(datagram, address)
    assert sorted(e.data for e in server.events() if isinstance(e, DataReceived)) == sorted(
        b"hello %d" % a[1] for a in list(clients)[:20])
    server.close_all()


def test_a_peers_datagrams_are_applied_in_arrival_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed handshake's last flight and the records right behind it: the records wait
    for the step on the worker, then follow it, in order, and no two steps of one peer
    ever run at once."""
    sctx = DtlsContext(psk_keys=lambda identity: PSK, initial_rto=0.5)
    cctx = DtlsContext(psk=("device", PSK), initial_rto=0.5)
    first_server = DtlsServer(sctx)
    first = Net(first_server)
    client = first.add(addr(0), Dtls(context=cctx))
    first.run(lambda: client.is_handshake_finished() and first_server.handshaking == 0)
    session = client.session()
    assert session is not None

    gate = threading.Event()
    running: dict[Any, int] = {}
    fed: list[tuple[Any, bytes]] = []
    overlaps: list[Any] = []
    original = server_module._feed_step

    def gated(engine: Dtls, datagram: bytes) -> tuple[int, bytes]:
        key = id(engine)
        running[key] = running.get(key, 0) + 1
        if running[key] > 1:
            overlaps.append(key)
        fed.append((key, datagram))
        gate.wait(10)  # the peer's first step holds the worker until the test lets go
        try:
            return original(engine, datagram)
        finally:
            running[key] -= 1

    monkeypatch.setattr(server_module, "_feed_step", gated)
    server = DtlsServer(sctx, handshake_workers=2)
    net = WorkerNet(server)
    resumed = Dtls(context=cctx, session=session)
    net.clients[addr(1)] = resumed
    resumed.handshake()
    gate.set()
    net.run(lambda: resumed.is_handshake_finished())  # server: hello, then its flight
    gate.clear()
    last_flight = drain(resumed)  # CCS + Finished: the server's last handshake step
    assert last_flight and resumed.session_reused()
    records = []
    for i in range(5):
        resumed.write(b"record %d" % i)
        records.extend(drain(resumed))
    for datagram in last_flight + records:  # all at once, while the step is held
        server.feed(datagram, addr(1))
    time.sleep(0.05)
    assert not [e for e in server.events() if isinstance(e, ConnectionEstablished)]
    gate.set()
    net.run(lambda: server.handshaking == 0 and len(server) == 1)
    events = [e for e in net.events + list(server.events()) if e.address == addr(1)]
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ConnectionEstablished"] + ["DataReceived"] * 5
    assert [e.data for e in events[1:]] == [b"record %d" % i for i in range(5)]
    assert not overlaps
    arrived = [d for _, d in fed]
    assert arrived[-len(last_flight):] == last_flight, "the flight's datagrams in arrival order"
    server.close_all()


def test_closing_the_server_stops_its_workers(certs: Any) -> None:
    before = set(worker_threads())
    server = DtlsServer(DtlsContext(psk_keys=lambda identity: PSK), handshake_workers=2)
    assert server.workers == 0 and set(worker_threads()) == before  # none before a handshake
    net = WorkerNet(server)
    client = net.add(addr(0), Dtls(context=DtlsContext(psk=("device", PSK))))
    net.run(lambda: client.is_handshake_finished() and server.handshaking == 0)
    threads = set(worker_threads()) - before
    assert server.workers == 2 and len(threads) == 2 and all(t.is_alive() for t in threads)
    server.close_all()
    assert server.workers == 0 and not any(t.is_alive() for t in threads)
    assert set(worker_threads()) == before

    # a server dropped without close_all() stops them too
    server = DtlsServer(DtlsContext(psk_keys=lambda identity: PSK), handshake_workers=2)
    net = WorkerNet(server)
    client = net.add(addr(0), Dtls(context=DtlsContext(psk=("device", PSK))))
    net.run(lambda: client.is_handshake_finished() and server.handshaking == 0)
    threads = set(worker_threads()) - before
    assert len(threads) == 2
    del server, net
    gc.collect()
    assert not any(t.is_alive() for t in threads)


def test_an_exception_on_a_worker_fails_only_that_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    def verify(address: Any, fingerprint: str | None, identity: str | None) -> bool:
        if identity == "evil":
            raise ValueError("refused by a bug in verify_peer")
        return True

    sctx = DtlsContext(psk_keys=lambda identity: PSK, initial_rto=0.5)
    server = DtlsServer(sctx, verify_peer=verify, handshake_workers=2)
    net = WorkerNet(server)
    good = [net.add(addr(i), Dtls(context=DtlsContext(psk=(f"dev{i}", PSK), initial_rto=0.5)))
            for i in range(4)]
    evil = net.add(addr(9), Dtls(context=DtlsContext(psk=("evil", PSK), initial_rto=0.5)))
    net.run(lambda: all(c.is_handshake_finished() for c in good)
            and any(isinstance(e, ConnectionTerminated) for e in net.events))
    [ended] = [e for e in net.events if isinstance(e, ConnectionTerminated)]
    assert ended.address == addr(9) and isinstance(ended.error, HandshakeError)
    assert isinstance(ended.error.__cause__, ValueError), "the hook's exception, from the worker"
    assert not evil.is_handshake_finished()
    assert server.stats.handshakes_failed == 1 and server.stats.handshakes_completed == 4

    # an exception that is no DtlsError at all (a bug below the engine)
    original = server_module._feed_step

    def second_step_breaks(engine: Dtls, datagram: bytes) -> tuple[int, bytes]:
        if victim_engine == [id(engine)]:
            raise RuntimeError("worker bug")
        return original(engine, datagram)

    victim_engine: list[int] = []
    monkeypatch.setattr(server_module, "_feed_step", second_step_breaks)
    others = [net.add(addr(20 + i), Dtls(context=DtlsContext(psk=(f"x{i}", PSK), initial_rto=0.5)))
              for i in range(3)]
    victim = net.add(addr(30), Dtls(context=DtlsContext(psk=("victim", PSK), initial_rto=0.5)))
    net.run(lambda: addr(30) in server and server.connection(addr(30)) is not None)
    engine = server.connection(addr(30))
    assert engine is not None
    victim_engine.append(id(engine))
    net.run(lambda: all(c.is_handshake_finished() for c in others)
            and any(isinstance(e, ConnectionTerminated) and e.address == addr(30) for e in net.events))
    [ended] = [e for e in net.events if isinstance(e, ConnectionTerminated) and e.address == addr(30)]
    assert isinstance(ended.error, HandshakeError) and "worker bug" in str(ended.error)
    assert isinstance(ended.error.__cause__, RuntimeError)
    assert not victim.is_handshake_finished() and addr(30) not in server
    assert server.stats.handshakes_failed == 2 and server.stats.handshakes_completed == 7
    server.close_all()


def test_the_blocking_and_asyncio_servers_pass_handshake_workers(certs: Any) -> None:
    import asyncio

    from pydtls_ossl import aio

    from .surfaces import BlockingEchoServer, async_echo, async_echo_client, blocking_echo_client
    from .test_surfaces import blocking_client

    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    client_ctx = DtlsContext(cadata=certs.server.cert_pem)
    with BlockingEchoServer(server_ctx, handshake_workers=2) as server:
        assert server.listener.core._pool is not None
        blocking_echo_client(lambda: blocking_client(client_ctx, server.port))
        assert server.listener.core.workers == 2

    async def main() -> None:
        async with await aio.serve(async_echo, "127.0.0.1", 0, context=server_ctx,
                                   handshake_workers=2) as served:
            await async_echo_client("127.0.0.1", served.address[1], client_ctx)
            assert served.core.workers == 2
        assert served.core.workers == 0
    asyncio.run(main())


def test_a_restarted_peers_new_handshake_runs_on_a_worker() -> None:
    """A peer that restarts on the same address shakes hands again on a worker, while
    the old association's records keep arriving on the caller's thread."""
    asked: list[str] = []

    def key(identity: str) -> bytes:
        asked.append(threading.current_thread().name)
        return PSK

    server = DtlsServer(DtlsContext(psk_keys=key, ciphers="PSK-AES128-CCM8", initial_rto=0.05),
                        handshake_workers=2)
    net = WorkerNet(server)
    cctx = DtlsContext(psk=("device", PSK), ciphers="PSK-AES128-CCM8", initial_rto=0.05)
    old = net.add(addr(1), Dtls(context=cctx))
    net.run(lambda: old.is_handshake_finished() and server.handshaking == 0)
    asked.clear()
    net.events.clear()
    new = Dtls(context=cctx)
    new.handshake()
    hello = new.pull()
    assert hello is not None
    server.feed(hello, addr(1))  # the cookie exchange
    [(hvr, _)] = server.datagrams_to_send()
    new.feed(hvr)
    server.feed(drain(new)[0], addr(1))  # the hello with its cookie: a worker takes it
    assert server.handshaking == 1 and server._replacing
    old.write(b"old, meanwhile")
    server.feed(drain(old)[0], addr(1))
    assert DataReceived(addr(1), b"old, meanwhile") in list(server.events())
    net.clients[addr(1)] = new
    net.run(lambda: new.is_handshake_finished() and server.stats.restarts == 1)
    assert asked and threading.main_thread().name not in asked
    assert [e.reason for e in net.events if isinstance(e, ConnectionTerminated)] == ["peer restarted"]
    new.write(b"new association")
    net.run(lambda: any(isinstance(e, DataReceived) and e.data == b"new association"
                        for e in net.events))
    assert server.handshaking == 0 and not server._busy and not server._replacing
    server.close_all()
