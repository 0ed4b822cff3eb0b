"""What the fuzz targets share: certificates, contexts, live engine pairs,
recorded handshakes and the invariant checks.

Everything is made through the library itself, once per process. Cookies
use a fixed secret and a frozen clock, so a recorded ClientHello with a
cookie stays valid in every later process (the seed corpora rely on it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from .. import Certificate, ConnectionState, Dtls, DtlsContext, DtlsError, generate_certificate
from .._ffi import drain_errors, lib
from ..context import CookieSecret
from . import Finding
from ._wire import framed_records

__all__ = ["Broken", "COOKIE_ADDRESS", "Flight", "Pair", "World", "check_queue", "drain", "world"]

Layer = Literal["engine", "openssl"]

#: The address cookies of the recorded ClientHellos are bound to.
COOKIE_ADDRESS = ("192.0.2.7", 5684)
_COOKIE_SECRET = b"pydtls_ossl fuzz cookie secret, fixed for seeds"
RTO = 0.02  # the shortest the context allows: finishing a stalled handshake is quick
MAX_ROUNDS = 40


class Broken(Exception):
    """A live association could not finish or carry data; the caller decides
    whether that is a finding (after garbage only) or expected (after a
    well-formed hostile message)."""


def check_queue(where: str) -> None:
    """Finding if OpenSSL's error queue is not empty (it must be after every call)."""
    if lib.ERR_peek_error() != 0:
        reasons = drain_errors()
        raise Finding(f"OpenSSL's error queue is not empty after {where}: {list(reasons)}")


def drain(engine: Dtls) -> list[bytes]:
    out: list[bytes] = []
    while (datagram := engine.pull()) is not None:
        out.append(datagram)
    return out


class World:
    """Two certificates and the contexts for one record layer."""

    def __init__(self, layer: Layer, ciphers: str | None = None) -> None:
        self.layer = layer
        self.server_cert: Certificate = generate_certificate("fuzz-server.test")
        self.client_cert: Certificate = generate_certificate("fuzz-client.test")
        cookies = CookieSecret(_COOKIE_SECRET, period=3600.0, clock=lambda: 0.0)
        self.server_ctx = DtlsContext(self.server_cert.cert_pem, self.server_cert.key_pem,
                                      initial_rto=RTO, max_rto=RTO, cookie_secret=cookies,
                                      record_layer=layer, ciphers=ciphers)
        self.client_ctx = DtlsContext(self.client_cert.cert_pem, self.client_cert.key_pem,
                                      initial_rto=RTO, max_rto=RTO, record_layer=layer,
                                      ciphers=ciphers)
        self.server_pin = self.server_cert.fingerprint()
        self.client_pin = self.client_cert.fingerprint()

    def server(self, cookie_address: object = None) -> Dtls:
        return Dtls(is_server=True, context=self.server_ctx, peer_address=cookie_address,
                    expected_peer_fingerprint=self.client_pin)

    def client(self) -> Dtls:
        return Dtls(context=self.client_ctx,
                    expected_peer_fingerprint=self.server_pin)


_worlds: dict[tuple[str, str | None], World] = {}

#: suites beyond the default AES-128-GCM: the engine's other AEADs, and a
#: CBC suite (libssl keeps those records)
CHACHA = "ECDHE-ECDSA-CHACHA20-POLY1305"
AES256 = "ECDHE-ECDSA-AES256-GCM-SHA384"
CBC = "ECDHE-ECDSA-AES128-SHA256"


def world(layer: Layer = "engine", ciphers: str | None = None) -> World:
    key = (layer, ciphers)
    if key not in _worlds:
        _worlds[key] = World(layer, ciphers)
    return _worlds[key]


@dataclass
class Flight:
    """One datagram of a recorded handshake: who sent it, and when."""

    sender: Literal["client", "server"]
    step: int
    datagram: bytes


@dataclass
class Pair:
    """A live client and server, with the datagrams each has sent that the
    other has not received yet (held, not lost)."""

    client: Dtls
    server: Dtls
    to_client: list[bytes] = field(default_factory=list)
    to_server: list[bytes] = field(default_factory=list)
    log: list[Flight] = field(default_factory=list)

    def collect(self) -> None:
        step = len(self.log)
        for d in drain(self.client):
            self.to_server.append(d)
            self.log.append(Flight("client", step, d))
        for d in drain(self.server):
            self.to_client.append(d)
            self.log.append(Flight("server", step, d))

    def deliver(self, side: Literal["client", "server"]) -> None:
        """Give one side everything held for it, then collect what both sent."""
        engine, held = ((self.client, self.to_client) if side == "client"
                        else (self.server, self.to_server))
        batch = held[:]
        held.clear()
        for d in batch:
            engine.feed(d)
        self.step()

    def step(self) -> None:
        for engine in (self.client, self.server):
            if engine.state in (ConnectionState.NEW, ConnectionState.HANDSHAKING) and (
                    engine is self.client or engine.state is ConnectionState.HANDSHAKING):
                engine.handshake()
        self.collect()

    def established(self) -> bool:
        return self.client.is_handshake_finished() and self.server.is_handshake_finished()

    def finish(self, deadline: float = 2.0) -> None:
        """Run the handshake to its end over a lossless link, retransmitting on
        the engines' own (short) timers if it stalls. Raises HandshakeError or
        Finding."""
        try:
            self._finish(deadline)
        except DtlsError as exc:
            raise Broken(f"the handshake failed: {type(exc).__name__}: {exc}") from exc

    def _finish(self, deadline: float) -> None:
        self.step()
        limit = time.monotonic() + deadline
        rounds = 0
        while not self.established():
            for engine in (self.client, self.server):
                if engine.state is ConnectionState.FAILED:
                    engine.handshake()  # raises why
                if engine.state not in (ConnectionState.NEW, ConnectionState.HANDSHAKING,
                                        ConnectionState.ESTABLISHED):
                    raise Broken(f"the {'client' if engine is self.client else 'server'} "
                                 f"ended in {engine.state.name} during the handshake")
            if self.to_client or self.to_server:
                rounds += 1
                if rounds > MAX_ROUNDS:
                    raise Broken(f"the handshake did not finish in {MAX_ROUNDS} lossless rounds")
                if self.to_server:
                    self.deliver("server")
                if self.to_client:
                    self.deliver("client")
                continue
            if time.monotonic() > limit:
                raise Broken(f"the handshake stalled for {deadline} s with both sides waiting "
                              f"(client {self.client.state.name}, server {self.server.state.name})")
            timers = [t for t in (self.client.get_timeout(), self.server.get_timeout())
                      if t is not None]
            if not timers:
                raise Broken("the handshake stalled with no retransmission timer running "
                              f"(client {self.client.state.name}, server {self.server.state.name})")
            time.sleep(min(max(min(timers), 0.0), 0.05))
            self.client.handle_timeout()
            self.server.handle_timeout()
            self.collect()
        # the final flight (and anything else) reaches the other side
        for _ in range(4):
            if not (self.to_client or self.to_server):
                break
            if self.to_server:
                self.deliver("server")
            if self.to_client:
                self.deliver("client")

    def roundtrip(self, what: str) -> None:
        """Broken unless one record goes each way and arrives intact."""
        try:
            for src, dst, name in ((self.client, self.server, "client"),
                                   (self.server, self.client, "server")):
                self.one_way(src, dst, name, what)
        except DtlsError as exc:
            raise Broken(f"{what}: {type(exc).__name__}: {exc}") from exc

    def one_way(self, src: Dtls, dst: Dtls, name: str, what: str) -> list[bytes]:
        """One record from src to dst; returns the datagrams that carried it."""
        for d in drain(dst):  # whatever dst queued reaches src first
            src.feed(d)
        while src.read() is not None:
            pass
        payload = b"roundtrip from " + name.encode()
        src.write(payload)
        sent = drain(src)
        got: list[bytes] = []
        for d in sent:
            dst.feed(d)
        while (data := dst.read()) is not None:
            got.append(data)
        if got != [payload]:
            raise Broken(f"{what}: a record from the {name} arrived as {got!r} "
                         f"(states {self.client.state.name}/{self.server.state.name})")
        return sent


def new_pair(layer: Layer = "engine", cookie_address: object = None,
             ciphers: str | None = None) -> Pair:
    w = world(layer, ciphers)
    return Pair(w.client(), w.server(cookie_address))


def _shape(datagram: bytes) -> list[tuple[int, int, int, int]]:
    """(type, epoch, sequence, length) of each record, for messages."""
    records, _ = framed_records(datagram)
    return [(r.type, r.epoch, r.seq, len(r.body)) for r in records]


def handshake_until(pair: Pair, done: Callable[[Pair], bool], deadline: float = 2.0) -> Pair:
    """Advance a lossless handshake one delivery at a time until ``done(pair)``;
    when both sides wait, their (short) retransmission timers move it on."""
    pair.step()
    limit = time.monotonic() + deadline
    for _ in range(4 * MAX_ROUNDS):
        if done(pair):
            return pair
        if pair.to_server:
            pair.deliver("server")
        elif pair.to_client:
            pair.deliver("client")
        elif time.monotonic() < limit and any(
                e.state is ConnectionState.HANDSHAKING for e in (pair.client, pair.server)):
            timers = [t for t in (pair.client.get_timeout(), pair.server.get_timeout())
                      if t is not None]
            if not timers:
                break
            time.sleep(min(max(min(timers), 0.0), 0.05))
            pair.client.handle_timeout()
            pair.server.handle_timeout()
            pair.collect()
        else:
            break
    if not done(pair):
        why = []
        for name, engine in (("client", pair.client), ("server", pair.server)):
            try:
                engine.handshake()
            except DtlsError as exc:
                why.append(f"{name}: {type(exc).__name__}: {exc} {exc.reasons}")
            why.append(f"{name} {engine.state.name}")
        raise Finding("a fresh handshake over a lossless link did not reach the wanted "
                      f"state: {'; '.join(why)}; {len(pair.log)} datagrams "
                      f"{[(f.sender, len(f.datagram), _shape(f.datagram)) for f in pair.log]}")
    return pair


def record_handshake(layer: Layer = "engine", cookie: bool = False,
                     ciphers: str | None = None) -> Pair:
    """A whole handshake, every datagram logged, ending established."""
    pair = new_pair(layer, COOKIE_ADDRESS if cookie else None, ciphers)
    return handshake_until(pair, lambda p: p.established() and not p.to_client
                           and not p.to_server)


def expect_dtls_error(call: Callable[[], object], what: str) -> None:
    """Run ``call``; a DtlsError or ValueError is documented, anything else a Finding."""
    try:
        call()
    except (DtlsError, ValueError):
        pass
    except Exception as exc:
        raise Finding(f"{what} raised {type(exc).__name__}: {exc}") from exc
