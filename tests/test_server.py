"""The multi-peer server core: stateless cookies, limits, timers, fairness, restarts."""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from typing import Any, Callable

import pytest

from pydtls_ossl import ConnectionClosed, Dtls, DtlsContext, LimitExceeded, Verify
from pydtls_ossl.context import CookieSecret
from pydtls_ossl.server import (ConnectionEstablished, ConnectionTerminated, DataReceived,
                                DtlsServer)

from .helpers import LossyLink, drain, library_growth
from .test_memory import rss_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def addr(i: int) -> tuple[str, int]:
    return ("127.0.0.1", 20000 + i)  # labels only: nothing is sent anywhere


class Net:
    """Client engines and one server core wired in memory, optionally lossy."""

    def __init__(self, server: DtlsServer, loss: float = 0.0, seed: int = 1) -> None:
        self.server = server
        self.clients: dict[Any, Dtls] = {}
        self.up = LossyLink(seed, loss, duplicate=0.0, reorder=0.0)
        self.down = LossyLink(seed + 7, loss, duplicate=0.0, reorder=0.0)
        self.events: list[Any] = []
        self._woken = threading.Event()
        theirs = server.wakeup  # a test's own hook still runs

        def woken() -> None:
            self._woken.set()
            if theirs is not None:
                theirs()

        server.wakeup = woken

    def add(self, address: Any, client: Dtls) -> Dtls:
        self.clients[address] = client
        client.handshake()
        return client

    def step(self) -> int:
        moved = 0
        for address, client in self.clients.items():
            for datagram in self.up.carry(drain(client)):
                self.server.feed(datagram, address)
                moved += 1
        for datagram, address in self.server.datagrams_to_send():
            client = self.clients.get(address)
            if client is not None and self.down.carry([datagram]):
                client.feed(datagram)
                if client.state.name in ("NEW", "HANDSHAKING"):
                    client.handshake()
                moved += 1
        self.events.extend(self.server.events())
        return moved

    def run(self, until: Callable[[], bool], limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while not until():
            assert time.monotonic() < deadline, "network did not settle"
            if self.step():
                continue
            timers = [t for t in (c.get_timeout() for c in self.clients.values()) if t is not None]
            server_timer = self.server.get_timeout()
            if server_timer is not None:
                timers.append(server_timer)
            self._woken.wait(min(timers, default=0.01))  # or until a handshake worker finishes
            self._woken.clear()
            for client in self.clients.values():
                if client.get_timeout() == 0:
                    client.handle_timeout()
            self.server.handle_timeout()


@pytest.fixture
def server_ctx(certs: Any) -> DtlsContext:
    return DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.05)


@pytest.fixture
def client_ctx() -> DtlsContext:
    return DtlsContext(verify=Verify.NONE, initial_rto=0.05)


def first_hello(client_ctx: DtlsContext) -> bytes:
    client = Dtls(context=client_ctx)
    client.handshake()
    hello = client.pull()
    assert hello is not None
    return hello


def cookie_hello(server: DtlsServer, client: Dtls, address: Any) -> bytes:
    """Run the cookie round; return the client's hello that carries the cookie."""
    client.handshake()
    server.feed(client.pull(), address)  # type: ignore[arg-type]
    # with handshake workers, other peers' results may be sent in the same call
    [hvr] = [d for d, to in server.datagrams_to_send() if to == address]
    assert hvr[0] == 22 and hvr[13] == 3
    client.feed(hvr)
    second = client.pull()
    assert second is not None
    return second


def test_spoofed_hello_flood_costs_no_state(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx)
    hello = first_hello(client_ctx)
    replies = 0
    for i in range(1000):  # warm up allocators before measuring
        server.feed(hello, addr(i))
    server.datagrams_to_send()
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    snapshot_before = tracemalloc.take_snapshot()
    for i in range(10_000):
        server.feed(hello, ("127.0.0.2", i))
        if i % 1000 == 999:
            sent = server.datagrams_to_send()
            replies += len(sent)
            assert all(d[0] == 22 and d[1:3] == b"\xfe\xff" and d[13] == 3 for d, _ in sent)
            del sent
    snapshot_after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    python_growth = library_growth(snapshot_before, snapshot_after)
    assert replies == 10_000
    assert len(server) == 0 and server.handshaking == 0
    assert server.stats.hello_verify_requests == 11_000
    # CPython keeps ~1,000 freed reply tuples on its free list (56 KB); anything
    # kept per hello would be at least 56 B x 10,000 = 560 KB.
    assert python_growth < 96 * 1024, "the library kept Python objects per spoofed hello"
    assert rss_bytes() - rss_before < 1024 * 1024


def test_hello_verify_request_is_well_formed(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx)
    hello = first_hello(client_ctx)
    server.feed(hello, addr(1))
    [(hvr, _)] = server.datagrams_to_send()
    assert len(hvr) == 60 and hvr[3:11] == hello[3:11], "echoes the hello's epoch and sequence"
    assert int.from_bytes(hvr[11:13], "big") == len(hvr) - 13
    assert hvr[25:27] == b"\xfe\xff" and hvr[27] == 32
    server.feed(hello, addr(1))
    [(again, _)] = server.datagrams_to_send()
    assert again == hvr, "stateless: the same hello from the same address gets the same cookie"
    server.feed(hello, addr(2))
    [(other, _)] = server.datagrams_to_send()
    assert other[28:] != hvr[28:], "the cookie binds the address"


def test_200_clients_through_one_core_with_10_percent_loss(server_ctx: DtlsContext,
                                                           client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx, max_handshakes=256)
    net = Net(server, loss=0.10, seed=42)
    for i in range(200):
        net.add(addr(i), Dtls(context=client_ctx))
    net.run(lambda: all(c.is_handshake_finished() for c in net.clients.values())
            and server.handshaking == 0 and len(server) == 200, limit=60)
    established = {e.address for e in net.events if isinstance(e, ConnectionEstablished)}
    assert established == set(net.clients)
    lossless = Net(server)
    lossless.clients = net.clients
    for address, client in net.clients.items():
        client.write(b"hello from %d" % address[1])
    lossless.step()
    received = [e for e in lossless.events if isinstance(e, DataReceived)]
    assert len(received) == 200
    for event in received:
        server.send(event.address, event.data.upper())
    lossless.step()
    for address, client in net.clients.items():
        assert client.read() == b"HELLO FROM %d" % address[1]
    for client in net.clients.values():
        client.close()
    lossless.step()
    closed = [e for e in lossless.events if isinstance(e, ConnectionTerminated)]
    assert len(closed) == 200 and {e.reason for e in closed} == {"peer closed"}
    assert len(server) == 0 and server.handshaking == 0


def test_handshake_deadline_reclaims_abandoned_handshakes(server_ctx: DtlsContext,
                                                          client_ctx: DtlsContext) -> None:
    clock = FakeClock()
    server = DtlsServer(server_ctx, handshake_timeout=5.0, clock=clock)
    client = Dtls(context=client_ctx)
    server.feed(cookie_hello(server, client, addr(1)), addr(1))
    assert len(server) == 1 and server.handshaking == 1
    timeout = server.get_timeout()
    assert timeout is not None and timeout <= 5.0
    clock.now += 5.0
    server.handle_timeout()
    events = list(server.events())
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert events[0].reason == "handshake timeout"  # type: ignore[union-attr]
    assert len(server) == 0 and server.handshaking == 0 and server.get_timeout() is None


def test_idle_timeout_closes_quiet_peers_and_activity_defers_it(server_ctx: DtlsContext,
                                                                client_ctx: DtlsContext) -> None:
    clock = FakeClock()
    server = DtlsServer(server_ctx, idle_timeout=60.0, clock=clock)
    net = Net(server)
    client = net.add(addr(1), Dtls(context=client_ctx))
    net.run(lambda: client.is_handshake_finished() and len(server) == 1 and server.handshaking == 0)
    clock.now += 40
    client.write(b"still here")
    net.step()
    clock.now += 40
    server.handle_timeout()
    assert len(server) == 1, "activity 40 s ago keeps it alive"
    clock.now += 21
    server.handle_timeout()
    assert len(server) == 0
    assert any(isinstance(e, ConnectionTerminated) and e.reason == "idle timeout"
               for e in server.events())
    notify = server.datagrams_to_send()
    assert notify and notify[0][0][0] == 21, "close_notify goes out"


def test_max_handshakes_refuses_without_allocating(server_ctx: DtlsContext,
                                                   client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx, max_handshakes=2)
    clients = [Dtls(context=client_ctx) for _ in range(3)]
    hellos = [cookie_hello(server, c, addr(i)) for i, c in enumerate(clients)]
    for i, hello in enumerate(hellos):
        server.feed(hello, addr(i))
    assert len(server) == 2 and server.handshaking == 2
    assert server.stats.refused_by_limit == 1
    net = Net(server)
    net.clients = {addr(0): clients[0], addr(1): clients[1]}
    net.run(lambda: server.handshaking == 0 and len(server) == 2)
    server.feed(hellos[2], addr(2))  # the client retransmits; now there is room
    assert len(server) == 3


def test_max_connections(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx, max_connections=1)
    net = Net(server)
    first = net.add(addr(0), Dtls(context=client_ctx))
    net.run(lambda: first.is_handshake_finished() and server.handshaking == 0)
    second = Dtls(context=client_ctx)
    server.feed(cookie_hello(server, second, addr(1)), addr(1))
    assert len(server) == 1 and server.stats.refused_by_limit == 1


def test_max_queued_bytes_per_peer(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx, max_queued_bytes=4000)
    net = Net(server)
    client = net.add(addr(0), Dtls(context=client_ctx))
    net.run(lambda: client.is_handshake_finished() and server.handshaking == 0)
    with pytest.raises(LimitExceeded):
        for _ in range(10):
            server.send(addr(0), b"x" * 1000)
    assert len(server.datagrams_to_send()) == 3
    server.send(addr(0), b"room again")
    with pytest.raises(ConnectionClosed):
        server.send(addr(9), b"nobody")


def test_cookie_from_another_address_is_rejected(server_ctx: DtlsContext,
                                                 client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx)
    hello = cookie_hello(server, Dtls(context=client_ctx), addr(1))
    server.feed(hello, addr(2))
    assert len(server) == 0
    assert server.datagrams_to_send()[0][0][13] == 3, "answered with a fresh HelloVerifyRequest"
    server.feed(hello, addr(1))
    assert len(server) == 1


def test_tampered_cookie_is_rejected(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx)
    hello = bytearray(cookie_hello(server, Dtls(context=client_ctx), addr(1)))
    cookie_at = 25 + 2 + 32 + 1 + hello[25 + 2 + 32] + 1
    hello[cookie_at + 5] ^= 1
    server.feed(bytes(hello), addr(1))
    assert len(server) == 0 and server.stats.hello_verify_requests == 2


def test_secret_rotation_accepts_previous_period_only(certs: Any, client_ctx: DtlsContext) -> None:
    clock = FakeClock()
    secret = CookieSecret(b"k" * 32, period=30, clock=clock)
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, cookie_secret=secret)
    server = DtlsServer(ctx)
    hello = cookie_hello(server, Dtls(context=client_ctx), addr(1))
    clock.now += 30  # next period: the old secret is still accepted
    server.feed(hello, addr(1))
    assert len(server) == 1
    server.close(addr(1))
    server.datagrams_to_send()
    clock.now += 60  # two periods on: expired
    server.feed(hello, addr(1))
    assert len(server) == 0
    assert server.datagrams_to_send()[0][0][13] == 3


def test_servers_sharing_a_secret_accept_each_others_cookies(certs: Any,
                                                              client_ctx: DtlsContext) -> None:
    shared = b"fleet-wide secret, 32 bytes long"
    a = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem, cookie_secret=shared))
    b = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem, cookie_secret=shared))
    other = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem))
    hello = cookie_hello(a, Dtls(context=client_ctx), addr(1))
    other.feed(hello, addr(1))
    assert len(other) == 0
    b.feed(hello, addr(1))
    assert len(b) == 1


def test_round_robin_fairness(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx)
    net = Net(server)
    chatty = net.add(addr(0), Dtls(context=client_ctx))
    quiet = net.add(addr(1), Dtls(context=client_ctx))
    net.run(lambda: chatty.is_handshake_finished() and quiet.is_handshake_finished()
            and server.handshaking == 0)
    for _ in range(50):
        server.send(addr(0), b"c" * 1100)
    server.send(addr(1), b"q")
    first = server.datagrams_to_send(limit=2)
    assert {a for _, a in first} == {addr(0), addr(1)}
    rest = server.datagrams_to_send()
    assert len(rest) == 49 and {a for _, a in rest} == {addr(0)}


def test_restarted_peer_replaces_its_association_only_with_a_cookie(
        server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx)
    net = Net(server)
    old = net.add(addr(1), Dtls(context=client_ctx))
    net.run(lambda: old.is_handshake_finished() and server.handshaking == 0)
    old_engine = server.connection(addr(1))
    list(server.events())

    spoofed = first_hello(client_ctx)  # an off-path spoofer's cookieless hello
    server.feed(spoofed, addr(1))
    assert server.connection(addr(1)) is old_engine
    assert [d[13] for d, _ in server.datagrams_to_send()] == [3]
    old.write(b"old still works")
    net.step()
    assert [e.data for e in net.events if isinstance(e, DataReceived)] == [b"old still works"]

    new = Dtls(context=client_ctx)  # the real peer, restarted on the same address
    net.clients[addr(1)] = new
    new.handshake()
    net.run(lambda: new.is_handshake_finished() and server.connection(addr(1)) is not old_engine)
    reasons = [e.reason for e in net.events if isinstance(e, ConnectionTerminated)]
    assert reasons == ["peer restarted"] and server.stats.restarts == 1
    new.write(b"new association")
    net.step()
    assert isinstance(net.events[-1], DataReceived) and net.events[-1].data == b"new association"


def test_garbage_from_strangers_is_dropped(server_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx)
    for i, junk in enumerate((b"", b"\x16", b"\x17\xfe\xfd" + bytes(30), bytes(range(256)))):
        server.feed(junk, addr(i))
    assert server.datagrams_to_send() == [] and len(server) == 0
    assert server.stats.dropped == 4


def test_single_engine_cookie_exchange(certs: Any, client_ctx: DtlsContext) -> None:
    server = Dtls(is_server=True, cert=certs.server.cert_pem, key=certs.server.key_pem,
                  peer_address=addr(1))
    client = Dtls(context=client_ctx)
    client.handshake()
    server.feed(client.pull())  # type: ignore[arg-type]
    hvr = server.pull()
    assert hvr is not None and hvr[13] == 3 and server.state.name == "NEW"
    client.feed(hvr)
    for _ in range(10):
        for datagram in drain(client):
            server.feed(datagram)
        for datagram in drain(server):
            client.feed(datagram)
        if client.handshake() and server.handshake():
            break
    assert client.is_handshake_finished() and server.is_handshake_finished()
    with pytest.raises(ValueError, match="for servers"):
        Dtls(context=client_ctx, peer_address=addr(1))


def test_close_all_and_limits_validation(server_ctx: DtlsContext, client_ctx: DtlsContext) -> None:
    server = DtlsServer(server_ctx)
    net = Net(server)
    clients = [net.add(addr(i), Dtls(context=client_ctx)) for i in range(3)]
    net.run(lambda: all(c.is_handshake_finished() for c in clients) and server.handshaking == 0)
    server.close_all()
    assert len(server) == 0
    assert sum(1 for d, _ in server.datagrams_to_send() if d[0] == 21) == 3
    with pytest.raises(ValueError):
        DtlsServer(server_ctx, max_handshakes=0)
    with pytest.raises(ValueError):
        DtlsServer(DtlsContext(verify="none"))


@pytest.mark.parametrize("layer", ["engine", "openssl"])
def test_quiet_peers_give_back_buffers_and_get_them_back(certs: Any, client_ctx: DtlsContext,
                                                         layer: str) -> None:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.05,
                             record_layer=layer)  # type: ignore[arg-type]
    clock = FakeClock()
    server = DtlsServer(server_ctx, release_after=2.0, clock=clock)
    net = Net(server)
    client = net.add(addr(1), Dtls(context=client_ctx))
    net.run(lambda: client.is_handshake_finished() and server.handshaking == 0)
    conn = server.connection(addr(1))._conn  # type: ignore[union-attr]
    assert not conn.buffers_released
    clock.now += 2.5
    server.handle_timeout()
    assert conn.buffers_released
    client.write(b"wake up")
    net.step()
    assert not conn.buffers_released
    server.send(addr(1), b"awake")
    net.step()
    assert client.read() == b"awake"
    assert len(server) == 1, "releasing buffers is not an idle timeout"


@pytest.mark.parametrize("layer", ["engine", "openssl"])
def test_last_record_and_close_notify_in_one_datagram(certs: Any, client_ctx: DtlsContext,
                                                      layer: str) -> None:
    """feed() delivered the record, then raised ConnectionClosed for the close_notify
    behind it: a peer could crash the server loop by closing politely."""
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.05,
                             record_layer=layer)  # type: ignore[arg-type]
    server = DtlsServer(server_ctx)
    net = Net(server)
    client = net.add(addr(1), Dtls(context=client_ctx))
    net.run(lambda: client.is_handshake_finished() and server.handshaking == 0)
    list(server.events())
    client.write(b"last words")
    client.close()
    [datagram] = drain(client)
    server.feed(datagram, addr(1))
    events = list(server.events())
    assert events[0] == DataReceived(addr(1), b"last words")
    assert isinstance(events[1], ConnectionTerminated) and events[1].reason == "peer closed"
    assert addr(1) not in server
