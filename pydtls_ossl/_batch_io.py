"""Many datagrams per system call for the socket surfaces (``csrc/io.c``).

``datagram_io(sock)`` gives a ``BatchIO`` (Linux: ``recvmmsg``/``sendmmsg``
into one arena the object owns) or, elsewhere or with
``PYDTLS_OSSL_BATCH_IO=0`` in the environment, a ``PlainIO`` doing the same
with ``recvfrom``/``sendto``. Both keep datagram semantics: one datagram in,
one ``feed`` call; one ``(bytes, address)`` out, one datagram on the wire;
a datagram longer than the receive slot is dropped and counted in
``truncated``, never handed on cut short. Addresses are the tuples
``recvfrom`` gives, so a ``DtlsServer`` keyed by them sees no difference.

Only the socket surfaces use this module; the sans-IO layers never do.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
from typing import Any, Callable, Sequence

from ._ffi import ffi, lib

__all__ = ["BatchIO", "PlainIO", "batch_available", "datagram_io", "will_batch"]

Address = Any
Feed = Callable[[bytes, Address], None]
_ADDR = lib.PD_IO_ADDR_LEN
_CHUNK = lib.PD_IO_CHUNK
_MAX_DATAGRAM = 65535
_SOFT_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE)
_NAMES_MAX = 1 << 18  # cached address conversions (both ways), cleared beyond this
_AF_INET6_KEY = struct.pack("=H", socket.AF_INET6)
_pd_recv = lib.pd_io_recv
_pd_send = lib.pd_io_send
_unpack = ffi.unpack


def batch_available() -> bool:
    """Whether this build and platform batch (Linux), and the environment allows it."""
    if os.environ.get("PYDTLS_OSSL_BATCH_IO", "1").strip().lower() in ("0", "no", "off", "false"):
        return False
    return bool(lib.pd_io_available())


class PlainIO:
    """The fallback: one ``recvfrom``/``sendto`` per datagram, the same interface."""

    batched = False

    def __init__(self, sock: socket.socket, batch: int = 64) -> None:
        self.sock = sock
        self.batch = batch
        self.truncated = 0
        self.send_failed = 0

    def receive(self, feed: Feed, limit: int = 64) -> int:
        """Feed up to ``limit`` waiting datagrams to ``feed(datagram, address)``; return how many."""
        recvfrom, n = self.sock.recvfrom, 0
        while n < limit:
            try:
                datagram, address = recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # ICMP errors surface here on some platforms
            feed(datagram, address)
            n += 1
        return n

    def receive_into(self, server: Any, limit: int = 64) -> int:
        """Feed up to ``limit`` waiting datagrams to a ``DtlsServer``; return how many."""
        return self.receive(server.feed, limit)

    def recv_batch(self, limit: int = 64) -> list[tuple[bytes, Address]]:
        out: list[tuple[bytes, Address]] = []
        self.receive(lambda d, a: out.append((d, a)), limit)
        return out

    def send(self, datagrams: Sequence[tuple[bytes, Address]]) -> int:
        """Send each datagram; return how many left (the rest wait for a full buffer)."""
        sendto = self.sock.sendto
        for i, (datagram, address) in enumerate(datagrams):
            try:
                sendto(datagram, address)
            except (BlockingIOError, InterruptedError):
                return i
            except OSError:
                self.send_failed += 1
        return len(datagrams)


class BatchIO(PlainIO):
    """``recvmmsg``/``sendmmsg`` through ``csrc/io.c``: one call per batch each way.

    ``slot`` bytes per received datagram (64 KiB: any UDP payload fits, so
    nothing is ever truncated unless ``slot`` is set lower); ``gso=True``
    sends runs of equal-size datagrams to one address as one UDP_SEGMENT
    message, ``gro=True`` asks the kernel for coalesced receives (split back
    here). Both off by default: in request/response traffic consecutive
    datagrams to one address are rare, and on loopback neither was a gain.
    """

    batched = True

    def __init__(self, sock: socket.socket, batch: int = 64, slot: int = 65536,
                 gso: bool = False, gro: bool = False) -> None:
        super().__init__(sock, min(batch, _CHUNK))
        if slot <= 0 or batch <= 0:
            raise ValueError("batch and slot must be positive")
        self.slot = slot
        self.gso = gso
        cap = self.batch * (64 if gro else 1)
        self._cap = cap
        self._arena = ffi.new("char[]", self.batch * slot)
        self._data = ffi.buffer(self._arena)
        self._offs = ffi.new("int[]", cap)
        self._lens = ffi.new("int[]", cap)
        self._addrs = ffi.new("unsigned char[]", cap * _ADDR)
        self._abuf = ffi.buffer(self._addrs)
        self._stats = ffi.new("int[2]")
        self._send_lens = ffi.new("int[]", _CHUNK)
        self._names: dict[bytes, Address] = {}    # raw sockaddr -> recvfrom's tuple
        self._keys: dict[Address, bytes] = {}     # and back, for sending
        if gro:
            try:
                sock.setsockopt(socket.SOL_UDP, 104, 1)  # UDP_GRO
            except OSError:
                self._cap = self.batch
        self.gro = gro and self._cap > self.batch

    # ------------------------------------------------------------ receive

    def _name(self, key: bytes) -> Address:
        if key[:2] == _AF_INET6_KEY:
            port = int.from_bytes(key[2:4], "big")
            flow = int.from_bytes(key[4:8], "big")
            scope = struct.unpack("=I", key[24:28])[0]
            host = socket.inet_ntop(socket.AF_INET6, key[8:24])
            if scope:  # link-local: recvfrom spells the zone too
                host = socket.getnameinfo((host, port, flow, scope), socket.NI_NUMERICHOST)[0]
            address: Address = (host, port, flow, scope)
        else:
            address = (socket.inet_ntop(socket.AF_INET, key[4:8]), int.from_bytes(key[2:4], "big"))
        if len(self._names) >= _NAMES_MAX:
            self._names.clear()
            self._keys.clear()
        self._names[key] = address
        self._keys[address] = key
        return address

    def _receive(self, on_batch: Callable[[int], None], limit: int) -> int:
        """Up to ``limit`` datagrams, a ``recvmmsg`` at a time; ``on_batch(k)`` takes
        each batch's ``k`` kept datagrams while they are in the arena."""
        fd, arena, slot, batch = self.sock.fileno(), self._arena, self.slot, self.batch
        offs_c, lens_c, addrs_c, stats, cap = self._offs, self._lens, self._addrs, self._stats, self._cap
        total = 0
        while total < limit:
            want = min(batch, limit - total)
            k = _pd_recv(fd, arena, slot, want, offs_c, lens_c, addrs_c, cap, stats)
            if k < 0:
                if -k in _SOFT_ERRORS:
                    continue  # an ICMP error queued on the socket: taken, go on
                raise OSError(-k, os.strerror(-k))
            got = stats[0]
            self.truncated += stats[1]
            if k:
                on_batch(k)
            total += got
            if got < want:
                break
        return total

    def receive(self, feed: Feed, limit: int = 64) -> int:
        data, abuf, names, name = self._data, self._abuf, self._names, self._name
        offs_c, lens_c = self._offs, self._lens

        def each(k: int) -> None:
            offs, lens = _unpack(offs_c, k), _unpack(lens_c, k)
            for i in range(k):
                off = offs[i]
                key = abuf[i * _ADDR:(i + 1) * _ADDR]
                address = names.get(key)
                if address is None:
                    address = name(key)
                feed(data[off:off + lens[i]], address)
        return self._receive(each, limit)

    def receive_into(self, server: Any, limit: int = 64) -> int:
        """Like ``receive``, for a ``DtlsServer``: each batch goes to it whole, its
        established peers' records decrypted in one C call (``_fast.py``)."""
        return self._receive(functools.partial(server._feed_batch, self), limit)

    def raw_address_at(self, i: int) -> bytes:
        """Datagram ``i``'s sender as the kernel gave it (zero-padded sockaddr)."""
        raw: bytes = self._abuf[i * _ADDR:(i + 1) * _ADDR]
        return raw

    def address_at(self, i: int) -> Address:
        """Datagram ``i``'s sender as ``recvfrom`` spells it."""
        key = self._abuf[i * _ADDR:(i + 1) * _ADDR]
        address = self._names.get(key)
        return self._name(key) if address is None else address

    def datagram_at(self, i: int) -> bytes:
        off = self._offs[i]
        datagram: bytes = self._data[off:off + self._lens[i]]
        return datagram

    # --------------------------------------------------------------- send

    def _key(self, address: Address) -> bytes:
        key: bytes
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        if family == socket.AF_INET:
            key = (struct.pack("=H", family) + address[1].to_bytes(2, "big")
                   + socket.inet_pton(family, address[0])).ljust(_ADDR, b"\0")
        else:
            host = address[0].split("%", 1)[0]
            flow = address[2] if len(address) > 2 else 0
            scope = address[3] if len(address) > 3 else 0
            if scope == 0 and "%" in address[0]:
                scope = int(socket.getaddrinfo(address[0], address[1], socket.AF_INET6)[0][4][3])  # type: ignore[misc]
            key = (struct.pack("=H", family) + address[1].to_bytes(2, "big") + flow.to_bytes(4, "big")
                   + socket.inet_pton(family, host) + struct.pack("=I", scope))
        if len(self._keys) >= _NAMES_MAX:
            self._names.clear()
            self._keys.clear()
        self._keys[address] = key
        return key

    def send(self, datagrams: Sequence[tuple[bytes, Address]]) -> int:
        n = len(datagrams)
        if n <= 1:  # one datagram: sendto is the cheaper call
            return super().send(datagrams)
        keys, key = self._keys, self._key
        fd, lens_c, stats = self.sock.fileno(), self._send_lens, self._stats
        done = 0
        while done < n:
            chunk = datagrams if done == 0 and n <= _CHUNK else datagrams[done:done + _CHUNK]
            try:
                addrs = b"".join([keys.get(a) or key(a) for _, a in chunk])
            except (OSError, ValueError, TypeError, IndexError, AttributeError):
                # an address this path cannot spell (a name, an odd tuple): sendto decides
                return done + super().send(chunk)
            m = len(chunk)
            lens_c[0:m] = [len(d) for d, _ in chunk]
            r = _pd_send(fd, b"".join([d for d, _ in chunk]), lens_c, addrs, m, self.gso, stats)
            if r < 0:
                raise OSError(-r, os.strerror(-r))
            self.send_failed += stats[0]
            done += r
            if r < m:
                break  # the socket buffer is full
        return done


def will_batch(batch: bool | None = None) -> bool:
    """Whether ``datagram_io(sock, batch)`` gives a ``BatchIO``: None means where
    available (``batch_available()``), True where this build and platform can."""
    if batch is None:
        return batch_available()
    return bool(batch) and bool(lib.pd_io_available())


def datagram_io(sock: socket.socket, batch: bool | None = None, **options: Any) -> PlainIO:
    """A ``BatchIO`` where batching is available (and ``batch`` is not False),
    else a ``PlainIO``; ``options`` go to ``BatchIO``."""
    if will_batch(batch):
        return BatchIO(sock, **options)
    return PlainIO(sock, options.get("batch", 64))
