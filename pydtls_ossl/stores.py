"""Where sessions and exported associations live outside one process's memory.

A store maps bytes keys (session IDs) to bytes values (serialized sessions)
with a time to live. ``DtlsContext(session_store=store)`` wires one into
OpenSSL's external session cache; ``MemorySessionStore`` is bounded (LRU
and TTL), ``pydtls_ossl.redis_store.RedisSessionStore`` (the ``redis``
extra) is shared by every process of a cluster. Stores hold secrets: a
serialized session carries its master secret.

``AssociationStore`` holds sealed associations (``Dtls.export_association()``)
by key; ``DtlsServer(association_store=...)`` evicts quiet peers into one and
restores them on their next datagram. ``take()`` removes what it returns, so
that two processes sharing a store never both continue one association.
Implementations: ``MemoryAssociationStore``, ``DirectoryAssociationStore``
(one file per key, atomic), and ``RedisAssociationStore`` in
``pydtls_ossl.redis_store``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

__all__ = ["AssociationStore", "DirectoryAssociationStore", "MemoryAssociationStore",
           "MemorySessionStore", "SessionStore"]


@runtime_checkable
class SessionStore(Protocol):
    """Bytes in, bytes out, by bytes key, with a time to live in seconds.

    A store may lose entries at any time (eviction, a restart): a miss only
    costs a full handshake. Methods may raise; the library logs the failure
    and treats it as a miss, never inside OpenSSL.
    """

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None (missing or expired)."""

    def put(self, key: bytes, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds."""

    def delete(self, key: bytes) -> None:
        """Forget ``key`` (no error when missing)."""


class MemorySessionStore:
    """A bounded in-process store: least recently used entries go first, and
    entries expire after their TTL. Thread-safe."""

    def __init__(self, max_entries: int = 20480,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: bytes, value: bytes, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            self._entries[bytes(key)] = (self._clock() + ttl, bytes(value))
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __repr__(self) -> str:
        return f"<MemorySessionStore {len(self)}/{self.max_entries} entries>"


@runtime_checkable
class AssociationStore(Protocol):
    """Sealed associations by bytes key. ``take`` is get-and-delete in one step."""

    def put(self, key: bytes, blob: bytes) -> None:
        """Store ``blob`` under ``key``, replacing what was there."""

    def take(self, key: bytes) -> bytes | None:
        """Remove and return the blob under ``key``, or None: one caller wins."""

    def delete(self, key: bytes) -> None:
        """Forget ``key`` (no error when missing)."""


def _check_age(max_age: float | None) -> float | None:
    if max_age is not None and not max_age > 0:
        raise ValueError("max_age is a positive number of seconds, or None for no limit")
    return max_age


class MemoryAssociationStore:
    """An in-process ``AssociationStore`` (for tests, or one process's restarts of a server).

    ``max_age`` (seconds, None: no limit): an older blob is not returned and
    ``prune()`` forgets it, so devices that never come back do not pile up.
    """

    def __init__(self, max_age: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._blobs: dict[bytes, bytes] = {}
        self._stored: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self.max_age = _check_age(max_age)
        self._clock = clock

    def put(self, key: bytes, blob: bytes) -> None:
        with self._lock:
            self._blobs[bytes(key)] = bytes(blob)
            if self.max_age is not None:
                self._stored[bytes(key)] = self._clock()

    def take(self, key: bytes) -> bytes | None:
        with self._lock:
            blob = self._blobs.pop(key, None)
            stored = self._stored.pop(key, None)
        if blob is not None and stored is not None and self.max_age is not None \
                and self._clock() - stored > self.max_age:
            return None
        return blob

    def prune(self) -> int:
        """Forget blobs older than ``max_age``; return how many."""
        if self.max_age is None:
            return 0
        limit = self._clock() - self.max_age
        with self._lock:
            old = [k for k, t in self._stored.items() if t < limit]
            for key in old:
                del self._blobs[key], self._stored[key]
        return len(old)

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._blobs.pop(key, None)
            self._stored.pop(key, None)

    def __len__(self) -> int:
        return len(self._blobs)


class DirectoryAssociationStore:
    """One file per key in ``path`` (names are the key in hex, so any bytes are safe).

    ``put`` writes a temporary file, fsyncs it and renames it into place, so
    a crash leaves the old blob or the new one, never half of one; ``take``
    renames the file away before reading it, so of two processes taking one
    key, one gets it. ``max_age`` (seconds, default 7 days like the Redis
    store's ``ttl``; None: no limit): a file older than that is not returned,
    and ``prune()`` deletes such files.
    """

    def __init__(self, path: str | os.PathLike[str], max_age: float | None = 7 * 86400) -> None:
        self.max_age = _check_age(max_age)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._dir = os.fspath(self.path)

    def _file(self, key: bytes) -> str:
        if not key:
            raise ValueError("an association key must not be empty")
        # a plain string: pathlib interns every name part, which would keep one
        # string per peer alive for the process's life
        return os.path.join(self._dir, bytes(key).hex() + ".assoc")

    def put(self, key: bytes, blob: bytes) -> None:
        target = self._file(key)
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def take(self, key: bytes) -> bytes | None:
        target = self._file(key)
        claimed = os.path.join(self._dir, f".take-{os.getpid()}-{threading.get_ident()}-"
                                          f"{os.path.basename(target)}")
        try:
            os.rename(target, claimed)  # atomic: only one taker succeeds
        except FileNotFoundError:
            return None
        try:
            with open(claimed, "rb") as f:
                if self.max_age is not None and time.time() - os.fstat(f.fileno()).st_mtime > self.max_age:
                    return None
                return f.read()
        finally:
            os.unlink(claimed)

    def prune(self) -> int:
        """Delete blobs older than ``max_age`` (and leftovers of crashed writers); return how many."""
        if self.max_age is None:
            return 0
        limit = time.time() - self.max_age
        removed = 0
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if not (entry.name.endswith(".assoc") or entry.name.startswith(".put-")):
                    continue
                try:
                    if entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def delete(self, key: bytes) -> None:
        try:
            os.unlink(self._file(key))
        except FileNotFoundError:
            pass

    def __len__(self) -> int:
        return sum(1 for _ in self.path.glob("*.assoc"))
