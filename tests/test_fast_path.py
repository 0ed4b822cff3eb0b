"""``ServerSocket`` over real UDP: established peers' records through C (``_fast.py``),
and every case that path hands back to the server's Python path."""

from __future__ import annotations

import select
import socket
from typing import Any

import pytest

from pydtls_ossl import (ConnectionTerminated, DataReceived, Dtls, DtlsContext, DtlsServer, LimitExceeded,
                         ServerSocket)
from pydtls_ossl._batch_io import will_batch

batched_only = pytest.mark.skipif(not will_batch(), reason="recvmmsg/sendmmsg: Linux only")
MODES = [pytest.param(None, id="batched", marks=batched_only), pytest.param(False, id="fallback")]


class Rig:
    """One server core on a ServerSocket, and client engines each on its own socket."""

    def __init__(self, ctx: DtlsContext, batch_io: bool | None = None, **limits: Any) -> None:
        self.server = DtlsServer(ctx, **limits)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.io = ServerSocket(self.server, self.sock, batch_io=batch_io)
        self.events: list[Any] = []
        self.slow = 0  # datagrams the Python path took (the C path calls feed() for those)
        feed = self.server.feed

        def counted(datagram: bytes, address: Any) -> None:
            self.slow += 1
            feed(datagram, address)
        self.server.feed = counted  # type: ignore[method-assign]

    def close(self) -> None:
        self.sock.close()

    def pump(self) -> None:
        select.select([self.sock], [], [], 0.005)
        self.io.receive()
        self.server.handle_timeout()
        self.events.extend(self.server.events())
        assert self.io.flush()

    def client(self, ctx: DtlsContext, engine: Dtls | None = None,
               sock: socket.socket | None = None) -> Client:
        client = Client(self, ctx, engine, sock)
        client.handshake()
        return client

    def data(self, address: Any = None) -> list[bytes]:
        return [e.data for e in self.events
                if type(e) is DataReceived and (address is None or e.address == address)]


class Client:
    def __init__(self, rig: Rig, ctx: DtlsContext, engine: Dtls | None, sock: socket.socket | None) -> None:
        self.rig = rig
        self.engine = engine or Dtls(context=ctx, server_hostname="localhost")
        self.sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if sock is None:
            self.sock.bind(("127.0.0.1", 0))
            self.sock.connect(rig.sock.getsockname())
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()

    def flush(self) -> int:
        n = 0
        while (datagram := self.engine.pull()) is not None:
            self.sock.send(datagram)
            n += 1
        return n

    def take(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.sock.recv(65535))
            except BlockingIOError:
                return got

    def handshake(self) -> None:
        self.engine.handshake()
        for _ in range(200):
            self.flush()
            self.rig.pump()
            for datagram in self.take():
                self.engine.feed(datagram)
            if self.engine.handshake_finished:
                self.rig.pump()  # the server's view settles (its last flight, the event)
                return
            self.engine.handshake()
        raise AssertionError("handshake did not finish")

    def records(self, count: int) -> list[bytes]:
        got: list[bytes] = []
        for _ in range(200):
            for datagram in self.take():
                self.engine.feed(datagram)
            while (data := self.engine.read()) is not None:
                got.append(data)
            if len(got) >= count:
                return got
            self.rig.pump()
        raise AssertionError(f"{len(got)} of {count} records arrived")


@pytest.fixture
def rig(server_ctx: DtlsContext) -> Any:
    made: list[Rig] = []

    def make(batch_io: bool | None = None, **limits: Any) -> Rig:
        made.append(Rig(server_ctx, batch_io, **limits))
        return made[-1]
    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("batch_io", MODES)
def test_echo_through_the_c_path_in_order(rig: Any, client_ctx: DtlsContext, batch_io: bool | None) -> None:
    r = rig(batch_io)
    clients = [r.client(client_ctx) for _ in range(12)]
    r.slow = 0
    for round_ in range(5):  # a burst from every client, one batch for the server
        for i, c in enumerate(clients):
            for k in range(4):
                c.engine.write(b"%d.%d.%d " % (i, round_, k) + bytes(k * 300))
            c.flush()
        r.pump()
        for event in r.server.events():
            r.events.append(event)
        for e in [e for e in r.events if type(e) is DataReceived]:
            r.server.send(e.address, e.data[::-1])
        r.events.clear()
        r.io.flush()
        for i, c in enumerate(clients):
            assert c.records(4) == [(b"%d.%d.%d " % (i, round_, k) + bytes(k * 300))[::-1] for k in range(4)]
    assert len(r.server._fast or ()) == (12 if r.io.batched else 0)
    assert (r.slow == 0) == r.io.batched  # batched: not one record through the Python path


@batched_only
def test_handshakes_and_records_interleaved_in_one_batch(rig: Any, client_ctx: DtlsContext) -> None:
    r = rig()
    old = [r.client(client_ctx) for _ in range(3)]
    new = [Client(r, client_ctx, None, None) for _ in range(3)]
    for c in new:
        c.engine.handshake()
    for a, b in zip(old, new):  # established records and hellos alternate in the socket
        a.engine.write(b"before " + str(a.address).encode())
        a.flush()
        b.flush()
        a.engine.write(b"after " + str(a.address).encode())
        a.flush()
    for b in new:
        b.handshake()
    assert [d for c in old for d in r.data(c.address)] == \
        [w + str(c.address).encode() for c in old for w in (b"before ", b"after ")]
    assert len(r.server._fast) == 6  # joined with the datagram that finished their handshake
    for b in new:
        b.engine.write(b"hi")
        b.flush()
    r.pump()
    assert all(r.data(b.address) == [b"hi"] for b in new)


@pytest.mark.parametrize("batch_io", MODES)
def test_record_and_close_notify_in_one_datagram(rig: Any, client_ctx: DtlsContext,
                                                 batch_io: bool | None) -> None:
    r = rig(batch_io)
    c = r.client(client_ctx)
    c.engine.write(b"x")
    c.flush()
    r.pump()  # in the table now
    c.engine.write(b"last words")
    c.engine.close()
    assert c.flush() == 1  # the record and the alert, one datagram
    r.pump()
    assert r.data() == [b"x", b"last words"]
    [end] = [e for e in r.events if isinstance(e, ConnectionTerminated)]
    assert end.address == c.address and end.reason == "peer closed"
    assert c.address not in r.server and len(r.server._fast or ()) == 0


@batched_only
def test_garbage_replays_and_forgeries_from_an_established_peer_are_dropped(
        rig: Any, client_ctx: DtlsContext) -> None:
    r = rig()
    c = r.client(client_ctx)
    c.engine.write(b"one")
    [record] = [c.engine.pull()]
    assert record is not None
    c.sock.send(record)
    r.pump()
    forged = bytearray(record)
    forged[-1] ^= 1
    for datagram in (record, bytes(forged), record[:20], b"\x17\xfe\xfd" + bytes(10), b"\x17" * 14):
        c.sock.send(datagram)
    c.engine.write(b"two")
    c.flush()
    r.pump()
    assert r.data() == [b"one", b"two"]
    assert not [e for e in r.events if isinstance(e, ConnectionTerminated)]
    assert len(r.server._fast) == 1


@batched_only
def test_unread_record_limit_and_send_limit_hold_on_the_c_path(rig: Any, client_ctx: DtlsContext) -> None:
    r = rig(max_queued_records=3, max_queued_bytes=1500)
    c = r.client(client_ctx)
    c.engine.write(b"first")
    c.flush()
    r.pump()
    assert r.server._fast is not None and len(r.server._fast) == 1
    r.events.clear()
    for k in range(10):
        c.engine.write(b"%d" % k)
    c.flush()
    select.select([r.sock], [], [], 0.005)
    r.io.receive()  # events not taken: only three may wait
    assert [e.data for e in r.server.events() if type(e) is DataReceived] == [b"0", b"1", b"2"]
    assert r.server.stats.records_dropped == 7
    with pytest.raises(ValueError, match="exceed"):  # one record, never cut
        r.server.send(c.address, bytes(1300))
    r.server.send(c.address, bytes(1000))
    with pytest.raises(LimitExceeded):
        r.server.send(c.address, bytes(1000))
    r.io.flush()
    assert c.records(1) == [bytes(1000)]


@batched_only
def test_datagrams_to_send_takes_what_the_c_path_queued(rig: Any, client_ctx: DtlsContext) -> None:
    r = rig()
    c = r.client(client_ctx)
    c.engine.write(b"in")
    c.flush()
    r.pump()
    for k in range(3):
        r.server.send(c.address, b"out %d" % k)
    out = r.server.datagrams_to_send()  # an application mixing its own loop in
    assert [a for _, a in out] == [c.address]
    assert r.io.flush()
    for datagram, _ in out:
        c.engine.feed(datagram)
    assert [c.engine.read() for _ in range(3)] == [b"out 0", b"out 1", b"out 2"]


@batched_only
def test_parked_closed_and_restarted_peers_leave_the_table(rig: Any, server_ctx: DtlsContext,
                                                           client_ctx: DtlsContext) -> None:
    clock = [1000.0]
    r = rig(release_after=1.0, idle_timeout=60.0, clock=lambda: clock[0])
    a, b, c = (r.client(client_ctx) for _ in range(3))
    for x in (a, b, c):
        x.engine.write(b"hello")
        x.flush()
    r.pump()
    assert len(r.server._fast) == 3
    r.server.close(b.address)  # closed here
    clock[0] += 5.0  # a is parked (its conn sealed and freed): its slot must be gone first
    r.server.send(c.address, b"keep c awake")
    r.pump()
    assert r.server.stats.parked >= 1 and len(r.server._fast) < 3
    a.engine.write(b"back")
    a.flush()
    r.pump()  # woken from the lot, then through the table again
    a.engine.write(b"again")
    a.flush()
    r.pump()
    assert r.data(a.address)[-2:] == [b"back", b"again"]
    restarted = Client(r, client_ctx, None, c.sock)  # same address, a new handshake
    restarted.handshake()
    restarted.engine.write(b"new association")
    restarted.flush()
    r.pump()
    assert r.data(c.address)[-1] == b"new association"
    assert r.server._fast is not None and c.address in r.server


@batched_only
def test_a_peer_on_libssls_record_layer_stays_on_the_python_path(certs: Any, client_ctx: DtlsContext) -> None:
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, record_layer="openssl")
    r = Rig(ctx)
    try:
        c = r.client(client_ctx)
        for k in range(3):
            c.engine.write(b"%d" % k)
            c.flush()
            r.pump()
        assert r.data() == [b"0", b"1", b"2"] and len(r.server._fast) == 0
        r.server.send(c.address, b"reply")
        r.io.flush()
        assert c.records(1) == [b"reply"]
    finally:
        r.close()


@batched_only
def test_cid_records_take_the_c_path_until_the_peer_moves(certs: Any) -> None:
    r = Rig(DtlsContext(certs.server.cert_pem, certs.server.key_pem, connection_id=True))
    try:
        c = r.client(DtlsContext(verify="none", connection_id=b""))
        assert c.engine.peer_connection_id  # our records carry the server's CID
        c.engine.write(b"first")
        c.flush()
        r.pump()
        r.slow = 0
        for k in range(5):
            c.engine.write(b"cid %d" % k)
            c.flush()
        r.pump()
        assert r.data(c.address)[-5:] == [b"cid %d" % k for k in range(5)] and r.slow == 0
        old = c.address
        c.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a NAT gave it a new port
        c.sock.bind(("127.0.0.1", 0))
        c.sock.connect(r.sock.getsockname())
        c.sock.setblocking(False)
        c.address = c.sock.getsockname()
        c.engine.write(b"from elsewhere")
        c.flush()
        r.pump()
        assert r.slow == 1 and r.data(c.address) == [b"from elsewhere"]
        [moved] = [e for e in r.events if type(e).__name__ == "AddressChanged"]
        assert (moved.address, moved.old_address) == (c.address, old)
        r.server.send(c.address, b"to the new port")
        r.io.flush()
        assert c.records(1) == [b"to the new port"]
        c.engine.write(b"and on")
        c.flush()
        r.pump()
        assert r.slow == 1 and r.data(c.address)[-1] == b"and on" and len(r.server._fast) == 1
    finally:
        r.close()


def test_the_table_grows_and_shrinks_with_its_peers(make_pair: Any) -> None:
    from pydtls_ossl._ffi import ffi, lib
    pair = make_pair()
    pair.handshake()
    pair.roundtrip(b"handed over")  # the engine's record layer holds the records now
    table = ffi.gc(lib.pd_fast_new(), lib.pd_fast_free)
    conn = pair.server._conn

    def raw(i: int) -> bytes:
        return (b"\x02\x00" + i.to_bytes(2, "big") + bytes([10, 0, i >> 8 & 255, i & 255])).ljust(28, b"\0")
    ids = [lib.pd_fast_put(table, raw(i), conn) for i in range(5000)]
    assert sorted(ids) == list(range(5000)) and lib.pd_fast_count(table) == 5000
    assert [lib.pd_fast_put(table, raw(i), conn) for i in range(0, 5000, 97)] == ids[::97]
    for slot in ids[:4990]:
        lib.pd_fast_drop(table, slot)
    lib.pd_fast_drop(table, ids[0])  # twice: nothing
    assert lib.pd_fast_count(table) == 10
    assert [lib.pd_fast_put(table, raw(i), conn) for i in range(4990, 5000)] == ids[4990:]
    again = [lib.pd_fast_put(table, raw(i), conn) for i in range(100)]
    assert max(again) < 5000 and lib.pd_fast_count(table) == 110  # freed ids come back


@pytest.mark.parametrize("batch_io", MODES)
def test_record_events_are_the_frozen_dataclass(rig: Any, client_ctx: DtlsContext,
                                                batch_io: bool | None) -> None:
    import dataclasses
    r = rig(batch_io)
    c = r.client(client_ctx)
    for k in range(3):
        c.engine.write(b"event %d" % k)
        c.flush()
        r.pump()
    events = [e for e in r.events if type(e) is DataReceived]
    assert events == [DataReceived(c.address, b"event %d" % k) for k in range(3)]
    assert len({*events}) == 3 and repr(events[0]) == f"DataReceived(address={c.address!r}, data=b'event 0')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].data = b"changed"  # type: ignore[misc]
