"""``Dtls``: one DTLS association over memory, sans-IO.

The application moves datagrams: ``feed()`` what arrived, send what
``pull()`` returns, call ``handle_timeout()`` when ``get_timeout()`` says so.
Names mirror the PHP ``Openssl\\Dtls`` proposal. Each hot-path method is one
call into C plus one copy into ``bytes``; error details are built only when
something failed.
"""

from __future__ import annotations

import enum
import os
from typing import Any, Callable, Sequence

from ._errors import (Alert, AlertReceived, AssociationError, CertificateError,
                      ConfigurationError, ConnectionClosed, DtlsError, FingerprintMismatch,
                      HandshakeError, InternalError)
from ._ffi import check, check_ptr, drain_errors, ffi, lib
from ._callbacks import take_callback_error
from ._resumption import frame_session, offer_session
from .certs import (CertificateSource, certificate_fingerprint, digest_for, format_fingerprint,
                    parse_fingerprint, x509_to_der)
from .context import DtlsContext, Verify, _seconds_to_us, address_parts, check_mtu
from .srtp import SRTP_EXPORTER_LABEL, SrtpKeys, SrtpProfile, split_srtp_keying_material

__all__ = ["CONTINUE", "FINISHED", "ConnectionState", "Dtls", "HandshakeStatus", "VerifyPeer"]

#: ``verify_peer(fingerprint, psk_identity) -> bool``: asked inside the
#: handshake with the peer's certificate fingerprint (sha-256, RFC 8122 form)
#: or its PSK identity; False fails the handshake (bad_certificate or
#: unknown_psk_identity).
VerifyPeer = Callable[[str | None, str | None], bool]


class HandshakeStatus(enum.IntEnum):
    """What ``handshake()`` says; a failure raises ``HandshakeError`` instead."""

    CONTINUE = 0
    FINISHED = 1


CONTINUE = HandshakeStatus.CONTINUE
FINISHED = HandshakeStatus.FINISHED


class ConnectionState(enum.IntEnum):
    """Where one association stands."""

    NEW = lib.PD_STATE_NEW
    HANDSHAKING = lib.PD_STATE_HANDSHAKING
    ESTABLISHED = lib.PD_STATE_ESTABLISHED
    PEER_CLOSED = lib.PD_STATE_PEER_CLOSED
    FAILED = lib.PD_STATE_FAILED
    CLOSED = lib.PD_STATE_CLOSED
    EXPORTED = lib.PD_STATE_EXPORTED


_DEAD = lib.pd_dead_conn()
_pd_feed = lib.pd_feed
_pd_pull = lib.pd_pull
_pd_write = lib.pd_write
_pd_read = lib.pd_read
_unpack = ffi.unpack
_ESTABLISHED = lib.PD_STATE_ESTABLISHED
_ERR_TOO_BIG = lib.PD_ERR_TOO_BIG
_ERR_SSL = lib.PD_ERR_SSL
_ERR_OVERSIZE = lib.PD_ERR_OVERSIZE
_CERT_ALERTS = frozenset({42, 43, 44, 45, 46, 48})
_RESERVED_LABELS = frozenset({b"client finished", b"server finished", b"master secret",
                              b"extended master secret", b"key expansion"})
_scratch = ffi.new_allocator(should_clear_after_alloc=False)  # filled by C before use


class _Unset:
    """Marks an argument left out, where None has a meaning of its own."""


_UNSET = _Unset()


def _split(blob_ptr: Any, ends_ptr: Any, count: int) -> list[bytes]:
    """Cut C's concatenated output at the given end offsets into separate bytes."""
    if count <= 0:
        return []
    ends: list[int] = ffi.unpack(ends_ptr, count)
    blob: bytes = _unpack(blob_ptr, ends[-1])
    parts: list[bytes] = []
    append, start = parts.append, 0
    for end in ends:  # a plain loop: half the cost of map(slice, ...) per record
        append(blob[start:end])
        start = end
    return parts


def _pins(expected: str | Sequence[str] | None) -> list[tuple[str, bytes]]:
    if expected is None:
        return []
    items = [expected] if isinstance(expected, str) else list(expected)
    if not items:
        raise ValueError("expected_peer_fingerprint must not be empty")
    if len(items) > lib.PD_MAX_PINS:
        raise ValueError(f"at most {lib.PD_MAX_PINS} pinned fingerprints")
    return [parse_fingerprint(item) for item in items]


class Dtls:
    """One DTLS 1.2 association, client or server, driven by the caller.

    ``Dtls(is_server=True, cert=..., key=...)`` builds a private context;
    pass ``context=`` to share one ``DtlsContext`` between many engines.
    ``expected_peer_fingerprint`` (``'AB:CD:…'``, ``'sha-256 AB:…'`` or a list)
    pins the peer's certificate: a mismatch fails the handshake inside it
    with a bad_certificate alert. ``peer_address`` (servers) turns on the
    stateless cookie exchange for that address: a ClientHello without a valid
    cookie is answered with a HelloVerifyRequest. Not thread-safe; one thread
    at a time.

    ``handshake_timeout`` overrides the context's deadline for this engine
    (None: none). ``verify_peer(fingerprint, psk_identity) -> bool`` is asked
    inside the handshake once the peer's certificate passed the configured
    checks (pins, CA) or its PSK identity has a key; False fails the
    handshake with bad_certificate or unknown_psk_identity. A server with a
    hook and no certificate verification asks certificate clients for one.
    ``connection_id`` overrides the CID the context would choose for this
    engine (the context must negotiate CIDs).
    """

    __slots__ = ("_conn", "_context", "_error", "_leftover", "_final_state", "_hook",
                 "__weakref__")

    def __init__(
        self,
        is_server: bool = False,
        cert: CertificateSource | None = None,
        key: CertificateSource | None = None,
        *,
        context: DtlsContext | None = None,
        mtu: int | None = None,
        expected_peer_fingerprint: str | Sequence[str] | None = None,
        server_hostname: str | None = None,
        verify: Verify | str | None = None,
        initial_rto: float | None = None,
        peer_address: Any = None,
        handshake_timeout: float | None | _Unset = _UNSET,
        verify_peer: VerifyPeer | None = None,
        session: bytes | None = None,
        connection_id: bytes | None = None,
    ) -> None:
        self._conn: Any = _DEAD
        self._hook: Any = None
        self._error: DtlsError | None = None
        self._leftover: list[bytes] | None = None
        self._final_state = ConnectionState.CLOSED
        if context is None:
            context = DtlsContext(cert, key, verify=verify)
        elif cert is not None or key is not None or verify is not None:
            raise ValueError("cert/key/verify belong to the context when context= is given")
        self._context = context
        pins = _pins(expected_peer_fingerprint)
        mode = context._role_check(is_server, pins)
        mtu = context.mtu if mtu is None else check_mtu(mtu)
        rto = context.initial_rto_us if initial_rto is None else _seconds_to_us(initial_rto, "initial_rto")
        conn = lib.pd_conn_new(context.ssl_ctx, int(is_server), mtu, rto,
                               max(rto, context.max_rto_us))
        self._conn = ffi.gc(check_ptr(conn, ConfigurationError, "cannot create the association"),
                            lib.pd_conn_free)
        conn.require_srtp = int(context.srtp_required)
        conn.keep_peer_cert = int(context.keep_peer_certificate)
        conn.compact = int(context.record_layer == "engine")
        timeout = context.handshake_timeout if isinstance(handshake_timeout, _Unset) else handshake_timeout
        if timeout is not None:
            if not 0 < timeout <= 86400:
                raise ValueError(f"handshake_timeout must be None or 0 to 86400 seconds, got {timeout}")
            conn.handshake_timeout_ns = int(timeout * 1e9)
        cids = context.connection_ids
        if connection_id is not None and cids is None:
            raise ConfigurationError("connection_id= needs a context with connection_id=...")
        if cids is not None:
            cid = cids.new() if connection_id is None else bytes(connection_id)
            if len(cid) > 255:
                raise ValueError("a connection ID is at most 255 bytes")
            check(lib.pd_set_cid(conn, cid, len(cid), cids.padding), InternalError,
                  "cannot offer a connection ID")
        if peer_address is not None:
            if not is_server:
                raise ValueError("peer_address (cookie exchange) is for servers")
            host, port = address_parts(peer_address)
            lib.pd_set_cookie_peer(conn, context.cookies.keys(), host, len(host), port)
        if verify_peer is not None:
            if not callable(verify_peer):
                raise TypeError("verify_peer must be a function (fingerprint, psk_identity) -> bool")
            self._hook = ffi.new_handle(verify_peer)
            conn.verify_hook = self._hook
        if mode is Verify.FINGERPRINT:
            for algorithm, digest in pins:
                check(lib.pd_add_pin(conn, digest_for(algorithm), digest, len(digest)),
                      InternalError, "cannot pin fingerprint")
            lib.pd_verify_peer(conn, 0)
        elif mode is Verify.ANY_CERTIFICATE or (verify_peer is not None and is_server
                                                 and mode is Verify.NONE
                                                 and context.has_certificate):
            lib.pd_verify_peer(conn, 1)
        elif verify_peer is not None and mode is Verify.CA:
            lib.pd_verify_peer(conn, 0)  # the chain as configured, then the hook
        elif mode is Verify.PSK and not is_server:
            # no trust anchors: a certificate suite chosen by the server fails
            lib.SSL_set_verify(conn.ssl, lib.SSL_VERIFY_PEER, ffi.NULL)
        if server_hostname is not None:
            if is_server:
                raise ValueError("server_hostname is for clients")
            name = server_hostname.encode("idna")
            check(lib.SSL_set_tlsext_host_name(conn.ssl, name), ConfigurationError, "bad server_hostname")
            if mode is Verify.CA:
                check(lib.SSL_set1_host(conn.ssl, name), ConfigurationError, "bad server_hostname")
        resumption = context.resumption
        if is_server:
            if session is not None:
                raise ValueError("session= (resuming a saved session) is for clients")
            if verify_peer is not None:
                # the hook must see every peer: no session made here is ever resumed
                lib.SSL_set_options(conn.ssl, lib.SSL_OP_NO_TICKET)
                sid = os.urandom(32)
                lib.SSL_set_session_id_context(conn.ssl, sid, len(sid))
            else:
                if pins:
                    resumption.require_context_id("a server engine that pins client certificates")
                sid = resumption.server_sid_ctx(mode.value, pins)
                lib.SSL_set_session_id_context(conn.ssl, sid, len(sid))
        else:
            conn.keep_session = 1
            saved = session if session is not None else resumption.session
            if saved is not None:
                offer_session(conn, context, bytes(saved), bool(pins), mode, server_hostname)
        drain_errors()

    # ------------------------------------------------------------ hot path

    def feed(self, datagram: bytes) -> int:
        """Process one received UDP payload; return how many records became readable.

        Never raises for what the peer sent: garbage, replays and stale
        retransmissions are dropped as RFC 6347 says; alerts and close_notify
        change ``state`` and the next ``read()``/``write()`` raises.
        """
        try:
            n: int = _pd_feed(self._conn, datagram, len(datagram))
        except TypeError:
            datagram = bytes(datagram)
            n = _pd_feed(self._conn, datagram, len(datagram))
        if n > 0:
            return n
        if n == _ERR_SSL:
            self._dead_error()  # drain the queue now; later calls raise it
        elif self._final_state is ConnectionState.EXPORTED and self._conn is _DEAD:
            raise self._dead_error()
        return 0  # e.g. a restarted peer's ClientHello: only a DtlsServer acts on it

    def pull(self) -> bytes | None:
        """The next datagram to send (whole records, at most ``mtu`` bytes), or None."""
        conn = self._conn
        n = _pd_pull(conn)
        if n > 0:
            return _unpack(conn.data, n)  # type: ignore[no-any-return]
        if n == 0:
            if self._leftover:
                return self._leftover.pop(0)
            if self._final_state is ConnectionState.EXPORTED and conn is _DEAD:
                raise self._dead_error()
            return None
        raise InternalError(f"OpenSSL wrote a record larger than the MTU ({conn.mtu})")

    def write(self, data: bytes) -> int:
        """Encrypt ``data`` as exactly one record; return its length.

        Raises ``ValueError`` when ``data`` exceeds ``max_write_size`` (nothing
        is fragmented or truncated). An empty write sends nothing: OpenSSL
        does not emit empty application records.
        """
        try:
            n: int = _pd_write(self._conn, data, len(data))
        except TypeError:
            data = bytes(data)
            n = _pd_write(self._conn, data, len(data))
        if n >= 0:
            return n
        if n == _ERR_TOO_BIG:
            raise ValueError(f"{len(data)} bytes exceed the {self.max_write_size} one record "
                             f"can carry at MTU {self._conn.mtu}")
        raise self._dead_error()

    def read(self) -> bytes | None:
        """Plaintext of the next received record, or None when none is waiting.

        After the peer's close_notify or a fatal alert, raises once the
        queue is empty.
        """
        conn = self._conn
        n = _pd_read(conn)
        if n >= 0:
            return _unpack(conn.data, n)  # type: ignore[no-any-return]
        if conn.state <= _ESTABLISHED:
            return None
        raise self._dead_error()

    # --------------------------------------------------------------- batches

    def write_batch(self, payloads: Sequence[bytes]) -> list[bytes]:
        """Encrypt each payload as one record, then return every queued datagram.

        The same records as ``write()`` once per payload followed by ``pull()``
        until None, in two calls into C instead of many. Raises ``ValueError``
        naming the first payload that exceeds ``max_write_size``; the payloads
        before it were written and stay queued for ``pull()``.
        """
        n = len(payloads)
        if n == 0:
            return []
        conn = self._conn
        joined = b"".join(payloads)
        sizes = ffi.new("size_t[]", list(map(len, payloads)))
        ends = _scratch("size_t[]", n + conn.out_len // 13 + 1)
        failed = ffi.new("size_t *")
        count: int = lib.pd_write_batch(conn, joined, sizes, n, ends, failed)
        if count >= 0:
            return _split(conn.data, ends, count)  # the datagrams, back to back
        if count == _ERR_TOO_BIG:
            raise ValueError(f"payload {failed[0]} ({len(payloads[failed[0]])} bytes) exceeds "
                             f"the {self.max_write_size} one record can carry at MTU {conn.mtu}")
        if count == _ERR_OVERSIZE:
            raise InternalError(f"OpenSSL wrote a record larger than the MTU ({conn.mtu})")
        raise self._dead_error()

    def feed_batch(self, datagrams: Sequence[bytes]) -> list[bytes]:
        """Feed received datagrams, then return every record now readable, in order.

        ``feed()`` for each, then ``read()`` until None, in two calls into C.
        Like ``feed()`` it never raises for what the peer sent.
        """
        conn = self._conn
        n = len(datagrams)
        joined = b"".join(datagrams)
        sizes = ffi.new("size_t[]", list(map(len, datagrams))) if n else ffi.NULL
        room = conn.plain_bytes + len(joined)
        if n == 0 and conn.plain_count == 0:
            return []
        out = _scratch("char[]", room or 1)
        ends = _scratch("size_t[]", conn.plain_count + len(joined) // 16 + n + 1)
        failed = ffi.new("int *")
        count: int = lib.pd_feed_read(conn, joined, sizes, n, out, room, ends, failed)
        if failed[0]:
            self._dead_error()  # drain the queue now; later calls raise it
        return _split(out, ends, count)

    # ----------------------------------------------------------- handshake

    def handshake(self) -> HandshakeStatus:
        """Advance the handshake; a client's first call sends its ClientHello."""
        if self._conn is _DEAD and self._final_state is ConnectionState.EXPORTED:
            raise self._dead_error()
        r = lib.pd_handshake(self._conn)
        if r == 1:
            return FINISHED
        if r == 0:
            return CONTINUE
        raise self._dead_error()

    def is_handshake_finished(self) -> bool:
        return bool(self._conn.state == _ESTABLISHED)

    @property
    def handshake_finished(self) -> bool:
        return self.is_handshake_finished()

    def get_timeout(self) -> float | None:
        """Seconds until ``handle_timeout()`` is due, or None when no timer runs."""
        t: float = lib.pd_get_timeout(self._conn)
        return None if t < 0 else t

    def handle_timeout(self) -> bool:
        """Retransmit if the timer expired; True when something was queued."""
        r: int = lib.pd_handle_timeout(self._conn)
        if r < 0:
            raise self._dead_error()
        return r > 0

    # --------------------------------------------------------------- state

    @property
    def state(self) -> ConnectionState:
        if self._conn is _DEAD:
            return self._final_state
        return ConnectionState(self._conn.state)

    @property
    def is_server(self) -> bool:
        return bool(self._conn.is_server)

    @property
    def context(self) -> DtlsContext:
        return self._context

    @property
    def mtu(self) -> int:
        return int(self._conn.mtu)

    @property
    def max_write_size(self) -> int:
        """Largest ``write()`` that fits one datagram with the agreed cipher (0 before)."""
        return int(self._conn.max_plaintext)

    @property
    def dropped_records(self) -> int:
        """Records dropped because the application left too much unread."""
        return int(self._conn.plain_dropped)

    def close(self) -> None:
        """Send close_notify (collect it with ``pull()``) and free OpenSSL's memory.

        Idempotent. Every later call but ``pull()`` raises ``ConnectionClosed``.
        """
        conn = self._conn
        if conn is _DEAD:
            return
        lib.pd_shutdown(conn)
        leftover = []
        while (datagram := self.pull()) is not None:
            leftover.append(datagram)
        self._final_state = ConnectionState(conn.state)
        if self._error is None and self._final_state is not ConnectionState.FAILED:
            self._error = ConnectionClosed("the association was closed by close()")
        elif self._error is None:
            self._dead_error()
        self._conn = _DEAD
        ffi.release(conn)
        self._leftover = leftover

    shutdown = close

    def __enter__(self) -> Dtls:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "server" if self._conn is not _DEAD and self.is_server else "client"
        return f"<Dtls {role} {self.state.name.lower()}>"

    # -------------------------------------------------------- introspection

    def _live(self) -> Any:
        conn = self._conn
        if conn is _DEAD:
            raise self._dead_error()
        return conn

    def _established(self) -> Any:
        conn = self._live()
        if conn.state != _ESTABLISHED:
            raise ValueError("the handshake has not finished")
        return conn

    def _after_handshake(self) -> Any:
        """The association once established (even if closed by the peer since), or None."""
        conn = self._conn
        if conn is _DEAD or not conn.max_plaintext:
            return None
        return conn

    @property
    def record_layer(self) -> str:
        """'engine' once the engine's own record layer carries the records, else 'openssl'."""
        return "engine" if self._conn is not _DEAD and lib.pd_compact(self._conn) else "openssl"

    @property
    def connection_id(self) -> bytes | None:
        """The CID the peer puts in records it sends us (RFC 9146), once negotiated;
        ``b""`` when we asked for none; None when no CID was negotiated."""
        return self._cid(0)

    @property
    def peer_connection_id(self) -> bytes | None:
        """The CID we put in records we send, as the peer asked; None when no CID was negotiated."""
        return self._cid(1)

    def _cid(self, which: int) -> bytes | None:
        if self._conn is _DEAD:
            return None
        out = ffi.new("const unsigned char **")
        n = lib.pd_get_cid(self._conn, which, out)
        return None if n < 0 else bytes(ffi.buffer(out[0], n))

    def version(self) -> str | None:
        """Negotiated protocol, e.g. 'DTLSv1.2', or None before the handshake."""
        conn = self._after_handshake()
        if conn is None:
            return None
        return str(ffi.string(lib.pd_version(conn)).decode())

    def cipher(self) -> tuple[str, str, int] | None:
        """(name, protocol, secret bits) like ``ssl.SSLSocket.cipher()``, or None."""
        conn = self._after_handshake()
        c = ffi.NULL if conn is None else lib.pd_cipher(conn)
        if c == ffi.NULL:
            return None
        return (ffi.string(lib.SSL_CIPHER_get_name(c)).decode(),
                ffi.string(lib.SSL_CIPHER_get_version(c)).decode(),
                int(lib.SSL_CIPHER_get_bits(c, ffi.NULL)))

    def session_reused(self) -> bool:
        """Whether the handshake resumed a session (an abbreviated handshake)."""
        return self._conn is not _DEAD and bool(lib.pd_session_reused(self._conn))

    def session(self) -> bytes | None:
        """A client's session, serialized, to pass as ``session=`` next time; None
        before the handshake, on servers, or when the server made it unresumable.

        The bytes are OpenSSL's DER (``i2d_SSL_SESSION``) followed by a check,
        so damaged bytes are refused with a warning instead of being offered;
        ``session=`` also takes bare DER. They hold the session's master
        secret: store them as a secret.
        """
        conn = self._after_handshake()
        if conn is None or conn.is_server:
            return None
        n = lib.pd_session_bytes(conn, ffi.NULL, 0)
        if n <= 0:
            return None
        buf = ffi.new("unsigned char[]", n)
        lib.pd_session_bytes(conn, buf, n)
        return frame_session(bytes(ffi.buffer(buf, n)))

    @property
    def extended_master_secret(self) -> bool:
        """Whether the handshake used the extended master secret (RFC 7627)."""
        conn = self._after_handshake()
        return conn is not None and bool(lib.pd_extms(conn))

    def export_keys(self, label: str | bytes, length: int, context: bytes | None = None) -> bytes:
        """RFC 5705 keying material; DTLS-SRTP uses label 'EXTRACTOR-dtls_srtp'.

        ``context=None`` and ``context=b''`` are different inputs, as the RFC says.
        """
        conn = self._established()
        if not 0 < length <= 65535:
            raise ValueError("length must be from 1 to 65535")
        label_bytes = label.encode("ascii") if isinstance(label, str) else bytes(label)
        if label_bytes in _RESERVED_LABELS:
            raise ValueError(f"{label_bytes.decode()!r} is reserved by TLS (RFC 5705 §4)")
        ctx_bytes = b"" if context is None else bytes(context)
        if len(ctx_bytes) > 65535:
            raise ValueError("context must be at most 65535 bytes")
        out = ffi.new("unsigned char[]", length)
        ok = lib.pd_export(conn, out, length, label_bytes, len(label_bytes),
                           ctx_bytes, len(ctx_bytes), int(context is not None))
        check(ok, InternalError, "keying material export failed")
        return bytes(ffi.buffer(out, length))

    def selected_srtp_profile(self) -> SrtpProfile | None:
        """The DTLS-SRTP profile the handshake agreed on, or None."""
        conn = self._after_handshake()
        profile = ffi.NULL if conn is None else lib.pd_srtp_profile(conn)
        if profile == ffi.NULL:
            return None
        return SrtpProfile.by_openssl_name(ffi.string(profile.name).decode())

    def srtp_keys(self) -> SrtpKeys:
        """SRTP master keys and salts for the agreed profile (RFC 5764 §4.2)."""
        self._established()
        profile = self.selected_srtp_profile()
        if profile is None:
            raise ValueError("no DTLS-SRTP profile was negotiated")
        material = self.export_keys(SRTP_EXPORTER_LABEL, profile.keying_material_length)
        return split_srtp_keying_material(profile, material, self.is_server)

    def psk_identity(self) -> str | None:
        """The PSK identity of this association (the client's), or None."""
        if self._conn is _DEAD:
            return None
        identity = lib.pd_psk_identity(self._conn)
        return None if identity == ffi.NULL else ffi.string(identity).decode(errors="replace")

    def selected_alpn_protocol(self) -> str | None:
        """The application protocol ALPN agreed on, or None."""
        conn = self._after_handshake()
        if conn is None:
            return None
        data = ffi.new("const unsigned char **")
        size = lib.pd_alpn(conn, data)
        return None if size == 0 else bytes(ffi.buffer(data[0], size)).decode(errors="replace")

    def get_fingerprint(self, algorithm: str = "sha-256") -> str | None:
        """RFC 8122 fingerprint of our own certificate, or None without one."""
        return self._context.fingerprint(algorithm)

    def get_peer_fingerprint(self, algorithm: str = "sha-256") -> str | None:
        """RFC 8122 fingerprint of the peer's certificate, or None if it sent none."""
        conn = self._live()
        if conn.ssl == ffi.NULL and digest_for(algorithm) == digest_for("sha-256"):
            digest = lib.pd_peer_sha256(conn)  # kept even when the DER was dropped
            return None if digest == ffi.NULL else format_fingerprint(bytes(ffi.buffer(digest, 32)))
        der = self.peer_certificate()
        return None if der is None else certificate_fingerprint(der, algorithm)

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate, DER-encoded, or None.

        An idle association that the server core compacted keeps only the
        certificate's sha-256 fingerprint, unless its context says
        ``keep_peer_certificate=True``; asking it for the DER then raises
        ``ValueError``.
        """
        conn = self._live()
        if conn.ssl == ffi.NULL:
            der = ffi.new("const unsigned char **")
            size = lib.pd_peer_der(conn, der)
            if size < 0:
                raise ValueError("this idle association kept only its peer's sha-256 fingerprint; "
                                 "DtlsContext(keep_peer_certificate=True) keeps the certificate")
            return bytes(ffi.buffer(der[0], size)) if size > 0 else None
        x509 = lib.SSL_get0_peer_certificate(conn.ssl)
        return None if x509 == ffi.NULL else x509_to_der(x509)

    def _accept_hello(self, hello: bytes) -> None:
        """Start a server handshake from a ClientHello whose cookie was verified."""
        if lib.pd_accept_hello(self._conn, hello, len(hello)) < 0:
            raise self._dead_error()

    # ---------------------------------------------------------- associations

    def export_association(self, binding: bytes = b"") -> bytes:
        """Move this established association out, sealed; the engine is then EXPORTED.

        The blob is AES-256-GCM-sealed under the context's first
        ``association_keys`` entry, bound to the context's suites, SRTP and
        ALPN settings and to ``binding`` (pass the same bytes to
        ``import_association``: the peer's address, a device id). No
        close_notify is sent; every later call on this engine raises.
        Requires the engine's record layer, and nothing left to ``pull()`` or
        ``read()``. The blob holds no plaintext key material.
        """
        context = self._context
        if not context.association_keys:
            raise ConfigurationError("export_association() needs DtlsContext(association_keys=[...])")
        conn = self._live()
        if conn.state != _ESTABLISHED:
            raise ValueError("only an established association can be exported")
        key_id, key = context.association_keys[0]
        out = ffi.new("unsigned char[]", 4096)
        n = lib.pd_export_association(conn, key, key_id, context.association_binding(binding),
                                      context.sequence_gap, out, len(out))
        if n == lib.PD_ASSOC_ERR_STATE:
            raise ValueError("this association keeps libssl's record layer "
                             f"(record_layer={self.record_layer!r}) and cannot be exported")
        if n == lib.PD_ASSOC_ERR_PENDING:
            raise ValueError("pull() every queued datagram and read() every record before exporting")
        if n < 0:
            raise InternalError(f"cannot export the association (error {n})", drain_errors())
        self._final_state = ConnectionState.EXPORTED
        self._error = ConnectionClosed("the association was exported (export_association())")
        self._conn = _DEAD
        ffi.release(conn)
        return bytes(ffi.buffer(out, n))

    @classmethod
    def import_association(cls, state: bytes, *, context: DtlsContext, binding: bytes = b"") -> Dtls:
        """An engine continuing an exported association: the peer notices nothing.

        Raises ``AssociationError`` for a blob that a key of
        ``context.association_keys`` does not open, that was tampered with or
        cut, bound to other ``binding`` bytes or context settings, or of
        another format version.
        """
        if not context.association_keys:
            raise ConfigurationError("import_association() needs DtlsContext(association_keys=[...])")
        state = bytes(state)
        keys = b"".join(key_id + key for key_id, key in context.association_keys)
        err = ffi.new("int *")
        conn = lib.pd_import_association(context.ssl_ctx, keys, len(context.association_keys),
                                         context.association_binding(binding), state, len(state),
                                         context.initial_rto_us, context.max_rto_us, err)
        drain_errors()
        if conn == ffi.NULL:
            raise AssociationError(_IMPORT_ERRORS.get(err[0], f"cannot import the association "
                                                              f"(error {err[0]})"))
        return cls._adopt(conn, context)

    @classmethod
    def _adopt(cls, conn: Any, context: DtlsContext) -> Dtls:
        """An engine around an established ``pd_conn`` the caller owned (an imported
        one, or one a server parked): the engine owns it from now on."""
        conn.keep_peer_cert = int(context.keep_peer_certificate)
        engine = cls.__new__(cls)
        engine._conn = ffi.gc(conn, lib.pd_conn_free)
        engine._context = context
        engine._hook = None
        engine._error = None
        engine._leftover = None
        engine._final_state = ConnectionState.CLOSED
        return engine

    def _disown(self) -> None:
        """Hand the ``pd_conn`` to whoever took it (a server's parking lot): this
        engine neither uses nor frees it again."""
        ffi.gc(self._conn, None)
        self._conn = _DEAD

    def _drop_hook(self) -> None:
        """Forget verify_peer once the handshake no longer needs it."""
        if self._hook is not None and self._conn is not _DEAD:
            self._conn.verify_hook = ffi.NULL
            self._hook = None

    def release_buffers(self) -> bool:
        """Free the buffers an idle established association does not need.

        With the engine's record layer that is its ~2 KB output buffer; with
        libssl's, OpenSSL's ~33 KB of record buffers. They come back by
        themselves on the next use. For servers holding many quiet peers;
        True if something was freed.
        """
        return bool(lib.pd_release_buffers(self._conn))

    # --------------------------------------------------------------- errors

    def _dead_error(self) -> Exception:
        """The exception that explains why this association cannot go on.

        Built once, from OpenSSL's queue and the alerts seen, then raised by
        every later call, so the queue is drained exactly when it failed.
        """
        if self._error is not None:
            return self._error
        conn = self._conn
        state = conn.state
        if state == lib.PD_STATE_NEW or state == lib.PD_STATE_HANDSHAKING:
            return ValueError("the handshake has not finished")
        if state == lib.PD_STATE_PEER_CLOSED:
            self._error = ConnectionClosed("the peer closed the association (close_notify)")
            return self._error
        if state == lib.PD_STATE_CLOSED:
            self._error = ConnectionClosed("the association was closed by close()")
            return self._error
        reasons = drain_errors()
        received = Alert.from_info(conn.alert_received, True)
        sent = Alert.from_info(conn.alert_sent, False)
        if conn.max_plaintext:  # the handshake had finished
            if received is not None and received.fatal:
                self._error = AlertReceived(received, reasons)
            else:
                self._error = DtlsError(f"association failed{f' ({sent})' if sent else ''}", reasons)
            return self._error
        self._error = self._handshake_error(conn, reasons, received, sent)
        return self._error

    @staticmethod
    def _handshake_error(conn: Any, reasons: tuple[str, ...], received: Alert | None,
                         sent: Alert | None) -> HandshakeError:
        callback_error = take_callback_error()
        if callback_error is not None:
            what = "verify_peer" if conn.hook_refused else "a PSK callback"
            cls = CertificateError if conn.hook_refused == 1 else HandshakeError
            error = cls(f"handshake failed: {what} raised "
                        f"{type(callback_error).__name__}: {callback_error}", reasons, sent)
            error.__cause__ = callback_error
            return error
        if conn.hook_refused == 1:
            return CertificateError("peer certificate refused by verify_peer", reasons, sent,
                                    lib.X509_V_ERR_CERT_REJECTED)
        if conn.hook_refused == 2:
            return HandshakeError("PSK identity refused by verify_peer", reasons, sent)
        if lib.pd_cid_failed(conn):
            return HandshakeError("handshake failed: Connection ID records need an AEAD suite "
                                  "on the engine's record layer (AES-GCM, AES-CCM, ChaCha20-Poly1305)",
                                  reasons, sent)
        if conn.deadline_passed or any("timeout" in r for r in reasons):
            return Dtls._timeout_error(conn, reasons, sent)
        if conn.srtp_refused:
            return HandshakeError("no DTLS-SRTP profile in common", reasons, sent or received)
        if conn.pin_mismatch:
            return FingerprintMismatch("peer certificate does not match the pinned fingerprint",
                                       reasons, sent, lib.X509_V_ERR_CERT_REJECTED)
        verify = lib.SSL_get_verify_result(conn.ssl)
        if verify != lib.X509_V_OK and sent is not None and sent.description in _CERT_ALERTS:
            text = ffi.string(lib.X509_verify_cert_error_string(verify)).decode()
            return CertificateError(f"peer certificate rejected: {text}", reasons, sent, verify)
        if received is not None and received.fatal:
            return HandshakeError(f"handshake failed: peer sent {received}", reasons, received)
        if any("no ciphers available" in r or "no shared cipher" in r for r in reasons):
            level = lib.SSL_CTX_get_security_level(lib.SSL_get_SSL_CTX(conn.ssl))
            return HandshakeError(
                f"handshake failed: no cipher suite in common (OpenSSL security level {level} "
                f"refuses weaker suites; lower it with DtlsContext(security_level=...) only on "
                f"purpose)", reasons, sent)
        return HandshakeError("handshake failed" + (f": {sent}" if sent else ""), reasons, sent)

    @staticmethod
    def _timeout_error(conn: Any, reasons: tuple[str, ...], sent: Alert | None) -> HandshakeError:
        what = ("the handshake deadline passed" if conn.deadline_passed
                else "too many retransmissions")
        text = f"handshake timed out: {what}"
        psk = conn.ssl != ffi.NULL and _uses_psk(conn.ssl)
        if conn.protected_seen:
            # Records at the new epoch that never completed the handshake did not
            # authenticate: DTLS drops those silently (RFC 6347 §4.1.2.7).
            text += (f"; {conn.protected_seen} records from the peer failed authentication"
                     + (": a wrong pre-shared key is the usual cause" if psk else ""))
        elif psk:
            text += ("; the peer never answered our encrypted flight: with PSK, a wrong "
                     "pre-shared key looks like this (DTLS drops records that fail to authenticate)")
        return HandshakeError(text, reasons, sent)

    def _expire(self) -> HandshakeError:
        """Fail a handshake whose deadline a server core enforces; the error says why."""
        lib.pd_expire(self._conn)
        error = self._dead_error()
        assert isinstance(error, HandshakeError)
        return error


_IMPORT_ERRORS = {
    lib.PD_ASSOC_ERR_FORMAT: "the association blob is truncated or malformed",
    lib.PD_ASSOC_ERR_VERSION: "the association blob has another format version",
    lib.PD_ASSOC_ERR_KEY: "no key of association_keys has the blob's key id (removed, or another deployment's)",
    lib.PD_ASSOC_ERR_AUTH: ("the association blob does not authenticate: tampered, sealed under "
                            "another key, or bound to other binding= bytes or context settings"),
    lib.PD_ASSOC_ERR_SUITE: "this context does not offer the association's suite or SRTP profile",
    lib.PD_ASSOC_ERR_NOMEM: "out of memory importing the association",
}


def _uses_psk(ssl: Any) -> bool:
    """Whether the handshake in progress negotiated a PSK suite."""
    cipher = lib.SSL_get_pending_cipher(ssl)
    if cipher == ffi.NULL:
        cipher = lib.SSL_get_current_cipher(ssl)
    return cipher != ffi.NULL and "PSK" in ffi.string(lib.SSL_CIPHER_get_name(cipher)).decode()
