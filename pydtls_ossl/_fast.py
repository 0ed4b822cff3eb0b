"""Established peers' datagrams through C, a batch at a time (``csrc/fast.c``).

A ``DtlsServer`` driven by a batching surface (``BatchIO``: the listener,
``aio.serve``) keeps each established peer on the engine's record layer in a
C table by its raw sockaddr, as ``recvmmsg`` spells it. A received batch is
then looked up and decrypted in one C call, its records laid out back to
back; ``send()`` to such a peer seals the record in C and queues the peer
there; one call pulls every queued datagram and sends them with
``sendmmsg``. What the table does not take (strangers, handshake records,
CID records naming another peer's CID, released buffers, a state change)
goes through ``DtlsServer.feed`` as before, so every rule of the server
keeps one home.

The table borrows each peer's ``pd_conn``: ``drop()`` must come before a
peer's engine can go, which ``DtlsServer._forget`` and the two other places
that change a peer's address or engine do.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._ffi import ffi, lib

if TYPE_CHECKING:
    from ._batch_io import BatchIO

__all__ = ["FastPeers"]

_OUT_BYTES = 1 << 17  # plaintext room per input call: a full batch of 2 KB datagrams
_OUT_RECORDS = 4096
_ROOM = lib.PD_FAST_ROOM
_FED = lib.PD_FAST_FED
_pd_input = lib.pd_fast_input
_pd_waiting = lib.pd_fast_waiting
_pd_send = lib.pd_fast_send
_unpack = ffi.unpack

NOT_HERE = -1  # a peer's ``fast`` while it is not in the table


class FastPeers:
    """The C table, its slot ids' peers, and the arrays one input call fills."""

    def __init__(self) -> None:
        table = lib.pd_fast_new()
        if table == ffi.NULL:
            raise MemoryError("no memory for the server's table of active peers")
        self.table = ffi.gc(table, lib.pd_fast_free)  # DtlsServer.send() writes through it
        self.peers: list[Any] = []  # slot id -> _Peer (None: free)
        self._out = ffi.new("char[]", _OUT_BYTES)
        self._buf = ffi.buffer(self._out)
        self._ends = ffi.new("size_t[]", _OUT_RECORDS)
        self._ids = ffi.new("int[]", _OUT_RECORDS)
        self._status = ffi.new("int[3]")
        self._send_stats = ffi.new("int[3]")
        self._taken = ffi.new("int[]", 256)

    def __len__(self) -> int:
        return int(lib.pd_fast_count(self.table))

    def admit(self, peer: Any, raw: bytes) -> None:
        """Route ``raw`` (the sockaddr the peer's datagrams come from) to its engine."""
        slot = lib.pd_fast_put(self.table, raw, peer.conn)
        if slot < 0:  # its records not handed over from libssl yet, or out of memory: later
            return
        peers = self.peers
        if slot >= len(peers):
            peers.extend([None] * (slot + 1 - len(peers)))
        peers[slot] = peer
        peer.fast = slot

    def drop(self, peer: Any) -> None:
        slot = peer.fast
        if slot >= 0:
            lib.pd_fast_drop(self.table, slot)
            self.peers[slot] = None
            peer.fast = NOT_HERE

    def waiting(self) -> bool:
        """Whether records are queued here for ``send()`` (or its last call left some)."""
        return bool(_pd_waiting(self.table))

    def take_queued(self) -> list[Any]:
        """The peers with records queued here, handed to the caller to pull itself."""
        out: list[Any] = []
        taken, peers = self._taken, self.peers
        while (n := lib.pd_fast_take_dirty(self.table, taken, 256)) > 0:
            out.extend(peers[i] for i in _unpack(taken, n))
        return out

    def send(self, fd: int) -> tuple[bool, int, int]:
        """Every queued datagram to the socket: (all sent, refused by the kernel,
        records larger than the MTU dropped). False: the socket buffer filled,
        and the rest wait here until the next call."""
        stats = self._send_stats
        r = _pd_send(self.table, fd, stats)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        return r == 1, stats[1], stats[2]

    def feed(self, server: Any, io: BatchIO, count: int) -> None:
        """Datagrams [0, count) of ``io``'s last receive: the table's through C,
        every other one through ``server.feed`` (in order, per peer and in all)."""
        table, status = self.table, self._status
        arena, offs, lens, addrs = io._arena, io._offs, io._lens, io._addrs
        out, ends, ids = self._out, self._ends, self._ids
        start = 0
        while start < count:
            i = _pd_input(table, arena, offs, lens, addrs, start, count, out, _OUT_BYTES,
                          ends, ids, _OUT_RECORDS, status)
            records = status[0]
            if records:
                server._fast_records(self, records)
            if i >= count:
                return
            why = status[1]
            if why == _FED:
                server._fast_fed(self.peers[status[2]])
                start = i + 1
            elif why == _ROOM and records:
                start = i
            else:  # untouched (or larger than the record area itself): the usual path
                address = io.address_at(i)
                server.feed(io.datagram_at(i), address)
                server._fast_admit(address, io.raw_address_at(i))
                start = i + 1

    def records(self, count: int) -> tuple[list[int], list[int], Any]:
        """The last input's records: their ends, their slots, and the buffer they lie in."""
        return _unpack(self._ends, count), _unpack(self._ids, count), self._buf
