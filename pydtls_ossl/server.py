"""``DtlsServer``: many peers on one UDP socket, sans-IO.

``feed(datagram, address)`` in; ``datagrams_to_send()`` out as
``(bytes, address)``; one timer for all peers (``get_timeout()`` /
``handle_timeout()``); events out of ``next_event()``. A ClientHello from an
unknown address without a valid cookie is answered with a
HelloVerifyRequest by one C call that allocates nothing, so a flood of
spoofed hellos costs no state. Hard limits bound handshakes, connections,
time, queued bytes and the bytes handshakes and associations hold;
``datagrams_to_send()`` serves peers round-robin. With
``handshake_workers=N`` the handshake steps (the public-key work) run on N
threads while established records stay on the caller's thread.
"""

from __future__ import annotations

import heapq
import logging
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

from ._errors import ConnectionClosed as ConnectionClosedError
from ._errors import ConfigurationError, DtlsError, HandshakeError, InternalError, LimitExceeded
from ._fast import NOT_HERE as _FAST_NOT_HERE
from ._fast import FastPeers
from ._ffi import ffi, lib
from ._lot import ParkingLot, Taken
from ._workers import HandshakePool
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
_pd_read = lib.pd_read
_pd_write = lib.pd_write
_pd_pull = lib.pd_pull
_pd_cookie_hello = lib.pd_cookie_hello
_unpack = ffi.unpack
_NEW_HELLO = lib.PD_NEW_HELLO
_HELLO_VALID = lib.PD_HELLO_VALID
_ESTABLISHED = lib.PD_STATE_ESTABLISHED
_FAILED = lib.PD_STATE_FAILED
_CID_RECORD = b"\x19"  # tls12_cid (RFC 9146)
_HANDSHAKE_RECORD = b"\x16"
_pd_memory = lib.pd_memory
_FAST_FULL = lib.PD_FAST_FULL
_FAST_SLOW = lib.PD_FAST_SLOW
_pd_fast_write = lib.pd_fast_write
#: What a peer's Python objects cost beside its engine's C memory (the ``_Peer``,
#: the ``Dtls``, the cffi pointer, the address key and its timer entry; the README's
#: idle-memory breakdown measures ~0.65 KB).
_PY_PEER_BYTES = 650
#: bytes that peers ending in handle_timeout() (closed, evicted) gave back, after
#: which the heap's free pages go back to the system (glibc keeps them otherwise)
#: once the application has taken the events (events(), next_event())
_TRIM_AFTER_BYTES = 1 << 20
#: Parked peers one handle_timeout() closes or evicts at most; get_timeout() is 0
#: while more are due. A sweep of 100,000 would stall the caller for seconds and
#: queue 100,000 events at once (whose objects then pin CPython's arenas).
_EXPIRE_PER_CALL = 512
#: A handshaking peer's datagrams waiting for its step on a worker; more are dropped.
_MAX_PENDING = 64


def _has_protected_record(datagram: bytes) -> bool:
    """Whether any record of the datagram is past epoch 0 (only those can be a stored
    association's; a stale retransmitted flight may come first)."""
    off, n = 0, len(datagram)
    while n - off >= 13:
        if datagram[off + 3] or datagram[off + 4]:
            return True
        off += 13 + int.from_bytes(datagram[off + 11:off + 13], "big")
    return False


def _clear_thread_errors() -> None:
    if lib.ERR_peek_error():
        lib.ERR_clear_error()  # a worker's queue is empty between steps, as a caller's is


def _accept_step(engine: Dtls, hello: bytes) -> None:
    """On a handshake worker: start the server handshake (our first flight: ServerHello,
    certificate, signed key exchange). A failure raises the engine's error."""
    try:
        engine._accept_hello(hello)
    finally:
        _clear_thread_errors()


def _feed_step(engine: Dtls, datagram: bytes) -> tuple[int, bytes]:
    """On a handshake worker: feed a handshaking engine one datagram. A failure's error
    is built here, from this thread's OpenSSL queue and callbacks; the caller's
    thread finds it kept in the engine."""
    conn = engine._conn
    try:
        n: int = _pd_feed(conn, datagram, len(datagram))
        if (n < 0 and n != _NEW_HELLO) or conn.state > _ESTABLISHED:
            engine._dead_error()
    finally:
        _clear_thread_errors()
    return n, datagram


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


# A DataReceived per record without the frozen dataclass's __init__ (two
# object.__setattr__ calls, most of its cost): its own slot descriptors set it.
_new_event = object.__new__
_set_address = DataReceived.__dict__["address"].__set__
_set_data = DataReceived.__dict__["data"].__set__


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
    handshakes_cancelled_stale: int = 0  # stale handshakes ended to admit a new hello (budget)
    refused_handshake_memory: int = 0  # valid hellos dropped: handshake budget full, none stale
    refused_connection_memory: int = 0  # valid hellos dropped: the established budget is full
    handshake_memory: int = 0  # bytes handshaking peers hold now (read through DtlsServer.stats)
    parked: int = 0  # quiet established peers held in C alone, no Python objects (likewise)
    connection_memory: int = 0  # bytes established peers hold now (likewise)


class _Peer:
    __slots__ = ("address", "engine", "conn", "established", "deadline", "last_seen",
                 "generation", "dirty", "replacement", "replacement_deadline", "cid", "mem", "lent",
                 "fast")

    def __init__(self, address: Address, engine: Dtls, deadline: float, generation: int) -> None:
        self.address = address
        self.engine = engine
        self.conn = engine._conn
        self.established = False
        self.deadline = deadline
        self.last_seen = 0.0
        # above every generation an earlier peer at this address left in the timer heap
        self.generation = generation
        self.dirty = False
        self.replacement: Dtls | None = None
        self.replacement_deadline = 0.0
        self.cid: bytes | None = None  # ours, once negotiated (non-empty): the routing key
        # bytes this peer holds as last measured (pd_memory + Python objects), counted in
        # the server's handshake or connection total; negative while its buffers are
        # released, so the next datagram or send() knows to measure it again
        self.mem = 0
        self.lent = False  # connection() gave the application its engine: never parked
        self.fast = _FAST_NOT_HERE  # its slot in the C table of active peers (_fast.py)


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
    record layer, ~33 KB with libssl's) and is parked in C (``_lot.py``): its
    Python objects go, and on the engine's record layer its association is
    sealed under a key only this server holds (~250 bytes, the engine freed).
    It comes back, the same association, on its next datagram or any call
    that names it; a peer whose engine ``connection()`` handed out stays in memory.
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

    Memory budgets, in bytes, beside the counts: ``max_handshake_memory`` for
    peers still shaking hands, ``max_connection_memory`` for established ones
    (None: no byte budget). Each peer's bytes are estimated by one C call
    (``pd_memory``: the engine's own allocations by size, plus constants
    measured for what libssl holds in an ``SSL`` and a cipher context, see
    ``csrc/memory.c``) and Python's per-peer objects, at each handshake step,
    when the handshake ends, when a quiet peer releases its buffers and when
    it gets them back. When the handshake budget cannot take a new valid
    hello, the handshake that has been stale longest is cancelled for it
    (``ConnectionTerminated``, ``stats.handshakes_cancelled_stale``); a
    handshake is stale when its peer sent nothing for
    ``handshake_stale_after`` seconds (default: the larger of 1 s and the
    context's initial retransmission timeout). With none stale, the hello
    is dropped (``stats.refused_handshake_memory``). A new hello is also
    dropped when the established associations plus the handshakes in
    progress, each at the cost of a fresh association, would pass
    ``max_connection_memory`` (``stats.refused_connection_memory``).
    ``stats.handshake_memory`` and ``stats.connection_memory`` give the
    bytes now. A restarted peer's new handshake counts with its association.

    Offloaded handshakes: with ``handshake_workers=N``, accepting a hello and
    feeding a handshaking engine run on a pool of N threads (started with
    the first handshake; cffi releases the GIL inside libssl), while
    established peers' records are processed on the caller's thread. A
    handshaking peer has at most one step in flight; its later datagrams wait
    (up to 64) and are fed in arrival order after it. Results are applied on
    the caller's thread at its next ``feed()``, ``datagrams_to_send()``,
    ``handle_timeout()``, ``next_event()`` or ``events()``; ``wakeup`` (if
    set) is called from the worker when one is ready. Events and datagrams
    are the same as without workers. An engine is used by one thread at a
    time: while its step runs, the core leaves it alone (its timers wait,
    ``connection()`` answers None). ``verify_peer``, PSK and session
    callbacks then run on worker threads. A step that raises fails only
    its handshake (``ConnectionTerminated`` carrying the error).
    ``close_all()`` stops the threads; a later handshake starts them again.
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
                 max_handshake_memory: int | None = None,
                 max_connection_memory: int | None = None,
                 handshake_stale_after: float | None = None,
                 handshake_workers: int | None = None,
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
        for name, budget in (("max_handshake_memory", max_handshake_memory),
                             ("max_connection_memory", max_connection_memory)):
            if budget is not None and (not isinstance(budget, int) or budget <= 0):
                raise ValueError(f"{name} must be None or a positive number of bytes")
        if handshake_stale_after is None:
            handshake_stale_after = max(1.0, context.initial_rto_us / 1e6)
        if handshake_stale_after <= 0:
            raise ValueError("handshake_stale_after must be positive")
        if handshake_workers is not None and (not isinstance(handshake_workers, int)
                                              or handshake_workers < 0):
            raise ValueError("handshake_workers must be None, 0 or a positive number of threads")
        self.max_handshake_memory = max_handshake_memory
        self.max_connection_memory = max_connection_memory
        self.handshake_stale_after = handshake_stale_after
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
        self._lot = ParkingLot(context)  # quiet established peers, in C alone
        self._fast: FastPeers | None = None  # active peers by raw sockaddr, for a batching surface
        self._fast_table: Any = None  # its C table, for send()
        self._freed = 0  # bytes given back by peers ended in handle_timeout(), since the last trim
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
        self._cids: dict[bytes, _Peer] = {}  # established peers, handshakes and replacements
        self._replacement_cids: dict[_Peer, bytes] = {}
        #: Called (from the sending thread) by ``send_threadsafe()``, and from a
        #: worker thread when a handshake step's result is ready; drivers set it.
        self.wakeup: Callable[[], None] | None = None
        self._hs_bytes = 0  # what handshaking peers hold, by their last measurement
        self._conn_bytes = 0  # what established peers hold
        # the cost of a new handshake and of a new association, as last measured
        self._hello_cost = lib.PD_MEM_SSL_HANDSHAKE + 2500 + _PY_PEER_BYTES
        self._association_cost = (lib.PD_MEM_SSL_ESTABLISHED + 2500 if context.record_layer == "openssl"
                                  else 2 * lib.PD_MEM_CIPHER_CTX + 3000) + _PY_PEER_BYTES
        # handshaking peers by their last datagram's time, the quietest first
        self._progress: dict[_Peer, float] = {}
        # peers (and restarted peers' new engines) a worker holds, with the datagrams waiting for it
        self._busy: dict[Union[_Peer, Dtls], deque[bytes]] = {}
        self._doomed: set[Any] = set()  # peers (or replacements) ended while a worker held the engine
        self._replacing: dict[Dtls, _Peer] = {}  # restarted peers' new engines a worker holds
        self._collecting = False
        self._pool: HandshakePool | None = None
        self._results: deque[tuple[Any, Any, BaseException | None]] = deque()
        if handshake_workers:
            me = weakref.ref(self)  # the threads must not keep the server alive

            def notify() -> None:
                server = me()
                wakeup = None if server is None else server.wakeup
                if wakeup is not None:
                    wakeup()

            self._pool = HandshakePool(handshake_workers, notify)
            self._results = self._pool.results
            weakref.finalize(self, self._pool.stop)

    # ------------------------------------------------------------- input

    def feed(self, datagram: bytes, address: Address) -> None:
        """Process one datagram received from ``address``. Never raises for its content."""
        if self._results and not self._collecting:
            self._collect()
        if self._cid_ids is not None and datagram[:1] == _CID_RECORD and self._feed_cid(datagram, address):
            return
        peer = self._peers.get(address)
        if peer is None:
            if self._lot and (datagram[:1] == _HANDSHAKE_RECORD or _has_protected_record(datagram)):
                peer = self._unpark(address)  # not for garbage: a wake-up costs an import
            if peer is None and self.association_store is not None and _has_protected_record(datagram):
                peer = self._restore(address)  # maybe a stored peer's
            if peer is None:
                if self._cookie_check(datagram, address):
                    self._admit_stranger(datagram, address)
                return
        if not peer.established:
            self._handshake_datagram(peer, datagram)
            return
        if peer.replacement is not None:
            self._feed_replacement(peer, datagram)
        conn = peer.conn
        n = _pd_feed(conn, datagram, len(datagram))
        if peer.mem < 0:
            self._measure(peer)  # its buffers and cipher contexts came back
        if n > 0:
            peer.last_seen = self._clock()
            self._queue_records(peer)
        elif n == _NEW_HELLO:
            self._peer_restart(peer, datagram)
            return
        if conn.state != _ESTABLISHED:  # failed, or the peer closed
            self._ended_by_peer(peer)
            return
        if conn.out_len and not peer.dirty:
            peer.dirty = True
            self._dirty.append(peer)

    def _output_due(self, peer: _Peer) -> None:
        """Queue the peer for ``datagrams_to_send()`` when its engine has output."""
        if peer.conn.out_len and not peer.dirty:
            peer.dirty = True
            self._dirty.append(peer)

    def _handshake_datagram(self, peer: _Peer, datagram: bytes) -> None:
        """A datagram for a peer still shaking hands: fed here, or by a worker."""
        progress = self._progress
        progress.pop(peer, None)
        progress[peer] = self._clock()  # the quietest handshakes stay first
        if self._pool is not None:
            self._feed_on_worker(peer, peer.engine, datagram)
            return
        self._handshake_fed(peer, _pd_feed(peer.conn, datagram, len(datagram)), datagram)

    def _feed_on_worker(self, key: _Peer | Dtls, engine: Dtls, datagram: bytes) -> None:
        """Feed a handshaking engine on a worker, or queue the datagram behind the step
        that one still runs for ``key`` (past ``_MAX_PENDING`` waiting, it is dropped)."""
        pending = self._busy.get(key)
        if pending is not None:
            if len(pending) < _MAX_PENDING:
                pending.append(datagram)
            else:
                self._stats.dropped += 1
            return
        assert self._pool is not None
        self._busy[key] = deque()
        self._pool.submit(key, _feed_step, engine, datagram)

    def _handshake_fed(self, peer: _Peer, n: int, datagram: bytes) -> None:
        """What a handshaking engine's ``pd_feed`` of ``datagram`` returned, applied."""
        conn = peer.conn
        if n > 0:
            peer.last_seen = self._clock()
            self._queue_records(peer)
        elif n == _NEW_HELLO:
            self._peer_restart(peer, datagram)
            return
        if conn.state != _ESTABLISHED and (n < 0 or conn.state > _ESTABLISHED):
            self._ended_by_peer(peer)
            return
        self._after_handshake_step(peer)
        self._output_due(peer)

    def _feed_cid(self, datagram: bytes, address: Address) -> bool:
        """Route a CID record by its CID; True when it was handled here (a peer that
        lives at another address, or one in the store). RFC 9146 §6: only a record
        that authenticates and is newer than any seen moves the peer."""
        size = self._cid_ids.length if self._cid_ids is not None else None
        if not size or len(datagram) < 13 + size:
            return False
        cid = datagram[11:11 + size]
        peer = self._cids.get(cid)
        if peer is None and self._lot:
            peer = self._unpark_cid(cid)
        if peer is None:
            if self.association_store is not None and address not in self._peers:
                self._restore_cid(cid, datagram, address)
                return True
            return False
        if peer.address == address:
            return False  # the usual path, by address
        if not peer.established:
            return True  # a CID handshaking elsewhere: only its own address takes part in it
        n = _pd_feed(peer.conn, datagram, len(datagram))
        if peer.mem < 0:
            self._measure(peer)
        if lib.pd_cid_advanced(peer.conn) and peer.conn.state == _ESTABLISHED:
            self._move(peer, address)
        if n > 0:
            peer.last_seen = self._clock()
            self._queue_records(peer)
        elif n < 0 or peer.conn.state > _ESTABLISHED:
            self._ended_by_peer(peer)
            return True
        self._output_due(peer)
        return True

    def _move(self, peer: _Peer, address: Address) -> None:
        old = peer.address
        other = self._peers.get(address)
        if other is None and self._lot:
            other = self._unpark(address)
        if other is not None and other is not peer:
            # a NAT gave this address to our peer: whoever had it has left it
            self._terminate(other, "address taken over by a Connection ID peer")
        del self._peers[old]
        if peer.fast >= 0:
            self._fast_drop(peer)  # routed from its new address once it sends from there
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
        if self._handshaking >= self.max_handshakes or len(self) >= self.max_connections:
            self._stats.refused_by_limit += 1
            return False
        budget = self.max_connection_memory
        if budget is not None and \
                self._conn_bytes + (self._handshaking + 1) * self._association_cost > budget:
            self._stats.refused_connection_memory += 1
            return False
        return self.max_handshake_memory is None or self._room_for_handshake(self.max_handshake_memory)

    def _room_for_handshake(self, budget: int) -> bool:
        """Whether a new handshake fits the handshake budget, once the handshakes stale
        longest are cancelled for it (never one a worker is running)."""
        need = self._hello_cost
        if self._hs_bytes + need <= budget:
            return True
        now, stale, busy = self._clock(), self.handshake_stale_after, self._busy
        while self._hs_bytes + need > budget:
            victim = None
            for peer, seen in self._progress.items():  # the quietest first
                if now - seen < stale:
                    break
                if peer not in busy:
                    victim = peer
                    break
            if victim is None:
                self._stats.refused_handshake_memory += 1
                return False
            self._stats.handshakes_cancelled_stale += 1
            self._terminate(victim, "stale handshake cancelled for a new one (handshake memory budget)")
        return True

    def _pins_for(self, address: Address) -> Pins:
        pins = self.expected_peer_fingerprint
        if pins is None:
            return None
        if isinstance(pins, Mapping):
            return pins.get(address)
        return pins(address)

    def _pick_cid(self) -> bytes | None | bool:
        """A CID no live or handshaking peer holds (None: the context gives none;
        False: the connection_id function keeps repeating CIDs in use)."""
        if self._cid_ids is None or not self._cid_ids.generated:
            return None
        for _ in range(8):  # random CIDs collide only by bad luck; a function may repeat itself
            cid = self._cid_ids.new()
            if cid not in self._cids:
                return cid
        _log.warning("pydtls_ossl: connection_id function keeps returning CIDs in use")
        self._stats.refused_by_limit += 1
        return False

    def _new_engine(self, datagram: bytes, address: Address, accept: bool = True,
                    cid: bytes | None = None) -> Dtls | None:
        hook = self.verify_peer
        try:
            engine = Dtls(is_server=True, context=self.context, connection_id=cid,
                          expected_peer_fingerprint=self._pins_for(address),
                          verify_peer=None if hook is None else (
                              lambda fingerprint, identity: hook(address, fingerprint, identity)),
                          handshake_timeout=None)  # the core keeps the deadline, on its clock
            if accept:
                engine._accept_hello(datagram)
        except DtlsError:
            self._stats.handshakes_failed += 1
            return None
        if accept:
            self._stats.handshakes_started += 1
        return engine

    def _admit_stranger(self, datagram: bytes, address: Address) -> None:
        if not self._admit():
            return
        cid = self._pick_cid()
        if cid is False:
            return
        pool = self._pool
        engine = self._new_engine(datagram, address, accept=pool is None,
                                  cid=cid if isinstance(cid, bytes) else None)
        if engine is None:
            return
        now = self._clock()
        peer = _Peer(address, engine, now + self.handshake_timeout, self._timer_seq)
        peer.last_seen = now
        self._peers[address] = peer
        if isinstance(cid, bytes) and cid:
            peer.cid = cid  # held from now on, so no other handshake draws it
            self._cids[cid] = peer
        self._handshaking += 1
        self._progress[peer] = now
        if pool is not None:
            self._measure(peer)  # its budget share is taken now, before the step runs
            self._busy[peer] = deque()
            pool.submit(peer, _accept_step, engine, datagram)
            return
        self._after_handshake_step(peer)
        self._hello_cost = peer.mem
        self._output_due(peer)

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
            self._hs_bytes -= peer.mem  # from the handshake budget to the established one
            peer.mem = 0
            self._progress.pop(peer, None)
            peer.established = True
            self._register_cid(peer)
            self._handshaking -= 1
            self._stats.handshakes_completed += 1
            self._events.append(ConnectionEstablished(peer.address, peer.engine.get_peer_fingerprint(),
                                                      peer.engine.psk_identity()))
            self._queue_records(peer)
            self._measure(peer)
            self._association_cost = abs(peer.mem)
        else:
            self._measure(peer)
        self._arm(peer)

    # ------------------------------------------------------------ memory

    def _measure(self, peer: _Peer) -> None:
        """Measure what the peer holds now and move the server's total by the change."""
        mem = _pd_memory(peer.conn) + _PY_PEER_BYTES
        if peer.replacement is not None:
            # a worker's replacement is counted as a new hello until its step returns
            mem += self._hello_cost if peer.replacement in self._busy else \
                _pd_memory(peer.replacement._conn)
        if peer.established:
            self._conn_bytes += mem - abs(peer.mem)
            peer.mem = -mem if peer.conn.buffers_released else mem
        else:
            self._hs_bytes += mem - peer.mem
            peer.mem = mem

    def _forget_memory(self, peer: _Peer) -> None:
        if peer.established:
            self._conn_bytes -= abs(peer.mem)
        else:
            self._hs_bytes -= peer.mem
            self._progress.pop(peer, None)
        peer.mem = 0

    # ------------------------------------------------------------ workers

    def _collect(self) -> None:
        """Apply the handshake steps the workers finished, on the caller's thread, then
        feed each such peer the datagrams that arrived meanwhile, in arrival order."""
        self._collecting = True
        try:
            results, busy, peers = self._results, self._busy, self._peers
            while results:
                peer, outcome, error = results.popleft()
                pending = busy.pop(peer, None)
                if pending is None:
                    continue  # the workers were stopped meanwhile
                if type(peer) is Dtls:  # a restarted peer's new handshake
                    self._replacement_stepped(peer, outcome, error, pending)
                    continue
                live = peers.get(peer.address) is peer
                if peer in self._doomed:
                    self._doomed.discard(peer)
                    if live:
                        self._terminate(peer, "closed locally")
                    else:  # ended while the worker held its engine
                        peer.engine.close()
                    continue
                if not live:
                    continue
                if error is not None:
                    self._worker_failed(peer, error)
                elif outcome is None:  # a hello accepted: our first flight is queued
                    self._stats.handshakes_started += 1
                    self._after_handshake_step(peer)
                    self._hello_cost = peer.mem
                    self._output_due(peer)
                else:
                    self._handshake_fed(peer, outcome[0], outcome[1])
                address = peer.address
                while pending:
                    again = busy.get(peer)
                    if again is not None:  # a step of its own again: the rest waits for it
                        again.extend(pending)
                        break
                    self.feed(pending.popleft(), address)
        finally:
            self._collecting = False

    def _replacement_stepped(self, engine: Dtls, outcome: Any, error: BaseException | None,
                             pending: deque[bytes]) -> None:
        """A worker's step of a restarted peer's new handshake, applied; then the
        datagrams for it that came meanwhile."""
        peer = self._replacing.pop(engine)
        if engine in self._doomed or peer.replacement is not engine:
            self._doomed.discard(engine)
            engine.close()  # dropped (deadline, the old association ended) while it ran
            return
        if error is not None:
            self._drop_replacement(peer)
            return
        if outcome is None:
            self._stats.handshakes_started += 1
            self._queue_replacement_output(peer)
            self._measure(peer)
        else:
            self._replacement_fed(peer)
        while pending:
            if peer.replacement is engine:
                if engine in self._busy:  # a step of its own again: the rest waits for it
                    self._busy[engine].extend(pending)
                    break
                self._feed_replacement(peer, pending.popleft())
            elif peer.engine is engine and self._peers.get(peer.address) is peer:
                self.feed(pending.popleft(), peer.address)  # the new association took over
            else:
                break
        if self._peers.get(peer.address) is peer:
            self._arm(peer)  # with the new handshake's retransmission timer

    def _worker_failed(self, peer: _Peer, error: BaseException) -> None:
        if not isinstance(error, DtlsError):
            wrapped = HandshakeError(f"handshake step failed on a worker thread: "
                                     f"{type(error).__name__}: {error}")
            wrapped.__cause__ = error
            error = wrapped
        _log.debug("pydtls_ossl: handshake of %r failed on a worker: %s", peer.address, error)
        self._stats.handshakes_failed += 1
        self._terminate(peer, "handshake failed", error)

    @property
    def workers(self) -> int:
        """Handshake worker threads running now (0 without ``handshake_workers``)."""
        return 0 if self._pool is None else len(self._pool.threads)

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
        budget = self.max_connection_memory
        if budget is not None and self._conn_bytes + self._hello_cost > budget:
            self._stats.refused_connection_memory += 1  # the replacement counts with its peer
            return
        cid = self._pick_cid()
        if cid is False:
            return
        pool = self._pool
        replacement = self._new_engine(datagram, peer.address, accept=pool is None,
                                       cid=cid if isinstance(cid, bytes) else None)
        if replacement is None:
            return
        peer.replacement = replacement
        if peer.fast >= 0:
            self._fast_drop(peer)  # its datagrams go to both handshakes now: the Python path
        if isinstance(cid, bytes) and cid:
            self._cids[cid] = peer  # held for the new association (routed by address until then)
            self._replacement_cids[peer] = cid
        self._handshaking += 1
        peer.replacement_deadline = self._clock() + self.handshake_timeout
        if pool is not None:  # its public-key work on a worker, as a new peer's
            self._busy[replacement] = deque()
            self._replacing[replacement] = peer
            pool.submit(replacement, _accept_step, replacement, datagram)
        else:
            self._measure(peer)
            self._queue_replacement_output(peer)
        self._arm(peer)

    def _feed_replacement(self, peer: _Peer, datagram: bytes) -> None:
        replacement = peer.replacement
        assert replacement is not None
        if self._pool is not None:
            self._replacing[replacement] = peer
            self._feed_on_worker(replacement, replacement, datagram)
            return
        replacement.feed(datagram)
        self._replacement_fed(peer)

    def _replacement_fed(self, peer: _Peer) -> None:
        """After a datagram reached a restarted peer's new handshake: its output, its
        failure, or its completion (the new association takes the old one's place)."""
        replacement = peer.replacement
        assert replacement is not None
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
            self._release_replacement_cid(peer)
            self._forget_cid(peer)
            peer.cid = None
            self._register_cid(peer)
            self._handshaking -= 1
            self._stats.restarts += 1
            self._stats.handshakes_completed += 1
            self._events.append(ConnectionEstablished(peer.address, replacement.get_peer_fingerprint(),
                                                      replacement.psk_identity()))
            self._measure(peer)

    def _release_replacement_cid(self, peer: _Peer) -> None:
        cid = self._replacement_cids.pop(peer, None)
        if cid is not None and self._cids.get(cid) is peer and cid != peer.cid:
            del self._cids[cid]

    def _drop_replacement(self, peer: _Peer) -> None:
        assert peer.replacement is not None
        self._release_replacement_cid(peer)
        self._close_replacement(peer.replacement)
        peer.replacement = None
        self._handshaking -= 1
        self._stats.handshakes_failed += 1
        self._measure(peer)

    def _close_replacement(self, replacement: Dtls) -> None:
        if replacement in self._busy:
            self._doomed.add(replacement)  # a worker holds it: closed when its step returns
        else:
            replacement.close()

    def _replacement_timers(self, peer: _Peer, now: float) -> None:
        """Retransmit a restarted peer's handshake, or give it up at its deadline."""
        assert peer.replacement is not None
        if now >= peer.replacement_deadline:
            self._drop_replacement(peer)
            return
        if peer.replacement in self._busy:
            return  # a worker holds it; its step re-arms
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

    # ------------------------------------------------ batching surfaces

    def _use_fast(self) -> None:
        """From now on, batches from ``_feed_batch()`` route established peers through
        C, and their sends wait in C for ``_send_fast()`` (the batching surfaces call
        this; an application driving ``feed()`` and ``datagrams_to_send()`` need not)."""
        if self._fast is None:
            self._fast = FastPeers()
            self._fast_table = self._fast.table

    def _feed_batch(self, io: Any, count: int) -> None:
        """Datagrams [0, count) of a ``BatchIO`` receive, as ``feed()`` would take them
        (through the C table, which this turns on if no surface did)."""
        if self._results and not self._collecting:
            self._collect()
        if self._fast is None:
            self._use_fast()
        assert self._fast is not None
        self._fast.feed(self, io, count)

    def _fast_records(self, fast: FastPeers, count: int) -> None:
        """The records the C table just decrypted, as events (``_queue_records`` rules)."""
        ends, slots, buf = fast.records(count)
        peers, events, unread, limit = fast.peers, self._events, self._unread, self.max_queued_records
        now = self._clock()
        start = 0
        for j in range(count):
            end = ends[j]
            peer = peers[slots[j]]
            peer.last_seen = now
            address = peer.address
            queued = unread.get(address, 0)
            if queued >= limit:
                self._stats.records_dropped += 1
            else:
                event = _new_event(DataReceived)
                _set_address(event, address)
                _set_data(event, buf[start:end])
                events.append(event)
                unread[address] = queued + 1
            start = end

    def _fast_fed(self, peer: _Peer) -> None:
        """What ``feed()`` does after the engine took a datagram, for one the C table fed
        (its records already delivered) whose engine changed state or queued output."""
        if peer.conn.state != _ESTABLISHED:  # failed, or the peer closed
            self._ended_by_peer(peer)
            return
        self._output_due(peer)

    def _fast_admit(self, address: Address, raw: bytes) -> None:
        """Put the peer at ``address`` (the kernel's ``raw`` sockaddr) in the C table, once
        it is an established peer the table can take."""
        if self.context.record_layer != "engine":
            return  # libssl's record layer: the table cannot take its records
        peer = self._peers.get(address)
        if peer is None or peer.fast != _FAST_NOT_HERE or not peer.established \
                or peer.replacement is not None:
            return
        assert self._fast is not None  # only the table's own feed() asks
        self._fast.admit(peer, raw)

    def _fast_drop(self, peer: _Peer) -> None:
        assert self._fast is not None
        self._fast.drop(peer)

    def _send_fast(self, fd: int) -> bool:
        """Send what peers in the C table queued, with ``sendmmsg`` on ``fd``; False
        when the socket buffer filled (call again once it is writable)."""
        fast = self._fast
        if fast is None:
            return True
        done, refused, oversize = fast.send(fd)  # nothing queued: one C call that finds so
        if oversize:
            raise InternalError(f"{oversize} records larger than the MTU were dropped")
        if refused:
            _log.debug("pydtls_ossl: the kernel refused %d datagrams", refused)
        return done

    # ------------------------------------------------------------ output

    def datagrams_to_send(self, limit: int | None = None) -> list[tuple[bytes, Address]]:
        """Datagrams due now, one per peer per round so no peer starves the others."""
        fast = self._fast
        if fast is not None and fast.waiting():
            for peer in fast.take_queued():  # the batching surface's C queue, pulled here instead
                if not peer.dirty:
                    peer.dirty = True
                    self._dirty.append(peer)
        return self._datagrams(limit)

    def _python_output(self) -> bool:
        """Whether ``_datagrams()`` may have something to send (the queues it reads;
        what peers in the C table queued is ``_send_fast()``'s)."""
        return bool(self._stateless or self._dirty or self._foreign or self._results)

    def _datagrams(self, limit: int | None = None) -> list[tuple[bytes, Address]]:
        """``datagrams_to_send()`` but for what peers in the C table queued there."""
        if self._results and not self._collecting:
            self._collect()
        if self._foreign:
            self._take_foreign_sends()
        out = self._stateless
        self._stateless = []
        dirty = self._dirty
        peers, busy = self._peers, self._busy
        while dirty and (limit is None or len(out) < limit):
            peer = dirty.popleft()
            if peers.get(peer.address) is not peer or peer in busy:
                peer.dirty = False  # evicted or replaced meanwhile, or a worker's: later
                continue
            conn = peer.conn
            n = _pd_pull(conn) if conn.out_len else 0  # the engine's pull(), less a call
            if n <= 0:
                if n < 0:
                    raise InternalError(f"a record larger than the MTU ({conn.mtu})")
                peer.dirty = False
                continue
            out.append((_unpack(conn.data, n), peer.address))
            dirty.append(peer)
        return out

    def send(self, address: Address, data: bytes) -> int:
        """Queue one record to an established peer."""
        peer = self._peers.get(address)
        if peer is None and self._lot:
            peer = self._unpark(address)
        if peer is None or not peer.established:
            raise ConnectionClosedError(f"no established association with {address!r}")
        n: int
        if peer.fast >= 0:  # sealed and queued in C for the batched surface (_fast.py)
            try:
                n = _pd_fast_write(self._fast_table, peer.fast, data, len(data), self.max_queued_bytes)
            except TypeError:  # not bytes: the engine's write() below converts it
                n = _FAST_SLOW
            if n >= 0:
                return n
            if n == _FAST_FULL:
                raise LimitExceeded(f"more than {self.max_queued_bytes} bytes queued for {address!r}")
        conn = peer.conn
        if conn.out_len + len(data) > self.max_queued_bytes:
            raise LimitExceeded(f"more than {self.max_queued_bytes} bytes queued for {address!r}")
        try:
            n = _pd_write(conn, data, len(data))
        except TypeError:  # not bytes: the engine's write() converts it
            n = -1
        if n < 0:
            n = peer.engine.write(data)  # and raises what the engine would
        if peer.mem < 0:
            self._measure(peer)  # its cipher context came back
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
        if peer is None and self._lot:
            peer = self._unpark(address)
        if peer is None:
            return
        if peer in self._busy:
            self._doomed.add(peer)  # once its worker's step returns
        else:
            self._terminate(peer, "closed locally")

    def close_all(self) -> None:
        """Close every peer (close_notify) and stop the handshake workers (threads
        joined; a step running finishes first, its result is dropped)."""
        if self._pool is not None:
            self._pool.stop()
            self._results.clear()
            self._busy.clear()
            self._doomed.clear()
            self._replacing.clear()
        for peer in list(self._peers.values()):
            self._terminate(peer, "server closed")
        while (woken := self._wake_oldest(float("inf"))) is not None:
            self._terminate(woken, "server closed")

    # ------------------------------------------------------------ events

    def _queue_records(self, peer: _Peer) -> None:
        """Every record the peer's engine read, as events; past ``max_queued_records``
        unread ones from this peer, newer records are dropped (and counted), so a
        flooding peer cannot make the server hold unbounded input for it."""
        conn, events, unread, address = peer.conn, self._events, self._unread, peer.address
        queued = unread.get(address, 0)
        # straight from C: the engine's read() would raise once a close_notify that
        # came in the same datagram is reached, and feed() never raises for content
        while (n := _pd_read(conn)) >= 0:
            if queued >= self.max_queued_records:
                self._stats.records_dropped += 1
                continue
            event = _new_event(DataReceived)
            _set_address(event, address)
            _set_data(event, _unpack(conn.data, n))
            events.append(event)
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
        if self._results and not self._collecting:
            self._collect()
        if self._events:
            return self._taken(self._events.popleft())
        if self._freed > _TRIM_AFTER_BYTES:
            self._trim()
        return None

    def _take_events(self) -> deque[ServerEvent]:
        """Every pending event at once, for a surface that handles each one: what
        ``events()`` yields, without a generator step and an unread count per event."""
        if self._results and not self._collecting:
            self._collect()
        events = self._events
        self._events = deque()
        self._unread.clear()
        if self._freed > _TRIM_AFTER_BYTES:
            self._trim()
        return events

    def events(self) -> Iterator[ServerEvent]:
        """Drain the pending events."""
        if self._results and not self._collecting:
            self._collect()
        events, unread = self._events, self._unread
        while events:
            event = events.popleft()
            if type(event) is DataReceived:  # _taken(), less a call per record
                address = event.address
                left = unread[address] - 1
                if left:
                    unread[address] = left
                else:
                    del unread[address]
            yield event
        if self._freed > _TRIM_AFTER_BYTES:
            self._trim()

    # ------------------------------------------------------------ timers

    def _arm(self, peer: _Peer, woken: bool = False) -> None:
        """One heap entry per peer: its next retransmission, deadline or idle check
        (``woken``: out of the lot, it goes back after ``release_after`` of quiet)."""
        now = self._clock()
        if peer.established:
            quiet_for = min(self.idle_timeout, self.evict_after) if peer.conn.buffers_released \
                else min(self.release_after, self.idle_timeout, self.evict_after)
            when = peer.last_seen + quiet_for
            if woken:
                when = min(when, now + self.release_after)
            if when <= now:  # an eviction that could not be done (yet): try again later
                when = now + self.release_after
            if peer.replacement is not None:  # a restarted peer's handshake, with its own timers
                # (not read while a worker holds it: its step's result re-arms)
                timer = None if peer.replacement in self._busy else peer.replacement.get_timeout()
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
        """Seconds until ``handle_timeout()`` is due, or None when no peer needs it
        (0 while a worker's finished handshake step waits to be applied)."""
        if self._results:
            return 0.0
        top = self._live_top()
        when = None if top is None else top[0]
        oldest = self._lot.oldest_seen()
        if oldest is not None:
            parked = oldest + min(self.idle_timeout, self.evict_after)
            when = parked if when is None else min(when, parked)
        return None if when is None else max(0.0, when - self._clock())

    def handle_timeout(self) -> None:
        """Retransmit, expire handshakes past their deadline, close idle peers.

        Parked peers are closed or evicted ``_EXPIRE_PER_CALL`` (512) at a time,
        so one call never stalls the caller for a whole sweep; ``get_timeout()``
        stays 0 while more are due."""
        if self._results and not self._collecting:
            self._collect()
        now = self._clock()
        if self._freed > _TRIM_AFTER_BYTES:
            self._trim()
        held = self._conn_bytes + self._hs_bytes
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
                if quiet >= self.release_after:
                    if not peer.conn.buffers_released:
                        peer.engine.release_buffers()
                        self._measure(peer)
                    if quiet < self.evict_after and self._park(peer):
                        continue
                self._arm(peer)
                continue
            if peer in self._busy:
                continue  # a worker holds the engine; its result re-arms the timer
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
            self._output_due(peer)
            self._arm(peer)
        if self._lot:
            self._expire_parked(now)
        self._freed += max(0, held - self._conn_bytes - self._hs_bytes)

    def _trim(self) -> None:
        """Give the heap's free pages back (callers check that enough peers ended),
        once the application took the events that ended them (they hold memory too)."""
        if not self._events:
            self._freed = 0
            lib.pd_trim_heap()

    # ------------------------------------------------------------- parking

    def _park(self, peer: _Peer) -> bool:
        """Move a quiet established peer into the lot, dropping its Python objects;
        False keeps it here (output or records pending, a replacement handshake,
        a worker's, an address the lot cannot key, or an engine lent by connection())."""
        conn = peer.conn
        if peer.replacement is not None or peer.dirty or conn.out_len or conn.plain_count \
                or conn.state != _ESTABLISHED or peer in self._busy or peer.lent:
            return False
        mem = self._lot.park(peer.address, peer.cid, conn, peer.last_seen)
        if not mem:
            if conn.state != _ESTABLISHED:  # exported, then no memory to keep it: lost
                self._terminate(peer, "no memory to park the association")
            return False
        peer.engine._disown()  # the lot owns it now (or sealed it and freed it)
        self._forget(peer)
        self._conn_bytes += mem  # counted in the lot now
        return True

    def _unpark(self, address: Address) -> _Peer | None:
        """The parked peer at ``address``, back in memory (None: none parked there)."""
        taken = self._lot.take(address)
        return None if taken is None else self._wake(taken)

    def _unpark_cid(self, cid: bytes) -> _Peer | None:
        """The parked peer with our Connection ID ``cid``, back in memory at its address."""
        taken = self._lot.take_cid(cid)
        return None if taken is None else self._wake(taken)

    def _wake_oldest(self, until: float) -> _Peer | None:
        """The parked peer heard from longest ago, if at or before ``until``, in memory
        again and not armed (its caller ends it or arms it)."""
        while (taken := self._lot.take_oldest(until)) is not None:
            peer = self._wake(taken, arm=False)
            if peer is not None:
                return peer
        return None

    def _established_peer(self, address: Address, engine: Dtls, last_seen: float) -> _Peer:
        """An established association (imported, or out of the lot) back as a peer here,
        routed by address and CID and counted in the connection budget; not yet armed."""
        peer = _Peer(address, engine, 0.0, self._timer_seq)
        peer.established = True
        peer.last_seen = last_seen
        self._peers[address] = peer
        self._register_cid(peer)
        self._measure(peer)
        return peer

    def _wake(self, taken: Taken, arm: bool = True) -> _Peer | None:
        self._conn_bytes -= taken.mem
        if taken.conn is None:  # its sealed association did not import: memory ran out
            self._stats.restore_failed += 1
            _log.error("pydtls_ossl: the parked association of %r could not be imported",
                       taken.address)
            self._events.append(ConnectionTerminated(taken.address, "parked association lost"))
            return None
        peer = self._established_peer(taken.address, Dtls._adopt(taken.conn, self.context),
                                      taken.last_seen)
        if arm:
            self._arm(peer, woken=True)
        return peer

    def _expire_parked(self, now: float) -> None:
        """Parked peers past ``idle_timeout`` are closed and past ``evict_after``
        evicted, the longest quiet first: each is woken, and the usual paths end it."""
        until = now - min(self.idle_timeout, self.evict_after)
        for _ in range(_EXPIRE_PER_CALL):
            peer = self._wake_oldest(until)
            if peer is None:
                break
            if now - peer.last_seen >= self.idle_timeout:
                self._terminate(peer, "idle timeout")
            elif not self._evict(peer):
                self._arm(peer)

    # ---------------------------------------------------- association store

    def _register_cid(self, peer: _Peer) -> None:
        """Route by the CID the association negotiated (a handshake held the one it offered)."""
        cid = peer.engine.connection_id
        if peer.cid is not None and peer.cid != cid:
            self._forget_cid(peer)
            peer.cid = None
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
            self._forget(peer)
            self._events.append(ConnectionTerminated(peer.address, "association store failed"))
            return True
        self._forget(peer)
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
            self._forget(peer)
            if peer.conn.state == _ESTABLISHED and self.association_store is not None:
                # an authentic but older record (reordered, or held back by someone on the
                # path) was read: it is dropped, as a lost datagram would be
                engine = peer.engine
                while engine.read() is not None:
                    pass
                while engine.pull() is not None:
                    pass
                try:
                    self.association_store.put(key, engine.export_association(key))
                except Exception:
                    _log.exception("pydtls_ossl: cannot put back the association of CID %s", cid.hex())
                    self._stats.restore_failed += 1
                    self._events.append(ConnectionTerminated(address, "association store failed"))
            return
        self._measure(peer)
        if n > 0:
            self._queue_records(peer)
        self._output_due(peer)

    def _restore(self, address: Address, key: bytes | None = None) -> _Peer | None:
        store = self.association_store
        if store is None or len(self) >= self.max_connections:
            return None
        budget = self.max_connection_memory
        if budget is not None and self._conn_bytes + self._association_cost > budget:
            self._stats.refused_connection_memory += 1
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
        peer = self._established_peer(address, engine, self._clock())
        peer.mem = -abs(peer.mem)  # measured again at its first datagram: contexts come back
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
        while (woken := self._wake_oldest(float("inf"))) is not None:
            if self._evict(woken):
                moved += 1
            else:
                self._arm(woken)
        return moved

    # ------------------------------------------------------------- state

    def _forget(self, peer: _Peer) -> None:
        """The server lets go of a peer: its address, its CID, its bytes, its timer."""
        del self._peers[peer.address]
        if peer.fast >= 0:
            self._fast_drop(peer)
        self._forget_cid(peer)
        self._forget_memory(peer)
        peer.generation += 1

    def _terminate(self, peer: _Peer, reason: str, error: DtlsError | None = None) -> None:
        self._forget(peer)
        if not peer.established:
            self._handshaking -= 1
        if peer.replacement is not None:
            self._handshaking -= 1
            self._release_replacement_cid(peer)
            self._close_replacement(peer.replacement)
        if peer in self._busy:
            self._doomed.add(peer)  # a worker holds the engine: closed when its step returns
        else:
            peer.engine.close()
            while (datagram := peer.engine.pull()) is not None:  # close_notify or an alert
                self._stateless.append((datagram, peer.address))
        self._events.append(ConnectionTerminated(peer.address, reason, error))

    def connection(self, address: Address) -> Dtls | None:
        """The engine of one peer, for introspection (cipher, fingerprints, keys);
        None while a handshake worker holds it. The application may keep it, so
        that peer is never parked from now on (the events carry the peer's
        fingerprint and PSK identity without it)."""
        peer = self._peers.get(address)
        if peer is None and self._lot:
            peer = self._unpark(address)
        if peer is None or peer in self._busy:
            return None
        peer.lent = True
        return peer.engine

    @property
    def stats(self) -> ServerStats:
        """Counters so far (a live object; the reply count is kept apart for speed)."""
        self._stats.hello_verify_requests = self._hello_verify_requests
        self._stats.handshake_memory = self._hs_bytes
        self._stats.connection_memory = self._conn_bytes
        self._stats.parked = len(self._lot)
        return self._stats

    @property
    def handshaking(self) -> int:
        return self._handshaking

    def __len__(self) -> int:
        return len(self._peers) + len(self._lot)

    def __contains__(self, address: Any) -> bool:
        return address in self._peers or address in self._lot
