"""The sans-IO engine: datagram framing, records, timers, close, introspection."""

from __future__ import annotations

import time
from typing import Callable

import pytest

from pydtls_ossl import (CONTINUE, FINISHED, ConnectionClosed, ConnectionState, Dtls,
                         DtlsContext, HandshakeStatus)
from pydtls_ossl._ffi import lib

from .helpers import Pair, drain


def records_of(datagram: bytes) -> list[bytes]:
    """Split a datagram at DTLS record headers; fail if a record is cut."""
    records, offset = [], 0
    while offset < len(datagram):
        assert len(datagram) - offset >= 13, "datagram ends inside a record header"
        length = int.from_bytes(datagram[offset + 11:offset + 13], "big")
        end = offset + 13 + length
        assert end <= len(datagram), "record split across datagrams"
        records.append(datagram[offset:end])
        offset = end
    return records


def client_flight_to_server(p: Pair) -> None:
    """ClientHello out, the server's flight back: the client's last flight is queued."""
    for datagram in drain(p.client):
        p.server.feed(datagram)
    for datagram in drain(p.server):
        p.client.feed(datagram)
    p.client.handshake()


def assert_queue_empty() -> None:
    assert lib.ERR_peek_error() == 0, "OpenSSL error queue left non-empty"


def test_handshake_datagrams_whole_and_within_mtu(make_pair: Callable[..., Pair]) -> None:
    p = make_pair()
    assert p.client.handshake() is CONTINUE
    p.handshake()
    assert p.client.handshake() is FINISHED and p.server.handshake() == HandshakeStatus.FINISHED
    assert p.client.is_handshake_finished() and p.server.handshake_finished
    assert [name for name, _ in p.sizes] == ["client", "server", "client", "server"]
    assert all(size <= 1200 for _, size in p.sizes)
    assert p.client.state is ConnectionState.ESTABLISHED
    assert_queue_empty()


@pytest.mark.parametrize("mtu", [576, 256])
def test_small_mtu_fragments_certificate_flight(make_pair: Callable[..., Pair], certs: object,
                                                 mtu: int) -> None:
    rsa = certs.rsa  # type: ignore[attr-defined]
    p = make_pair(mtu=mtu, server_cert=rsa, client_cert=rsa)
    p.client.handshake()
    datagrams: list[bytes] = []
    for _ in range(50):
        for src, dst in ((p.client, p.server), (p.server, p.client)):
            for datagram in drain(src):
                assert len(datagram) <= mtu
                records_of(datagram)
                datagrams.append(datagram)
                dst.feed(datagram)
        if p.client.handshake() and p.server.handshake():
            break
    assert p.client.is_handshake_finished() and p.server.is_handshake_finished()
    assert len(datagrams) > 6, "an RSA certificate flight must be fragmented at a small MTU"
    assert p.client.max_write_size < mtu
    assert p.roundtrip(b"z" * p.client.max_write_size) == b"z" * p.client.max_write_size


@pytest.mark.parametrize("mtu", [1200, 576])
def test_every_payload_size_is_one_record_one_read(make_pair: Callable[..., Pair], mtu: int) -> None:
    p = make_pair(mtu=mtu)
    p.handshake()
    limit = p.client.max_write_size
    assert 0 < limit < mtu
    for sender in ("client", "server"):
        for size in range(1, limit + 1):
            payload = bytes([size % 251]) * size
            src = p.client if sender == "client" else p.server
            dst = p.server if sender == "client" else p.client
            assert src.write(payload) == size
            datagram = src.pull()
            assert datagram is not None and len(datagram) <= mtu and src.pull() is None
            assert len(records_of(datagram)) == 1
            assert dst.feed(datagram) == 1
            assert dst.read() == payload
            assert dst.read() is None
    assert_queue_empty()


def test_largest_record_fills_the_mtu_exactly(pair: Pair) -> None:
    pair.client.write(b"m" * pair.client.max_write_size)
    datagram = pair.client.pull()
    assert datagram is not None and len(datagram) == 1200


def test_oversized_write_raises_and_association_survives(pair: Pair) -> None:
    limit = pair.client.max_write_size
    with pytest.raises(ValueError, match=f"exceed the {limit}"):
        pair.client.write(b"x" * (limit + 1))
    assert pair.client.pull() is None
    assert pair.roundtrip(b"still fine") == b"still fine"


def test_empty_write_sends_nothing(pair: Pair) -> None:
    assert pair.client.write(b"") == 0
    assert pair.client.pull() is None


def test_write_accepts_buffers(pair: Pair) -> None:
    assert pair.client.write(bytearray(b"abc")) == 3
    assert pair.client.write(memoryview(b"defg")) == 4
    for datagram in drain(pair.client):
        pair.server.feed(memoryview(datagram))
    assert [pair.server.read(), pair.server.read()] == [b"abc", b"defg"]


def test_many_writes_pack_into_few_datagrams_and_read_one_by_one(pair: Pair) -> None:
    payloads = [f"record {i}".encode() * (i % 7 + 1) for i in range(100)]
    for payload in payloads:
        pair.client.write(payload)
    datagrams = drain(pair.client)
    assert len(datagrams) < len(payloads)
    total_records = 0
    for datagram in datagrams:
        assert len(datagram) <= 1200
        total_records += len(records_of(datagram))
        pair.server.feed(datagram)
    assert total_records == len(payloads)
    assert [pair.server.read() for _ in payloads] == payloads
    assert pair.server.read() is None


def test_duplicates_and_replays_are_dropped(pair: Pair) -> None:
    pair.client.write(b"once")
    datagram = pair.client.pull()
    assert datagram is not None
    assert pair.server.feed(datagram) == 1
    assert pair.server.read() == b"once"
    for _ in range(3):
        assert pair.server.feed(datagram) == 0
    assert pair.server.read() is None
    assert pair.roundtrip(b"after replay") == b"after replay"


def test_reordered_records_each_delivered_once(pair: Pair) -> None:
    datagrams = []
    for word in (b"one", b"two", b"three"):
        pair.client.write(word)
        datagrams.append(pair.client.pull())
    for index in (2, 0, 1, 2, 0):
        pair.server.feed(datagrams[index])  # type: ignore[arg-type]
    assert [pair.server.read() for _ in range(4)] == [b"three", b"one", b"two", None]


def test_unread_records_beyond_the_queue_limit_are_dropped_and_counted(pair: Pair) -> None:
    payload = b"q" * pair.client.max_write_size
    sent = 1000  # ~1.16 MB, above the 1 MiB unread limit
    for _ in range(sent):
        pair.client.write(payload)
        pair.server.feed(pair.client.pull())  # type: ignore[arg-type]
    received = 0
    while pair.server.read() is not None:
        received += 1
    assert pair.server.dropped_records > 0
    assert received + pair.server.dropped_records == sent


def test_export_keys_match_and_depend_on_label_and_context(pair: Pair) -> None:
    a = pair.client.export_keys("EXTRACTOR-dtls_srtp", 60)
    assert len(a) == 60 and a == pair.server.export_keys(b"EXTRACTOR-dtls_srtp", 60)
    assert pair.client.export_keys("EXTRACTOR-other", 60) != a
    with_ctx = pair.client.export_keys("EXTRACTOR-dtls_srtp", 60, context=b"")
    assert with_ctx != a and with_ctx == pair.server.export_keys("EXTRACTOR-dtls_srtp", 60, b"")
    with pytest.raises(ValueError):
        pair.client.export_keys("EXTRACTOR-dtls_srtp", 0)


def test_fingerprints_and_introspection(pair: Pair, certs: object) -> None:
    server_cert = certs.server  # type: ignore[attr-defined]
    client_cert = certs.client  # type: ignore[attr-defined]
    assert pair.client.get_peer_fingerprint() == server_cert.fingerprint()
    assert pair.server.get_peer_fingerprint() == client_cert.fingerprint()
    assert pair.client.get_fingerprint() == client_cert.fingerprint()
    for algorithm, size in (("sha-1", 20), ("sha-224", 28), ("sha-256", 32),
                            ("sha-384", 48), ("sha-512", 64)):
        text = pair.client.get_peer_fingerprint(algorithm)
        assert text is not None and len(text.split(":")) == size
        assert text == server_cert.fingerprint(algorithm)
    assert pair.client.version() == "DTLSv1.2"
    assert pair.client.cipher() == ("ECDHE-ECDSA-AES128-GCM-SHA256", "TLSv1.2", 128)
    assert pair.client.peer_certificate() is not None
    assert not pair.client.session_reused()
    assert not pair.client.is_server and pair.server.is_server


def test_before_handshake(make_pair: Callable[..., Pair]) -> None:
    p = make_pair()
    assert p.client.read() is None and p.client.pull() is None
    assert p.client.version() is None and p.client.cipher() is None
    assert p.client.max_write_size == 0
    with pytest.raises(ValueError, match="handshake has not finished"):
        p.client.write(b"early")
    with pytest.raises(ValueError):
        p.client.export_keys("EXTRACTOR-dtls_srtp", 60)
    assert p.client.feed(b"\x16\xfe\xfd" + b"\x00" * 30) == 0  # a client that has not started
    assert p.server.get_timeout() is None


def test_close_notify_reaches_peer_and_every_call_then_raises(pair: Pair) -> None:
    pair.server.write(b"last words")
    last = pair.server.pull()
    pair.client.close()
    pair.client.close()
    notify = pair.client.pull()
    assert notify is not None and notify[0] == 21 and pair.client.pull() is None
    pair.client.feed(last)  # type: ignore[arg-type]
    assert pair.client.state is ConnectionState.CLOSED
    for call in (lambda: pair.client.write(b"x"), pair.client.read, pair.client.handshake,
                 lambda: pair.client.export_keys("x", 1), pair.client.get_peer_fingerprint):
        with pytest.raises(ConnectionClosed):
            call()
    assert pair.server.feed(notify) == 0
    assert pair.server.state is ConnectionState.PEER_CLOSED
    answer = pair.server.pull()
    assert answer is not None and answer[0] == 21, "close_notify is answered"
    with pytest.raises(ConnectionClosed, match="peer closed"):
        pair.server.read()
    with pytest.raises(ConnectionClosed):
        pair.server.write(b"too late")
    assert_queue_empty()


def test_data_before_close_notify_is_still_read(pair: Pair) -> None:
    pair.client.write(b"before close")
    data = pair.client.pull()
    pair.client.close()
    notify = pair.client.pull()
    pair.server.feed(data)  # type: ignore[arg-type]
    pair.server.feed(notify)  # type: ignore[arg-type]
    assert pair.server.read() == b"before close"
    with pytest.raises(ConnectionClosed):
        pair.server.read()


def test_context_manager_closes(make_pair: Callable[..., Pair]) -> None:
    p = make_pair()
    p.handshake()
    with p.client as client:
        assert client.write(b"in block") == 8
    assert p.client.state is ConnectionState.CLOSED
    assert "closed" in repr(p.client)


def test_forged_plaintext_alert_after_handshake_is_ignored(pair: Pair) -> None:
    # epoch 0, sequence 99: a fatal handshake_failure alert anyone could spoof
    forged = bytes.fromhex("15fefd0000000000000063000202" "28")
    assert pair.client.feed(forged) == 0
    assert pair.client.state is ConnectionState.ESTABLISHED
    assert pair.roundtrip(b"unharmed", sender="server") == b"unharmed"


def test_retransmitted_last_flight_is_answered(make_pair: Callable[..., Pair]) -> None:
    p = make_pair(initial_rto=0.05)
    p.client.handshake()
    client_flight_to_server(p)
    for datagram in drain(p.client):
        p.server.feed(datagram)
    assert p.server.handshake() is FINISHED
    lost = drain(p.server)
    assert lost, "server's final flight"
    assert not p.client.is_handshake_finished()
    timeout = p.client.get_timeout()
    assert timeout is not None and 0 <= timeout <= 0.05
    time.sleep(timeout + 0.01)
    assert p.client.handle_timeout() is True
    retransmitted = drain(p.client)
    assert retransmitted
    for datagram in retransmitted:
        p.server.feed(datagram)
    answer = drain(p.server)
    assert answer, "the finished server answers a retransmitted flight"
    for datagram in answer:
        p.client.feed(datagram)
    assert p.client.handshake() is FINISHED
    assert p.roundtrip(b"after recovery") == b"after recovery"


def test_app_data_in_the_finishing_datagram_is_readable(make_pair: Callable[..., Pair]) -> None:
    p = make_pair()
    p.client.handshake()
    client_flight_to_server(p)
    for datagram in drain(p.client):
        p.server.feed(datagram)
    assert p.server.handshake() is FINISHED
    p.server.write(b"early data from server")
    datagrams = drain(p.server)
    assert len(datagrams) == 1, "final flight and the record share one datagram"
    assert p.client.feed(datagrams[0]) == 1
    assert p.client.is_handshake_finished()
    assert p.client.read() == b"early data from server"


def test_timer_runs_only_while_waiting(make_pair: Callable[..., Pair]) -> None:
    p = make_pair()
    assert p.client.get_timeout() is None
    p.client.handshake()
    timeout = p.client.get_timeout()
    assert timeout is not None and 0.9 < timeout <= 1.0
    assert p.client.handle_timeout() is False, "not due yet"
    p.handshake()
    assert p.client.get_timeout() is None and p.server.get_timeout() is None


def test_release_buffers_then_use_again(pair: Pair) -> None:
    for _ in range(3):
        assert pair.client.release_buffers() and pair.server.release_buffers()
        assert pair.roundtrip(b"after release") == b"after release"
        assert pair.roundtrip(b"reply", sender="server") == b"reply"
    pair.client.release_buffers()
    pair.client.close()
    assert pair.client.pull() is not None


def test_mtu_bounds_are_checked(certs: object) -> None:
    cert = certs.server  # type: ignore[attr-defined]
    for bad in (100, 70000):
        with pytest.raises(ValueError, match="mtu"):
            DtlsContext(cert.cert_pem, cert.key_pem, mtu=bad)
    ctx = DtlsContext(cert.cert_pem, cert.key_pem)
    with pytest.raises(ValueError, match="mtu"):
        Dtls(is_server=True, context=ctx, mtu=10)
    assert Dtls(is_server=True, context=ctx, mtu=9000).mtu == 9000


def test_jumbo_mtu_handshake_and_records(make_pair: Callable[..., Pair]) -> None:
    p = make_pair(mtu=9000)
    p.handshake()
    assert all(size <= 9000 for _, size in p.sizes)
    big = b"J" * p.client.max_write_size
    assert p.client.max_write_size > 8900
    assert p.roundtrip(big) == big
