"""Target ``server``: ``DtlsServer`` fed datagrams from addresses the input picks.

The input is a run of operations (at most ``MAX_OPS``). Each starts with one
byte: the low 3 bits are the operation, the high 5 bits its argument (an
address index, a size or a time step):

====  =========  ==========================================================
op    name       what it does
====  =========  ==========================================================
0     feed       ``feed(datagram, address)``; 2-byte big-endian length, bytes
1     live       a real client at the address sends what it has (starts one;
                 an established one restarts, as a peer that lost its state)
2     deliver    ``datagrams_to_send()`` go to the real clients, which answer
3     time       the server's clock moves ``arg / 4`` s; ``handle_timeout()``
4     send       ``send(address, ...)`` of ``8 * arg`` bytes
5     close      ``close(address)``
6     write      a real client writes a record of ``arg`` bytes
7     mutate     a real client's last datagram, XORed with a 1-byte-length mask
====  =========  ==========================================================

Address 0 is the reserved peer: a real client established at start. The
input may feed anything in its name (spoofing it), but nothing may end that
association: after each input it must still carry a record each way. Other
checks: nothing raises but what the documentation lists (``send()``:
``ConnectionClosed``, ``LimitExceeded``, ``ValueError``), OpenSSL's error
queue is empty, only real clients complete handshakes or deliver data,
peers stay within the limits. The server is rebuilt every ``REBUILD`` inputs.

Target ``server_batched`` runs the same operations through the batched
surfaces' path (``_fast.py``): each client's datagrams, and each fed one,
reach the server as one receive batch, so established peers' records go
through C and everything else is handed back to ``feed()`` mid-batch.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

from .. import ConnectionClosed, ConnectionState, Dtls, DtlsError, LimitExceeded
from .._batch_io import BatchIO
from ..server import ConnectionEstablished, ConnectionTerminated, DataReceived, DtlsServer
from . import Finding, _signal, register
from ._world import COOKIE_ADDRESS, check_queue, drain, record_handshake, world

__all__ = ["ADDRESSES", "BatchedServerTarget", "ServerTarget"]

MAX_OPS = 48
REBUILD = 500
MAX_HANDSHAKES = 6
MAX_CONNECTIONS = 10
MAX_CLIENTS = 4
RESERVED = ("203.0.113.1", 40000)
ADDRESSES: tuple[Any, ...] = (
    RESERVED,
    COOKIE_ADDRESS,                       # the recorded cookies are bound to it
    ("192.0.2.8", 5684),
    ("2001:db8::1", 5684, 0, 0),
    ("2001:db8::1", 5685, 0, 0),
    ("::ffff:192.0.2.7", 5684, 0, 0),
    ("192.0.2.7", 5685),
    ("fe80::1%eth0", 1, 0, 2),
)


def address(arg: int) -> Any:
    """Eight fixed addresses, then IPv4 and IPv6 ones made from the argument."""
    if arg < len(ADDRESSES):
        return ADDRESSES[arg]
    if arg & 1:
        return (f"2001:db8::{arg:x}", 1000 + arg, 0, 0)
    return (f"198.51.100.{arg}", 1000 + arg)


@dataclass
class Client:
    engine: Dtls
    sent: list[bytes] = field(default_factory=list)
    wrote: list[bytes] = field(default_factory=list)


class ServerTarget:
    def __init__(self) -> None:
        self.server: DtlsServer | None = None
        self.now = 0.0
        self.clients: dict[Any, Client] = {}
        self.inputs = 0
        self.recent: list[bytes] = []

    def reset(self) -> None:
        if self.server is not None:
            self.server.close_all()
        self.server = None
        self.clients = {}
        self.inputs = 0

    def history(self) -> list[bytes]:
        return list(self.recent)

    # ------------------------------------------------------------ set-up

    def _build(self) -> DtlsServer:
        self.reset()
        self.now = 1000.0
        server = DtlsServer(world().server_ctx, max_handshakes=MAX_HANDSHAKES,
                            max_connections=MAX_CONNECTIONS, handshake_timeout=10.0,
                            idle_timeout=1e9, release_after=1.0, clock=lambda: self.now)
        self.server = server
        self._live(RESERVED)
        client = self.clients[RESERVED].engine
        limit = time.monotonic() + 3.0
        while time.monotonic() < limit:
            self._deliver()
            engine = server.connection(RESERVED)
            if (engine is not None and engine.is_handshake_finished()
                    and client.is_handshake_finished()):
                break
            if not server._stateless and not server._dirty:
                # nothing in flight: a timer-driven retransmission moves it on
                time.sleep(0.01)
                self.now += 0.05
                client.handle_timeout()
                self._send_from(RESERVED, self.clients[RESERVED])
                self._time(0.0)
        else:
            raise Finding("a fresh server and client could not complete a handshake in 3 s")
        self._events()
        return server

    # -------------------------------------------------------- operations

    def _feed(self, datagram: bytes, addr: Any) -> None:
        assert self.server is not None
        try:
            self.server.feed(datagram, addr)
        except Exception as exc:
            raise Finding(f"DtlsServer.feed() raised {type(exc).__name__}: {exc}") from exc
        check_queue(f"DtlsServer.feed() from {addr!r}")

    def _live(self, addr: Any) -> None:
        client = self.clients.get(addr)
        if client is not None and addr != RESERVED and client.engine.is_handshake_finished() \
                and not drain(client.engine):
            client = None  # the peer lost its state and starts again (RFC 6347 §4.2.8)
            del self.clients[addr]
        if client is None:
            if len(self.clients) >= MAX_CLIENTS + 1:
                return
            client = self.clients[addr] = Client(world().client())
            client.engine.handshake()
        self._send_from(addr, client)

    def _send_from(self, addr: Any, client: Client) -> None:
        out = drain(client.engine)
        client.sent = (client.sent + out)[-8:]
        for d in out:
            self._feed(d, addr)

    def _deliver(self) -> None:
        assert self.server is not None
        try:
            out = self.server.datagrams_to_send()
        except Exception as exc:
            raise Finding(f"datagrams_to_send() raised {type(exc).__name__}: {exc}") from exc
        check_queue("datagrams_to_send()")
        for datagram, addr in out:
            client = self.clients.get(addr)
            if client is None:
                continue
            engine = client.engine
            engine.feed(datagram)
            if engine.state is ConnectionState.HANDSHAKING:
                try:
                    engine.handshake()
                except DtlsError:
                    pass  # a fuzzed hello in its name can make the server refuse it
            while True:
                try:
                    if engine.read() is None:
                        break
                except DtlsError:
                    break
            check_queue(f"a real client at {addr!r}")
        for addr, client in list(self.clients.items()):
            self._send_from(addr, client)

    def _time(self, step: float) -> None:
        assert self.server is not None
        self.now += step
        try:
            self.server.handle_timeout()
            self.server.get_timeout()
        except Exception as exc:
            raise Finding(f"handle_timeout() raised {type(exc).__name__}: {exc}") from exc
        check_queue("handle_timeout()")

    def _expire(self) -> None:
        """Past every handshake deadline: no handshake may be left in progress."""
        assert self.server is not None
        self._time(self.server.handshake_timeout + 1)
        if self.server.handshaking != 0:
            raise Finding(f"{self.server.handshaking} handshake(s) still counted in progress "
                          f"after every handshake deadline passed")

    def _send(self, addr: Any, size: int) -> None:
        assert self.server is not None
        try:
            self.server.send(addr, bytes(size))
        except (ConnectionClosed, LimitExceeded, ValueError):
            pass
        except Exception as exc:
            raise Finding(f"DtlsServer.send() raised {type(exc).__name__}: {exc}") from exc
        check_queue("DtlsServer.send()")

    def _write(self, addr: Any, size: int) -> None:
        client = self.clients.get(addr)
        if client is None or not client.engine.is_handshake_finished():
            return
        payload = bytes([size]) * (size + 1)
        client.engine.write(payload)
        client.wrote = (client.wrote + [payload])[-64:]
        self._send_from(addr, client)

    def _mutate(self, addr: Any, mask: bytes) -> None:
        client = self.clients.get(addr)
        if client is None or not client.sent:
            self._feed(mask, addr)
            return
        original = client.sent[-1]
        out = bytearray(original)
        for i, b in enumerate(mask):
            if i < len(out):
                out[i] ^= b
            else:
                out.append(b)
        self._feed(bytes(out), addr)

    # ------------------------------------------------------------ checks

    def _events(self) -> list[Any]:
        assert self.server is not None
        events = list(self.server.events())
        for event in events:
            addr = event.address
            if isinstance(event, ConnectionEstablished):
                client = self.clients.get(addr)
                if client is None:
                    raise Finding(f"a handshake completed with {addr!r}, where no real client is")
            elif isinstance(event, DataReceived):
                client = self.clients.get(addr)
                if client is None or event.data not in client.wrote:
                    raise Finding(f"data from {addr!r} that no real client wrote: {event.data!r}")
            elif isinstance(event, ConnectionTerminated):
                if addr == RESERVED and event.reason != "server closed":
                    raise Finding(f"the reserved association was ended: {event.reason} "
                                  f"({event.error!r})")
                client = self.clients.get(addr)
                if client is not None and event.reason != "peer restarted" and addr != RESERVED:
                    del self.clients[addr]
        return events

    def _reserved_roundtrip(self) -> None:
        server = self.server
        assert server is not None
        engine = server.connection(RESERVED)
        if engine is None or not engine.is_handshake_finished():
            raise Finding(f"the reserved association is gone: {engine!r}")
        client = self.clients[RESERVED]
        payload = b"reserved %d" % self.inputs
        client.engine.write(payload)
        client.wrote = (client.wrote + [payload])[-64:]
        self._send_from(RESERVED, client)
        got = self._events()
        data = [e.data for e in got if isinstance(e, DataReceived) and e.address == RESERVED]
        if payload not in data:
            raise Finding(f"the reserved client's record did not arrive: {got!r}")
        server.send(RESERVED, b"pong")
        out = server.datagrams_to_send()
        for datagram, addr in out:
            if addr == RESERVED:
                client.engine.feed(datagram)
        received = []
        while (record := client.engine.read()) is not None:
            received.append(record)
        if b"pong" not in received:
            raise Finding(f"the server's record did not reach the reserved client: {received!r}")
        for datagram, addr in out:
            other = self.clients.get(addr)
            if other is not None and addr != RESERVED:
                other.engine.feed(datagram)
        check_queue("the reserved roundtrip")

    # -------------------------------------------------------------- run

    def __call__(self, data: bytes) -> None:
        if self.server is None or self.inputs >= REBUILD:
            self._build()
            self.recent = []
        self.recent.append(bytes(data))  # everything since the build: enough to replay
        server = self.server
        assert server is not None
        self.inputs += 1
        pos = ops = 0
        while pos < len(data) and ops < MAX_OPS:
            head = data[pos]
            pos += 1
            ops += 1
            op, arg = head & 7, head >> 3
            addr = address(arg)
            if op == 0:
                size = int.from_bytes(data[pos:pos + 2], "big")
                self._feed(data[pos + 2:pos + 2 + size], addr)
                pos += 2 + size
            elif op == 1 and addr != RESERVED:
                self._live(addr)
            elif op == 2:
                self._deliver()
            elif op == 3 and arg == 31:
                self._expire()
            elif op == 3:
                self._time(arg / 4)
            elif op == 4 and addr != RESERVED:
                self._send(addr, 8 * arg)
            elif op == 5 and addr != RESERVED:
                self._close(addr)
            elif op == 6 and addr != RESERVED:
                self._write(addr, arg)
            elif op == 7:
                size = data[pos] if pos < len(data) else 0
                self._mutate(addr, data[pos + 1:pos + 1 + size])
                pos += 1 + size
            events = self._events()
            stats = server.stats
            _signal.feature("server", op, len(server), server.handshaking,
                            tuple(type(e).__name__ for e in events), stats.dropped > 0,
                            stats.restarts, stats.refused_by_limit > 0)
            if len(server) > MAX_CONNECTIONS or server.handshaking > MAX_HANDSHAKES:
                raise Finding(f"the limits were exceeded: {len(server)} peers, "
                              f"{server.handshaking} handshaking")
            if server.handshaking < 0:
                raise Finding(f"negative handshake count: {server.handshaking}")
        self._reserved_roundtrip()
        self._events()

    def _close(self, addr: Any) -> None:
        assert self.server is not None
        try:
            self.server.close(addr)
        except Exception as exc:
            raise Finding(f"DtlsServer.close() raised {type(exc).__name__}: {exc}") from exc
        check_queue("DtlsServer.close()")
        self.clients.pop(addr, None)


class BatchedServerTarget(ServerTarget):
    """The same operations; datagrams arrive as receive batches (see the docstring)."""

    BATCH = 8

    def __init__(self) -> None:
        super().__init__()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never bound: arrays only
        self._io = BatchIO(self._sock, batch=self.BATCH, slot=4096)

    def _build(self) -> DtlsServer:
        server = super()._build()
        server._use_fast()
        return server

    def _feed(self, datagram: bytes, addr: Any) -> None:
        self._feed_many([datagram], addr)

    def _send_from(self, addr: Any, client: Client) -> None:
        out = drain(client.engine)
        client.sent = (client.sent + out)[-8:]
        for i in range(0, len(out), self.BATCH):
            self._feed_many(out[i:i + self.BATCH], addr)

    def _feed_many(self, datagrams: list[bytes], addr: Any) -> None:
        """One receive batch from ``addr``, laid out as ``BatchIO`` lays out ``recvmmsg``'s."""
        server, io = self.server, self._io
        assert server is not None
        try:
            key = io._key(addr)
        except (OSError, ValueError):  # a zone this machine lacks: the plain path
            for datagram in datagrams:
                super()._feed(datagram, addr)
            return
        io._names[key] = addr
        n = 0
        for datagram in datagrams:
            if len(datagram) > io.slot:
                continue  # recvmmsg would drop it as truncated
            off = n * io.slot
            io._data[off:off + len(datagram)] = datagram
            io._offs[n], io._lens[n] = off, len(datagram)
            io._abuf[n * len(key):(n + 1) * len(key)] = key
            n += 1
        if not n:
            return
        try:
            server._feed_batch(io, n)
        except Exception as exc:
            raise Finding(f"a batch from {addr!r} raised {type(exc).__name__}: {exc}") from exc
        check_queue(f"a batch of {n} from {addr!r}")


_target = ServerTarget()
_batched = BatchedServerTarget()


def _op_feed(arg: int, datagram: bytes) -> bytes:
    return bytes([arg << 3 | 0]) + len(datagram).to_bytes(2, "big") + datagram


def _server_seeds() -> dict[str, bytes]:
    """Real datagrams in real orders: a cookie round, a handshake, data, a
    close, a restart; then the same datagrams spoofed at the reserved peer."""
    pair = record_handshake("engine", cookie=True)
    client_sent = [f.datagram for f in pair.log if f.sender == "client"]
    hello, hello_cookie, flight3 = client_sent[0], client_sent[1], client_sent[2]
    data = pair.one_way(pair.client, pair.server, "client", "recording")[0]
    pair.client.close()
    close = drain(pair.client)[0]
    live, deliver = bytes([2 << 3 | 1]), bytes([2])
    seeds = {
        "hello": _op_feed(1, hello),
        "hello-cookie": _op_feed(1, hello_cookie),
        "hello-cookie-flight3": _op_feed(1, hello_cookie) + _op_feed(1, flight3),
        "hello-cookie-wrong-address": _op_feed(3, hello_cookie),
        "spoof-reserved-hello": _op_feed(0, hello),
        "spoof-reserved-data": _op_feed(0, data),
        "spoof-reserved-close": _op_feed(0, close),
        "spoof-reserved-flight3": _op_feed(0, flight3),
        "handshake": live + deliver * 4 + bytes([2 << 3 | 6, 2]) + bytes([3 << 3 | 4]) + deliver,
        "handshake-close": live + deliver * 4 + bytes([2 << 3 | 5]) + deliver,
        "handshake-timeout": live + bytes([31 << 3 | 3]) * 3 + deliver,
        "restart": bytes([1 << 3 | 1]) + deliver * 4 + _op_feed(1, hello_cookie) + deliver,
        "mutate": live + deliver + bytes([2 << 3 | 7, 4, 0, 0, 0, 1]) + deliver,
        "many": b"".join(bytes([a << 3 | 1]) for a in range(8, 20)) + deliver * 3,
        "ipv6": bytes([3 << 3 | 1]) + deliver * 4 + bytes([3 << 3 | 6, 9]) + deliver,
    }
    return seeds


@register("server", "DtlsServer: cookies, peers, restarts, timers, from spoofable addresses",
          seeds=_server_seeds, max_len=4096, reset=_target.reset,
          history=_target.history)
def server(data: bytes) -> None:
    _target(data)


@register("server_batched", "DtlsServer through the batched surfaces' C path (_fast.py)",
          seeds=_server_seeds, max_len=4096, reset=_batched.reset,
          history=_batched.history)
def server_batched(data: bytes) -> None:
    _batched(data)
