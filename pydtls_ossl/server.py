"""``DtlsServer``: many peers on one UDP socket, sans-IO.

``feed(datagram, address)`` in; ``datagrams_to_send()`` out as
``(bytes, address)``; one timer for all peers (``get_timeout()`` /
``handle_timeout()``); events out of ``next_event()``. A ClientHello from an
unknown address without a valid cookie is answered with a
HelloVerifyRequest by one C call that allocates nothing, so a flood of
spoofed hellos costs no state. Hard limits bound handshakes, connections,
time and queued bytes; ``datagrams_to_send()`` serves peers round-robin.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

from ._errors import ConnectionClosed as ConnectionClosedError
from ._errors import ConfigurationError, DtlsError, LimitExceeded
from ._ffi import ffi, lib
from .context import DtlsContext, address_parts
from .engine import ConnectionState, Dtls
from .stores import AssociationStore

__all__ = ["AddressChanged", "ConnectionEstablished", "ConnectionEvicted", "ConnectionRestored", "ConnectionTerminated",
           "DataReceived", "DtlsServer",
           "PeerPins", "ServerEvent", "ServerStats", "ServerVerifyPeer"]

#: A socket address tuple as ``recvfrom`` gives it, or any hashable key an
#: application demultiplexing by itself uses.
Address = Any
#: Fingerprints a peer's certificate must match, per address: a mapping, or a
#: function of the address; None (or a missing key) means no pin for that peer.
Pins = Union[str, Sequence[str], None]
PeerPins = Union[Mapping[Address, Pins], Callable[[Address], Pins]]
#: ``verify_peer(address, fingerprint, psk_identity) -> bool``, asked inside
#: each handshake; False fails it with bad_certificate / unknown_psk_identity.
ServerVerifyPeer = Callable[[Address, Union[str, None], Union[str, None]], bool]
_log = logging.getLogger("pydtls_ossl")
_pd_feed = lib.pd_feed
_pd_cookie_hello = lib.pd_cookie_hello
_unpack = ffi.unpack
_NEW_HELLO = lib.PD_NEW_HELLO
_HELLO_VALID = lib.PD_HELLO_VALID
_ESTABLISHED = lib.PD_STATE_ESTABLISHED
_FAILED = lib.PD_STATE_FAILED
_CID_RECORD = b"\x19"  # tls12_cid (RFC 9146)


def _has_protected_record(datagram: bytes) -> bool:
    """Whether any record of the datagram is past epoch 0 (only those can be a stored
    association's; a stale retransmitted flight may come first)."""
    off, n = 0, len(datagram)
    while n - off >= 13:
        if datagram[off + 3] or datagram[off + 4]:
            return True
        off += 13 + int.from_bytes(datagram[off + 11:off + 13], "big")
    return False


@dataclass(frozen=True, slots=True)
class ConnectionEstablished:
    """A handshake finished. ``peer_fingerprint`` is None when the peer sent no
    certificate; ``psk_identity`` is the client's PSK identity, if it used one."""

    address: Address
    peer_fingerprint: str | None
    psk_identity: str | None = None


@dataclass(frozen=True, slots=True)
class DataReceived:
    """One record's plaintext from one peer."""

    address: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """An association ended; its state is gone. ``error`` says why when it failed."""

    address: Address
    reason: str
    error: DtlsError | None = None


@dataclass(frozen=True, slots=True)
class ConnectionEvicted:
    """A quiet peer's association moved to the association store; no state is left here."""

    address: Address


@dataclass(frozen=True, slots=True)
class ConnectionRestored:
    """A peer's association came back from the association store with its datagram."""

    address: Address
    peer_fingerprint: str | None
    psk_identity: str | None = None


@dataclass(frozen=True, slots=True)
class AddressChanged:
    """A peer's records now come from ``address`` (RFC 9146 §6): a record carrying its
    Connection ID authenticated from there and was newer than any before. Replies go
    to the new address from now on."""

    address: Address
    old_address: Address
    connection_id: bytes


ServerEvent = Union[ConnectionEstablished, DataReceived, ConnectionTerminated, ConnectionEvicted,
                    ConnectionRestored, AddressChanged]


@dataclass(slots=True)
class ServerStats:
    """Counters for monitoring: what was answered, refused or dropped."""

    hello_verify_requests: int = 0  # filled in when read through DtlsServer.stats
    handshakes_started: int = 0
    handshakes_completed: int = 0
    handshakes_failed: int = 0
    refused_by_limit: int = 0
    dropped: int = 0
    restarts: int = 0
    sends_dropped: int = 0  # send_threadsafe() records whose peer was gone or over a limit
    evicted: int = 0
    restored: int = 0
    restore_failed: int = 0  # blobs that did not open (logged), or a store that failed
    records_dropped: int = 0  # a peer's records past max_queued_records unread events
    address_changes: int = 0  # peers that moved to a new address by Connection ID


class _Peer:
    __slots__ = ("address", "engine", "conn", "established", "deadline", "last_seen",
                 "generation", "dirty", "replacement", "replacement_deadline", "cid")

    def __init__(self, address: Address, engine: Dtls, deadline: float) -> None:
        self.address = address
        self.engine = engine
        self.conn = engine._conn
        self.established = False
        self.deadline = deadline
        self.last_seen = 0.0
        self.generation = 0
        self.dirty = False
        self.replacement: Dtls | None = None
        self.replacement_deadline = 0.0
        self.cid: bytes | None = None  # ours, once negotiated (non-empty): the routing key


class DtlsServer:
    """The server side of many associations sharing one socket.

    Limits: ``max_handshakes`` in progress at once (further valid hellos are
    dropped, never allocated), ``max_connections`` in all, ``handshake_timeout``
    seconds for a handshake to finish, ``idle_timeout`` seconds of silence
    before an association is closed, ``max_queued_bytes`` of unsent data per
    peer (``send()`` raises ``LimitExceeded`` beyond it), ``max_queued_records``
    received records per peer waiting in ``events()`` (newer ones are dropped and
    counted in ``stats.records_dropped``, as a full socket buffer would). A peer quiet for
    ``release_after`` seconds gives back its buffers (~2 KB with the engine's
    record layer, ~33 KB with libssl's); they return on its next datagram.
    ``handshake_timeout`` defaults to the context's. ``clock`` (seconds,
    monotonic) is injectable for tests; retransmission timers are OpenSSL's.

    Per-peer verification, inside each handshake: ``expected_peer_fingerprint``
    maps an address to the fingerprint(s) its certificate must match (a
    mapping, or a function of the address, e.g. fed by SDP offers); a
    mismatch fails that handshake with bad_certificate. ``verify_peer(address,
    fingerprint, psk_identity) -> bool`` has the last word on each peer's
    certificate (after its pin) or PSK identity; False fails the handshake.

    Connection ID (``DtlsContext(connection_id=True)`` or a function): each
    peer gets its own CID; a CID record is routed by it, whatever its source
    address, and one that authenticates and is newer than any before moves
    the peer to that address (``AddressChanged``). With an association store,
    a peer with a CID is stored under it, so it is found from any address.
    """

    def __init__(self, context: DtlsContext, *, max_handshakes: int = 1024,
                 max_connections: int = 100_000, handshake_timeout: float | None = None,
                 idle_timeout: float = 600.0, max_queued_bytes: int = 256 * 1024,
                 release_after: float = 2.0,
                 expected_peer_fingerprint: PeerPins | None = None,
                 verify_peer: ServerVerifyPeer | None = None,
                 association_store: AssociationStore | None = None,
                 evict_after: float | None = None,
                 max_queued_records: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not context.has_certificate and context.psk_keys is None:
            raise ValueError("a DTLS server context needs cert= and key=, or psk_keys=")
        if min(max_handshakes, max_connections, max_queued_bytes) <= 0:
            raise ValueError("limits must be positive")
        if handshake_timeout is None:
            handshake_timeout = context.handshake_timeout
        if (handshake_timeout is not None and handshake_timeout <= 0) or idle_timeout <= 0 \
                or release_after <= 0:
            raise ValueError("timeouts must be positive")
        if expected_peer_fingerprint is not None and not (
                callable(expected_peer_fingerprint) or isinstance(expected_peer_fingerprint, Mapping)):
            raise TypeError("expected_peer_fingerprint must be a mapping or a function of the address")
        if verify_peer is not None and not callable(verify_peer):
            raise TypeError("verify_peer must be a function (address, fingerprint, psk_identity) -> bool")
        if expected_peer_fingerprint is not None:
            context.resumption.require_context_id("a DtlsServer that pins client certificates")
        if association_store is not None:
            if not isinstance(association_store, AssociationStore):
                raise TypeError("association_store must have put(key, blob), take(key), delete(key)")
            if not context.association_keys:
                raise ConfigurationError("an association store needs "
                                         "DtlsContext(association_keys=[...]) to seal with")
        if evict_after is not None and (association_store is None or evict_after <= 0):
            raise ValueError("evict_after (seconds) needs an association_store and must be positive")
        if max_queued_records <= 0:
            raise ValueError("max_queued_records must be positive")
        self.max_queued_records = max_queued_records
        self.association_store = association_store
        self.evict_after = float("inf") if evict_after is None else evict_after
        self.expected_peer_fingerprint = expected_peer_fingerprint
        self.verify_peer = verify_peer
        self.context = context
        self.max_handshakes = max_handshakes
        self.max_connections = max_connections
        self.handshake_timeout = float("inf") if handshake_timeout is None else handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_queued_bytes = max_queued_bytes
        self.release_after = release_after
        self._stats = ServerStats()
        self._clock = clock
        self._peers: dict[Address, _Peer] = {}
        self._handshaking = 0
        self._events: deque[ServerEvent] = deque()
        self._unread: dict[Address, int] = {}  # DataReceived events not taken yet, per peer
        self._stateless: list[tuple[bytes, Address]] = []
        self._dirty: deque[_Peer] = deque()
        self._timers: list[tuple[float, int, int, Address]] = []
        self._timer_seq = 0
        self._cookies = context.cookies
        self._hello_verify_requests = 0
        self._hvr = ffi.new("unsigned char[]", lib.PD_HVR_LEN)
        self._hvr_chars = ffi.cast("char *", self._hvr)  # unpacks to bytes, not ints
        self._foreign: deque[tuple[Address, bytes]] = deque()
        ids = context.connection_ids
        if ids is not None and not ids.generated and ids.length:
            raise ConfigurationError("a DtlsServer gives each peer its own Connection ID: use "
                                     "connection_id=True, connection_id_length=N or a function")
        self._cid_ids = ids
        self._cids: dict[bytes, _Peer] = {}
        #: Called (from the sending thread) by ``send_threadsafe()``; drivers set it.
        self.wakeup: Callable[[], None] | None = None

    # ------------------------------------------------------------- input

    def feed(self, datagram: bytes, address: Address) -> None:
        """Process one datagram received from ``address``. Never raises for its content."""
        if self._cid_ids is not None and datagram[:1] == _CID_RECORD and self._feed_cid(datagram, address):
            return
        peer = self._peers.get(address)
        if peer is None:
            if self.association_store is not None and _has_protected_record(datagram):
                peer = self._restore(address)  # maybe a stored peer's
            if peer is None:
                if self._cookie_check(datagram, address):
                    self._admit_stranger(datagram, address)
                return
        if peer.replacement is not None:
            self._feed_replacement(peer, datagram)
        conn = peer.conn
        n = _pd_feed(conn, datagram, len(datagram))
        if n > 0:
            peer.last_seen = self._clock()
            self._queue_records(peer)
        elif n == _NEW_HELLO:
            self._peer_restart(peer, datagram)
            return
        if conn.state != _ESTABLISHED:
            if n < 0 or conn.state > _ESTABLISHED:
                self._ended_by_peer(peer)
                return
            self._after_handshake_step(peer)
        elif not peer.established:
            self._after_handshake_step(peer)
        if peer.conn.out_len and not peer.dirty:
            peer.dirty = True
            self._dirty.append(peer)

    def _feed_cid(self, datagram: bytes, address: Address) -> bool:
        """Route a CID record by its CID; True when it was handled here (a peer that
        lives at another address, or one in the store). RFC 9146 §6: only a record
        that authenticates and is newer than any seen moves the peer."""
        size = self._cid_ids.length if self._cid_ids is not None else None
        if not size or len(datagram) < 13 + size:
            return False
        cid = datagram[11:11 + size]
        peer = self._cids.get(cid)
        if peer is None:
            if self.association_store is not None and address not in self._peers:
                self._restore_cid(cid, datagram, address)
                return True
            return False
        if peer.address == address:
            return False  # the usual path, by address
        n = _pd_feed(peer.conn, datagram, len(datagram))
        if lib.pd_cid_advanced(peer.conn) and peer.conn.state == _ESTABLISHED:
            self._move(peer, address)
        if n > 0:
            peer.last_seen = self._clock()
            self._queue_records(peer)
        elif n < 0 or peer.conn.state > _ESTABLISHED:
            self._ended_by_peer(peer)
            return True
        if peer.conn.out_len and not peer.dirty:
            peer.dirty = True
            self._dirty.append(peer)
        return True

    def _move(self, peer: _Peer, address: Address) -> None:
        old = peer.address
        other = self._peers.get(address)
        if other is not None and other is not peer:
            # a NAT gave this address to our peer: whoever had it has left it
            self._terminate(other, "address taken over by a Connection ID peer")
        del self._peers[old]
        peer.address = address
        self._peers[address] = peer
        self._stats.address_changes += 1
        self._events.append(AddressChanged(address, old, peer.cid or b""))
        self._arm(peer)

    def _cookie_check(self, datagram: bytes, address: Address) -> bool:
        """True for a hello with a valid cookie; otherwise answer it with a
        HelloVerifyRequest or drop it, in one C call that keeps nothing."""
        if type(address) is tuple:
            host, port = address[0].encode(), address[1]
        else:
            host, port = address_parts(address)
        r = _pd_cookie_hello(self._cookies.keys(), host, len(host), port, datagram,
                             len(datagram), self._hvr)
        if r > 0:
            self._stateless.append((_unpack(self._hvr_chars, r), address))
            self._hello_verify_requests += 1
            return False
        if r != _HELLO_VALID:
            self._stats.dropped += 1
            return False
        return True

    def _admit(self) -> bool:
        if self._handshaking >= self.max_handshakes or len(self._peers) >= self.max_connections:
            self._stats.refused_by_limit += 1
            return False
        return True

    def _pins_for(self, address: Address) -> Pins:
        pins = self.expected_peer_fingerprint
        if pins is None:
            return None
        if isinstance(pins, Mapping):
            return pins.get(address)
        return pins(address)

    def _new_engine(self, datagram: bytes, address: Address) -> Dtls | None:
        hook = self.verify_peer
        cid = None
        if self._cid_ids is not None and self._cid_ids.generated:
            for _ in range(8):  # random CIDs collide only by bad luck; a function may repeat itself
                cid = self._cid_ids.new()
                if cid not in self._cids:
                    break
            else:
                _log.warning("pydtls_ossl: connection_id function keeps returning CIDs in use")
                self._stats.refused_by_limit += 1
                return None
        try:
            engine = Dtls(is_server=True, context=self.context, connection_id=cid,
                          expected_peer_fingerprint=self._pins_for(address),
                          verify_peer=None if hook is None else (
                              lambda fingerprint, identity: hook(address, fingerprint, identity)),
                          handshake_timeout=None)  # the core keeps the deadline, on its clock
            engine._accept_hello(datagram)
        except DtlsError:
            self._stats.handshakes_failed += 1
            return None
        self._stats.handshakes_started += 1
        return engine

    def _admit_stranger(self, datagram: bytes, address: Address) -> None:
        if not self._admit():
            return
        engine = self._new_engine(datagram, address)
        if engine is None:
            return
        now = self._clock()
        peer = _Peer(address, engine, now + self.handshake_timeout)
        peer.last_seen = now
        self._peers[address] = peer
        self._handshaking += 1
        self._after_handshake_step(peer)
        if peer.conn.out_len:
            peer.dirty = True
            self._dirty.append(peer)

    def _ended_by_peer(self, peer: _Peer) -> None:
        """The last datagram failed the handshake, or carried close_notify or an alert."""
        if peer.conn.state == _FAILED:
            error = peer.engine._dead_error()
            if not peer.established:
                self._stats.handshakes_failed += 1
            self._terminate(peer, "failed" if peer.established else "handshake failed",
                            error if isinstance(error, DtlsError) else None)
        else:
            self._terminate(peer, "peer closed")

    def _after_handshake_step(self, peer: _Peer) -> None:
        if peer.conn.state == lib.PD_STATE_ESTABLISHED:
            peer.engine._drop_hook()
            peer.established = True
            self._register_cid(peer)
            self._handshaking -= 1
            self._stats.handshakes_completed += 1
            self._events.append(ConnectionEstablished(peer.address, peer.engine.get_peer_fingerprint(),
                                                      peer.engine.psk_identity()))
            self._queue_records(peer)
        self._arm(peer)

    # ------------------------------------------------ peer restart (§4.2.8)

    def _peer_restart(self, peer: _Peer, datagram: bytes) -> None:
        """A ClientHello at a live association: only a valid cookie (proof the
        sender receives at this address) starts a new handshake, and the old
        association lives on until that handshake completes."""
        if peer.replacement is not None or not self._cookie_check(datagram, peer.address):
            return
        if self._handshaking >= self.max_handshakes:
            self._stats.refused_by_limit += 1
            return
        peer.replacement = self._new_engine(datagram, peer.address)
        if peer.replacement is not None:
            self._handshaking += 1
            peer.replacement_deadline = self._clock() + self.handshake_timeout
            self._queue_replacement_output(peer)
            self._arm(peer)

    def _feed_replacement(self, peer: _Peer, datagram: bytes) -> None:
        replacement = peer.replacement
        assert replacement is not None
        replacement.feed(datagram)
        if replacement.state is ConnectionState.FAILED:
            self._drop_replacement(peer)
            return
        self._queue_replacement_output(peer)
        if replacement.is_handshake_finished():
            replacement._drop_hook()
            old = peer.engine
            self._events.append(ConnectionTerminated(peer.address, "peer restarted"))
            old.close()
            peer.engine, peer.conn, peer.replacement = replacement, replacement._conn, None
            self._handshaking -= 1
            self._stats.restarts += 1
            self._stats.handshakes_completed += 1
            self._events.append(ConnectionEstablished(peer.address, replacement.get_peer_fingerprint(),
                                                      replacement.psk_identity()))

    def _drop_replacement(self, peer: _Peer) -> None:
        assert peer.replacement is not None
        peer.replacement.close()
        peer.replacement = None
        self._handshaking -= 1
        self._stats.handshakes_failed += 1

    def _replacement_timers(self, peer: _Peer, now: float) -> None:
        """Retransmit a restarted peer's handshake, or give it up at its deadline."""
        assert peer.replacement is not None
        if now >= peer.replacement_deadline:
            self._drop_replacement(peer)
            return
        try:
            peer.replacement.handle_timeout()
        except DtlsError:
            self._drop_replacement(peer)
            return
        self._queue_replacement_output(peer)

    def _queue_replacement_output(self, peer: _Peer) -> None:
        assert peer.replacement is not None
        while (datagram := peer.replacement.pull()) is not None:
            self._stateless.append((datagram, peer.address))

    # ------------------------------------------------------------ output

    def datagrams_to_send(self, limit: int | None = None) -> list[tuple[bytes, Address]]:
        """Datagrams due now, one per peer per round so no peer starves the others."""
        if self._foreign:
            self._take_foreign_sends()
        out = self._stateless
        self._stateless = []
        dirty = self._dirty
        peers = self._peers
        while dirty and (limit is None or len(out) < limit):
            peer = dirty.popleft()
            if peers.get(peer.address) is not peer:  # evicted or replaced meanwhile
                peer.dirty = False
                continue
            datagram = peer.engine.pull()
            if datagram is None:
                peer.dirty = False
                continue
            out.append((datagram, peer.address))
            dirty.append(peer)
        return out

    def send(self, address: Address, data: bytes) -> int:
        """Queue one record to an established peer."""
        peer = self._peers.get(address)
        if peer is None or not peer.established:
            raise ConnectionClosedError(f"no established association with {address!r}")
        if peer.conn.out_len + len(data) > self.max_queued_bytes:
            raise LimitExceeded(f"more than {self.max_queued_bytes} bytes queued for {address!r}")
        n = peer.engine.write(data)
        if not peer.dirty:
            peer.dirty = True
            self._dirty.append(peer)
        return n

    def send_threadsafe(self, address: Address, data: bytes) -> None:
        """Queue one record for a peer from any thread.

        The one thread-safe entry point: everything else on a ``DtlsServer``
        belongs to the thread that drives it. The record is written by that
        thread at its next ``datagrams_to_send()``; ``wakeup`` (if set) is
        called here so a driver blocked in a wait notices. A record whose peer
        is gone by then, or that ``send()`` would refuse, is counted in
        ``stats.sends_dropped``.
        """
        self._foreign.append((address, bytes(data)))  # deque.append is atomic
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup()

    def _take_foreign_sends(self) -> None:
        foreign = self._foreign
        while foreign:
            address, data = foreign.popleft()
            try:
                self.send(address, data)
            except (DtlsError, ValueError):
                self._stats.sends_dropped += 1

    def close(self, address: Address) -> None:
        """Send close_notify to a peer and forget it."""
        peer = self._peers.get(address)
        if peer is not None:
            self._terminate(peer, "closed locally")

    def close_all(self) -> None:
        for peer in list(self._peers.values()):
            self._terminate(peer, "server closed")

    # ------------------------------------------------------------ events

    def _queue_records(self, peer: _Peer) -> None:
        """Every record the peer's engine read, as events; past ``max_queued_records``
        unread ones from this peer, newer records are dropped (and counted), so a
        flooding peer cannot make the server hold unbounded input for it."""
        engine, events, unread, address = peer.engine, self._events, self._unread, peer.address
        queued = unread.get(address, 0)
        while (data := engine.read()) is not None:
            if queued >= self.max_queued_records:
                self._stats.records_dropped += 1
                continue
            events.append(DataReceived(address, data))
            queued += 1
        if queued:
            unread[address] = queued

    def _taken(self, event: ServerEvent) -> ServerEvent:
        if type(event) is DataReceived:
            unread = self._unread
            left = unread[event.address] - 1
            if left:
                unread[event.address] = left
            else:
                del unread[event.address]
        return event

    def next_event(self) -> ServerEvent | None:
        return self._taken(self._events.popleft()) if self._events else None

    def events(self) -> Iterator[ServerEvent]:
        """Drain the pending events."""
        events, taken = self._events, self._taken
        while events:
            yield taken(events.popleft())

    # ------------------------------------------------------------ timers

    def _arm(self, peer: _Peer) -> None:
        """One heap entry per peer: its next retransmission, deadline or idle check."""
        now = self._clock()
        if peer.established:
            quiet_for = min(self.idle_timeout, self.evict_after) if peer.conn.buffers_released \
                else min(self.release_after, self.idle_timeout, self.evict_after)
            when = peer.last_seen + quiet_for
            if peer.replacement is not None:  # a restarted peer's handshake, with its own timers
                timer = peer.replacement.get_timeout()
                when = min(when, peer.replacement_deadline,
                           when if timer is None else now + timer)
        else:
            timer = peer.engine.get_timeout()
            when = peer.deadline if timer is None else min(peer.deadline, now + timer)
        peer.generation += 1
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, peer.generation, peer.address))
        if len(self._timers) > 2 * len(self._peers) + 64:
            self._compact_timers()

    def _compact_timers(self) -> None:
        peers = self._peers
        self._timers = [t for t in self._timers
                        if (p := peers.get(t[3])) is not None and p.generation == t[2]]
        heapq.heapify(self._timers)

    def _live_top(self) -> tuple[float, int, int, Address] | None:
        timers, peers = self._timers, self._peers
        while timers:
            top = timers[0]
            peer = peers.get(top[3])
            if peer is not None and peer.generation == top[2]:
                return top
            heapq.heappop(timers)
        return None

    def get_timeout(self) -> float | None:
        """Seconds until ``handle_timeout()`` is due, or None when no peer needs it."""
        top = self._live_top()
        if top is None:
            return None
        return max(0.0, top[0] - self._clock())

    def handle_timeout(self) -> None:
        """Retransmit, expire handshakes past their deadline, close idle peers."""
        now = self._clock()
        while (top := self._live_top()) is not None and top[0] <= now:
            heapq.heappop(self._timers)
            peer = self._peers[top[3]]
            if peer.established:
                if peer.replacement is not None:
                    self._replacement_timers(peer, now)
                quiet = now - peer.last_seen
                if quiet >= self.idle_timeout:
                    self._terminate(peer, "idle timeout")
                    continue
                if quiet >= self.evict_after and self._evict(peer):
                    continue
                if quiet >= self.release_after and not peer.conn.buffers_released:
                    peer.engine.release_buffers()
                self._arm(peer)
                continue
            if now >= peer.deadline:
                self._stats.handshakes_failed += 1
                self._terminate(peer, "handshake timeout", peer.engine._expire())
                continue
            try:
                peer.engine.handle_timeout()
            except DtlsError as exc:
                self._stats.handshakes_failed += 1
                self._terminate(peer, "handshake failed", exc)
                continue
            if peer.conn.out_len and not peer.dirty:
                peer.dirty = True
                self._dirty.append(peer)
            self._arm(peer)

    # ---------------------------------------------------- association store

    def _register_cid(self, peer: _Peer) -> None:
        cid = peer.engine.connection_id
        if cid:
            peer.cid = cid
            self._cids[cid] = peer

    def _forget_cid(self, peer: _Peer) -> None:
        if peer.cid is not None and self._cids.get(peer.cid) is peer:
            del self._cids[peer.cid]

    @staticmethod
    def cid_store_key(cid: bytes) -> bytes:
        """The association store's key (and the blob's binding) for a peer with a Connection ID."""
        return b"cid:" + bytes(cid).hex().encode()

    def _key_for(self, peer: _Peer) -> bytes:
        return self.cid_store_key(peer.cid) if peer.cid else self.store_key(peer.address)

    @staticmethod
    def store_key(address: Address) -> bytes:
        """The association store's key (and the blob's binding) for a peer address."""
        if type(address) is tuple:
            return f"{address[0]}|{address[1]}".encode()
        host, port = address_parts(address)
        return host if port == 0 else host + b"|%d" % port

    def _evict(self, peer: _Peer) -> bool:
        """Export a quiet peer into the store and forget it; False keeps it here."""
        store = self.association_store
        if store is None or peer.replacement is not None or peer.conn.out_len or peer.conn.plain_count:
            return False
        key = self._key_for(peer)
        try:
            blob = peer.engine.export_association(key)
        except (DtlsError, ValueError):
            return False  # e.g. libssl's record layer: such peers stay in memory
        try:
            store.put(key, blob)
        except Exception:
            _log.exception("pydtls_ossl: cannot store the association of %r; it is closed",
                           peer.address)
            self._stats.restore_failed += 1
            del self._peers[peer.address]
            self._forget_cid(peer)
            peer.generation += 1
            self._events.append(ConnectionTerminated(peer.address, "association store failed"))
            return True
        del self._peers[peer.address]
        self._forget_cid(peer)
        peer.generation += 1
        self._stats.evicted += 1
        self._events.append(ConnectionEvicted(peer.address))
        return True

    def _restore_cid(self, cid: bytes, datagram: bytes, address: Address) -> None:
        """A CID record from an address with no peer: the store may hold its association.
        It stays here only if the record authenticates; otherwise it goes back."""
        key = self.cid_store_key(cid)
        peer = self._restore(address, key)
        if peer is None:
            return
        n = _pd_feed(peer.conn, datagram, len(datagram))
        if not lib.pd_cid_advanced(peer.conn) or peer.conn.state != _ESTABLISHED:
            self._events.pop()  # its ConnectionRestored: it did not happen
            self._stats.restored -= 1
            del self._peers[address]
            self._forget_cid(peer)
            peer.generation += 1
            if peer.conn.state == _ESTABLISHED and self.association_store is not None:
                try:
                    self.association_store.put(key, peer.engine.export_association(key))
                except Exception:
                    _log.exception("pydtls_ossl: cannot put back the association of CID %s", cid.hex())
            return
        if n > 0:
            self._queue_records(peer)
        if peer.conn.out_len and not peer.dirty:
            peer.dirty = True
            self._dirty.append(peer)

    def _restore(self, address: Address, key: bytes | None = None) -> _Peer | None:
        store = self.association_store
        if store is None or len(self._peers) >= self.max_connections:
            return None
        if key is None:
            key = self.store_key(address)
        try:
            blob = store.take(key)
        except Exception:
            _log.exception("pydtls_ossl: the association store failed taking %r", address)
            self._stats.restore_failed += 1
            return None
        if blob is None:
            return None
        try:
            engine = Dtls.import_association(blob, context=self.context, binding=key)
        except DtlsError as exc:
            _log.warning("pydtls_ossl: dropped the stored association of %r: %s", address, exc)
            self._stats.restore_failed += 1
            return None
        peer = _Peer(address, engine, 0.0)
        peer.established = True
        peer.last_seen = self._clock()
        self._peers[address] = peer
        self._register_cid(peer)
        self._stats.restored += 1
        self._events.append(ConnectionRestored(address, engine.get_peer_fingerprint(),
                                               engine.psk_identity()))
        self._arm(peer)
        return peer

    def export_all(self) -> int:
        """Move every established association into the store (for a shutdown); return how many.

        Peers still shaking hands are left alone. A new server over the same
        store continues the exported ones on their next datagrams.
        """
        if self.association_store is None:
            raise ConfigurationError("export_all() needs DtlsServer(association_store=...)")
        moved = 0
        for peer in [p for p in self._peers.values() if p.established]:
            moved += self._evict(peer)
        return moved

    # ------------------------------------------------------------- state

    def _terminate(self, peer: _Peer, reason: str, error: DtlsError | None = None) -> None:
        del self._peers[peer.address]
        self._forget_cid(peer)
        if not peer.established:
            self._handshaking -= 1
        if peer.replacement is not None:
            self._handshaking -= 1
            peer.replacement.close()
        peer.engine.close()
        while (datagram := peer.engine.pull()) is not None:  # close_notify or an alert
            self._stateless.append((datagram, peer.address))
        peer.generation += 1
        self._events.append(ConnectionTerminated(peer.address, reason, error))

    def connection(self, address: Address) -> Dtls | None:
        """The engine of one peer, for introspection (cipher, fingerprints, keys)."""
        peer = self._peers.get(address)
        return peer.engine if peer is not None else None

    @property
    def stats(self) -> ServerStats:
        """Counters so far (a live object; the reply count is kept apart for speed)."""
        self._stats.hello_verify_requests = self._hello_verify_requests
        return self._stats

    @property
    def handshaking(self) -> int:
        return self._handshaking

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, address: Any) -> bool:
        return address in self._peers
