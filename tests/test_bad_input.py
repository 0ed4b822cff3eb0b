"""Garbage, truncated and foreign datagrams never crash or break an association."""

from __future__ import annotations

import random
from typing import Callable

from pydtls_ossl import ConnectionState

from .helpers import Pair, drain
from .test_engine import assert_queue_empty


def junk(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    size = rng.randrange(0, 1500)
    body = rng.randbytes(size)
    if kind == 0:
        return body
    if kind == 1:  # plausible DTLS 1.2 header, random epoch/sequence/length
        return bytes([rng.choice((20, 21, 22, 23)), 0xFE, 0xFD]) + body
    if kind == 2:  # header claiming more than it carries
        return bytes([23, 0xFE, 0xFD, 0, 1]) + b"\x00" * 6 + b"\xff\xff" + body[:20]
    if kind == 3:  # a ClientHello-shaped handshake record
        return bytes([22, 0xFE, 0xFF, 0, 0]) + b"\x00" * 6 + len(body).to_bytes(2, "big") + body
    if kind == 4:
        return b"\x17\xfe\xfd"
    return bytes([rng.randrange(256)])


def feed_junk(p: Pair, rng: random.Random, count: int) -> None:
    for _ in range(count):
        for engine in (p.client, p.server):
            assert engine.feed(junk(rng)) == 0
            assert engine.read() is None
            assert_queue_empty()


def test_garbage_at_every_stage_of_the_handshake(make_pair: Callable[..., Pair]) -> None:
    rng = random.Random(7)
    p = make_pair()
    feed_junk(p, rng, 50)
    p.client.handshake()
    for _ in range(20):
        for src, dst in ((p.client, p.server), (p.server, p.client)):
            for datagram in drain(src):
                dst.feed(datagram)
                feed_junk(p, rng, 5)
        if p.client.handshake() and p.server.handshake():
            break
    assert p.client.is_handshake_finished() and p.server.is_handshake_finished()
    feed_junk(p, rng, 200)
    assert p.roundtrip(b"healthy") == b"healthy"
    assert p.roundtrip(b"both ways", sender="server") == b"both ways"


def test_truncated_and_bitflipped_records_are_dropped(pair: Pair) -> None:
    rng = random.Random(11)
    pair.client.write(b"the real one")
    real = pair.client.pull()
    assert real is not None
    for cut in range(1, len(real)):
        assert pair.server.feed(real[:cut]) == 0
    for _ in range(200):
        flipped = bytearray(real)
        flipped[rng.randrange(13, len(flipped))] ^= 1 << rng.randrange(8)
        assert pair.server.feed(bytes(flipped)) == 0
    assert pair.server.read() is None
    assert pair.server.state is ConnectionState.ESTABLISHED
    assert pair.server.feed(real) == 1 and pair.server.read() == b"the real one"
    assert_queue_empty()


def test_datagrams_from_another_association_are_dropped(make_pair: Callable[..., Pair]) -> None:
    a, b = make_pair(), make_pair()
    a.handshake()
    b.handshake()
    for i in range(50):
        b.client.write(b"foreign %d" % i)
        for datagram in drain(b.client):
            assert a.server.feed(datagram) == 0
    assert a.server.read() is None
    assert a.roundtrip(b"own traffic") == b"own traffic"


def test_handshake_datagrams_replayed_after_handshake(make_pair: Callable[..., Pair]) -> None:
    p = make_pair()
    p.client.handshake()
    seen: list[tuple[str, bytes]] = []
    for _ in range(20):
        for name, src, dst in (("client", p.client, p.server), ("server", p.server, p.client)):
            for datagram in drain(src):
                seen.append((name, datagram))
                dst.feed(datagram)
        if p.client.handshake() and p.server.handshake():
            break
    for name, datagram in seen * 3:
        (p.server if name == "client" else p.client).feed(datagram)
        drain(p.client)
        drain(p.server)
    assert p.client.state is ConnectionState.ESTABLISHED
    assert p.server.state is ConnectionState.ESTABLISHED
    assert p.roundtrip(b"still here") == b"still here"
    assert_queue_empty()


def test_oversized_datagram_is_dropped(pair: Pair) -> None:
    assert pair.server.feed(b"\x17\xfe\xfd" + b"\x00" * 70000) == 0
    assert pair.roundtrip(b"ok") == b"ok"


def test_good_record_with_corrupt_neighbour_leaves_queue_clean(pair: Pair) -> None:
    pair.client.write(b"good")
    good = pair.client.pull()
    pair.client.write(b"bad!")
    bad = bytearray(pair.client.pull() or b"")
    bad[-1] ^= 0x55
    assert good is not None
    assert pair.server.feed(good + bytes(bad)) == 1
    assert_queue_empty()
    assert pair.server.read() == b"good" and pair.server.read() is None


def test_stale_errors_from_other_code_do_not_break_reads(pair: Pair) -> None:
    from pydtls_ossl._ffi import ffi, lib
    lib.d2i_X509(ffi.NULL, ffi.new("const unsigned char **", ffi.new("char[]", b"junk")), 4)
    assert lib.ERR_peek_error() != 0, "setup: someone else's error is on the queue"
    pair.client.write(b"despite the junk")
    assert pair.server.feed(pair.client.pull()) == 1  # type: ignore[arg-type]
    assert pair.server.read() == b"despite the junk"
    assert pair.server.read() is None
    lib.ERR_clear_error()
