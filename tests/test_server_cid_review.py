"""DtlsServer's Connection ID routing where it meets handshakes in progress, peer restarts,
the association store's put-back and the byte budgets (found in review; each failed before
its fix). Real engines in memory, the server's clock injected."""

from __future__ import annotations

from typing import Any

from pydtls_ossl import (AddressChanged, ConnectionEstablished, ConnectionRestored, DataReceived, Dtls,
                         DtlsContext, DtlsServer, MemoryAssociationStore)

from .helpers import drain
from .test_server import FakeClock, Net, addr

PSK = bytes(range(16))
KEY = b"A" * 32


def contexts(cid: Any, **kw: Any) -> tuple[DtlsContext, DtlsContext]:
    return (DtlsContext(psk_keys=lambda identity: PSK, connection_id=cid, initial_rto=0.5, **kw),
            DtlsContext(psk=("device", PSK), connection_id=b"", initial_rto=0.5))


def test_concurrent_handshakes_never_share_a_cid() -> None:
    """A handshake holds the CID it offered: another handshake in progress never draws it."""
    sctx, cctx = contexts(iter([b"\x07\x07", b"\x07\x07", b"\x08\x08"]).__next__)
    server = DtlsServer(sctx)
    net = Net(server)
    a, b = addr(1), addr(2)
    ca = net.add(a, Dtls(context=cctx))
    cb = net.add(b, Dtls(context=cctx))  # both hellos before either handshake finishes
    net.run(lambda: ca.is_handshake_finished() and cb.is_handshake_finished() and server.handshaking == 0)
    assert len(server) == 2
    ca.write(b"from a")
    cb.write(b"from b")
    net.step()
    data = sorted((e.address, e.data) for e in net.events if isinstance(e, DataReceived))
    assert data == [(a, b"from a"), (b, b"from b")], \
        f"two live peers share CID {ca.peer_connection_id!r}; delivered: {data}"
    assert {ca.peer_connection_id, cb.peer_connection_id} == {b"\x07\x07", b"\x08\x08"}


def test_a_function_that_only_repeats_a_cid_in_use_is_refused() -> None:
    sctx, cctx = contexts(lambda: b"\x07\x07")
    server = DtlsServer(sctx)
    net = Net(server)
    ca = net.add(addr(1), Dtls(context=cctx))
    net.run(lambda: ca.is_handshake_finished() and server.handshaking == 0)
    refused = server.stats.refused_by_limit
    net.add(addr(2), Dtls(context=cctx))
    for _ in range(4):
        net.step()
    assert server.stats.refused_by_limit > refused and len(server) == 1


def restarted_with_cid(**server_kw: Any) -> tuple[DtlsServer, Net, Dtls, bytes, FakeClock, DtlsContext]:
    sctx, cctx = contexts(True, association_keys=[KEY])
    clock = FakeClock()
    server = DtlsServer(sctx, clock=clock, **server_kw)
    net = Net(server)
    old = net.add(addr(1), Dtls(context=cctx))
    net.run(lambda: old.is_handshake_finished() and server.handshaking == 0)
    old_cid = old.peer_connection_id
    new = Dtls(context=cctx)  # the device reboots, same address (peer restart, RFC 6347 4.2.8)
    net.clients[addr(1)] = new
    new.handshake()
    net.run(lambda: new.is_handshake_finished() and server.stats.restarts == 1 and server.handshaking == 0)
    assert new.peer_connection_id and new.peer_connection_id != old_cid
    return server, net, new, old_cid, clock, sctx


def test_restarted_peer_is_routed_by_its_new_cid() -> None:
    """_feed_replacement (server.py ~L741) swaps in the replacement engine but neither
    forgets the old CID nor registers the new one: _cids keeps the old CID -> peer, and a
    NAT rebinding after the restart loses the peer (the record is answered as a stranger's)."""
    server, net, new, old_cid, _, _ = restarted_with_cid()
    peer = server._peers[addr(1)]
    assert server._cids.get(new.peer_connection_id) is peer, \
        f"_cids keys: {[k.hex() for k in server._cids]}, new CID {new.peer_connection_id.hex()}, old {old_cid.hex()}"


def test_restarted_peer_follows_a_nat_rebinding() -> None:
    server, net, new, _, _, _ = restarted_with_cid()
    list(server.events())
    moved = addr(9)
    new.write(b"after the reboot, from a new port")
    for datagram in drain(new):
        server.feed(datagram, moved)
    events = list(server.events())
    assert any(isinstance(e, AddressChanged) for e in events), events
    assert DataReceived(moved, b"after the reboot, from a new port") in events


def test_restarted_peer_comes_back_from_the_store() -> None:
    """Eviction stores the restarted peer under its *old* CID (_key_for uses peer.cid), the
    client sends its new CID: the association can never be restored, not even from its own
    address."""
    store = MemoryAssociationStore()
    server, net, new, old_cid, clock, _ = restarted_with_cid(association_store=store, evict_after=5.0)
    clock.now += 10
    server.handle_timeout()
    assert server.stats.evicted == 1 and len(server) == 0
    list(server.events())
    new.write(b"back")
    for datagram in drain(new):
        server.feed(datagram, addr(1))
    events = list(server.events())
    assert [type(e) for e in events] == [ConnectionRestored, DataReceived], \
        f"{events}; store keys {list(store._blobs)}; client's CID {new.peer_connection_id.hex()}"


def test_an_older_authentic_record_does_not_destroy_the_stored_association() -> None:
    """_restore_cid (server.py ~L1000) puts the association back when the record did not
    advance it, by export_association(); but an authentic record older than the newest
    (reordered, or held back by an on-path attacker past eviction) was decrypted into the
    engine's plaintext queue, so the export raises ValueError ("read() every record"), which
    is logged, and the association is gone from the store for good."""
    sctx, cctx = contexts(True, association_keys=[KEY])
    store = MemoryAssociationStore()
    clock = FakeClock()
    server = DtlsServer(sctx, clock=clock, association_store=store, evict_after=5.0)
    net = Net(server)
    client = net.add(addr(1), Dtls(context=cctx))
    net.run(lambda: client.is_handshake_finished() and server.handshaking == 0)
    client.write(b"first")
    [first] = drain(client)
    client.write(b"second")
    [second] = drain(client)
    server.feed(second, addr(1))  # the first one is late
    list(server.events())
    clock.now += 10
    server.handle_timeout()
    assert server.stats.evicted == 1 and len(store._blobs) == 1
    server.feed(first, addr(1))  # authentic, fresh for the window, but not the newest
    list(server.events())
    assert len(store._blobs) == 1, "the stored association was taken and never put back"
    client.write(b"third")
    for datagram in drain(client):
        server.feed(datagram, addr(1))
    assert DataReceived(addr(1), b"third") in list(server.events())


def test_a_restart_handshake_respects_the_connection_budget() -> None:
    """A restarted peer's new handshake (an SSL mid-handshake, ~77 KB) is refused when the
    connection budget cannot hold it; the old association lives on."""
    sctx, cctx = (DtlsContext(psk_keys=lambda identity: PSK, initial_rto=0.5),
                  DtlsContext(psk=("device", PSK), initial_rto=0.5))
    budget = 30_000
    server = DtlsServer(sctx, max_connection_memory=budget)
    net = Net(server)
    c = net.add(addr(1), Dtls(context=cctx))
    net.run(lambda: c.is_handshake_finished() and server.handshaking == 0)
    assert server.stats.connection_memory < budget
    new = Dtls(context=cctx)
    net.clients[addr(1)] = new
    new.handshake()
    peak = 0
    for _ in range(6):
        net.step()
        peak = max(peak, server.stats.connection_memory)
    assert server.stats.restarts == 0 and server.stats.refused_connection_memory >= 1
    assert peak <= budget, f"connection_memory reached {peak} with max_connection_memory={budget}"
    assert addr(1) in server

