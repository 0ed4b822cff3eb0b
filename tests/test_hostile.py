"""Hostile inputs RFC 6347 and RFC 5246 name, against the real engine and server core.

Where the two record layers differ (after the handshake), each test runs against
both: the engine's own (``record_layer="engine"``, the default) and libssl's
(``"openssl"``). Records are built by hand where an attacker would build them; where
only a real peer can produce them (an authenticated renegotiation request), a real
libssl peer produces them. Memory is measured as malloc's heap in use
(``heap_in_use``), which counts every byte kept, where RSS hides reuse.
"""

from __future__ import annotations

import ctypes
import gc
import time
from typing import Any, Iterator

import pytest

from pydtls_ossl import (AlertDescription, ConnectionState, Dtls, DtlsContext, HandshakeError,
                         Verify)
from pydtls_ossl import _openssl as _openssl_module
from pydtls_ossl._ffi import ffi, lib
from pydtls_ossl.server import (ConnectionEstablished, ConnectionTerminated, DataReceived,
                                DtlsServer)

from .helpers import LossyLink, Pair, drain, lossy_handshake
from .test_soak import SANITIZED, heap_in_use, rss_bytes

LAYERS = ("engine", "openssl")
KEY = bytes.fromhex("0f0e0d0c0b0a09080706050403020100")
PSK_SUITE = "PSK-AES128-GCM-SHA256"
HANDSHAKE, ALERT, APPLICATION_DATA = 22, 21, 23
WARNING, FATAL = 1, 2


# ----------------------------------------------------------------- wire helpers

def record(content_type: int, epoch: int, seq: int, body: bytes, version: bytes = b"\xfe\xfd",
           length: int | None = None) -> bytes:
    """One DTLS record, header and all; ``length`` overrides the length field."""
    size = len(body) if length is None else length
    return (bytes([content_type]) + version + epoch.to_bytes(2, "big") + seq.to_bytes(6, "big")
            + size.to_bytes(2, "big") + body)


def fragment(msg_type: int, msg_len: int, msg_seq: int, offset: int, body: bytes) -> bytes:
    """One handshake message fragment (RFC 6347 §4.2.2 header, then the bytes)."""
    return (bytes([msg_type]) + msg_len.to_bytes(3, "big") + msg_seq.to_bytes(2, "big")
            + offset.to_bytes(3, "big") + len(body).to_bytes(3, "big") + body)


def header(datagram: bytes) -> tuple[int, int, int, int]:
    """(content type, epoch, sequence number, length) of a datagram's first record."""
    return (datagram[0], int.from_bytes(datagram[3:5], "big"), int.from_bytes(datagram[5:11], "big"),
            int.from_bytes(datagram[11:13], "big"))


def relabel(datagram: bytes, epoch: int) -> bytes:
    return datagram[:3] + epoch.to_bytes(2, "big") + datagram[5:]


def assert_queue_empty() -> None:
    assert lib.ERR_peek_error() == 0, "OpenSSL error queue left non-empty"


def cert_pair(certs: Any, layer: Any = "engine", **options: Any) -> Pair:
    server = Dtls(is_server=True, context=DtlsContext(
        certs.server.cert_pem, certs.server.key_pem, record_layer=layer, **options),
        expected_peer_fingerprint=certs.client.fingerprint())
    client = Dtls(context=DtlsContext(
        certs.client.cert_pem, certs.client.key_pem, record_layer=layer, **options),
        expected_peer_fingerprint=certs.server.fingerprint())
    return Pair(client, server)


def psk_contexts(layer: Any = "engine", **options: Any) -> tuple[DtlsContext, DtlsContext]:
    return (DtlsContext(psk=("hostile-test", KEY), ciphers=PSK_SUITE, record_layer=layer, **options),
            DtlsContext(psk_keys={"hostile-test": KEY}, ciphers=PSK_SUITE, record_layer=layer,
                        **options))


def finish(p: Pair, limit: float = 10.0) -> None:
    """Complete a handshake in memory, retransmitting on the engines' own timers when
    stuck (abuse may have cost a flight); bounded in time."""
    deadline = time.monotonic() + limit
    while not (p.client.is_handshake_finished() and p.server.is_handshake_finished()):
        assert time.monotonic() < deadline, "handshake did not finish"
        moved = p.transfer()
        for engine in (p.client, p.server):
            if not engine.is_handshake_finished():
                engine.handshake()
        if moved:
            continue
        timers = [t for t in (p.client.get_timeout(), p.server.get_timeout()) if t is not None]
        assert timers, "stuck with no retransmission timer running"
        time.sleep(min(timers + [0.1]))
        p.client.handle_timeout()
        p.server.handle_timeout()
    p.transfer()


def to_server_flight(p: Pair) -> None:
    """ClientHello in, the server's first flight queued: the server is mid-handshake."""
    p.client.handshake()
    for datagram in drain(p.client):
        p.server.feed(datagram)


@pytest.fixture(params=LAYERS)
def layer(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def established(certs: Any, layer: str) -> Iterator[Pair]:
    p = cert_pair(certs, layer)
    p.handshake()
    assert p.client.record_layer == p.server.record_layer == layer
    yield p
    p.client.close()
    p.server.close()


class Core:
    """One ``DtlsServer`` and its clients wired in memory; every loop bounded."""

    def __init__(self, server: DtlsServer) -> None:
        self.server = server
        self.events: list[Any] = []

    def exchange(self, client: Dtls, address: Any, rounds: int = 8) -> None:
        """Move datagrams between one client and the core until neither has any."""
        for _ in range(rounds):
            moved = 0
            for datagram in drain(client):
                self.server.feed(datagram, address)
                moved += 1
            for datagram, to in self.server.datagrams_to_send():
                if to == address:
                    client.feed(datagram)
                    moved += 1
            if client.state.name in ("NEW", "HANDSHAKING"):
                client.handshake()
            self.events.extend(self.server.events())
            if not moved:
                return

    def cookie_round(self, client: Dtls, address: Any) -> bytes:
        """The client's ClientHello that carries a valid cookie for ``address``."""
        client.handshake()
        self.server.feed(client.pull(), address)  # type: ignore[arg-type]
        [hvr] = [d for d, to in self.server.datagrams_to_send() if to == address and d[13] == 3]
        client.feed(hvr)
        hello = client.pull()
        assert hello is not None and client.pull() is None
        return hello


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------ replays, stale epochs

def test_replays_outside_the_64_record_window_are_dropped(established: Pair) -> None:
    """RFC 6347 §4.1.2.6: a record older than the window's left edge, or one already
    received, is dropped; records inside the window are delivered once, in any order."""
    p = established
    datagrams = []
    for i in range(300):
        p.client.write(b"record %d" % i)
        (datagram,) = drain(p.client)
        datagrams.append(datagram)
    seqs = [header(d)[2] for d in datagrams]
    assert seqs == list(range(seqs[0], seqs[0] + 300))
    delivered: list[bytes] = []

    def feed(i: int) -> None:
        p.server.feed(datagrams[i])
        while (data := p.server.read()) is not None:
            delivered.append(data)

    feed(199)  # the window's right edge is now seqs[199]
    for i in range(200):
        feed(i)
    window = [i for i in range(199) if seqs[199] - seqs[i] < 64]
    assert delivered == [b"record 199"] + [b"record %d" % i for i in window]
    assert len(window) == 63
    delivered.clear()
    for i in list(range(200)) * 2:  # everything again: replays or too old
        feed(i)
    assert delivered == []
    feed(299)  # a jump of 100 moves the window past everything before 236
    for i in range(200, 299):
        feed(i)
    assert delivered == [b"record 299"] + [b"record %d" % i for i in range(236, 299)]
    assert p.server.state is ConnectionState.ESTABLISHED
    assert p.server.pull() is None, "nothing is answered"
    assert_queue_empty()


def test_records_from_a_stale_or_unknown_epoch_are_dropped(established: Pair) -> None:
    """After the handshake only epoch 1 is current: epoch 0 application data, and a real
    record relabelled to another epoch, are dropped without using up its sequence number."""
    p = established
    p.client.write(b"the real one")
    (real,) = drain(p.client)
    assert header(real)[:2] == (APPLICATION_DATA, 1)
    for seq in (0, 1, 5, header(real)[2], 2**48 - 1):  # plaintext at epoch 0, any sequence
        assert p.server.feed(record(APPLICATION_DATA, 0, seq, b"plaintext injected")) == 0
    for epoch in (0, 2, 3, 0xFFFF):  # the real ciphertext under another epoch
        assert p.server.feed(relabel(real, epoch)) == 0
    forged = bytearray(real)  # the current epoch and the real sequence number, forged body
    forged[-5] ^= 0x40
    assert p.server.feed(bytes(forged)) == 0
    assert p.server.read() is None
    assert p.server.pull() is None, "nothing is answered"
    assert p.server.feed(real) == 1 and p.server.read() == b"the real one", \
        "copies that failed did not mark its sequence number as seen"
    assert p.roundtrip(b"and later ones") == b"and later ones"
    assert_queue_empty()


# ---------------------------------------------------- ClientHello flood (core)

def test_client_hello_flood_from_one_address_keeps_one_peer_at_most(certs: Any) -> None:
    """RFC 6347 §4.2.1: cookieless hellos get HelloVerifyRequests and no state; hellos with
    valid cookies from one address never make more than that address's association (plus
    the one replacement §4.2.8 allows), and the server sends less than it receives."""
    client_ctx, server_ctx = psk_contexts()
    server = DtlsServer(server_ctx, max_handshakes=1024)
    core = Core(server)
    address = ("127.0.0.1", 4444)
    hellos = []
    for _ in range(100):  # 100 distinct ClientHellos (own randoms), one address
        client = Dtls(context=client_ctx)
        client.handshake()
        hellos.append(client.pull())
    gc.collect()
    heap_before, rss_before = heap_in_use(), rss_bytes()
    received = sent = replies = 0
    for i in range(20_000):
        hello = hellos[i % 100]
        server.feed(hello, address)  # type: ignore[arg-type]
        received += len(hello)  # type: ignore[arg-type]
        if i % 500 == 499:
            out = server.datagrams_to_send()
            assert all(to == address and d[13] == 3 for d, to in out), "HelloVerifyRequests only"
            replies += len(out)
            sent += sum(len(d) for d, _ in out)
    assert replies == 20_000 and len(server) == 0 and server.handshaking == 0
    assert sent < received
    # now hellos that carry valid cookies, all from the same address
    cookied = [core.cookie_round(Dtls(context=client_ctx), address) for _ in range(50)]
    server.datagrams_to_send()
    received = sent = 0
    for i in range(5_000):
        server.feed(cookied[i % 50], address)
        received += len(cookied[i % 50])
        if i % 100 == 99:
            sent += sum(len(d) for d, _ in server.datagrams_to_send())
        assert len(server) <= 1 and server.handshaking <= 1
    assert server.stats.handshakes_started == 1, "one association for one address"
    assert sent < received, "no amplification: duplicates are not answered with flights"
    if not SANITIZED:
        assert heap_in_use() - heap_before < 512 * 1024
        assert rss_bytes() - rss_before < 2 * 2**20
    assert_queue_empty()


def test_late_duplicate_of_the_cookie_hello_holds_no_handshake_slot(certs: Any) -> None:
    """A network may deliver a copy of the client's ClientHello (with its cookie) after the
    handshake it started has finished. Taken for a restart (RFC 6347 §4.2.8), the
    replacement handshake it starts is a handshake like any other: the handshake deadline
    reclaims it, and until then it is the only one for that address. (Seen first as a
    lossy server-core run that never got back to zero handshakes in progress.)"""
    client_ctx, server_ctx = psk_contexts()
    clock = FakeClock()
    server = DtlsServer(server_ctx, max_handshakes=1, handshake_timeout=5.0, clock=clock)
    core = Core(server)
    address, other = ("127.0.0.1", 4446), ("127.0.0.1", 4447)
    client = Dtls(context=client_ctx)
    hello = core.cookie_round(client, address)
    server.feed(hello, address)
    core.exchange(client, address)
    assert client.is_handshake_finished() and server.handshaking == 0
    server.feed(hello, address)  # the late copy
    server.datagrams_to_send()
    for _ in range(20):  # well past the deadline, with the server's timer run throughout
        clock.now += 1.0
        server.handle_timeout()
        server.datagrams_to_send()
    assert server.handshaking == 0, "a handshake outlived the handshake deadline"
    newcomer = Dtls(context=client_ctx)
    newcomer.handshake()
    core.exchange(newcomer, other)
    assert newcomer.is_handshake_finished(), "a handshake slot is still taken"
    client.write(b"the original association")
    core.exchange(client, address)
    assert [e.data for e in core.events if isinstance(e, DataReceived)] == [b"the original association"]
    assert_queue_empty()


def test_client_hello_flood_at_an_established_peer_keeps_one_replacement(certs: Any) -> None:
    """RFC 6347 §4.2.8: a ClientHello with a valid cookie at a live association may start
    one replacement handshake; a flood of them never makes more, and the live association
    keeps working until a replacement completes."""
    client_ctx, server_ctx = psk_contexts()
    server = DtlsServer(server_ctx)
    core = Core(server)
    address = ("127.0.0.1", 4445)
    live = Dtls(context=client_ctx)
    live.handshake()
    core.exchange(live, address)
    assert live.is_handshake_finished() and address in server
    cookied = [core.cookie_round(Dtls(context=client_ctx), address) for _ in range(50)]
    server.datagrams_to_send()
    for i in range(5_000):
        server.feed(cookied[i % 50], address)
        assert len(server) == 1 and server.handshaking <= 1
        if i % 100 == 99:
            server.datagrams_to_send()
    assert server.stats.handshakes_started == 2 and server.stats.restarts == 0
    live.write(b"the live one")
    core.exchange(live, address)
    assert [e.data for e in core.events if isinstance(e, DataReceived)] == [b"the live one"]
    assert_queue_empty()


# --------------------------------------------------- fragments never completing

def fragments_of(msg_type: int, msg_len: int, msg_seq: int, count: int, first_seq: int) -> list[bytes]:
    """``count`` 8-byte fragments of one huge message, scattered, never completing it."""
    return [record(HANDSHAKE, 0, first_seq + k,
                   fragment(msg_type, msg_len, msg_seq, (k * 7919) % (msg_len - 8), bytes(8)))
            for k in range(count)]


def test_fragmented_hello_from_a_stranger_makes_no_state(certs: Any) -> None:
    """A server core answers only whole ClientHellos: fragments of a huge one (the start
    of a reassembly-memory attack) are dropped before anything is allocated."""
    client_ctx, server_ctx = psk_contexts()
    server = DtlsServer(server_ctx)
    gc.collect()
    heap_before = heap_in_use()
    for i, datagram in enumerate(fragments_of(1, 2**24 - 1, 0, 5_000, 0)
                                 + fragments_of(1, 100_000, 0, 5_000, 0)):
        server.feed(datagram, ("127.0.0.1", 5000 + i % 7))
    assert server.datagrams_to_send() == [] and len(server) == 0
    assert server.stats.dropped == 10_000
    if not SANITIZED:
        assert heap_in_use() - heap_before < 256 * 1024


def hostile_handshaking_peers(server: DtlsServer, client_ctx: DtlsContext, count: int,
                              base_port: int, msg_len: int = 100_000) -> list[Any]:
    """Peers that pass the cookie check, then send only fragments of the next messages."""
    core = Core(server)
    addresses = []
    for n in range(count):
        address = ("127.0.0.1", base_port + n)
        server.feed(core.cookie_round(Dtls(context=client_ctx), address), address)
        assert address in server
        addresses.append(address)
    server.datagrams_to_send()
    for address in addresses:
        seq = 10
        for msg_seq in range(2, 14):  # the expected message and the ones after it
            for datagram in fragments_of(16, msg_len, msg_seq, 40, seq):
                server.feed(datagram, address)
            seq += 40
    return addresses


def test_reassembly_memory_per_handshaking_peer_is_bounded(certs: Any) -> None:
    """Fragments that never complete a message may cost a handshaking association about
    what a real handshake needs (a legitimate handshaking server holds ~75 KB here), not
    eleven 100 KB reassembly buffers (OpenSSL's max_cert_list times its window)."""
    client_ctx, server_ctx = psk_contexts()
    server = DtlsServer(server_ctx, max_handshakes=256, clock=FakeClock())
    hostile_handshaking_peers(server, client_ctx, 2, 7000)  # warm-up
    gc.collect()
    heap_before = heap_in_use()
    addresses = hostile_handshaking_peers(server, client_ctx, 40, 8000)
    per_peer = (heap_in_use() - heap_before) / len(addresses)  # dropped at once is fine too
    if not SANITIZED:
        assert per_peer < 256 * 1024, \
            f"{per_peer / 1024:.0f} KiB of reassembly buffers per hostile handshaking peer"


def test_never_completing_fragments_are_dropped_on_the_handshake_deadline(certs: Any) -> None:
    """The handshake deadline reclaims peers that only ever send fragments, and their
    buffers are freed: a second wave of the same attack takes no more memory."""
    client_ctx, server_ctx = psk_contexts()
    clock = FakeClock()
    server = DtlsServer(server_ctx, max_handshakes=256, handshake_timeout=5.0, clock=clock)
    heaps = []
    for wave in range(3):
        gc.collect()
        heaps.append(heap_in_use())
        # messages of 4,000 bytes: legal under any limit, but never completed
        addresses = hostile_handshaking_peers(server, client_ctx, 30, 9000 + 100 * wave, 4000)
        assert server.handshaking == 30
        for _ in range(50):  # the peers keep sending; activity must not extend the deadline
            clock.now += 0.2
            for address in addresses:
                server.feed(fragments_of(16, 4000, 3, 1, 1000)[0], address)
            server.handle_timeout()
            if not len(server):
                break
        events = list(server.events())
        assert len(server) == 0 and server.handshaking == 0
        assert sum(1 for e in events if isinstance(e, ConnectionTerminated)
                   and e.reason == "handshake timeout") == 30
        assert not any(isinstance(e, ConnectionEstablished) for e in events)
        server.datagrams_to_send()
    gc.collect()
    heaps.append(heap_in_use())
    if not SANITIZED:
        assert heaps[-1] - heaps[1] < 1024 * 1024, f"heap after each wave: {heaps}"
    assert_queue_empty()


def test_forged_next_epoch_records_during_the_handshake_cost_bounded_memory(layer: str) -> None:
    """Epoch-1 records arrive before keys exist (they may be the peer's Finished, or data
    overtaking it), so they are kept until the handshake can judge them; forged ones
    (anyone can send them) may cost a handshaking association a bounded amount, and must
    not take the association off the engine's record layer."""
    client_ctx, server_ctx = psk_contexts(layer, initial_rto=0.05)
    pairs = [Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)) for _ in range(10)]
    for p in pairs:
        to_server_flight(p)
    gc.collect()
    heap_before = heap_in_use()
    for p in pairs:
        for k in range(150):
            size = 16_000 if k % 5 else 65_000
            p.server.feed(record(APPLICATION_DATA, 1, 1000 + k, bytes(size)))
    per_association = (heap_in_use() - heap_before) / len(pairs)
    for p in pairs:
        finish(p)
        assert p.roundtrip(b"unharmed") == b"unharmed"
    assert_queue_empty()
    problems = []
    if not SANITIZED and per_association >= 256 * 1024:
        problems.append(f"{per_association / 1024:.0f} KiB kept per handshaking association")
    layers = {p.server.record_layer for p in pairs}
    if layers != {layer}:
        problems.append(f"record layer after the handshake {layers}, configured {layer!r}")
    assert not problems, "; ".join(problems)


# ---------------------------------------------------------------- oversize

def test_oversize_records_and_datagrams_are_dropped(established: Pair) -> None:
    """RFC 6347 §4.1.2.7 / RFC 5246 §6.2.3: a record longer than 2^14 + 2048 is invalid and
    silently dropped, as is a 70 KB datagram; the association goes on."""
    p = established
    limit = 2**14 + 2048
    p.client.write(b"kept for later")
    (real,) = drain(p.client)
    seq = header(real)[2] + 10
    for length in (limit + 1, 30_000, 65_535):
        assert p.server.feed(record(APPLICATION_DATA, 1, seq, bytes(length))) == 0
        assert p.server.feed(record(APPLICATION_DATA, 1, seq, bytes(40), length=length)) == 0
        seq += 1
    seventy_kb = record(APPLICATION_DATA, 1, seq, bytes(65_535)) + record(APPLICATION_DATA, 1, seq + 1,
                                                                          bytes(70_000 - 65_548 - 13))
    assert len(seventy_kb) == 70_000
    assert p.server.feed(seventy_kb) == 0
    assert p.server.feed(real * 60) == 1, "a datagram of many copies yields one record"
    assert p.server.read() == b"kept for later"
    assert p.server.state is ConnectionState.ESTABLISHED
    assert p.server.pull() is None, "no record_overflow alert: DTLS drops, never answers"
    assert p.roundtrip(b"after the flood") == b"after the flood"
    assert p.roundtrip(b"other way", sender="server") == b"other way"
    assert_queue_empty()


def test_oversize_handshake_records_are_dropped_mid_handshake(certs: Any) -> None:
    p = cert_pair(certs, initial_rto=0.05)
    to_server_flight(p)
    for length in (2**14 + 2049, 65_535):
        p.server.feed(record(HANDSHAKE, 0, 7, fragment(16, length - 12, 2, 0, bytes(length - 12))))
        p.client.feed(record(HANDSHAKE, 0, 7, bytes(length)))
    p.server.feed(b"\x16\xfe\xfd" + bytes(70_000))
    assert p.server.state is ConnectionState.HANDSHAKING
    finish(p)
    assert p.roundtrip(b"ok") == b"ok"
    assert_queue_empty()


# ---------------------------------------------------------------- renegotiation

# The libssl the binding links (libssl.so.3 or .so.4): symbols looked up through the
# extension resolve in its own dependencies, never in another release's library.
_libssl = ctypes.CDLL(_openssl_module.__file__)
_libssl.SSL_clear_options.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
_libssl.SSL_clear_options.restype = ctypes.c_uint64
_libssl.SSL_renegotiate.argtypes = [ctypes.c_void_p]
_libssl.SSL_do_handshake.argtypes = [ctypes.c_void_p]


def start_renegotiation(engine: Dtls) -> list[bytes]:
    """Make a libssl-layer peer renegotiate, as a peer that allows it would: a client sends
    a ClientHello, a server a HelloRequest, both protected at epoch 1."""
    ssl = int(ffi.cast("uintptr_t", engine._conn.ssl))
    assert ssl, "the renegotiating peer keeps libssl's record layer"
    _libssl.SSL_clear_options(ssl, lib.SSL_OP_NO_RENEGOTIATION)
    assert _libssl.SSL_renegotiate(ssl) == 1
    _libssl.SSL_do_handshake(ssl)
    lib.ERR_clear_error()
    return drain(engine)


@pytest.mark.parametrize("peer_role", ["client", "server"])
def test_renegotiation_is_refused_and_the_association_survives(certs: Any, layer: str,
                                                               peer_role: str) -> None:
    """RFC 5246 §7.4.1.1/§7.4.1.2 with renegotiation off: a HelloRequest or a ClientHello
    after the handshake is answered with a no_renegotiation warning, nothing more."""
    client_layer, server_layer = ("openssl", layer) if peer_role == "client" else (layer, "openssl")
    server = Dtls(is_server=True, context=DtlsContext(
        certs.server.cert_pem, certs.server.key_pem, record_layer=server_layer),  # type: ignore[arg-type]
        expected_peer_fingerprint=certs.client.fingerprint())
    client = Dtls(context=DtlsContext(certs.client.cert_pem, certs.client.key_pem,
                                      record_layer=client_layer),  # type: ignore[arg-type]
                  expected_peer_fingerprint=certs.server.fingerprint())
    p = Pair(client, server)
    p.handshake()
    peer, target = (client, server) if peer_role == "client" else (server, client)
    assert target.record_layer == layer
    earlier = []
    for i in range(3):
        peer.write(b"before %d" % i)
        earlier.extend(drain(peer))
    request = start_renegotiation(peer)
    assert [header(d)[:2] for d in request] == [(HANDSHAKE, 1)]
    for datagram in request * 3:  # the copies are replays: answered once
        assert target.feed(datagram) == 0
    replies = drain(target)
    assert [header(d)[:2] for d in replies] == [(ALERT, 1)]
    assert target.state is ConnectionState.ESTABLISHED
    for datagram in replies:
        peer.feed(datagram)
    assert peer._conn.alert_received == WARNING << 8 | AlertDescription.NO_RENEGOTIATION
    for i, datagram in enumerate(earlier):
        assert target.feed(datagram) == 1 and target.read() == b"before %d" % i
    assert target.write(b"still writing") == 13 and len(drain(target)) == 1
    assert_queue_empty()


# ------------------------------------------------------------------- alerts

def test_plaintext_fatal_alert_mid_handshake_ends_it_as_openssl_does(certs: Any) -> None:
    """Before keys exist, alerts are plaintext and as authentic as anything else at epoch
    0; a fatal one ends the handshake (libssl's behaviour, kept: RFC 6347 §4.1.2.7 asks to
    drop *invalid* records, and a well-formed alert is not one). The side that got it
    raises HandshakeError naming the alert and answers nothing; the server core then
    forgets the peer, and the peer's next handshake starts afresh."""
    forged = record(ALERT, 0, 40, bytes([FATAL, AlertDescription.HANDSHAKE_FAILURE]))
    for target_is_client in (True, False):
        p = cert_pair(certs)
        to_server_flight(p)
        target = p.client if target_is_client else p.server
        if target_is_client:
            for datagram in drain(p.server):
                p.client.feed(datagram)
        drain(target)
        target.feed(forged)
        assert target.state is ConnectionState.FAILED
        with pytest.raises(HandshakeError) as failure:
            target.handshake()
        assert failure.value.alert is not None and failure.value.alert.received
        assert failure.value.alert.description == AlertDescription.HANDSHAKE_FAILURE
        assert drain(target) == [], "a received alert is not answered"
        assert_queue_empty()
    client_ctx, server_ctx = psk_contexts()
    server = DtlsServer(server_ctx)
    core = Core(server)
    address = ("127.0.0.1", 6000)
    server.feed(core.cookie_round(Dtls(context=client_ctx), address), address)
    assert server.handshaking == 1
    server.datagrams_to_send()  # its flight goes out
    server.feed(forged, address)
    events = list(server.events())
    assert [e.reason for e in events if isinstance(e, ConnectionTerminated)] == ["handshake failed"]
    assert len(server) == 0 and server.handshaking == 0
    fresh = Dtls(context=client_ctx)
    fresh.handshake()
    core.exchange(fresh, address)
    assert fresh.is_handshake_finished() and address in server
    assert_queue_empty()


@pytest.mark.parametrize("description", [AlertDescription.USER_CANCELED, AlertDescription.BAD_CERTIFICATE])
def test_plaintext_warning_alert_mid_handshake_does_not_end_it(certs: Any, description: int) -> None:
    """RFC 5246 §7.2: after a warning "the connection can continue normally". One forged
    15-byte warning must not abort a handshake (libssl 3.0 answers it with a fatal
    unexpected_message, "too many warn alerts", as `openssl s_server` does too)."""
    p = cert_pair(certs, initial_rto=0.05)
    to_server_flight(p)
    for datagram in drain(p.server):
        p.client.feed(datagram)
    p.server.feed(record(ALERT, 0, 40, bytes([WARNING, description])))
    p.client.feed(record(ALERT, 0, 41, bytes([WARNING, description])))
    assert p.server.state is ConnectionState.HANDSHAKING
    assert p.client.state is ConnectionState.HANDSHAKING
    finish(p)
    assert p.roundtrip(b"completed") == b"completed"
    assert_queue_empty()


@pytest.mark.parametrize("target_role", ["client", "server"])
def test_offpath_plaintext_alert_after_the_handshake_is_ignored(established: Pair,
                                                                 target_role: str) -> None:
    """RFC 6347 §4.1.2.7: once epoch 1 is current, an epoch-0 alert is not authenticated
    and cannot be from the peer: fatal or close_notify, at any sequence number, it is
    dropped and not answered."""
    p = established
    target = p.client if target_role == "client" else p.server
    for description, level in ((AlertDescription.HANDSHAKE_FAILURE, FATAL),
                               (AlertDescription.BAD_RECORD_MAC, FATAL),
                               (AlertDescription.CLOSE_NOTIFY, WARNING)):
        for seq in (0, 1, 2, 99, 2**48 - 1):
            assert target.feed(record(ALERT, 0, seq, bytes([level, description]))) == 0
            assert target.feed(record(ALERT, 0, seq, bytes([level, description]),
                                      version=b"\xfe\xff")) == 0
    assert target.state is ConnectionState.ESTABLISHED
    assert target.pull() is None
    assert p.roundtrip(b"unharmed") == b"unharmed"
    assert p.roundtrip(b"both ways", sender="server") == b"both ways"
    assert_queue_empty()


def test_offpath_plaintext_close_notify_does_not_end_a_core_peer(certs: Any) -> None:
    client_ctx, server_ctx = psk_contexts()
    server = DtlsServer(server_ctx)
    core = Core(server)
    address = ("127.0.0.1", 6100)
    client = Dtls(context=client_ctx)
    client.handshake()
    core.exchange(client, address)
    assert client.is_handshake_finished() and address in server
    for level, description in ((WARNING, 0), (FATAL, 40), (FATAL, 20)):
        server.feed(record(ALERT, 0, 3, bytes([level, description])), address)
    assert address in server and server.datagrams_to_send() == []
    client.write(b"still connected")
    core.exchange(client, address)
    assert [e.data for e in core.events if isinstance(e, DataReceived)] == [b"still connected"]
    assert not any(isinstance(e, ConnectionTerminated) for e in core.events)


# ------------------------------------------------------------ a lossy network

def lossy(seed: int) -> tuple[LossyLink, LossyLink]:
    return (LossyLink(seed, loss=0.3, duplicate=0.1, reorder=0.3),
            LossyLink(seed + 500, loss=0.3, duplicate=0.1, reorder=0.3))


@pytest.mark.parametrize("seed", range(5))
def test_30_percent_loss_with_duplication_and_reordering(certs: Any, layer: str, seed: int) -> None:
    """Handshakes finish and data flows over 30% loss each way with duplicates and
    reordering, driven only by get_timeout()/handle_timeout(); delivery is at most once."""
    if seed % 2:
        client_ctx, server_ctx = psk_contexts(layer, initial_rto=0.02, max_rto=0.16)
        p = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    else:
        p = cert_pair(certs, layer, initial_rto=0.02, max_rto=0.16)
    forward, backward = lossy(seed)
    lossy_handshake(p.client, p.server, forward, backward, limit=20.0)
    for src, dst, link in ((p.client, p.server, forward), (p.server, p.client, backward)):
        link.dropped = link.sent = 0
        sent = [b"seed %d message %d" % (seed, i) for i in range(400)]
        got: list[bytes] = []
        for start in range(0, 400, 20):  # reordering inside a batch stays inside the window
            datagrams = []
            for message in sent[start:start + 20]:
                src.write(message)
                datagrams.extend(drain(src))  # one record a datagram: a loss loses one
            for datagram in link.carry(datagrams):
                dst.feed(datagram)
            while (data := dst.read()) is not None:
                got.append(data)
        assert len(got) == len(set(got)), "duplicates are dropped"
        assert set(got) <= set(sent)
        assert len(sent) - len(got) == link.dropped > 0, "every datagram that arrived is delivered"
        assert len(got) > 200
    assert_queue_empty()


def test_server_core_under_30_percent_loss(certs: Any) -> None:
    client_ctx = DtlsContext(verify=Verify.NONE, initial_rto=0.02, max_rto=0.16)
    server = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.02,
                                    max_rto=0.16), handshake_timeout=20.0)
    up, down = lossy(77)
    clients = {("127.0.0.1", 7700 + n): Dtls(context=client_ctx) for n in range(12)}
    for client in clients.values():
        client.handshake()
    events: list[Any] = []
    deadline = time.monotonic() + 30
    # (not `server.handshaking == 0`: a late duplicate hello may leave a replacement
    # handshake behind, see test_late_duplicate_of_the_cookie_hello_holds_no_handshake_slot)
    while not (all(c.is_handshake_finished() for c in clients.values())
               and server.stats.handshakes_completed >= 12):
        assert time.monotonic() < deadline, (
            f"handshakes did not finish under loss: clients {[c.state.name for c in clients.values()]}, "
            f"{len(server)} peers, {server.handshaking} handshaking, {server.stats}")
        moved = 0
        for address, client in clients.items():
            for datagram in up.carry(drain(client)):
                server.feed(datagram, address)
                moved += 1
        for datagram, address in server.datagrams_to_send():
            for copy in down.carry([datagram]):
                clients[address].feed(copy)
                moved += 1
        for client in clients.values():
            if not client.is_handshake_finished():
                client.handshake()
        events.extend(server.events())
        if moved:
            continue
        timers = [t for t in [c.get_timeout() for c in clients.values()] + [server.get_timeout()]
                  if t is not None]
        time.sleep(min(timers + [0.05]))
        for client in clients.values():
            client.handle_timeout()
        server.handle_timeout()
    established = {e.address for e in events if isinstance(e, ConnectionEstablished)}
    assert established == set(clients) and len(server) == 12
    for address, client in clients.items():
        client.write(b"from %d" % address[1])
        for datagram in drain(client):
            server.feed(datagram, address)
    received = {e.address: e.data for e in server.events() if isinstance(e, DataReceived)}
    assert received == {a: b"from %d" % a[1] for a in clients}


# ----------------------------------------------------- handshakes that never end

def test_server_core_drops_a_handshake_that_never_finishes(certs: Any) -> None:
    """A peer that keeps retransmitting but never completes (here: it hears nothing after
    the cookie round) is dropped at the handshake deadline; its activity does not extend
    it. Real clock, driven by the server's own timer."""
    client_ctx, server_ctx = psk_contexts(initial_rto=0.02, max_rto=0.05)
    server = DtlsServer(server_ctx, handshake_timeout=0.4)
    core = Core(server)
    address = ("127.0.0.1", 6200)
    client = Dtls(context=client_ctx)
    server.feed(core.cookie_round(client, address), address)
    admitted = time.monotonic()
    assert server.handshaking == 1
    ended = None
    retransmissions = 0
    while ended is None:
        now = time.monotonic()
        assert now - admitted < 3.0, "the deadline never fired"
        server.datagrams_to_send()  # the server's flights are lost
        for event in server.events():
            if isinstance(event, ConnectionTerminated):
                ended = (event, now - admitted)
        if ended:
            break
        timers = [t for t in (client.get_timeout(), server.get_timeout()) if t is not None]
        time.sleep(min(timers + [0.05]))
        if client.get_timeout() == 0:
            client.handle_timeout()
        for datagram in drain(client):  # its retransmissions still reach the server
            retransmissions += 1
            if time.monotonic() - admitted < 0.4:
                server.feed(datagram, address)
        server.handle_timeout()
    event, after = ended
    assert event.reason == "handshake timeout" and isinstance(event.error, HandshakeError)
    assert "deadline passed" in str(event.error)
    assert 0.4 <= after < 1.5, f"dropped after {after:.2f} s"
    assert retransmissions >= 3, "the peer was active all along"
    assert len(server) == 0 and server.handshaking == 0 and server.get_timeout() is None
    assert server.stats.handshakes_failed == 1
    assert_queue_empty()
