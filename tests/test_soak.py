"""Soak and lifetime: memory stays flat over 100,000 handshakes and 1,000,000 records,
engines dropped without ``close()`` free everything, and a context outlives its last
reference for as long as an engine still uses it.

Every test is marked ``soak`` (CI runs them) and the file is bounded to minutes on a
2-core machine. Counts are the issue's; under a sanitizer build (ASan's allocator
keeps freed memory in quarantine) they shrink tenfold and the memory bounds are
reported, not asserted.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import time
import tracemalloc
import weakref
from typing import Any, Iterator

import pytest

from pydtls_ossl import Dtls, DtlsContext, HandshakeError
from pydtls_ossl._ffi import lib
from pydtls_ossl.server import ConnectionEstablished, ConnectionTerminated, DtlsServer

from .helpers import Pair, drain, library_growth

pytestmark = pytest.mark.soak

KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
SUITE = "PSK-AES128-GCM-SHA256"  # no public-key operation: ~0.25 ms a handshake pair


def _sanitized() -> bool:
    with open("/proc/self/maps") as f:
        return any("libasan" in line or "libtsan" in line for line in f)


SANITIZED = _sanitized()
SCALE = 10 if SANITIZED else 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2), C and Python alike.

    Unlike RSS it does not hide memory behind pages the allocator already holds, so a
    growth of N bytes is N bytes kept. 0 where glibc's counter is unavailable.
    """
    if _mallinfo2 is None or SANITIZED:
        return 0
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


def assert_within(growth: int, bound: int, what: str) -> None:
    if SANITIZED:
        print(f"{what}: {growth / 1024:.0f} KiB (bound {bound / 1024:.0f} KiB not asserted under a sanitizer)",
              file=sys.stderr)
        return
    assert growth < bound, f"{what}: grew by {growth / 1024:.0f} KiB (bound {bound / 1024:.0f} KiB)"


def psk_contexts(layer: Any = "engine", identity: str = "soak") -> tuple[DtlsContext, DtlsContext]:
    return (DtlsContext(psk=(identity, KEY), ciphers=SUITE, record_layer=layer),
            DtlsContext(psk_keys={"soak": KEY}, ciphers=SUITE, record_layer=layer))


def quick_handshake(client: Dtls, server: Dtls) -> None:
    """The in-memory handshake with as few calls as it needs (bounded rounds)."""
    client.handshake()
    for _ in range(8):
        while (datagram := client.pull()) is not None:
            server.feed(datagram)
        server.handshake()
        while (datagram := server.pull()) is not None:
            client.feed(datagram)
        if client.handshake() and server.is_handshake_finished():
            return
    raise AssertionError("handshake did not finish in memory")


class Checkpoints:
    """RSS (and malloc's heap in use) at checkpoints after a warm-up."""

    def __init__(self) -> None:
        gc.collect()
        self.rss = [rss_bytes()]
        self.heap = [heap_in_use()]

    def mark(self) -> None:
        gc.collect()
        self.rss.append(rss_bytes())
        self.heap.append(heap_in_use())

    @property
    def rss_growth(self) -> int:
        return max(self.rss) - self.rss[0]

    @property
    def heap_growth(self) -> int:
        return max(self.heap) - self.heap[0]

    def report(self, what: str) -> str:
        mib = [f"{r / 2**20:.1f}" for r in self.rss]
        return (f"{what}: RSS MiB at checkpoints {' '.join(mib)}; growth {self.rss_growth / 1024:.0f} KiB "
                f"RSS, {self.heap_growth / 1024:.0f} KiB heap")


# ------------------------------------------------------------ 100,000 handshakes

class HandshakeMix:
    """One handshake per call, rotating through the kinds a long-lived process sees.

    Of every 10: 6 engine pairs on the engine's record layer, 1 on libssl's, 2 through
    a ``DtlsServer`` (cookie round, PSK callback, close_notify), 1 refused (unknown
    identity: alerts, exception, drained error queue). Each good one carries a record
    each way and ends with close_notify.
    """

    def __init__(self) -> None:
        self.client, self.server = psk_contexts()
        self.client_lib, self.server_lib = psk_contexts("openssl")
        self.intruder = DtlsContext(psk=("intruder", KEY), ciphers=SUITE)
        self.core = DtlsServer(self.server, max_handshakes=4)
        self.count = 0
        self.refused = 0

    def __call__(self) -> None:
        kind = self.count % 10
        self.count += 1
        if kind < 6:
            self.pair(self.client, self.server)
        elif kind == 6:
            self.pair(self.client_lib, self.server_lib)
        elif kind < 9:
            self.through_core(("127.0.0.1", 1024 + self.count % 60000))
        else:
            self.refuse()

    def pair(self, client_ctx: DtlsContext, server_ctx: DtlsContext) -> None:
        client, server = Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)
        quick_handshake(client, server)
        client.write(b"ping %d" % self.count)
        server.feed(client.pull())  # type: ignore[arg-type]
        assert server.read() == b"ping %d" % self.count
        server.write(b"pong")
        client.feed(server.pull())  # type: ignore[arg-type]
        assert client.read() == b"pong"
        client.close()
        while (datagram := client.pull()) is not None:
            server.feed(datagram)
        server.close()

    def through_core(self, address: tuple[str, int]) -> None:
        core = self.core
        client = Dtls(context=self.client)
        client.handshake()
        for _ in range(8):
            while (datagram := client.pull()) is not None:
                core.feed(datagram, address)
            for datagram, _ in core.datagrams_to_send():
                client.feed(datagram)
            if client.handshake() and address in core and core.handshaking == 0:
                break
        client.write(b"via core")
        core.feed(client.pull(), address)  # type: ignore[arg-type]
        events = list(core.events())
        assert isinstance(events[0], ConnectionEstablished) and events[0].psk_identity == "soak"
        assert events[-1].data == b"via core"  # type: ignore[union-attr]
        client.close()
        core.feed(client.pull(), address)  # type: ignore[arg-type]
        core.datagrams_to_send()
        (closed,) = core.events()
        assert isinstance(closed, ConnectionTerminated) and address not in core

    def refuse(self) -> None:
        client, server = Dtls(context=self.intruder), Dtls(is_server=True, context=self.server)
        with pytest.raises(HandshakeError):
            quick_handshake(client, server)
        while (datagram := server.pull()) is not None:
            client.feed(datagram)
        with pytest.raises(HandshakeError):
            client.handshake()
        assert lib.ERR_peek_error() == 0
        self.refused += 1


def test_100000_psk_handshakes_keep_memory_flat() -> None:
    total = 100_000 // SCALE
    mix = HandshakeMix()
    start = time.monotonic()
    for _ in range(5_000 // SCALE):  # warm-up: allocator caches, free lists, cookie keys
        mix()
    warm = time.monotonic() - start
    marks = Checkpoints()
    for _ in range(10):
        for _ in range(total // 10):
            mix()
        marks.mark()
    elapsed = time.monotonic() - start
    print(f"{mix.count} handshakes in {elapsed:.1f} s ({mix.count / elapsed:.0f}/s, warm-up {warm:.1f} s); "
          + marks.report("100,000 handshakes"), file=sys.stderr)
    assert mix.count == total + 5_000 // SCALE and mix.refused == mix.count // 10
    assert len(mix.core) == 0 and mix.core.handshaking == 0
    # Measured: < 1 MiB RSS, < 32 KiB heap. A leak of 32 bytes a handshake is 3.2 MB.
    assert_within(marks.rss_growth, 2 * 2**20, "RSS over 100,000 handshakes")
    assert_within(marks.heap_growth, 1 * 2**20, "malloc heap over 100,000 handshakes")


# -------------------------------------------------------- 1,000,000 records

@pytest.fixture
def established() -> Iterator[Pair]:
    client_ctx, server_ctx = psk_contexts()
    p = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    quick_handshake(p.client, p.server)
    assert p.client.record_layer == p.server.record_layer == "engine"
    yield p
    p.client.close()
    p.server.close()


def payload(i: int) -> bytes:
    """Record i: its number, then 0 to 299 filler bytes (sizes vary, content checkable)."""
    return i.to_bytes(8, "big") + bytes([i & 0xFF]) * (i * 7 % 300)


def test_1000000_records_through_one_association_keep_memory_flat(established: Pair) -> None:
    p = established
    total, batch = 1_000_000 // SCALE, 64
    one_per_call = total // 10  # a share through write/pull/feed/read, the rest in batches
    sent = received = 0
    directions = ((p.client, p.server), (p.server, p.client))

    def batches(count: int) -> None:
        nonlocal sent, received
        for _ in range(count // batch):
            src, dst = directions[(sent // batch) % 2]
            payloads = [payload(sent + k) for k in range(batch)]
            got = dst.feed_batch(src.write_batch(payloads))
            assert got == payloads
            sent += batch
            received += len(got)

    def singles(count: int) -> None:
        nonlocal sent, received
        for _ in range(count):
            src, dst = directions[sent % 2]
            data = payload(sent)
            src.write(data)
            dst.feed(src.pull())  # type: ignore[arg-type]
            assert dst.read() == data
            sent += 1
            received += 1

    batches(50_000 // SCALE)  # warm-up
    singles(5_000 // SCALE)
    warm = sent
    start = time.monotonic()
    marks = Checkpoints()
    for _ in range(10):
        batches((total - one_per_call) // 10)
        singles(one_per_call // 10)
        marks.mark()
    elapsed = time.monotonic() - start
    measured = sent - warm
    print(f"{measured} records in {elapsed:.1f} s ({measured / elapsed:.0f}/s); "
          + marks.report("1,000,000 records"), file=sys.stderr)
    assert measured >= total - batch * 10 and received == sent
    assert p.client.dropped_records == p.server.dropped_records == 0
    assert p.client.state.name == p.server.state.name == "ESTABLISHED"
    assert lib.ERR_peek_error() == 0
    # Records keep nothing: 1 byte a record would be 1 MB.
    assert_within(marks.rss_growth, 1 * 2**20, "RSS over 1,000,000 records")
    assert_within(marks.heap_growth, 512 * 1024, "malloc heap over 1,000,000 records")


def test_records_through_libssl_record_layer_keep_memory_flat() -> None:
    client_ctx, server_ctx = psk_contexts("openssl")
    client, server = Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)
    quick_handshake(client, server)
    assert client.record_layer == server.record_layer == "openssl"
    sent = 0

    def run(rounds: int) -> None:
        nonlocal sent
        for _ in range(rounds):
            payloads = [payload(sent + k) for k in range(64)]
            src, dst = (client, server) if sent % 128 == 0 else (server, client)
            assert dst.feed_batch(src.write_batch(payloads)) == payloads
            sent += 64

    run(500 // SCALE)
    marks = Checkpoints()
    for _ in range(5):
        run(600 // SCALE)
        marks.mark()
    print(marks.report(f"{sent} records on libssl's layer"), file=sys.stderr)
    assert_within(marks.rss_growth, 1 * 2**20, "RSS over 200,000 libssl-layer records")


# ------------------------------------------------- engines dropped, not closed

def abandoned_engines(client_ctx: DtlsContext, server_ctx: DtlsContext, i: int) -> list[Dtls]:
    """Engines in every state an application might drop them in, none closed."""
    stage = i % 6
    client, server = Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)
    if stage == 0:
        return [client, server]  # never started
    client.handshake()
    if stage == 1:
        return [client, server]  # ClientHello queued, never pulled
    for datagram in drain(client):
        server.feed(datagram)
    if stage == 2:
        return [client, server]  # server mid-handshake with its flight unpulled
    quick_handshake(client, server)
    if stage == 3:  # unread records both ways, unpulled output, queued input
        for n in range(5):
            client.write(b"unread %d" % n)
            server.write(b"unread %d" % n)
        server.feed(client.pull())  # type: ignore[arg-type]
        client.feed(server.pull())  # type: ignore[arg-type]
        client.write(b"never pulled")
        return [client, server]
    if stage == 4:  # quiet association that gave its buffers back
        client.release_buffers()
        server.release_buffers()
        return [client, server]
    # in a reference cycle that only the cyclic collector can break
    holder: list[Any] = [client, server]
    holder.append(holder)
    return holder[:2]


@pytest.mark.parametrize("layer", ["engine", "openssl"])
def test_engines_dropped_without_close_free_everything(layer: str) -> None:
    client_ctx, server_ctx = psk_contexts(layer)
    rounds = 20_000 // SCALE
    refs: list[weakref.ref[Dtls]] = []

    def churn(count: int) -> None:
        for i in range(count):
            engines = abandoned_engines(client_ctx, server_ctx, i)
            if i % 1000 == 0:
                refs.extend(weakref.ref(e) for e in engines)
            del engines
            if i % 500 == 499:
                gc.collect()

    churn(3_000 // SCALE)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    marks = Checkpoints()
    for _ in range(5):
        churn(rounds // 5)
        marks.mark()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    python_growth = library_growth(before, after)
    print(marks.report(f"{rounds} dropped pairs ({layer})")
          + f"; Python objects kept by pydtls_ossl: {python_growth} B", file=sys.stderr)
    assert refs and all(ref() is None for ref in refs), "every dropped engine was collected"
    assert python_growth < 32 * 1024
    # A pair of dropped engines holds ~80 KB mid-handshake: losing even 1% shows.
    assert_within(marks.rss_growth, 3 * 2**20, "RSS over dropped engines")
    assert_within(marks.heap_growth, 512 * 1024, "malloc heap over dropped engines")


def test_server_core_dropped_with_live_peers_frees_them() -> None:
    client_ctx, server_ctx = psk_contexts()

    def one_core() -> weakref.ref[Dtls]:
        core = DtlsServer(server_ctx)
        clients = []
        for n in range(20):
            address = ("127.0.0.1", 3000 + n)
            client = Dtls(context=client_ctx)
            client.handshake()
            for _ in range(8):
                while (datagram := client.pull()) is not None:
                    core.feed(datagram, address)
                for datagram, _ in core.datagrams_to_send():
                    client.feed(datagram)
                if client.handshake() and address in core and n % 2 == 0:
                    break  # odd peers are left mid-handshake
            clients.append(client)
        engine = core.connection(("127.0.0.1", 3000))
        assert engine is not None
        return weakref.ref(engine)

    for _ in range(20):
        one_core()
    gc.collect()
    marks = Checkpoints()
    refs = []
    for _ in range(4):
        for _ in range(50 // max(1, SCALE // 2)):
            refs.append(one_core())
        marks.mark()
    print(marks.report("server cores dropped with 20 peers each"), file=sys.stderr)
    assert all(ref() is None for ref in refs)
    assert_within(marks.heap_growth, 2 * 2**20, "malloc heap over dropped server cores")


# ---------------------------------------------- a context outlives its references

@pytest.mark.parametrize("layer", ["engine", "openssl"])
def test_context_dropped_while_engines_use_it_lives_until_the_last_engine(layer: str) -> None:
    seen: list[str] = []

    def key_for(identity: str) -> bytes | None:
        seen.append(identity)
        return KEY if identity == "late" else None

    server_ctx = DtlsContext(psk_keys=key_for, ciphers=SUITE, record_layer=layer)  # type: ignore[arg-type]
    client_ctx = DtlsContext(psk=lambda hint: ("late", KEY), ciphers=SUITE, record_layer=layer)
    refs = (weakref.ref(server_ctx), weakref.ref(client_ctx))
    pairs = [Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)) for _ in range(4)]
    del server_ctx, client_ctx, key_for
    gc.collect()
    assert all(ref() is not None for ref in refs), "engines keep their context alive"
    for i, p in enumerate(pairs):  # the PSK callbacks find their context through a weak handle
        quick_handshake(p.client, p.server)
        assert p.server.psk_identity() == "late"
        assert p.roundtrip(b"after del context %d" % i) == b"after del context %d" % i
    assert seen == ["late"] * 4
    del p
    while pairs:
        pairs.pop()
        gc.collect()
        assert all(ref() is not None for ref in refs) == bool(pairs), \
            "alive exactly while an engine is left"
    # the last engine gone, its SSL_CTX went with the context; new contexts still work
    client_ctx, server_ctx = psk_contexts(layer)
    p = Pair(Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx))
    quick_handshake(p.client, p.server)
    assert p.roundtrip(b"fresh") == b"fresh"


def test_context_churn_keeps_memory_flat(certs: Any) -> None:
    """A context per association (the slow way) frees its SSL_CTX with the last engine."""
    pin = certs.server.fingerprint()

    def cycle(i: int) -> None:
        client = Dtls(context=DtlsContext(psk=("soak", KEY), ciphers=SUITE) if i % 2 else
                      DtlsContext(certs.client.cert_pem, certs.client.key_pem),
                      expected_peer_fingerprint=None if i % 2 else pin)
        server = Dtls(is_server=True, context=DtlsContext(psk_keys={"soak": KEY}, ciphers=SUITE) if i % 2
                      else DtlsContext(certs.server.cert_pem, certs.server.key_pem))
        quick_handshake(client, server)

    for i in range(150 // SCALE):
        cycle(i)
    marks = Checkpoints()
    for _ in range(4):
        for i in range(250 // SCALE):
            cycle(i)
        marks.mark()
    print(marks.report("1,000 context pairs made and dropped"), file=sys.stderr)
    assert_within(marks.heap_growth, 2 * 2**20, "malloc heap over context churn")
