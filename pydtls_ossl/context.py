"""``DtlsContext``: one ``SSL_CTX`` shared by every engine of one configuration.

A context per configuration, not per connection: a fresh ``SSL_CTX`` per
association costs a third of the handshake rate and memory for nothing.
Defaults are DTLS 1.2 only, ECDHE with AEAD ciphers, renegotiation off, and
peer verification that the caller chooses explicitly (see ``Verify``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import time
from typing import Any, Callable, Iterable, Literal, Sequence

from ._errors import ConfigurationError, InternalError
from ._ffi import check, check_ptr, drain_errors, ffi, lib
from .certs import (CertificateSource, format_fingerprint, load_certificates,
                    load_private_key, x509_digest)
from ._callbacks import ClientPsk, ServerPsk
from ._cid import ConnectionIdSpec, connection_ids
from ._callbacks import install as install_callbacks
from ._resumption import OnNewSession, Resumption, SessionGet, SessionNew, SessionRemove
from .stores import SessionStore
from .srtp import SrtpProfile

__all__ = ["DEFAULT_CIPHERS", "DEFAULT_GROUPS", "DEFAULT_PSK_CIPHERS", "CookieSecret", "DtlsContext", "Verify",
           "address_parts"]

#: ECDHE key exchange with AEAD ciphers only, ECDSA first (what WebRTC uses).
DEFAULT_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
))
#: Pre-shared-key suites, AEAD only; CCM8 last (CoAP's mandatory suite, 8-byte tag).
DEFAULT_PSK_CIPHERS = ":".join((
    "ECDHE-PSK-CHACHA20-POLY1305",
    "PSK-AES128-GCM-SHA256",
    "PSK-AES256-GCM-SHA384",
    "PSK-CHACHA20-POLY1305",
    "PSK-AES128-CCM",
    "PSK-AES128-CCM8",
))
#: P-256 must be offered for P-256 certificates to be usable at all.
DEFAULT_GROUPS = "X25519:P-256:P-384"

_MIN_MTU = 256
_MAX_MTU = 65507
_log = logging.getLogger("pydtls_ossl")


class Verify(enum.Enum):
    """How the peer is authenticated. There is no silent default for clients.

    ``CA``: the peer's chain must verify against ``cafile``/``cadata`` (and
    the hostname, when one is given). ``FINGERPRINT``: the peer's leaf
    certificate must match a pinned fingerprint (WebRTC, RFC 8122); chain and
    dates are not checked. ``ANY_CERTIFICATE``: the peer must present a
    certificate, any is accepted, and the application checks
    ``get_peer_fingerprint()`` itself after the handshake (for an SDP answer
    that arrives late). ``PSK``: a pre-shared key authenticates both sides (set
    by ``psk=``); a certificate suite the server might pick is then refused.
    ``NONE``: no authentication at all; say so on purpose.
    """

    CA = "ca"
    FINGERPRINT = "fingerprint"
    ANY_CERTIFICATE = "any-certificate"
    PSK = "psk"
    NONE = "none"


#: OpenSSL 3.0 treats a timer with under 15 ms left as expired, so a shorter
#: RTO retransmits on every read and exhausts its retries inside one call.
MIN_RTO = 0.02


def _seconds_to_us(seconds: float, what: str) -> int:
    if not MIN_RTO <= seconds <= 600:
        raise ValueError(f"{what} must be between {MIN_RTO} and 600 seconds, got {seconds}")
    return int(seconds * 1_000_000)


def address_parts(address: Any) -> tuple[bytes, int]:
    """What a cookie binds of a peer address: (host, port) of a socket address
    tuple (IPv4 or IPv6), or the bytes/str key an application uses, port 0."""
    if type(address) is tuple and len(address) >= 2:
        return str(address[0]).encode(), int(address[1]) & 0xFFFF
    if isinstance(address, bytes):
        return address, 0
    if isinstance(address, str):
        return address.encode(), 0
    raise TypeError(f"cannot use {type(address).__name__} as a peer address")


class CookieSecret:
    """The rotating secret behind stateless cookies (RFC 6347 §4.2.1).

    The secret of each ``period`` is derived from one base secret and the
    wall-clock period number, so every process given the same base secret
    issues and accepts the same cookies without talking to the others.
    Cookies of the current and the previous period are accepted.
    """

    def __init__(self, secret: bytes | None = None, *, period: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("a cookie secret needs at least 16 bytes")
        if period <= 0:
            raise ValueError("period must be positive")
        self._base = secret if secret is not None else os.urandom(32)
        self.period = period
        self._clock = clock
        self._keys = ffi.new("pd_cookie_keys *")
        self._next_rotation = float("-inf")

    def _derive(self, index: int) -> bytes:
        return hmac.new(self._base, b"pydtls_ossl cookie %d" % index, hashlib.sha256).digest()

    def keys(self) -> Any:
        """The C key pair for now (current and previous period), refreshed as time passes."""
        now = self._clock()
        if now >= self._next_rotation:
            index = int(now // self.period)
            current, previous = self._derive(index), self._derive(index - 1)
            lib.pd_cookie_keys_set(self._keys, current, len(current), previous, len(previous))
            self._next_rotation = (index + 1) * self.period
        return self._keys


def _association_keys(keys: Sequence[bytes] | None) -> tuple[tuple[bytes, bytes], ...]:
    """(key id, key) pairs: the first seals exported associations, every one opens."""
    if keys is None:
        return ()
    if isinstance(keys, (bytes, bytearray)):
        raise TypeError("association_keys is a list of keys: association_keys=[key]")
    pairs = []
    for key in keys:
        key = bytes(key)
        if len(key) != 32:
            raise ValueError("association keys are 32 bytes each")
        pairs.append((hashlib.sha256(b"pydtls_ossl association key id\0" + key).digest()[:4], key))
    if not pairs:
        raise ValueError("association_keys must not be empty; pass None for none")
    return tuple(pairs)


def check_mtu(mtu: int) -> int:
    """Validate a datagram MTU (the UDP payload size, not the link MTU)."""
    if not isinstance(mtu, int) or not _MIN_MTU <= mtu <= _MAX_MTU:
        raise ValueError(f"mtu must be an int from {_MIN_MTU} to {_MAX_MTU}, got {mtu!r}")
    return mtu


class DtlsContext:
    """Certificates, verification and ciphers shared by many ``Dtls`` engines.

    ``cert``/``key`` take PEM or DER bytes, PEM text or file paths (a PEM
    ``cert`` may carry the chain after the leaf). ``mtu`` is the largest UDP
    payload an engine's ``pull()`` may return. ``initial_rto``/``max_rto`` set
    the retransmission timer (seconds; doubled per timeout, RFC 6347 §4.2.4).
    ``srtp_profiles`` offers (client) or accepts (server) DTLS-SRTP profiles
    in order of preference; with ``srtp_required`` (the default once profiles
    are given) a handshake without a common profile fails.

    Pre-shared keys: ``psk=(identity, key)`` or ``psk=fn(hint) -> (identity,
    key)`` for clients; ``psk_keys={identity: key}`` or ``psk_keys=fn(identity)
    -> key | None`` for servers (an unknown identity is refused with
    unknown_psk_identity); ``psk_identity_hint`` is what a server announces.
    ``ciphers`` defaults to AEAD ECDHE certificate suites, AEAD PSK suites when
    PSK is configured, or both for a server doing both. ``security_level`` sets
    OpenSSL's level (Debian defaults to 2). When ``ciphers`` names suites the
    default level refuses (CCM_8 from OpenSSL 3.5 on, rated 64 bits for its
    8-byte tag), the level is lowered only as far as those suites need, with a
    log line, and ``security_level`` reports it; the default suites never lower
    it. ``cookie_secret``
    (bytes or a ``CookieSecret``) is shared by servers that must accept each
    other's cookies; by default each context has its own random one.
    ``alpn_protocols`` is offered by a client and, on a server, the list it
    picks from by its own order (no overlap: no_application_protocol).
    ``keylog`` appends NSS key-log lines to a file so Wireshark can decrypt a
    capture; without it ``$SSLKEYLOGFILE`` is honoured. Both expose every
    session key to whoever reads the file.

    ``handshake_timeout`` (seconds, default 30; None for none) bounds a
    handshake from its first step to its end, through ``get_timeout()`` /
    ``handle_timeout()``, so a peer that never finishes (a wrong PSK, a
    black hole) ends in ``HandshakeError``; ``DtlsServer`` and the surfaces
    use the same value.

    Resumption (README "Session resumption"): ``session=`` is what a client
    of this context offers; ``on_new_session(id, session)`` is told of every
    new session. Servers keep an internal cache (``session_cache``,
    ``session_cache_size``, ``session_timeout`` seconds) and issue tickets
    (``session_tickets``); ``session_get``/``session_new``/``session_remove``
    or ``session_store=`` replace the internal cache by an external one;
    ``ticket_secret`` (32+ bytes) derives the ticket keys from one secret and
    the clock's ``ticket_period``, so that every server holding it resumes
    the others' tickets. ``session_context_id`` names the service; it is
    required when clients are verified and sessions leave the context.

    An idle association (``release_buffers()``, which ``DtlsServer`` calls
    for quiet peers) keeps only its peer certificate's sha-256 fingerprint,
    not the certificate, unless ``keep_peer_certificate=True``.

    ``association_keys=[key, ...]`` (32 bytes each; the first seals, every
    one opens, so keys rotate) lets ``Dtls.export_association()`` move an
    established association out of the process and ``import_association()``
    continue it; an import jumps the write sequence number by
    ``sequence_gap`` plus a random amount, so no nonce is ever reused.

    Connection ID (RFC 9146, README "Connection ID"): ``connection_id=True``
    (random CIDs of ``connection_id_length`` bytes, default 8), fixed
    ``bytes`` (``b""``: send the peer's CID, ask for none), or a function
    returning each association's CID, offers the ``connection_id`` extension;
    once both sides agree, records carry the CID, so a server finds the
    association when the peer's address changes. ``record_padding=N`` pads
    the inner plaintext of CID records to a multiple of N bytes (default: no
    padding). CIDs need ``record_layer="engine"`` and an AEAD suite.

    ``max_handshake_message_size`` (16 KiB) bounds what a peer can make a
    handshaking association reassemble; raise it for long certificate chains.

    ``record_layer="engine"`` (the default): once a handshake with an AEAD
    suite (AES-GCM, ChaCha20-Poly1305) finishes, the engine protects records
    itself with OpenSSL's AEAD and frees the SSL object, as kernel TLS does:
    ~3 KB instead of ~35 KB per established association and fewer
    instructions per record. ``"openssl"`` keeps libssl's record layer for
    the association's life (as do suites the engine does not carry).
    """

    def __init__(
        self,
        cert: CertificateSource | None = None,
        key: CertificateSource | None = None,
        *,
        password: bytes | None = None,
        verify: Verify | str | None = None,
        cafile: str | os.PathLike[str] | None = None,
        cadata: bytes | str | None = None,
        psk: ClientPsk | None = None,
        psk_keys: ServerPsk | None = None,
        psk_identity_hint: str | None = None,
        ciphers: str | None = None,
        groups: str = DEFAULT_GROUPS,
        security_level: int | None = None,
        mtu: int = 1200,
        initial_rto: float = 1.0,
        max_rto: float = 60.0,
        srtp_profiles: Sequence[SrtpProfile | str] | None = None,
        srtp_required: bool = True,
        cookie_secret: bytes | CookieSecret | None = None,
        alpn_protocols: Sequence[str] | None = None,
        keylog: str | os.PathLike[str] | None = None,
        record_layer: Literal["engine", "openssl"] = "engine",
        handshake_timeout: float | None = 30.0,
        session: bytes | None = None,
        on_new_session: OnNewSession | None = None,
        session_cache: bool = True,
        session_cache_size: int = 20480,
        session_timeout: float = 300,
        session_context_id: bytes | None = None,
        session_tickets: bool = True,
        session_get: SessionGet | None = None,
        session_new: SessionNew | None = None,
        session_remove: SessionRemove | None = None,
        ticket_secret: bytes | None = None,
        ticket_period: float = 3600.0,
        session_store: SessionStore | None = None,
        keep_peer_certificate: bool = False,
        association_keys: Sequence[bytes] | None = None,
        sequence_gap: int = 2**20,
        max_handshake_message_size: int = 16384,
        connection_id: ConnectionIdSpec = None,
        connection_id_length: int | None = None,
        record_padding: int = 0,
    ) -> None:
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together: pass both or neither")
        if record_layer not in ("engine", "openssl"):
            raise ValueError(f"record_layer must be 'engine' or 'openssl', got {record_layer!r}")
        self.record_layer = record_layer
        self.connection_ids = connection_ids(connection_id, connection_id_length, record_padding)
        if self.connection_ids is not None and record_layer != "engine":
            raise ConfigurationError("connection_id needs record_layer='engine': libssl's record "
                                     "layer has no Connection ID records")
        self.keep_peer_certificate = bool(keep_peer_certificate)
        self.association_keys = _association_keys(association_keys)
        if not isinstance(sequence_gap, int) or not 0 <= sequence_gap <= 2**40:
            raise ValueError("sequence_gap is 0 to 2**40 records")
        self.sequence_gap = sequence_gap
        if handshake_timeout is not None and not 0 < handshake_timeout <= 86400:
            raise ValueError(f"handshake_timeout must be None or 0 to 86400 seconds, "
                             f"got {handshake_timeout}")
        self.handshake_timeout = handshake_timeout
        self.mtu = check_mtu(mtu)
        self.initial_rto_us = _seconds_to_us(initial_rto, "initial_rto")
        self.max_rto_us = _seconds_to_us(max_rto, "max_rto")
        if self.max_rto_us < self.initial_rto_us:
            raise ValueError("max_rto must not be below initial_rto")
        has_ca = cafile is not None or cadata is not None
        self.psk = psk
        self.psk_keys = psk_keys
        if psk is not None and not callable(psk) and (not isinstance(psk, tuple) or len(psk) != 2):
            raise TypeError("psk must be (identity, key) or a function of the hint")
        self.verify: Verify | None = Verify(verify) if verify is not None else (
            Verify.CA if has_ca else Verify.PSK if psk is not None else None)
        if self.verify is Verify.CA and not has_ca:
            raise ConfigurationError("Verify.CA needs cafile= or cadata=")
        self._fingerprints: dict[str, str] = {}
        self.srtp_profiles = tuple(SrtpProfile.parse(p) for p in srtp_profiles or ())
        if srtp_profiles is not None and not self.srtp_profiles:
            raise ValueError("srtp_profiles must not be empty; pass None for no DTLS-SRTP")
        self.srtp_required = bool(self.srtp_profiles) and srtp_required
        self.cookies = (cookie_secret if isinstance(cookie_secret, CookieSecret)
                        else CookieSecret(cookie_secret))
        self.resumption = Resumption(
            session=session, on_new_session=on_new_session, cache=session_cache,
            cache_size=session_cache_size, timeout=session_timeout, context_id=session_context_id,
            tickets=session_tickets, get=session_get, new=session_new, remove=session_remove,
            ticket_secret=ticket_secret, ticket_period=ticket_period, store=session_store)
        if self.verify in (Verify.CA, Verify.ANY_CERTIFICATE) and cert is not None:
            self.resumption.require_context_id("a server context that")

        ctx = check_ptr(lib.SSL_CTX_new(lib.DTLS_method()), InternalError, "SSL_CTX_new")
        self._ctx = ffi.gc(ctx, lib.SSL_CTX_free)
        named_suites = ciphers is not None
        if ciphers is None:
            suites = []
            if cert is not None or (psk is None and psk_keys is None):
                suites.append(DEFAULT_CIPHERS)
            if psk is not None or psk_keys is not None:
                suites.append(DEFAULT_PSK_CIPHERS)
            ciphers = ":".join(suites)
        self.ciphers = ciphers
        self._psk_handle: Any = None
        self._alpn_select: Any = None
        self.alpn_protocols = tuple(alpn_protocols or ())
        keylog_path = keylog if keylog is not None else os.environ.get("SSLKEYLOGFILE") or None
        self.keylog = open(keylog_path, "ab") if keylog_path is not None else None
        try:
            if security_level is not None:
                if not 0 <= security_level <= 5:
                    raise ValueError("security_level is 0 to 5")
                lib.SSL_CTX_set_security_level(ctx, security_level)
            self._configure(ciphers, groups)
            if not 1024 <= max_handshake_message_size <= 1 << 20:
                raise ValueError("max_handshake_message_size is 1 KiB to 1 MiB")
            lib.SSL_CTX_set_max_cert_list(ctx, max_handshake_message_size)
            if named_suites and security_level is None:
                self._level_for_named_suites(ciphers)
            self._psk_handle = install_callbacks(self)
            self.resumption.install(ctx, cert is not None or psk_keys is not None)
            if self.alpn_protocols:
                self._configure_alpn()
            if psk_identity_hint is not None:
                check(lib.SSL_CTX_use_psk_identity_hint(ctx, psk_identity_hint.encode()),
                      ConfigurationError, "bad psk_identity_hint")
            if cert is not None and key is not None:
                self._load_identity(cert, key, password)
            if has_ca:
                self._load_cas(cafile, cadata)
            if self.srtp_profiles:
                self._configure_srtp()
            if self.connection_ids is not None:
                check(lib.pd_ctx_enable_cid(ctx), InternalError, "cannot add the connection_id extension")
        finally:
            drain_errors()

    # -------------------------------------------------------------- setup

    def _configure(self, ciphers: str, groups: str) -> None:
        ctx = self._ctx
        check(lib.SSL_CTX_set_min_proto_version(ctx, lib.DTLS1_2_VERSION),
              InternalError, "cannot require DTLS 1.2")
        # No encrypt-then-MAC: with it, libssl's DTLS answers one forged CBC record with a
        # fatal bad_record_mac instead of dropping it (RFC 6347 §4.1.2.7). AEAD suites
        # (every default) are unaffected.
        lib.SSL_CTX_set_options(ctx, lib.SSL_OP_NO_RENEGOTIATION | lib.SSL_OP_NO_COMPRESSION
                                | lib.SSL_OP_CIPHER_SERVER_PREFERENCE | lib.SSL_OP_NO_QUERY_MTU
                                | lib.SSL_OP_NO_ENCRYPT_THEN_MAC)
        check(lib.SSL_CTX_set_cipher_list(ctx, ciphers.encode()), ConfigurationError,
              f"no usable cipher in {ciphers!r} at OpenSSL security level "
              f"{lib.SSL_CTX_get_security_level(ctx)} (a suite the level refuses needs "
              f"security_level= lowered on purpose)")
        check(lib.SSL_CTX_set1_groups_list(ctx, groups.encode()), ConfigurationError,
              f"bad groups list {groups!r}")
        lib.pd_ctx_enable_cookies(ctx)
        mode = lib.SSL_VERIFY_NONE
        if self.verify is Verify.CA:
            mode = lib.SSL_VERIFY_PEER | lib.SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        lib.SSL_CTX_set_verify(ctx, mode, ffi.NULL)

    def _level_for_named_suites(self, ciphers: str) -> None:
        """Lower the security level as far as the suites the caller named need, no further.

        OpenSSL 3.5 rates CCM_8 suites (8-byte tag) at 64 bits, below level 1,
        so CoAP's mandatory PSK-AES128-CCM8 needs level 0 there. Only suites
        named explicitly get this; the defaults never lower the level.
        """
        level = self.security_level
        needed = lib.pd_ctx_level_for_ciphers(self._ctx)
        if 0 <= needed < level:
            lib.SSL_CTX_set_security_level(self._ctx, needed)
            _log.warning("pydtls_ossl: OpenSSL security level lowered from %d to %d because "
                         "ciphers=%r names suites that level %d refuses", level, needed, ciphers,
                         level)

    def _configure_alpn(self) -> None:
        wire = b""
        for name in self.alpn_protocols:
            encoded = name.encode()
            if not 0 < len(encoded) < 256:
                raise ValueError(f"ALPN protocol names are 1 to 255 bytes: {name!r}")
            wire += bytes([len(encoded)]) + encoded
        if lib.SSL_CTX_set_alpn_protos(self._ctx, wire, len(wire)) != 0:  # 0 is success
            raise ConfigurationError("libssl refused the ALPN list", drain_errors())
        self._alpn_select = ffi.new("unsigned char[]", len(wire).to_bytes(2, "big") + wire)
        lib.pd_ctx_alpn_select(self._ctx, self._alpn_select, len(wire))

    def _configure_srtp(self) -> None:
        names = ":".join(p.openssl_name for p in self.srtp_profiles)
        if lib.SSL_CTX_set_tlsext_use_srtp(self._ctx, names.encode()) != 0:  # 0 is success
            raise ConfigurationError(f"libssl refused SRTP profiles {names}", drain_errors())
        if self.srtp_required:
            lib.pd_ctx_require_srtp(self._ctx)

    def _load_identity(self, cert: CertificateSource, key: CertificateSource,
                       password: bytes | None) -> None:
        chain = load_certificates(cert)
        pkey = load_private_key(key, password)
        if lib.X509_check_private_key(chain[0], pkey) != 1:
            raise ConfigurationError("certificate and private key do not match", drain_errors())
        check(lib.SSL_CTX_use_certificate(self._ctx, chain[0]), ConfigurationError,
              "certificate refused (too weak for the security level?)")
        for extra in chain[1:]:
            check(lib.SSL_CTX_add1_chain_cert(self._ctx, extra), ConfigurationError,
                  "chain certificate refused")
        check(lib.SSL_CTX_use_PrivateKey(self._ctx, pkey), ConfigurationError,
              "private key refused")

    def _load_cas(self, cafile: str | os.PathLike[str] | None, cadata: bytes | str | None) -> None:
        if cafile is not None:
            check(lib.SSL_CTX_load_verify_locations(self._ctx, os.fsencode(cafile), ffi.NULL),
                  ConfigurationError, f"cannot load CA file {os.fspath(cafile)!r}")
        if cadata is not None:
            store = lib.SSL_CTX_get_cert_store(self._ctx)
            for x509 in load_certificates(cadata if isinstance(cadata, bytes) else cadata.encode()):
                check(lib.X509_STORE_add_cert(store, x509), ConfigurationError,
                      "CA certificate refused")

    # ----------------------------------------------------------- queries

    # ------------------------------------------------------------ sockets

    def wrap_socket(self, sock: Any, server_side: bool = False, server_hostname: str | None = None,
                    expected_peer_fingerprint: str | Sequence[str] | None = None,
                    do_handshake_on_connect: bool = True, *, cookies: bool = True,
                    session: bytes | None = None) -> Any:
        """A blocking ``DtlsSocket`` on a UDP socket, in the manner of ``ssl``.

        A connected socket shakes hands at once (unless told not to); otherwise
        ``connect()`` does. ``server_side=True`` serves the one peer the socket
        is connected to and, unless ``cookies=False``, first makes it prove its
        address with the stateless cookie exchange (a HelloVerifyRequest).
        Many peers on one socket: ``listen()``. A client's ``session=`` (bytes
        from an earlier ``session()``) asks to resume.
        """
        from .engine import Dtls
        from .sockets import DtlsSocket
        peer = None
        if server_side:
            try:
                peer = sock.getpeername()
            except OSError:
                raise ValueError("wrap_socket(server_side=True) serves the one peer a connected "
                                 "socket talks to: connect() it first, or use listen()") from None
        engine = Dtls(is_server=server_side, context=self, server_hostname=server_hostname,
                      expected_peer_fingerprint=expected_peer_fingerprint,
                      peer_address=peer if cookies else None, session=session)
        return DtlsSocket(sock, engine, do_handshake_on_connect)

    def listen(self, address: Any, *, export_on_close: bool = False, reuse_port: bool = False,
               **limits: Any) -> Any:
        """A ``DtlsListener`` bound to ``address``; ``limits`` go to ``DtlsServer``.

        ``export_on_close`` (with ``association_store=``): ``close()`` moves the
        established peers into the store, for a restart they never notice.
        ``reuse_port``: SO_REUSEPORT, for several processes on one port.
        """
        from .sockets import DtlsListener
        return DtlsListener(self, address, export_on_close=export_on_close, reuse_port=reuse_port,
                            **limits)

    def association_binding(self, binding: bytes) -> bytes:
        """What a sealed association is bound to: the settings an importer must share
        (suites, SRTP profiles, ALPN) and the caller's own ``binding`` bytes."""
        h = hashlib.sha256(b"pydtls_ossl association binding v1")
        for part in (self.ciphers.encode(), ",".join(p.openssl_name for p in self.srtp_profiles).encode(),
                     ",".join(self.alpn_protocols).encode(), bytes(binding)):
            h.update(len(part).to_bytes(4, "big") + part)
        return h.digest()

    @property
    def security_level(self) -> int:
        return int(lib.SSL_CTX_get_security_level(self._ctx))

    @property
    def has_certificate(self) -> bool:
        return bool(lib.SSL_CTX_get0_certificate(self._ctx) != ffi.NULL)

    def fingerprint(self, algorithm: str = "sha-256") -> str | None:
        """Fingerprint of this context's own certificate, or None without one."""
        cached = self._fingerprints.get(algorithm)
        if cached is None:
            x509 = lib.SSL_CTX_get0_certificate(self._ctx)
            if x509 == ffi.NULL:
                return None
            cached = self._fingerprints[algorithm] = format_fingerprint(x509_digest(x509, algorithm))
        return cached

    @property
    def ssl_ctx(self) -> Any:
        """The underlying ``SSL_CTX *`` (owned by this object; do not free)."""
        return self._ctx

    def _role_check(self, is_server: bool, pins: Iterable[Any]) -> Verify:
        """The verification an engine of this role will use, or an error."""
        if list(pins):
            return Verify.FINGERPRINT
        if self.verify is Verify.FINGERPRINT:
            raise ConfigurationError("Verify.FINGERPRINT needs expected_peer_fingerprint=")
        if is_server and not self.has_certificate and self.psk_keys is None:
            raise ConfigurationError("a DTLS server needs cert= and key=, or psk_keys=")
        if self.verify is not None:
            return self.verify
        if is_server:
            return Verify.NONE  # servers, as in TLS, do not ask for client certificates
        raise ConfigurationError(
            "a client must say how it authenticates the server: "
            "expected_peer_fingerprint=..., cafile=/cadata= (Verify.CA), psk=..., "
            "or verify=Verify.NONE to accept any server on purpose")
