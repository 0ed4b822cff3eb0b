"""Where resumable sessions live outside one ``SSL_CTX``: a protocol and a memory store.

A store maps bytes keys (session IDs) to bytes values (serialized sessions)
with a time to live. ``DtlsContext(session_store=store)`` wires one into
OpenSSL's external session cache; ``MemorySessionStore`` is bounded (LRU
and TTL), ``pydtls_ossl.redis_store.RedisSessionStore`` (the ``redis``
extra) is shared by every process of a cluster. Stores hold secrets: a
serialized session carries its master secret.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Protocol, runtime_checkable

__all__ = ["MemorySessionStore", "SessionStore"]


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
