"""Quiet established peers are parked in C (csrc/lot.c) with no Python objects,
and come back on their next datagram, a send() or any call that names them."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from pydtls_ossl import (ConnectionClosed, ConnectionEstablished, ConnectionEvicted, ConnectionState,
                         ConnectionTerminated, DataReceived, Dtls, DtlsContext, DtlsServer,
                         MemoryAssociationStore)

from .test_server import FakeClock, Net, addr

PSK = bytes(range(16))
CLIENTS = DtlsContext(psk=("device", PSK), ciphers="PSK-AES128-CCM8", initial_rto=0.05)


def server_context(layer: str = "engine") -> DtlsContext:
    return DtlsContext(psk_keys=lambda identity: PSK, ciphers="PSK-AES128-CCM8",
                       association_keys=[bytes(32)], initial_rto=0.05, record_layer=layer)


def setup(count: int, layer: str = "engine", addresses: Any = addr,
          **options: Any) -> tuple[DtlsServer, Net, FakeClock, dict[Any, Dtls]]:
    clock = FakeClock()
    server = DtlsServer(server_context(layer), clock=clock, **options)
    net = Net(server)
    clients = {addresses(i): net.add(addresses(i), Dtls(context=CLIENTS)) for i in range(count)}
    net.run(lambda: all(c.is_handshake_finished() for c in clients.values())
            and server.handshaking == 0)
    net.events.clear()
    return server, net, clock, clients


def quiet(server: DtlsServer, clock: FakeClock, seconds: float = 3.0) -> None:
    clock.now += seconds
    server.handle_timeout()


def closed_by_server(client: Dtls, datagram: bytes) -> bool:
    client.feed(datagram)
    with pytest.raises(ConnectionClosed):
        client.read()
    return client.state is ConnectionState.PEER_CLOSED


def say(server: DtlsServer, client: Dtls, address: Any, data: bytes) -> list[Any]:
    client.write(data)
    for datagram in iter(client.pull, None):
        server.feed(datagram, address)
    return list(server.events())


def test_quiet_peers_are_parked_without_python_objects_and_talk_on() -> None:
    server, net, clock, clients = setup(200)
    gc.collect()
    before = len(gc.get_objects())
    memory = server.stats.connection_memory
    quiet(server, clock)
    gc.collect()
    assert server.stats.parked == 200 and len(server) == 200 and not server._peers
    assert len(gc.get_objects()) <= before - 200 * 2  # its _Peer and Dtls, tracked by the GC: gone
    assert 0 < server.stats.connection_memory < memory
    assert all(address in server for address in clients) and addr(999) not in server
    for i, (address, client) in enumerate(clients.items()):
        events = say(server, client, address, b"ping %d" % i)
        assert events == [DataReceived(address, b"ping %d" % i)]  # nothing else: it never left
        server.send(address, b"pong %d" % i)
    for datagram, address in server.datagrams_to_send():
        clients[address].feed(datagram)
    assert [c.read() for c in clients.values()] == [b"pong %d" % i for i in range(200)]
    assert server.stats.parked == 0 and len(server._peers) == 200


def test_send_close_and_connection_take_a_parked_peer_back() -> None:
    server, net, clock, clients = setup(3)
    quiet(server, clock)
    assert server.stats.parked == 3
    server.send(addr(0), b"to a parked peer")
    for datagram, address in server.datagrams_to_send():
        clients[address].feed(datagram)
    assert clients[addr(0)].read() == b"to a parked peer"
    engine = server.connection(addr(1))
    assert engine is not None and engine.state is ConnectionState.ESTABLISHED
    assert engine.cipher()[0] == "PSK-AES128-CCM8"
    server.close(addr(2))
    [(datagram, address)] = server.datagrams_to_send()
    assert address == addr(2) and closed_by_server(clients[address], datagram)
    assert [type(e) for e in server.events()] == [ConnectionTerminated]
    for datagram, address in server.datagrams_to_send():
        clients[address].feed(datagram)
    quiet(server, clock)
    assert server.stats.parked == 1, "the engine connection() lent keeps its peer in memory"
    assert addr(0) not in server._peers and addr(1) in server._peers
    del engine
    assert say(server, clients[addr(1)], addr(1), b"still") == [DataReceived(addr(1), b"still")]
    list(server.events())
    quiet(server, clock, 601)  # parked or not, the idle timeout ends both
    assert len(server) == 0 and server.stats.parked == 0
    assert [e.reason for e in server.events()] == ["idle timeout"] * 2


def test_parked_peers_time_out_close_and_export() -> None:
    store = MemoryAssociationStore()
    server, net, clock, clients = setup(6, idle_timeout=100, association_store=store, evict_after=50)
    quiet(server, clock)
    assert server.stats.parked == 6
    quiet(server, clock, 48)  # 51 s quiet: evicted, straight out of the lot
    assert server.stats.parked == 0 and len(store) == 6 and len(server) == 0
    assert sum(isinstance(e, ConnectionEvicted) for e in server.events()) == 6
    server, net, clock, clients = setup(4, idle_timeout=10)
    quiet(server, clock)
    assert server.stats.parked == 4
    quiet(server, clock, 8)
    ended = list(server.events())
    assert [(type(e), e.reason) for e in ended] == [(ConnectionTerminated, "idle timeout")] * 4
    sent = server.datagrams_to_send()  # each one's close_notify
    assert sorted(a for _, a in sent) == sorted(clients)
    assert all(closed_by_server(clients[address], datagram) for datagram, address in sent)
    assert server.stats.connection_memory == 0 and len(server) == 0
    server, net, clock, clients = setup(5, association_store=MemoryAssociationStore())
    quiet(server, clock)
    assert server.export_all() == 5 and len(server) == 0
    server, net, clock, clients = setup(5)
    quiet(server, clock)
    server.close_all()
    assert len(server) == 0 and len(server.datagrams_to_send()) == 5


def test_get_timeout_covers_parked_peers() -> None:
    server, net, clock, clients = setup(2, idle_timeout=30)
    quiet(server, clock)
    assert server.stats.parked == 2
    timeout = server.get_timeout()
    assert timeout is not None and 26 < timeout <= 27


def test_ipv6_and_other_addresses() -> None:
    six = (lambda i: ("::1", 30000 + i, 0, 3))
    server, net, clock, clients = setup(2, addresses=six)
    quiet(server, clock)
    assert server.stats.parked == 2
    assert say(server, clients[six(1)], six(1), b"v6") == [DataReceived(six(1), b"v6")]
    server, net, clock, clients = setup(2, addresses=lambda i: f"peer-{i}")
    quiet(server, clock)
    assert server.stats.parked == 0 and len(server) == 2  # a key the lot cannot hold: in memory
    assert say(server, clients["peer-1"], "peer-1", b"named") == [DataReceived("peer-1", b"named")]


@pytest.mark.parametrize("layer", ["engine", "openssl"])
def test_a_peer_that_cannot_be_evicted_does_not_hang_the_timer(layer: str) -> None:
    """libssl's record layer cannot be exported: the eviction is tried again later,
    not at once in a loop (handle_timeout() used to spin on it forever)."""
    server, net, clock, clients = setup(2, layer, association_store=MemoryAssociationStore(),
                                        evict_after=60)
    quiet(server, clock)
    assert server.stats.parked == 2  # libssl's record layer parks too: a pointer is a pointer
    clock.now += 61
    done = threading.Thread(target=server.handle_timeout, daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive(), "handle_timeout() did not return"
    assert len(server) == (2 if layer == "openssl" else 0)
    events = say(server, clients[addr(0)], addr(0), b"later")
    assert DataReceived(addr(0), b"later") in events


def test_a_new_hello_from_a_parked_address_restarts_it() -> None:
    server, net, clock, clients = setup(1)
    quiet(server, clock)
    assert server.stats.parked == 1
    fresh = net.add(addr(0), Dtls(context=CLIENTS))
    net.run(lambda: fresh.is_handshake_finished() and server.handshaking == 0)
    assert any(isinstance(e, ConnectionEstablished) for e in net.events)
    assert say(server, fresh, addr(0), b"again") == [DataReceived(addr(0), b"again")]
    assert len(server) == 1


def test_a_parked_connection_id_peer_is_found_by_its_cid_from_a_new_address() -> None:
    """NAT rebinding while parked: the CID record wakes it, authenticates, moves it."""
    clock = FakeClock()
    context = DtlsContext(psk_keys=lambda identity: PSK, ciphers="PSK-AES128-CCM8",
                          connection_id=True, initial_rto=0.05)
    server = DtlsServer(context, clock=clock)
    net = Net(server)
    clients = {addr(i): net.add(addr(i), Dtls(context=DtlsContext(
        psk=("device", PSK), ciphers="PSK-AES128-CCM8", connection_id=b"", initial_rto=0.05)))
        for i in range(3)}
    net.run(lambda: all(c.is_handshake_finished() for c in clients.values())
            and server.handshaking == 0)
    for address, client in clients.items():
        say(server, client, address, b"hello")
    quiet(server, clock)
    assert server.stats.parked == 3 and not server._cids
    moved = ("192.0.2.77", 40000)
    events = say(server, clients[addr(1)], moved, b"from behind a new NAT binding")
    assert [type(e).__name__ for e in events] == ["AddressChanged", "DataReceived"]
    assert events[1] == DataReceived(moved, b"from behind a new NAT binding")
    assert moved in server and addr(1) not in server and server.stats.parked == 2
    server.send(moved, b"found you")
    for datagram, address in server.datagrams_to_send():
        assert address == moved
        clients[addr(1)].feed(datagram)
    assert clients[addr(1)].read() == b"found you"
    spoofed = bytearray(clients[addr(2)].write(b"x") and clients[addr(2)].pull() or b"")
    spoofed[-1] ^= 1  # a CID record that does not authenticate moves nothing
    server.feed(bytes(spoofed), ("198.51.100.1", 1))
    assert addr(2) in server and ("198.51.100.1", 1) not in server


def test_garbage_from_a_parked_address_does_not_wake_it() -> None:
    server, net, clock, clients = setup(1)
    say(server, clients[addr(0)], addr(0), b"first")
    quiet(server, clock)
    assert server.stats.parked == 1
    for junk in (b"", b"\x00" * 40, b"\x17\xfe\xfd" + b"\x00" * 10, b"\x15\xfe\xfd\x00\x00" + b"\x00" * 20):
        server.feed(junk, addr(0))
    assert server.stats.parked == 1 and not server._peers
    assert say(server, clients[addr(0)], addr(0), b"real") == [DataReceived(addr(0), b"real")]


def test_a_sweep_is_done_in_slices_the_timer_asks_for() -> None:
    """1,200 parked peers time out at once: one handle_timeout() ends 512 of them and
    get_timeout() says 0 until the rest are done, so no call stalls for the sweep."""
    server, net, clock, clients = setup(1200, idle_timeout=10)
    quiet(server, clock)
    assert server.stats.parked == 1200
    clock.now += 8
    ended = []
    for expected in (688, 176, 0):
        server.handle_timeout()
        ended += list(server.events())
        assert len(server) == expected
        assert server.get_timeout() == (0 if expected else None)
    assert len(ended) == 1200 and all(e.reason == "idle timeout" for e in ended)
