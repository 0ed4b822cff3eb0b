"""One peer flooding the server core cannot starve the quiet ones, nor make it hold unbounded input."""

from __future__ import annotations

from typing import Any

from pydtls_ossl import DataReceived, Dtls, DtlsContext, DtlsServer

from .test_server import Net, addr

PSK = bytes(16)
QUIET = 100


def psk_net(**limits: Any) -> tuple[DtlsServer, Net, dict[Any, Dtls]]:
    server = DtlsServer(DtlsContext(psk_keys=lambda identity: PSK, initial_rto=0.05), **limits)
    net = Net(server)
    ctx = DtlsContext(psk=("device", PSK), initial_rto=0.05)
    clients = {addr(i): net.add(addr(i), Dtls(context=ctx)) for i in range(QUIET + 1)}
    net.run(lambda: all(c.is_handshake_finished() for c in clients.values()) and server.handshaking == 0)
    list(server.events())
    net.events.clear()
    return server, net, clients


def test_a_flooding_peer_cannot_delay_the_others_by_more_than_one_round() -> None:
    server, net, clients = psk_net(max_queued_bytes=10**7)
    flooder = addr(0)
    for i in range(3000):  # the flooder's replies: thousands of datagrams queued for it
        server.send(flooder, b"f" * 1000)
    for i in range(1, QUIET + 1):
        server.send(addr(i), b"quiet %d" % i)
    first_round = server.datagrams_to_send(limit=QUIET + 1)
    delivered = {address for _, address in first_round}
    assert delivered == set(clients), "one datagram per peer in the first round, flooder included"
    for datagram, address in first_round:
        clients[address].feed(datagram)
    for i in range(1, QUIET + 1):
        assert clients[addr(i)].read() == b"quiet %d" % i


def test_a_flooding_peer_cannot_make_the_server_hold_unbounded_input() -> None:
    server, net, clients = psk_net(max_queued_records=256)
    flooder = clients[addr(0)]
    for i in range(5000):  # the application does not take events meanwhile
        flooder.write(b"flood %d" % i)
        for datagram in iter(flooder.pull, None):
            server.feed(datagram, addr(0))
    for i in range(1, QUIET + 1):
        clients[addr(i)].write(b"quiet %d" % i)
        for datagram in iter(clients[addr(i)].pull, None):
            server.feed(datagram, addr(i))
    events = [e for e in server.events() if isinstance(e, DataReceived)]
    from_flooder = [e for e in events if e.address == addr(0)]
    assert len(from_flooder) == 256 and server.stats.records_dropped == 5000 - 256
    assert sorted(e.data for e in events if e.address != addr(0)) == sorted(
        b"quiet %d" % i for i in range(1, QUIET + 1)), "every quiet peer's record is delivered"
    # once the application has taken its events, the flooder's records flow again
    flooder.write(b"later")
    for datagram in iter(flooder.pull, None):
        server.feed(datagram, addr(0))
    assert [e.data for e in server.events()] == [b"later"]
