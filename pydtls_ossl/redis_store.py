"""Session and association stores in Redis, shared by a cluster (the ``redis`` extra).

``RedisSessionStore("redis://host:6379/0")`` or ``RedisSessionStore(client)``
with a ``redis.Redis`` you built. Keys are binary-safe: a prefix, then the
raw session ID; values are ``SET ... PX`` with the session's time to live.
A Redis that is down or slow costs full handshakes, never a failed or hung
one: every call has a short socket timeout, and after a failure the store
answers misses for ``retry_after`` seconds (one log line) before trying again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RedisAssociationStore", "RedisSessionStore"]

_log = logging.getLogger("pydtls_ossl")


def _redis() -> Any:
    try:
        import redis
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the Redis stores need redis-py: pip install 'pydtls_ossl[redis]'") from None
    return redis


class _RedisBase:
    """A client (or a URL for one, with short socket timeouts) and a key prefix."""

    def __init__(self, client: Any, prefix: bytes, timeout: float) -> None:
        redis = _redis()
        if isinstance(client, str):
            client = redis.Redis.from_url(client, socket_timeout=timeout,
                                          socket_connect_timeout=timeout)
        self.client = client
        self.prefix = bytes(prefix)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


class RedisSessionStore(_RedisBase):
    """``SessionStore`` over Redis; see the module docstring."""

    def __init__(self, client: Any = "redis://127.0.0.1:6379/0", *,
                 prefix: bytes = b"pydtls:session:", timeout: float = 0.25,
                 retry_after: float = 1.0) -> None:
        super().__init__(client, prefix, timeout)
        self.retry_after = retry_after
        self._down_until = 0.0

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() < self._down_until:
            return None
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            self._down_until = time.monotonic() + self.retry_after
            _log.warning("pydtls_ossl: Redis session store %s failed (%s: %s); full handshakes "
                         "for the next %.1f s", what, type(exc).__name__, exc, self.retry_after)
            return None

    def get(self, key: bytes) -> bytes | None:
        value = self._call("get", self.client.get, self.prefix + key)
        return None if value is None else bytes(value)

    def put(self, key: bytes, value: bytes, ttl: float) -> None:
        milliseconds = int(ttl * 1000)
        if milliseconds > 0:
            self._call("put", self.client.set, self.prefix + key, value, px=milliseconds)

    def delete(self, key: bytes) -> None:
        self._call("delete", self.client.delete, self.prefix + key)

    def __repr__(self) -> str:
        return f"<RedisSessionStore prefix={self.prefix!r}>"


class RedisAssociationStore(_RedisBase):
    """``AssociationStore`` over Redis: ``take`` is an atomic GETDEL (Redis 6.2+), so
    of the processes that receive a peer's datagrams, exactly one continues it.

    Unlike sessions, an association that cannot be stored is not silently
    lost: ``put`` raises when Redis is down (the server then keeps the peer in
    memory); ``take`` answers None (the peer's datagrams are dropped until it
    can be restored, or it shakes hands again).
    """

    def __init__(self, client: Any = "redis://127.0.0.1:6379/0", *,
                 prefix: bytes = b"pydtls:assoc:", timeout: float = 0.5,
                 ttl: float | None = 7 * 86400) -> None:
        super().__init__(client, prefix, timeout)
        self.ttl = ttl

    def put(self, key: bytes, blob: bytes) -> None:
        px = None if self.ttl is None else int(self.ttl * 1000)
        self.client.set(self.prefix + key, blob, px=px)

    def take(self, key: bytes) -> bytes | None:
        try:
            value = self.client.getdel(self.prefix + key)
        except self._errors as exc:
            _log.warning("pydtls_ossl: Redis association store take failed (%s: %s)",
                         type(exc).__name__, exc)
            return None
        return None if value is None else bytes(value)

    def delete(self, key: bytes) -> None:
        self.client.delete(self.prefix + key)

    def __repr__(self) -> str:
        return f"<RedisAssociationStore prefix={self.prefix!r}>"
