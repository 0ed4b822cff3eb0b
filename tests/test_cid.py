"""Connection ID (RFC 9146) between our own engines and through DtlsServer, in memory."""

from __future__ import annotations

from typing import Any

import pytest

from pydtls_ossl import (AddressChanged, ConfigurationError, ConnectionEstablished, DataReceived,
                         Dtls, DtlsContext, DtlsServer, HandshakeError, MemoryAssociationStore)

from .helpers import LossyLink, Pair, drain, lossy_handshake

PSK = {"device-1": b"k" * 16}
KEY = b"A" * 32


def cert_contexts(certs: Any, client_cid: Any, server_cid: Any, **kw: Any) -> tuple[DtlsContext, DtlsContext]:
    server = DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=server_cid, **kw)
    client = DtlsContext(verify="none", connection_id=client_cid, **kw)
    return client, server


def psk_contexts(client_cid: Any, server_cid: Any, **kw: Any) -> tuple[DtlsContext, DtlsContext]:
    return (DtlsContext(psk=("device-1", PSK["device-1"]), connection_id=client_cid, **kw),
            DtlsContext(psk_keys=PSK, connection_id=server_cid, **kw))


def pair_of(client_ctx: DtlsContext, server_ctx: DtlsContext) -> Pair:
    pair = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    pair.handshake()
    return pair


def records(datagram: bytes, cid_len: int) -> list[tuple[int, int, bytes]]:
    """(type, epoch, cid) of each record; type-25 records carry cid_len bytes of CID."""
    out, off = [], 0
    while off < len(datagram):
        kind = datagram[off]
        epoch = int.from_bytes(datagram[off + 3:off + 5], "big")
        extra = cid_len if kind == 25 else 0
        cid = datagram[off + 11:off + 11 + extra]
        length = int.from_bytes(datagram[off + 11 + extra:off + 13 + extra], "big")
        out.append((kind, epoch, cid))
        off += 13 + extra + length
    assert off == len(datagram)
    return out


@pytest.mark.parametrize("client_cid,server_cid", [
    (b"\x01\x02\x03", b"\xaa\xbb"),
    (b"", b"\xaa\xbb"),
    (b"\x01\x02\x03", b""),
    (b"", b""),
])
def test_negotiated_both_ways(certs: Any, client_cid: bytes, server_cid: bytes) -> None:
    pair = pair_of(*cert_contexts(certs, client_cid, server_cid))
    c, s = pair.client, pair.server
    assert (c.connection_id, c.peer_connection_id) == (client_cid, server_cid)
    assert (s.connection_id, s.peer_connection_id) == (server_cid, client_cid)
    assert c.record_layer == s.record_layer == "engine"
    for i in range(5):
        assert c.write(b"up %d" % i) == 4
        datagram = c.pull()
        assert datagram is not None
        # towards a server that asked for a CID, every record is a CID record carrying it
        assert records(datagram, len(server_cid)) == ([(25, 1, server_cid)] if server_cid else
                                                     [(23, 1, b"")])
        s.feed(datagram)
        assert s.read() == b"up %d" % i
        assert pair.roundtrip(b"down %d" % i, "server") == b"down %d" % i


def test_not_negotiated_when_one_side_does_not_offer(certs: Any) -> None:
    for client_cid, server_cid in ((None, b"\xaa"), (b"\x01", None)):
        pair = pair_of(*cert_contexts(certs, client_cid, server_cid))
        assert pair.client.connection_id is None and pair.server.peer_connection_id is None
        assert pair.roundtrip(b"plain") == b"plain"


def test_finished_flight_uses_the_cid_format(certs: Any) -> None:
    """libssl writes the Finished at epoch 1 in its own format: the engine translates it."""
    client_ctx, server_ctx = cert_contexts(certs, b"\x0c" * 4, b"\x05" * 6)
    client, server = Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)
    seen: list[tuple[str, int, int, bytes]] = []
    client.handshake()
    for _ in range(20):
        for name, src, dst, cid_len in (("client", client, server, 6), ("server", server, client, 4)):
            for datagram in drain(src):
                seen += [(name, *r) for r in records(datagram, cid_len)]
                dst.feed(datagram)
        if client.handshake() and server.handshake():
            break
    epoch1 = [r for r in seen if r[2] == 1]
    assert {r[0] for r in epoch1} == {"client", "server"}  # both Finished flights
    assert all(r[1] == 25 for r in epoch1)
    assert all(r[3] == (b"\x05" * 6 if r[0] == "client" else b"\x0c" * 4) for r in epoch1)


@pytest.mark.parametrize("suite,psk", [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", False),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", False),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", False),
    ("ECDHE-ECDSA-AES128-CCM8", False),
    ("PSK-AES128-CCM8", True),
    ("PSK-AES256-CCM", True),
    ("PSK-CHACHA20-POLY1305", True),
])
def test_every_aead_suite(certs: Any, suite: str, psk: bool) -> None:
    ctxs = psk_contexts(True, True, ciphers=suite) if psk else cert_contexts(certs, True, True,
                                                                               ciphers=suite)
    pair = pair_of(*ctxs)
    assert pair.client.cipher() is not None and len(pair.client.connection_id or b"") == 8
    biggest = b"x" * pair.client.max_write_size
    assert pair.roundtrip(biggest) == biggest  # the CID and inner type still fit the MTU
    assert pair.roundtrip(b"y" * pair.server.max_write_size, "server") == b"y" * pair.server.max_write_size
    with pytest.raises(ValueError):
        pair.client.write(biggest + b"!")


def test_write_size_shrinks_by_the_cid(certs: Any) -> None:
    plain = pair_of(*cert_contexts(certs, None, None))
    with_cid = pair_of(*cert_contexts(certs, b"\x01" * 10, b"\x02" * 10))
    assert plain.client.max_write_size - with_cid.client.max_write_size == 10 + 1


def test_record_padding(certs: Any) -> None:
    pair = pair_of(*cert_contexts(certs, b"\x01\x02", b"\x03\x04", record_padding=64))
    sizes = set()
    for n in (1, 10, 63, 64, 100):
        pair.client.write(b"p" * n)
        datagram = pair.client.pull()
        assert datagram is not None
        # header 13 + CID 2, explicit nonce 8, tag 16: the inner plaintext is a multiple of 64
        assert (len(datagram) - 13 - 2 - 8 - 16) % 64 == 0
        sizes.add(len(datagram))
        pair.server.feed(datagram)
        assert pair.server.read() == b"p" * n
    assert len(sizes) == 2


@pytest.mark.parametrize("seed", range(6))
def test_handshake_under_loss_and_reordering(certs: Any, seed: int) -> None:
    client_ctx, server_ctx = cert_contexts(certs, True, True, initial_rto=0.05)
    client, server = Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)
    lossy_handshake(client, server, LossyLink(seed, 0.25), LossyLink(seed + 100, 0.25))
    assert client.connection_id == server.peer_connection_id
    assert client.peer_connection_id == server.connection_id
    for i in range(10):
        client.write(b"m%d" % i)
        for datagram in drain(client):
            server.feed(datagram)
        assert server.read() == b"m%d" % i
        server.write(b"r%d" % i)
        for datagram in drain(server):
            client.feed(datagram)
        assert client.read() == b"r%d" % i


def test_damaged_cid_records_are_dropped(certs: Any) -> None:
    pair = pair_of(*cert_contexts(certs, b"\x01\x02", b"\x0a\x0b\x0c"))
    pair.client.write(b"genuine")
    datagram = pair.client.pull()
    assert datagram is not None
    for i in range(len(datagram)):
        for bit in (0x01, 0x80):
            damaged = bytearray(datagram)
            damaged[i] ^= bit
            assert pair.server.feed(bytes(damaged)) == 0, f"byte {i} bit {bit:#x}"
    for cut in range(len(datagram)):
        assert pair.server.feed(datagram[:cut]) == 0
    assert pair.server.feed(datagram) == 1 and pair.server.read() == b"genuine"
    assert pair.server.feed(datagram) == 0  # a replay
    plain = bytearray(datagram)
    plain[0] = 23  # a non-CID record where a CID is required
    assert pair.server.feed(bytes(plain)) == 0
    assert pair.roundtrip(b"still fine") == b"still fine"


def test_export_import_keeps_the_cids(certs: Any) -> None:
    client_ctx, server_ctx = cert_contexts(certs, b"\x01\x02", b"\x0a\x0b\x0c", association_keys=[KEY])
    pair = pair_of(client_ctx, server_ctx)
    blob = pair.server.export_association(b"binding")
    pair.server = Dtls.import_association(blob, context=server_ctx, binding=b"binding")
    assert pair.server.connection_id == b"\x0a\x0b\x0c"
    assert pair.server.peer_connection_id == b"\x01\x02"
    assert pair.roundtrip(b"after import") == b"after import"
    assert pair.roundtrip(b"and back", "server") == b"and back"


def test_configuration_errors(certs: Any) -> None:
    with pytest.raises(ConfigurationError, match="record_layer"):
        DtlsContext(verify="none", connection_id=True, record_layer="openssl")
    with pytest.raises(ValueError):
        DtlsContext(verify="none", connection_id_length=256)
    with pytest.raises(ValueError, match="record_padding"):
        DtlsContext(verify="none", record_padding=16)
    with pytest.raises(TypeError):
        DtlsContext(verify="none", connection_id=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="its own Connection ID"):
        DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=b"\x01"))
    with pytest.raises(ConfigurationError):
        Dtls(verify="none", connection_id=b"\x01")


def test_non_aead_suite_fails_clearly(certs: Any) -> None:
    client_ctx, server_ctx = cert_contexts(certs, True, True, ciphers="ECDHE-ECDSA-AES128-SHA256")
    client, server = Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)
    with pytest.raises(HandshakeError, match="Connection ID records need an AEAD suite"):
        Pair(client, server).handshake()


# ------------------------------------------------------------------ server core

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def server_and_client(certs: Any, **server_kw: Any) -> tuple[DtlsServer, Dtls, DtlsContext]:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=True,
                             association_keys=[KEY])
    server = DtlsServer(server_ctx, clock=server_kw.pop("clock", Clock()), **server_kw)
    client = Dtls(context=DtlsContext(verify="none", connection_id=b""))
    return server, client, server_ctx


def converse(server: DtlsServer, client: Dtls, address: Any) -> list[Any]:
    """Move datagrams until nothing moves; return the server's events."""
    events: list[Any] = []
    for _ in range(50):
        moved = False
        for datagram in drain(client):
            server.feed(datagram, address)
            moved = True
        for datagram, to in server.datagrams_to_send():
            if to == address:
                client.feed(datagram)
                moved = True
        events += list(server.events())
        if not client.is_handshake_finished():
            client.handshake()
        if not moved:
            break
    return events


def test_server_follows_a_nat_rebinding(certs: Any) -> None:
    server, client, _ = server_and_client(certs)
    a, b = ("192.0.2.1", 4000), ("192.0.2.1", 5555)
    client.handshake()
    events = converse(server, client, a)
    assert any(isinstance(e, ConnectionEstablished) for e in events)
    cid = server.connection(a).connection_id  # type: ignore[union-attr]
    assert cid is not None and len(cid) == 8 and client.peer_connection_id == cid

    client.write(b"from the new port")
    events = converse(server, client, b)
    assert AddressChanged(b, a, cid) in events
    assert DataReceived(b, b"from the new port") in events
    assert b in server and a not in server and server.stats.address_changes == 1
    server.send(b, b"reply")
    out = server.datagrams_to_send()
    assert [to for _, to in out] == [b]
    client.feed(out[0][0])
    assert client.read() == b"reply"


def test_spoofed_and_replayed_records_move_nothing(certs: Any) -> None:
    server, client, _ = server_and_client(certs)
    a, spoofer = ("192.0.2.1", 4000), ("203.0.113.9", 6666)
    client.handshake()
    converse(server, client, a)
    client.write(b"one")
    old = client.pull()
    assert old is not None
    server.feed(old, a)
    assert [e for e in server.events()] == [DataReceived(a, b"one")]

    forged = bytearray(old)
    forged[-1] ^= 1  # right CID, wrong tag
    server.feed(bytes(forged), spoofer)
    server.feed(old, spoofer)  # a replay of an authentic record
    assert list(server.events()) == []
    assert a in server and spoofer not in server and server.stats.address_changes == 0

    client.write(b"two")
    newer = client.pull()
    client.write(b"three")
    newest = client.pull()
    assert newer is not None and newest is not None
    server.feed(newest, ("198.51.100.7", 7000))  # authentic and newest: the peer moved
    server.feed(newer, ("198.51.100.8", 8000))   # authentic but older: delivered, no move
    events = list(server.events())
    assert [type(e) for e in events] == [AddressChanged, DataReceived, DataReceived]
    assert ("198.51.100.7", 7000) in server and ("198.51.100.8", 8000) not in server


def test_stored_peer_is_found_by_cid_from_a_new_address(certs: Any) -> None:
    clock = Clock()
    store = MemoryAssociationStore()
    server, client, server_ctx = server_and_client(certs, clock=clock, association_store=store,
                                                   evict_after=5.0)
    a = ("192.0.2.1", 4000)
    client.handshake()
    converse(server, client, a)
    cid = client.peer_connection_id
    assert cid
    clock.now += 10
    server.handle_timeout()
    assert len(server) == 0 and server.stats.evicted == 1
    assert DtlsServer.cid_store_key(cid) in store._blobs

    # another process of the cluster, same store and keys: the device comes from elsewhere
    other = DtlsServer(server_ctx, association_store=store, clock=clock)
    client.write(b"back again")
    datagram = client.pull()
    assert datagram is not None
    bad = bytearray(datagram)
    bad[-2] ^= 0x40
    other.feed(bytes(bad), ("203.0.113.1", 1))
    assert len(other) == 0 and DtlsServer.cid_store_key(cid) in store._blobs  # put back
    b = ("198.51.100.20", 9999)
    other.feed(datagram, b)
    events = list(other.events())
    assert [type(e).__name__ for e in events] == ["ConnectionRestored", "DataReceived"]
    assert events[1] == DataReceived(b, b"back again") and b in other


@pytest.mark.parametrize("tickets", [True, False])
def test_resumed_handshake_translates_the_servers_finished_first(certs: Any, tickets: bool) -> None:
    """In an abbreviated handshake the server's Finished comes first: both flights still
    go out as CID records, and the CIDs are negotiated anew."""
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=True,
                             session_tickets=tickets)
    client_ctx = DtlsContext(verify="none", connection_id=b"\x31\x32")
    first = pair_of(client_ctx, server_ctx)
    session = first.client.session()
    assert session is not None
    client = Dtls(context=client_ctx, session=session)
    server = Dtls(is_server=True, context=server_ctx)
    epoch1: list[tuple[str, int]] = []
    client.handshake()
    for _ in range(20):
        for name, src, dst, cid_len in (("client", client, server, 8), ("server", server, client, 2)):
            for datagram in drain(src):
                epoch1 += [(name, kind) for kind, epoch, _ in records(datagram, cid_len) if epoch]
                dst.feed(datagram)
        if client.handshake() and server.handshake():
            break
    assert client.session_reused() and server.session_reused()
    assert epoch1[0][0] == "server" and {k for _, k in epoch1} == {25}
    assert server.connection_id != first.server.connection_id  # a new CID for the new association
    assert Pair(client, server).roundtrip(b"resumed") == b"resumed"


def test_connection_id_function_embeds_a_node_id(certs: Any) -> None:
    counter = iter(range(1000))
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                             connection_id=lambda: b"N7" + next(counter).to_bytes(4, "big"))
    server = DtlsServer(server_ctx)
    client = Dtls(context=DtlsContext(verify="none", connection_id=b""))
    client.handshake()
    converse(server, client, ("192.0.2.9", 1))
    assert client.peer_connection_id is not None and client.peer_connection_id.startswith(b"N7")
    bad = DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                      connection_id=iter([b"\x01\x02", b"\x01\x02\x03"]).__next__)
    Dtls(is_server=True, context=bad)
    with pytest.raises(ConfigurationError, match="one length"):
        Dtls(is_server=True, context=bad)
