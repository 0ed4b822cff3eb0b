"""Session resumption settings of one ``DtlsContext``, and the checks around them.

OpenSSL keeps the mechanics (``SSL_SESSION``, its internal cache, RFC 5077
tickets); this module decides what may be resumed:

- a client offers a saved session only if it still passes the engine's own
  verification (pins, CA and hostname), is DTLS 1.2, resumable and unexpired;
  anything else is a ``ResumptionWarning`` and a full handshake;
- a server tags every session with a session ID context derived from
  ``session_context_id`` (or a random per-context value), the verification
  mode and the pins in force, so a session made under other settings is
  never resumed; a server with a ``verify_peer`` hook does full handshakes,
  since the hook must see every peer;
- fleet tickets: ``ticket_secret`` derives the ticket keys of each period in C
  (``csrc/sessions.c``), so every holder of the secret opens every ticket.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Sequence

from ._errors import ConfigurationError, ResumptionWarning
from ._ffi import check, ffi, lib
from .stores import SessionStore

__all__ = ["OnNewSession", "Resumption", "SessionGet", "SessionNew", "SessionRemove",
           "frame_session", "offer_session", "unframe_session"]

#: on_new_session(session_id, session): a session was established, or a ticket arrived.
OnNewSession = Callable[[bytes, bytes], None]
SessionGet = Callable[[bytes], "bytes | None"]
SessionNew = Callable[[bytes, bytes], None]
SessionRemove = Callable[[bytes], None]

_MAX_SESSION = 64 * 1024
_DECODED_MAX = 64
#: session() appends this and a digest to the DER, so that damaged bytes (a
#: flipped bit in the master secret parses fine) are caught before they are
#: offered; bare DER from other tools is accepted as it is.
_TRAILER = b"\x00pydtls-session\x00"
_DIGEST = 16


def frame_session(der: bytes) -> bytes:
    """The bytes ``session()`` hands out: the DER, then a check of it."""
    return der + _TRAILER + hashlib.sha256(der).digest()[:_DIGEST]


def unframe_session(data: bytes) -> bytes | None:
    """The DER inside ``session()`` bytes, bare DER as given, or None when damaged."""
    cut = data.rfind(_TRAILER)
    if cut < 0:
        return data
    der, digest = data[:cut], data[cut + len(_TRAILER):]
    if len(digest) != _DIGEST or hashlib.sha256(der).digest()[:_DIGEST] != digest:
        return None
    return der


class Resumption:
    """What a ``DtlsContext`` was told about resumption, validated once."""

    def __init__(self, *, session: bytes | None, on_new_session: OnNewSession | None,
                 cache: bool, cache_size: int, timeout: float, context_id: bytes | None,
                 tickets: bool, get: SessionGet | None, new: SessionNew | None,
                 remove: SessionRemove | None, ticket_secret: bytes | None,
                 ticket_period: float, store: SessionStore | None) -> None:
        if store is not None:
            if get is not None or new is not None or remove is not None:
                raise ValueError("pass session_store= or session_get/new/remove=, not both")
            if not isinstance(store, SessionStore):
                raise TypeError("session_store must have get(key), put(key, value, ttl), delete(key)")
            ttl = float(timeout)
            get, new, remove = store.get, (lambda key, value: store.put(key, value, ttl)), store.delete
        if get is not None and new is None:
            raise ConfigurationError("an external session cache (session_get=) needs session_new= "
                                     "to be told of new sessions")
        if get is not None and context_id is None:
            raise ConfigurationError("an external session cache needs session_context_id= (bytes "
                                     "naming this service), so that sessions of another service "
                                     "sharing the cache are never resumed here")
        if cache_size < 0:
            raise ValueError("session_cache_size must not be negative")
        if not 0 < timeout <= 7 * 86400:
            raise ValueError("session_timeout is 1 s to 7 days")
        if context_id is not None and not 0 < len(context_id) <= 1024:
            raise ValueError("session_context_id must be 1 to 1024 bytes")
        if ticket_secret is not None:
            if not tickets:
                raise ValueError("ticket_secret= needs session_tickets=True")
            if len(ticket_secret) < 32:
                raise ValueError("ticket_secret needs at least 32 bytes")
            if ticket_period <= 0:
                raise ValueError("ticket_period must be positive")
        self.session = None if session is None else bytes(session)
        self.on_new_session = on_new_session
        self.cache = cache
        self.cache_size = cache_size
        self.timeout = timeout
        self.context_id = context_id
        self.tickets = tickets
        self.get, self.new, self.remove = get, new, remove
        self.ticket_period = ticket_period
        self._base_id = context_id if context_id is not None else os.urandom(16)
        self._sid_cache: dict[str, bytes] = {}
        self._decoded: OrderedDict[bytes, Any] = OrderedDict()
        self._decoded_lock = threading.Lock()
        self._ticket_secret: Any = None
        if ticket_secret is not None:
            secret = bytes(ticket_secret)
            if len(secret) > lib.PD_TICKET_SECRET_MAX:
                secret = hashlib.sha512(secret).digest()
            self._ticket_secret = ffi.gc(ffi.new("pd_ticket_secret *"), lib.pd_ticket_secret_clear)
            lib.pd_ticket_secret_set(self._ticket_secret, secret, len(secret), int(ticket_period))

    def decoded(self, der: bytes) -> Any:
        """The decoded session for ``der`` (NULL-free cdata), or None; the last few are
        kept, since decoding one costs ~1.5M instructions in OpenSSL 3.0 (its
        certificate's key decoder) and a client offers the same session often."""
        digest = hashlib.sha256(der).digest()
        with self._decoded_lock:
            session = self._decoded.get(digest)
            if session is not None:
                self._decoded.move_to_end(digest)
                return session
        raw = lib.pd_session_from_der(der, len(der))
        if raw == ffi.NULL:
            return None
        session = ffi.gc(raw, lib.SSL_SESSION_free)
        with self._decoded_lock:
            self._decoded[digest] = session
            while len(self._decoded) > _DECODED_MAX:
                self._decoded.popitem(last=False)
        return session

    @property
    def enabled(self) -> bool:
        """Whether a server of this context may resume at all."""
        return self.cache or self.tickets or self.get is not None

    @property
    def shared(self) -> bool:
        """Whether sessions leave this context: an external cache, or fleet tickets."""
        return self.get is not None or self._ticket_secret is not None

    def install(self, ctx: Any, serves: bool) -> None:
        """Configure OpenSSL; ``serves`` when the context can be a server's."""
        mode = 0
        if self.on_new_session is not None:
            # so that it fires on clients too; a client keeps no cache of its own
            mode |= lib.SSL_SESS_CACHE_CLIENT
            if not serves:
                mode |= lib.SSL_SESS_CACHE_NO_INTERNAL
        if serves and (self.cache or self.get is not None):
            mode |= lib.SSL_SESS_CACHE_SERVER
        if self.get is not None:
            mode |= lib.SSL_SESS_CACHE_NO_INTERNAL
        lib.SSL_CTX_set_session_cache_mode(ctx, mode)
        lib.SSL_CTX_sess_set_cache_size(ctx, self.cache_size)
        lib.SSL_CTX_set_timeout(ctx, max(1, int(self.timeout)))
        if not self.tickets:
            lib.SSL_CTX_set_options(ctx, lib.SSL_OP_NO_TICKET)
        elif self._ticket_secret is not None:
            check(lib.pd_ctx_fleet_tickets(ctx, self._ticket_secret), ConfigurationError,
                  "cannot install the fleet ticket key callback")
        lib.pd_ctx_session_callbacks(ctx, int(self.on_new_session is not None or self.new is not None),
                                     int(self.get is not None))

    def server_sid_ctx(self, verification: str, pins: Sequence[tuple[str, bytes]]) -> bytes:
        """The session ID context of a server engine: sessions resume only under the same one.

        Set on server SSLs only: a client's would have to match the one its
        saved session was made under, which a new client context never does.
        """
        if not pins:
            cached = self._sid_cache.get(verification)
            if cached is None:
                cached = self._sid_cache[verification] = self._sid(verification, ())
            return cached
        return self._sid(verification, pins)

    def _sid(self, verification: str, pins: Sequence[tuple[str, bytes]]) -> bytes:
        h = hashlib.sha256(b"pydtls_ossl session context\0" + self._base_id + b"\0"
                           + verification.encode())
        for algorithm, digest in sorted(pins):
            h.update(b"\0" + algorithm.encode() + b":" + digest)
        return h.digest()

    def require_context_id(self, what: str) -> None:
        """Client verification and sessions that leave the context need a named service."""
        if self.shared and self.context_id is None:
            raise ConfigurationError(
                f"{what} verifies clients while sessions are shared (ticket_secret= or an "
                f"external session cache): set session_context_id= to name this service, so "
                f"that a session verified elsewhere is never resumed here")


_OFFER_REFUSALS = {
    lib.PD_OFFER_NOT_RESUMABLE: "the session is not a resumable DTLS 1.2 session",
    lib.PD_OFFER_EXPIRED: "the session has expired",
    lib.PD_OFFER_PIN: "the session's server certificate does not match the pinned fingerprint",
    lib.PD_OFFER_CA: "the session's server certificate no longer verifies (CA, hostname)",
    lib.PD_OFFER_NO_CERT: "the session has no server certificate",
    lib.PD_OFFER_CERT: "a PSK client does not resume a certificate session",
    lib.PD_OFFER_REFUSED: "OpenSSL refused the session",
}


def offer_session(conn: Any, context: Any, data: bytes, pinned: bool, verification: Any,
                  server_hostname: str | None) -> bool:
    """Offer saved session bytes for resumption if they may be resumed; warn and
    return False otherwise. One decode per distinct session per context."""
    from .context import Verify
    if len(data) > _MAX_SESSION:
        return _refuse("the session is larger than any DTLS session")
    der = unframe_session(data)
    if der is None:
        return _refuse("the session bytes are damaged (their check does not match)")
    session = context.resumption.decoded(der)
    if session is None:
        return _refuse("the bytes are not a serialized session (corrupted or truncated?)")
    check = lib.PD_CHECK_PINS if pinned else {
        Verify.CA: lib.PD_CHECK_CA, Verify.ANY_CERTIFICATE: lib.PD_CHECK_ANY,
        Verify.PSK: lib.PD_CHECK_PSK}.get(verification, lib.PD_CHECK_NONE)
    host = ffi.NULL if server_hostname is None else server_hostname.encode("idna")
    result = lib.pd_offer_session(conn, context.ssl_ctx, session, check, host)
    if result != lib.PD_OFFER_OK:
        return _refuse(_OFFER_REFUSALS.get(result, "the session cannot be offered"))
    return True


def _refuse(why: str) -> bool:
    warnings.warn(f"pydtls_ossl: not resuming: {why}; doing a full handshake",
                  ResumptionWarning, stacklevel=4)
    return False
