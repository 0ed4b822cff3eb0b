"""The batch helper (csrc/io.c through _batch_io) over real UDP sockets on loopback."""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any, Iterator

import pytest

from pydtls_ossl import _batch_io
from pydtls_ossl._batch_io import BatchIO, PlainIO, datagram_io

pytestmark = pytest.mark.skipif(not _batch_io.lib.pd_io_available(),
                                reason="no recvmmsg/sendmmsg on this platform")
MAX_V4 = 65507  # the largest UDP payload over IPv4


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = [pytest.param("127.0.0.1", id="ipv4"),
            pytest.param("::1", id="ipv6", marks=pytest.mark.skipif(not has_ipv6(), reason="no ::1"))]


@pytest.fixture
def udp() -> Iterator[Any]:
    made: list[socket.socket] = []

    def make(host: str = "127.0.0.1") -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.bind((host, 0))
        sock.setblocking(False)
        made.append(sock)
        return sock
    yield make
    for sock in made:
        sock.close()


def collect(io: PlainIO, count: int, limit: float = 10.0) -> list[tuple[bytes, Any]]:
    """Receive until ``count`` datagrams came (or a generous bound passed)."""
    out: list[tuple[bytes, Any]] = []
    end = time.monotonic() + limit
    while len(out) < count and time.monotonic() < end:
        select.select([io.sock], [], [], 0.2)
        io.receive(lambda d, a: out.append((d, a)), 1000)
    return out


def send_all(io: PlainIO, datagrams: list[tuple[bytes, Any]]) -> None:
    done = 0
    end = time.monotonic() + 10
    while done < len(datagrams) and time.monotonic() < end:
        done += io.send(datagrams[done:])
        if done < len(datagrams):
            select.select([], [io.sock], [], 0.2)
    assert done == len(datagrams)


@pytest.mark.parametrize("host", FAMILIES)
def test_many_datagrams_of_varied_sizes_round_trip(udp: Any, host: str) -> None:
    a, b = udp(host), udp(host)
    sender, receiver = BatchIO(a), BatchIO(b)
    sizes = [0, 1, 13, 100, 1199, 1200, 1201, 1500, 9000, MAX_V4 if host[0] != ":" else 65487]
    sizes = (sizes * 30)[:300]  # more than one sendmmsg / recvmmsg chunk
    datagrams = [(os.urandom(n), b.getsockname()) for n in sizes]
    send_all(sender, datagrams)
    got = collect(receiver, len(datagrams))
    assert [d for d, _ in got] == [d for d, _ in datagrams]  # whole, in order, never merged
    assert {address for _, address in got} == {a.getsockname()}
    assert receiver.truncated == 0


@pytest.mark.parametrize("host", FAMILIES)
def test_addresses_match_recvfrom(udp: Any, host: str) -> None:
    a, b = udp(host), udp(host)
    a.sendto(b"one", b.getsockname())
    select.select([b], [], [], 5)
    _, plain_address = b.recvfrom(100)
    a.sendto(b"two", b.getsockname())
    got = collect(BatchIO(b), 1)
    assert got == [(b"two", plain_address)]


def test_truncated_datagrams_are_dropped_and_counted(udp: Any) -> None:
    a, b = udp(), udp()
    receiver = BatchIO(b, slot=1000)
    sizes = [999, 1000, 1001, 5000, 1, 1000]
    send_all(BatchIO(a), [(bytes([i]) * n, b.getsockname()) for i, n in enumerate(sizes)])
    got = collect(receiver, 4)
    end = time.monotonic() + 5
    while receiver.truncated < 2 and time.monotonic() < end:
        collect(receiver, 1, 0.2)
    assert [(len(d), d[:1]) for d, _ in got] == [(999, b"\0"), (1000, b"\1"), (1, b"\4"), (1000, b"\5")]
    assert receiver.truncated == 2


def test_one_batch_to_many_addresses(udp: Any) -> None:
    a = udp()
    receivers = [udp() for _ in range(5)]
    datagrams = [(f"{i}:{j}".encode(), receivers[i].getsockname()) for j in range(20) for i in range(5)]
    send_all(BatchIO(a), datagrams)
    for i, r in enumerate(receivers):
        got = collect(BatchIO(r), 20)
        assert [d for d, _ in got] == [f"{i}:{j}".encode() for j in range(20)]


@pytest.mark.parametrize("gro", [False, True], ids=["gso-to-plain", "gso-to-gro"])
def test_gso_runs_arrive_as_the_datagrams_sent(udp: Any, gro: bool) -> None:
    a, b, c = udp(), udp(), udp()
    sender, receiver = BatchIO(a, gso=True), BatchIO(b, gro=gro)
    run = [(bytes([i]) * 1000, b.getsockname()) for i in range(70)]  # past 64 segments
    tail = [(b"s" * 500, b.getsockname()), (b"t" * 1000, b.getsockname()), (b"x" * 7, c.getsockname())]
    datagrams = run + tail + [(b"u" * 1200, b.getsockname())] * 3
    send_all(sender, datagrams)
    got = collect(receiver, len(datagrams) - 1)
    assert [d for d, _ in got] == [d for d, addr in datagrams if addr == b.getsockname()]
    assert collect(BatchIO(c), 1) == [(b"x" * 7, a.getsockname())]


def test_plain_and_batch_interoperate(udp: Any) -> None:
    a, b = udp(), udp()
    send_all(PlainIO(a), [(b"p%d" % i, b.getsockname()) for i in range(10)])
    assert [d for d, _ in collect(BatchIO(b), 10)] == [b"p%d" % i for i in range(10)]
    send_all(BatchIO(b), [(b"q%d" % i, a.getsockname()) for i in range(10)])
    got = collect(PlainIO(a), 10)
    assert [d for d, _ in got] == [b"q%d" % i for i in range(10)]
    assert {addr for _, addr in got} == {b.getsockname()}


def test_environment_forces_the_fallback(udp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = udp()
    assert isinstance(datagram_io(sock), BatchIO)
    assert not isinstance(datagram_io(sock, batch=False), BatchIO)
    monkeypatch.setenv("PYDTLS_OSSL_BATCH_IO", "0")
    io = datagram_io(sock)
    assert type(io) is PlainIO and not io.batched
