"""Targets on one ``Dtls`` engine: ``feed_client``, ``feed_server``, ``record_layer``.

Input layout of ``feed_client`` / ``feed_server``: the first byte picks the
state the engine is in (modulo the number of states), the rest is one
datagram for ``feed()``. The states are every point of a real handshake at
which the role waits for a datagram, plus established with either record
layer. Engines are kept between inputs and rebuilt when they leave their
state, fail, have seen ``ACTIONABLE_LIMIT`` well-formed plaintext messages,
or after ``USES_LIMIT`` inputs; before an engine that is still alive is
dropped, its handshake is finished with the real peer and one record goes
each way (the association survived what it was fed).

What is checked on every input:
- ``feed()`` raises nothing and returns 0 (no input here authenticates);
  ``read()`` gives None or, on a dead engine, a documented error;
- OpenSSL's error queue is empty;
- an established association stays established and carries a record each
  way;
- during the handshake a datagram may fail it only if it is a well-formed
  plaintext (epoch 0) message a stack must act on (``_wire.is_actionable_plaintext``);
  after garbage only, the handshake must still finish with the real peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from .. import ConnectionClosed, ConnectionState, Dtls, DtlsError
from . import Finding, _signal, known, register
from ._wire import frame, framed_records, is_actionable_plaintext
from ._world import (AES256, CBC, CHACHA, COOKIE_ADDRESS, Broken, Layer, Pair, check_queue, drain,
                     handshake_until, new_pair, record_handshake)

__all__ = ["CLIENT_STATES", "SERVER_STATES"]

USES_LIMIT = 64
ACTIONABLE_LIMIT = 4
Side = Literal["client", "server"]
_LIVE = (ConnectionState.NEW, ConnectionState.HANDSHAKING, ConnectionState.ESTABLISHED)


# ------------------------------------------------------------------ states

def _fresh(layer: Layer = "engine", cookie: bool = False) -> Pair:
    return new_pair(layer, COOKIE_ADDRESS if cookie else None)


def _client_hello_sent() -> Pair:
    pair = _fresh()
    pair.step()  # the client's ClientHello is held for the server
    return pair


def _client_finished_sent() -> Pair:
    # the server got the client's Finished flight and answered; the answer is held
    return handshake_until(_fresh(), lambda p: p.server.is_handshake_finished())


def _server_hello_received(cookie: bool) -> Pair:
    def done(p: Pair) -> bool:
        return p.server.state is ConnectionState.HANDSHAKING and bool(p.to_client)
    return handshake_until(_fresh(cookie=cookie), done)


def _established(layer: Layer, ciphers: str | None = None) -> Callable[[], Pair]:
    return lambda: record_handshake(layer, ciphers=ciphers)


@dataclass(frozen=True)
class State:
    name: str
    build: Callable[[], Pair]
    established: bool = False


CLIENT_STATES = (
    State("fresh", _fresh),
    State("hello-sent", _client_hello_sent),
    State("finished-sent", _client_finished_sent),
    State("established", _established("engine"), True),
    State("established-openssl", _established("openssl"), True),
    State("established-cbc", _established("engine", CBC), True),
)
SERVER_STATES = (
    State("fresh", _fresh),
    State("fresh-cookie", lambda: _fresh(cookie=True)),
    State("hello-received", lambda: _server_hello_received(False)),
    State("cookie-hello-received", lambda: _server_hello_received(True)),
    State("established", _established("engine"), True),
    State("established-openssl", _established("openssl"), True),
    State("established-cbc", _established("engine", CBC), True),
)
#: states whose records libssl carries with an AEAD (the known short-record bug)
_LIBSSL_AEAD = frozenset({"fresh", "hello-sent", "finished-sent", "fresh-cookie", "hello-received",
                          "cookie-hello-received", "established-openssl"})


@dataclass
class Slot:
    state: State
    side: Side
    pair: Pair
    uses: int = 0
    actionable: int = 0
    history: list[bytes] = field(default_factory=list)

    @property
    def victim(self) -> Dtls:
        return self.pair.client if self.side == "client" else self.pair.server

    def park_output(self) -> None:
        """What the victim sent in answer goes to its peer (delivered later)."""
        held = self.pair.to_server if self.side == "client" else self.pair.to_client
        held.extend(drain(self.victim))

    def describe(self) -> str:
        return (f"{self.side} in state {self.state.name!r} after {len(self.history)} input(s) "
                f"({self.actionable} well-formed plaintext)")


class EngineTarget:
    """``feed()`` in every state of one role; see the module docstring."""

    def __init__(self, side: Side, states: tuple[State, ...]) -> None:
        self.side = side
        self.states = states
        self.slots: dict[str, Slot] = {}
        self.current: Slot | None = None  # the slot of the last input
        self.tolerated = 0  # handshakes rightly failed by a well-formed message

    def reset(self) -> None:
        self.slots.clear()
        self.current = None

    def history(self) -> list[bytes]:
        """What the engine of the last input had seen, that input included."""
        return list(self.current.history) if self.current is not None else []

    def slot(self, state: State) -> Slot:
        slot = self.slots.get(state.name)
        if slot is None:
            slot = self.slots[state.name] = Slot(state, self.side, state.build())
            check_queue(f"building state {state.name!r}")
        return slot

    def retire(self, slot: Slot, check_alive: bool) -> None:
        """Forget the slot; if asked, first prove the association still works."""
        del self.slots[slot.state.name]
        if not check_alive:
            return
        slot.park_output()
        try:  # after a well-formed hostile message it may rightly stall: do not wait then
            slot.pair.finish(deadline=2.0 if slot.actionable == 0 else 0.0)
            slot.pair.roundtrip("after the fuzzed inputs")
        except Broken as exc:
            if slot.actionable == 0:
                raise Finding(f"garbage broke the association ({slot.describe()}): {exc}") from exc
            self.tolerated += 1
        check_queue("finishing the handshake")

    def __call__(self, data: bytes) -> None:
        state = self.states[data[0] % len(self.states)] if data else self.states[0]
        try:
            self._run(state, data)
        except Finding:
            self.slots.pop(state.name, None)
            slot = self.current
            fed = [h[1:] for h in slot.history] if slot is not None else [data[1:]]
            records = (known.LIBSSL_AEAD if state.name in _LIBSSL_AEAD else
                       known.LIBSSL_CBC if state.name == "established-cbc" else known.ENGINE)
            if known.explain(fed, records) is None:
                raise

    def _run(self, state: State, data: bytes) -> None:
        datagram = data[1:]
        self.current = None
        slot = self.current = self.slot(state)
        victim = slot.victim
        before = victim.state
        slot.uses += 1
        slot.history.append(bytes(data))
        actionable = is_actionable_plaintext(datagram)
        slot.actionable += actionable
        try:
            n = victim.feed(datagram)
        except Exception as exc:
            raise Finding(f"feed() raised {type(exc).__name__}: {exc} ({slot.describe()})") from exc
        check_queue(f"feed() ({slot.describe()})")
        if n != 0:
            raise Finding(f"feed() of an unauthenticated datagram returned {n} ({slot.describe()})")
        try:
            data_read = victim.read()
        except (DtlsError, ValueError):
            data_read = None
            if victim.state in _LIVE:
                raise
        if data_read is not None:
            raise Finding(f"read() returned {data_read!r} after garbage ({slot.describe()})")
        check_queue(f"read() ({slot.describe()})")
        after = victim.state
        conn = victim._conn
        _signal.feature(self.side, state.name, before, after, actionable, conn.alert_sent,
                        conn.alert_received, conn.out_len > 0, conn.compact, conn.buffers_released)
        if state.established:
            if after is not ConnectionState.ESTABLISHED:
                raise Finding(f"a datagram ended an established association: {after.name} "
                              f"({slot.describe()})")
            try:
                slot.pair.roundtrip("after the datagram")
            except Broken as exc:
                raise Finding(f"garbage broke an established association ({slot.describe()}): "
                              f"{exc}") from exc
            check_queue("the roundtrip")
            return
        if after not in _LIVE:
            if not actionable:
                raise Finding(f"a datagram that is not a well-formed plaintext message ended the "
                              f"handshake: {after.name} ({slot.describe()})")
            self.tolerated += 1
            self.retire(slot, check_alive=False)
            return
        slot.park_output()
        if after is not before or slot.actionable >= ACTIONABLE_LIMIT or slot.uses >= USES_LIMIT:
            self.retire(slot, check_alive=True)


_client = EngineTarget("client", CLIENT_STATES)
_server = EngineTarget("server", SERVER_STATES)


def _handshake_seeds(side: Side, states: tuple[State, ...]) -> dict[str, bytes]:
    """Every datagram of real handshakes (plain, with a cookie round, both
    record layers), each offered to the role in every state."""
    datagrams: dict[str, bytes] = {}
    for label, pair in (("plain", record_handshake("engine")),
                        ("cookie", record_handshake("engine", cookie=True)),
                        ("openssl", record_handshake("openssl")),
                        ("cbc", record_handshake("engine", ciphers=CBC))):
        for i, flight in enumerate(pair.log):
            if flight.sender != side:  # what the peer sends this role
                datagrams[f"{label}-{i}-{flight.sender}"] = flight.datagram
        peer, own = (pair.server, pair.client) if side == "client" else (pair.client, pair.server)
        datagrams[f"{label}-data"] = pair.one_way(peer, own, "peer", "recording")[0]
        peer.close()
        datagrams[f"{label}-close"] = drain(peer)[0]
    out: dict[str, bytes] = {}
    for index, state in enumerate(states):
        for name, d in datagrams.items():
            if state.established or not name.startswith(("openssl", "cbc")):
                out[f"{state.name}-{name}"] = bytes([index]) + d
        out[f"{state.name}-empty"] = bytes([index])
    return out


@register("feed_client", "Dtls.feed() of a client in every handshake state and established",
          seeds=lambda: _handshake_seeds("client", CLIENT_STATES), max_len=1500,
          reset=_client.reset,
          history=_client.history)
def feed_client(data: bytes) -> None:
    _client(data)


@register("feed_server", "Dtls.feed() of a server in every handshake state and established",
          seeds=lambda: _handshake_seeds("server", SERVER_STATES), max_len=1500,
          reset=_server.reset,
          history=_server.history)
def feed_server(data: bytes) -> None:
    _server(data)


# ------------------------------------------------------------ record layer

RESEND_LIMIT = 12  # what the engine promises at most (PD_MAX_RESENDS)
_SUITES = (None, CHACHA, AES256, None)
_RING = 80


def _mutate(live: bytes, spec: bytes) -> bytes:
    """XOR ``spec[1:]`` into ``live`` from offset ``spec[0]``; mask bytes past
    its end are appended. An all-zero mask leaves the record intact."""
    if not spec:
        return live
    offset = spec[0] % (len(live) + 1)
    out = bytearray(live)
    for i, b in enumerate(spec[1:]):
        if offset + i < len(out):
            out[offset + i] ^= b
        else:
            out.append(b)
    return bytes(out)


def _starts_new_hello(d: bytes) -> bool:
    """An established engine hands a datagram that starts with an epoch-0
    ClientHello to the server core as a restart, and reads no record of it."""
    return len(d) > 25 and d[0] == 22 and d[3] == 0 and d[4] == 0 and d[13] == 1


def _carries(datagram: bytes, record: bytes) -> bool:
    """Whether a receiver frames ``record`` intact out of ``datagram``."""
    if _starts_new_hello(datagram):
        return False
    records, _ = framed_records(datagram)
    return any(datagram[r.start:r.end] == record for r in records)


@dataclass
class Live:
    """An established engine-layer pair and the records each side has accepted."""

    pair: Pair
    seen: dict[Side, list[bytes]] = field(default_factory=lambda: {"client": [], "server": []})
    uses: int = 0
    history: list[bytes] = field(default_factory=list)  # every input since the handshake

    def engines(self, side: Side) -> tuple[Dtls, Dtls]:
        p = self.pair
        return (p.client, p.server) if side == "client" else (p.server, p.client)

    def remember(self, side: Side, datagrams: list[bytes]) -> None:
        ring = self.seen[side]
        ring.extend(datagrams)
        del ring[:-_RING]


@dataclass
class Resend:
    """A server that finished, whose last flight the client never got: the
    client's retransmitted Finished flights make it resend."""

    pair: Pair
    finished: list[tuple[bytes, bytes]] = field(default_factory=list)  # (datagram, record)
    used: set[bytes] = field(default_factory=set)
    resends: int = 0
    uses: int = 0
    history: list[bytes] = field(default_factory=list)


class RecordLayerTarget:
    """The engine's own record layer; the first byte picks the victim (bit 3)
    and the mode (low 3 bits): 0 raw datagram, 1 a fresh record from the peer
    XOR-mutated, 2 a replay, 3 ``feed_batch``, 4 the peer's close_notify
    mutated, 5 a retransmitted Finished mutated, 6 raw after
    ``release_buffers()``, 7 raw bytes then a fresh record in one datagram.
    Bits 4-5 pick the suite: AES-128-GCM, ChaCha20-Poly1305 (no explicit
    nonce), AES-256-GCM (SHA-384 PRF), AES-128-GCM."""

    def __init__(self) -> None:
        self.lives: dict[str | None, Live] = {}
        self.resend: Resend | None = None
        self.recent: list[bytes] = []

    def reset(self) -> None:
        self.lives = {}
        self.resend = None
        self.recent = []

    def history(self) -> list[bytes]:
        """Every input the pair of the last input has seen (its timers aside,
        replaying them rebuilds its state)."""
        return list(self.recent)

    def _live(self, suite: str | None) -> Live:
        live = self.lives.get(suite)
        if live is None or live.uses >= 4096:
            pair = record_handshake("engine", ciphers=suite)
            if pair.client.record_layer != "engine" or pair.server.record_layer != "engine":
                raise Finding(f"an AEAD handshake ({suite}) did not hand the records over")
            live = self.lives[suite] = Live(pair)
        return live

    def __call__(self, data: bytes) -> None:
        self.recent = [bytes(data)]
        head = data[0] if data else 0
        rest = data[1:]
        side: Side = "server" if head & 8 else "client"
        mode = head & 7
        if mode == 5:
            self._resend(rest)
            return
        suite = _SUITES[(head >> 4) & 3]
        live = self._live(suite)
        live.uses += 1
        live.history.append(bytes(data))
        self.recent = live.history
        victim, peer = live.engines(side)
        what = f"record_layer mode {mode} on the {side} ({suite or 'AES-128-GCM'})"
        expected: list[bytes] = []
        fresh: list[bytes] = []
        closing = False
        if mode == 0:
            datagrams = [rest]
        elif mode == 6:
            victim.release_buffers()
            datagrams = [rest]
        elif mode in (1, 7):
            payload, record = self._fresh(live, peer, rest[:1])
            datagram = _mutate(record, rest[1:]) if mode == 1 else rest[1:] + record
            if _carries(datagram, record):
                expected.append(payload)
                fresh.append(record)  # accepted now, a replay from then on
            datagrams = [datagram]
        elif mode == 2:
            ring = live.seen[side]
            old = ring[rest[0] % len(ring)] if ring and rest else b""
            datagrams = [old + rest[1:]]
        elif mode == 3:
            datagrams = []
            pos = 0
            while pos < len(rest) and len(datagrams) < 16:
                kind, pos = rest[pos], pos + 1
                if kind & 1:
                    payload, record = self._fresh(live, peer, bytes([kind]))
                    fresh.append(record)
                    expected.append(payload)
                    datagrams.append(record)
                else:
                    size = kind >> 1
                    datagrams.append(rest[pos:pos + size])
                    pos += size
        else:  # mode 4: the peer closes
            peer.close()
            (close_notify,) = [d for d in drain(peer)] or [b""]
            datagram = _mutate(close_notify, rest)
            closing = _carries(datagram, close_notify)
            datagrams = [datagram]
        got = self._feed(victim, datagrams, mode == 3, what)
        _signal.feature("record_layer", mode, side, len(got), len(expected), victim.state,
                        victim._conn.out_len > 0)
        live.remember(side, fresh)
        if got != expected:
            raise Finding(f"{what}: delivered {got!r}, expected {expected!r}")
        if mode == 4:
            del self.lives[suite]
            if closing:
                if victim.state is not ConnectionState.PEER_CLOSED:
                    raise Finding(f"{what}: an intact close_notify left {victim.state.name}")
                try:
                    victim.read()
                    raise Finding(f"{what}: read() after close_notify did not raise")
                except ConnectionClosed:
                    pass
                if not drain(victim):
                    raise Finding(f"{what}: close_notify was not answered")
            elif victim.state is not ConnectionState.ESTABLISHED:
                raise Finding(f"{what}: a mutated close_notify left {victim.state.name}")
            check_queue(what)
            return
        if victim.state is not ConnectionState.ESTABLISHED:
            raise Finding(f"{what}: the association ended: {victim.state.name}")
        if mode in (2, 0, 6) and drain(victim):
            raise Finding(f"{what}: the engine answered a datagram that does not authenticate")
        try:
            for src, dst, name in ((live.pair.client, live.pair.server, "client"),
                                   (live.pair.server, live.pair.client, "server")):
                sent = live.pair.one_way(src, dst, name, what)
                live.remember("server" if name == "client" else "client", sent)
        except (Broken, DtlsError) as exc:
            raise Finding(f"{what}: the association no longer carries records: {exc}") from exc
        check_queue(what)

    def _fresh(self, live: Live, peer: Dtls, size: bytes) -> tuple[bytes, bytes]:
        """One new record from the peer: (payload, the datagram carrying it)."""
        length = 1 + (size[0] * 5 if size else 0) % peer.max_write_size
        payload = bytes((i * 7 + len(live.seen["client"])) & 0xFF for i in range(length))
        peer.write(payload)
        (datagram,) = drain(peer)
        return payload, datagram

    def _feed(self, victim: Dtls, datagrams: list[bytes], batch: bool, what: str) -> list[bytes]:
        try:
            if batch:
                got = victim.feed_batch(datagrams)
            else:
                got = []
                for d in datagrams:
                    victim.feed(d)
                    while (data := victim.read()) is not None:
                        got.append(data)
        except (ConnectionClosed, DtlsError) as exc:
            if victim.state in _LIVE:
                raise Finding(f"{what}: {type(exc).__name__} from a live engine: {exc}") from exc
            got = []
        except Exception as exc:
            raise Finding(f"{what}: {type(exc).__name__}: {exc}") from exc
        check_queue(what)
        return got

    # ------------------------------------------------ resent last flight

    def _resend_slot(self) -> Resend:
        slot = self.resend
        if slot is None or slot.uses >= 512:
            if slot is not None:
                self._resend_finish(slot)
            pair = handshake_until(new_pair("engine"), lambda p: p.server.is_handshake_finished())
            pair.to_client.clear()  # the server's last flight is lost
            slot = self.resend = Resend(pair)
        client = slot.pair.client
        if client.state is ConnectionState.HANDSHAKING and client.get_timeout() == 0:
            try:  # a fresh retransmission, no waiting: the timer ran out
                client.handle_timeout()
            except DtlsError:
                pass  # it gives up after a dozen: the flights it sent stay usable
            for d in drain(client):
                finished = [d[r.start:r.end] for r in frame(d) or () if r.epoch == 1]
                if finished:
                    slot.finished.append((d, finished[0]))
        return slot

    def _resend(self, spec: bytes) -> None:
        slot = self._resend_slot()
        slot.uses += 1
        slot.history.append(bytes([5]) + spec)
        self.recent = slot.history
        server = slot.pair.server
        what = "record_layer mode 5 (retransmitted Finished) on the server"
        if not slot.finished:
            datagram = spec
            expect = False
        else:
            original, record = slot.finished[spec[0] % len(slot.finished) if spec else -1]
            datagram = _mutate(original, spec[1:])
            expect = (_carries(datagram, record) and record not in slot.used
                      and slot.resends < RESEND_LIMIT)
            if _carries(datagram, record):
                slot.used.add(record)
        got = self._feed(server, [datagram], False, what)
        if got:
            raise Finding(f"{what}: delivered {got!r}")
        if server.state is not ConnectionState.ESTABLISHED:
            raise Finding(f"{what}: the association ended: {server.state.name}")
        resent = drain(server)
        _signal.feature("resend", expect, len(resent), slot.resends, len(slot.finished) > 0)
        if bool(resent) != expect:
            raise Finding(f"{what}: {'no ' if expect else ''}resend "
                          f"(fresh intact Finished: {expect}, resends so far {slot.resends})")
        if resent:
            slot.resends += 1
            slot.pair.to_client[:] = resent  # only the newest flight matters
        check_queue(what)

    def _resend_finish(self, slot: Resend) -> None:
        """The client finishes with the newest resent flight, if it is still waiting."""
        if not slot.pair.to_client or slot.pair.client.state is not ConnectionState.HANDSHAKING:
            return
        slot.pair.deliver("client")
        if not slot.pair.client.is_handshake_finished():
            raise Finding("a resent last flight did not finish the client's handshake")
        try:
            slot.pair.roundtrip("after a resent flight")
        except Broken as exc:
            raise Finding(f"after a resent flight: {exc}") from exc
        check_queue("finishing with a resent flight")


_record_layer = RecordLayerTarget()


def _record_layer_seeds() -> dict[str, bytes]:
    """Protected records of a real association: data, close_notify, a
    retransmitted Finished, each under every mode that takes raw bytes."""
    out: dict[str, bytes] = {}
    pair = record_handshake("engine")
    last = pair.log[-1].datagram  # the server's last flight (CCS, Finished)
    pair.client.write(b"application data")
    data_c = drain(pair.client)[0]
    pair.server.write(b"x" * 600)
    data_s = drain(pair.server)[0]
    pair.client.close()
    close_c = drain(pair.client)[0]
    for side in (0, 8):
        for name, d in (("data-c", data_c), ("data-s", data_s), ("close", close_c),
                        ("last-flight", last)):
            out[f"raw-{side}-{name}"] = bytes([side | 0]) + d
            out[f"released-{side}-{name}"] = bytes([side | 6]) + d
        out[f"live-{side}-intact"] = bytes([side | 1, 3])
        out[f"live-{side}-flip"] = bytes([side | 1, 40, 20, 1])
        out[f"live-{side}-tail"] = bytes([side | 1, 9, 255, 0, 0, 0, 0x17])
        out[f"replay-{side}"] = bytes([side | 2, 0])
        out[f"replay-{side}-tail"] = bytes([side | 2, 1]) + data_c[:20]
        out[f"batch-{side}"] = bytes([side | 3, 1, 24]) + data_c[:12] + bytes([3, 0, 5])
        out[f"close-{side}-intact"] = bytes([side | 4])
        out[f"close-{side}-flip"] = bytes([side | 4, 20, 1])
        out[f"prefix-{side}"] = bytes([side | 7, 2]) + data_s
    for bits, suite in ((16, "chacha"), (32, "aes256")):
        out[f"live-{suite}"] = bytes([bits | 1, 3])
        out[f"live-{suite}-flip"] = bytes([bits | 9, 40, 20, 1])
        out[f"batch-{suite}"] = bytes([bits | 3, 1, 24]) + data_c[:12] + bytes([3, 0, 5])
        out[f"close-{suite}"] = bytes([bits | 12])
        out[f"raw-{suite}"] = bytes([bits | 8]) + data_c
    out["resend-intact"] = bytes([5, 0])
    out["resend-flip"] = bytes([5, 0, 200, 1])
    out["resend-raw"] = bytes([5]) + last
    return out


@register("record_layer", "the engine's own record layer after the handover, and feed_batch",
          seeds=_record_layer_seeds, max_len=1500, reset=_record_layer.reset,
          history=_record_layer.history)
def record_layer(data: bytes) -> None:
    _record_layer(data)
