"""The batch API: the same records as the one-per-call API, in fewer calls."""

from __future__ import annotations

import random

import pytest

from pydtls_ossl import ConnectionClosed, ConnectionState

from .helpers import Pair, drain
from .test_engine import assert_queue_empty, records_of


def test_write_batch_equals_write_then_pull(pair: Pair) -> None:
    payloads = [bytes([i]) * (1 + i * 37 % pair.client.max_write_size) for i in range(200)]
    datagrams = pair.client.write_batch(payloads)
    assert pair.client.pull() is None, "everything queued was returned"
    assert all(len(d) <= 1200 for d in datagrams)
    assert sum(len(records_of(d)) for d in datagrams) == len(payloads)
    for datagram in datagrams:
        pair.server.feed(datagram)
    assert [pair.server.read() for _ in payloads] == payloads


def test_feed_batch_equals_feed_then_read(pair: Pair) -> None:
    payloads = [b"%d" % i * (i % 50 + 1) for i in range(300)]
    datagrams = []
    for payload in payloads:
        pair.client.write(payload)
        datagrams.extend(drain(pair.client))
    assert pair.server.feed_batch(datagrams) == payloads
    assert pair.server.read() is None and pair.server.feed_batch([]) == []


def test_batches_both_ways_every_size(pair: Pair) -> None:
    limit = pair.client.max_write_size
    for sender, receiver in ((pair.client, pair.server), (pair.server, pair.client)):
        payloads = [bytes([size % 256]) * size for size in range(1, limit + 1)]
        for start in range(0, limit, 64):
            chunk = payloads[start:start + 64]
            assert receiver.feed_batch(sender.write_batch(chunk)) == chunk


def test_records_queued_before_a_batch_come_first(pair: Pair) -> None:
    pair.client.write(b"early")
    pair.server.feed(pair.client.pull())  # type: ignore[arg-type]
    later = pair.client.write_batch([b"later 1", b"later 2"])
    assert pair.server.feed_batch(later) == [b"early", b"later 1", b"later 2"]


def test_oversized_payload_is_named_and_earlier_ones_stay_queued(pair: Pair) -> None:
    limit = pair.client.max_write_size
    with pytest.raises(ValueError, match=r"payload 2 \(%d bytes\)" % (limit + 1)):
        pair.client.write_batch([b"a", b"b", b"x" * (limit + 1), b"never"])
    assert pair.server.feed_batch(drain(pair.client)) == [b"a", b"b"]


def test_feed_batch_drops_garbage_replays_and_foreign_datagrams(make_pair: object) -> None:
    p = make_pair()  # type: ignore[operator]
    other = make_pair()  # type: ignore[operator]
    p.handshake()
    other.handshake()
    rng = random.Random(5)
    good = p.client.write_batch([b"one", b"two", b"three"])
    junk = [rng.randbytes(rng.randrange(1, 300)) for _ in range(20)]
    foreign = other.client.write_batch([b"not yours"])
    mixed = [junk[0], *good, *foreign, *good, *junk[1:]]  # replays too
    assert p.server.feed_batch(mixed) == [b"one", b"two", b"three"]
    assert p.server.state is ConnectionState.ESTABLISHED
    assert_queue_empty()


def test_close_notify_inside_a_batch(pair: Pair) -> None:
    datagrams = pair.client.write_batch([b"before close"])
    pair.client.close()
    datagrams += drain(pair.client)
    assert pair.server.feed_batch(datagrams) == [b"before close"]
    assert pair.server.state is ConnectionState.PEER_CLOSED
    with pytest.raises(ConnectionClosed):
        pair.server.read()
    assert pair.server.feed_batch([]) == []


def test_empty_payloads_in_a_batch_send_nothing(pair: Pair) -> None:
    assert pair.server.feed_batch(pair.client.write_batch([b"", b"x", b""])) == [b"x"]
