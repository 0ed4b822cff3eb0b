"""Callbacks OpenSSL makes into Python: pre-shared keys, verify_peer, key logging.

They find their ``DtlsContext`` through a weak-reference handle in the
``SSL_CTX``'s app data. A Python exception never crosses into OpenSSL: a PSK
callback's is kept for this thread, the callback returns 0 so the handshake
fails, and the engine raises a ``HandshakeError`` chained to it; a key-log
write that fails is logged and the handshake goes on.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

from ._ffi import ffi, lib

if TYPE_CHECKING:
    from .context import DtlsContext

__all__ = ["ClientPsk", "ServerPsk", "install", "take_callback_error"]

_log = logging.getLogger("pydtls_ossl")

#: A client's (identity, key), or a function of the server's hint returning one.
ClientPsk = Union[tuple[Union[str, bytes], bytes],
                  Callable[[Union[str, None]], Union[tuple[Union[str, bytes], bytes], None]]]
#: A server's identity -> key table, or a function returning the key or None.
ServerPsk = Union[Mapping[Union[str, bytes], bytes], Callable[[str], Union[bytes, None]]]

_failures = threading.local()


def take_callback_error() -> BaseException | None:
    """The exception a callback raised during this thread's last failed call."""
    error: BaseException | None = getattr(_failures, "error", None)
    _failures.error = None
    return error


def _context(ssl: Any) -> DtlsContext | None:
    return _context_of_ctx(lib.SSL_get_SSL_CTX(ssl))


def _context_of_ctx(ctx: Any) -> DtlsContext | None:
    handle = lib.SSL_CTX_get_ex_data(ctx, 0)
    if handle == ffi.NULL:
        return None
    ref: weakref.ref[DtlsContext] = ffi.from_handle(handle)
    return ref()


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pd_psk_client_cb(ssl: Any, hint: Any, identity_out: Any, max_identity: int,
                     psk_out: Any, max_psk: int) -> int:
    try:
        context = _context(ssl)
        if context is None or context.psk is None:
            return 0
        hint_text = None if hint == ffi.NULL else ffi.string(hint).decode(errors="replace")
        chosen = context.psk(hint_text) if callable(context.psk) else context.psk
        if chosen is None:
            return 0
        identity, key = _as_bytes(chosen[0]), bytes(chosen[1])
        if len(identity) + 1 > max_identity or not 0 < len(key) <= max_psk:
            raise ValueError(f"PSK identity must be under {max_identity} bytes and the key "
                             f"1 to {max_psk} bytes")
        ffi.memmove(identity_out, identity + b"\0", len(identity) + 1)
        ffi.memmove(psk_out, key, len(key))
        return len(key)
    except BaseException as exc:  # never into OpenSSL
        _failures.error = exc
        return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pd_psk_server_cb(ssl: Any, identity: Any, psk_out: Any, max_psk: int) -> int:
    try:
        context = _context(ssl)
        if context is None or context.psk_keys is None or identity == ffi.NULL:
            return 0
        name = ffi.string(identity).decode(errors="replace")
        keys = context.psk_keys
        key = keys(name) if callable(keys) else keys.get(name, keys.get(name.encode()))
        if key is None:
            return 0  # OpenSSL answers unknown_psk_identity
        key = bytes(key)
        if not 0 < len(key) <= max_psk:
            raise ValueError(f"PSK key must be 1 to {max_psk} bytes")
        conn = lib.pd_conn_of(ssl)
        if conn != ffi.NULL and conn.verify_hook != ffi.NULL:
            conn.hook_refused = 2  # until the hook says yes (or raises)
            if not ffi.from_handle(conn.verify_hook)(None, name):
                return 0  # OpenSSL answers unknown_psk_identity
            conn.hook_refused = 0
        ffi.memmove(psk_out, key, len(key))
        return len(key)
    except BaseException as exc:
        _failures.error = exc
        return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pd_verify_hook_cb(hook: Any, der: Any, der_len: int) -> int:
    """A certificate that passed the configured checks, put to ``verify_peer``."""
    try:
        from .certs import certificate_fingerprint
        fingerprint = certificate_fingerprint(bytes(ffi.buffer(der, der_len)), "sha-256")
        return 1 if ffi.from_handle(hook)(fingerprint, None) else 0
    except BaseException as exc:  # never into OpenSSL; the handshake fails
        _failures.error = exc
        return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pd_keylog_cb(ssl: Any, line: Any) -> None:
    try:
        context = _context(ssl)
        if context is not None and context.keylog is not None:
            context.keylog.write(ffi.string(line) + b"\n")
            context.keylog.flush()
    except Exception:  # a full disk must not fail the handshake
        _log.exception("pydtls_ossl: cannot write the key log")


def install(context: DtlsContext) -> Any:
    """Point the SSL_CTX's callbacks at ``context``; return the handle to keep alive."""
    handle = ffi.new_handle(weakref.ref(context))
    lib.SSL_CTX_set_ex_data(context.ssl_ctx, 0, handle)
    if context.psk is not None:
        lib.SSL_CTX_set_psk_client_callback(context.ssl_ctx, lib.pd_psk_client_cb)
    if context.psk_keys is not None:
        lib.SSL_CTX_set_psk_server_callback(context.ssl_ctx, lib.pd_psk_server_cb)
    if context.keylog is not None:
        lib.SSL_CTX_set_keylog_callback(context.ssl_ctx, lib.pd_keylog_cb)
    return handle


# ------------------------------------------------------------- sessions
# Store and notification failures are logged and count as misses: a session
# cache that is down costs full handshakes, never a failed one.

def _session_id(session: Any) -> bytes:
    length = ffi.new("unsigned int *")
    data = lib.pd_session_id(session, length)
    return bytes(ffi.buffer(data, length[0]))


def _session_der(session: Any) -> bytes | None:
    n = lib.pd_session_to_der(session, ffi.NULL, 0)
    if n == 0:
        return None
    buf = ffi.new("unsigned char[]", -n)
    n = lib.pd_session_to_der(session, buf, len(buf))
    return bytes(ffi.buffer(buf, n)) if n > 0 else None


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pd_new_session_py(ssl: Any, session: Any) -> int:
    try:
        context = _context(ssl)
        der = None if context is None else _session_der(session)
        if context is None or der is None:
            return 0
        resumption = context.resumption
        session_id = _session_id(session)
        if resumption.new is not None and lib.SSL_is_server(ssl):
            try:
                resumption.new(session_id, der)
            except Exception:
                _log.exception("pydtls_ossl: session_new failed; the session is not stored")
        if resumption.on_new_session is not None:
            from ._resumption import frame_session
            resumption.on_new_session(session_id, frame_session(der))
    except Exception:
        _log.exception("pydtls_ossl: on_new_session failed")
    return 0  # OpenSSL keeps no extra reference


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pd_get_session_py(ssl: Any, session_id: Any, length: int, copy: Any) -> Any:
    copy[0] = 0  # the session returned is OpenSSL's to free
    try:
        context = _context(ssl)
        if context is None or context.resumption.get is None or length <= 0:
            return ffi.NULL
        der = context.resumption.get(bytes(ffi.buffer(session_id, length)))
        if der is None:
            return ffi.NULL
        return lib.pd_session_from_der(bytes(der), len(der))
    except Exception:
        _log.exception("pydtls_ossl: session_get failed; doing a full handshake")
        return ffi.NULL


@ffi.def_extern()  # type: ignore[untyped-decorator]
def pd_remove_session_py(ctx: Any, session: Any) -> None:
    try:
        context = _context_of_ctx(ctx)
        if context is not None and context.resumption.remove is not None:
            context.resumption.remove(_session_id(session))
    except Exception:
        _log.exception("pydtls_ossl: session_remove failed")
