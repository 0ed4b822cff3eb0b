"""Exceptions, grouped by what the caller does next.

``DtlsError`` is the root. Configuration problems are the caller's to fix
before retrying; handshake and alert errors end one association; misuse of
the API raises ``ValueError``/``TypeError`` instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Alert",
    "AlertDescription",
    "AssociationError",
    "AlertReceived",
    "CertificateError",
    "ConfigurationError",
    "ConnectionClosed",
    "DtlsError",
    "FingerprintMismatch",
    "HandshakeError",
    "InternalError",
    "LimitExceeded",
    "ResumptionWarning",
]


class AlertDescription(enum.IntEnum):
    """TLS alert descriptions (RFC 5246 §7.2, RFC 8446 §6)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    NO_RENEGOTIATION = 100
    UNSUPPORTED_EXTENSION = 110
    UNRECOGNIZED_NAME = 112
    UNKNOWN_PSK_IDENTITY = 115
    NO_APPLICATION_PROTOCOL = 120


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as seen on the wire; ``received`` is False for ones we sent."""

    level: int
    description: int
    received: bool

    @classmethod
    def from_info(cls, value: int, received: bool) -> Alert | None:
        """Decode OpenSSL's info-callback value ``(level << 8) | description``."""
        if value < 0:
            return None
        return cls(value >> 8, value & 0xFF, received)

    @property
    def fatal(self) -> bool:
        return self.level == 2

    @property
    def name(self) -> str:
        try:
            return AlertDescription(self.description).name.lower()
        except ValueError:
            return f"alert_{self.description}"

    def __str__(self) -> str:
        side = "received" if self.received else "sent"
        level = "fatal" if self.fatal else "warning"
        return f"{level} alert {self.name} ({self.description}) {side}"


class DtlsError(Exception):
    """Root of every error this library raises on purpose.

    ``reasons`` holds OpenSSL's error-queue entries that explain it.
    """

    def __init__(self, message: str, reasons: tuple[str, ...] = ()) -> None:
        full = message if not reasons else f"{message} ({'; '.join(reasons)})"
        super().__init__(full)
        self.message = message
        self.reasons = reasons


class ConfigurationError(DtlsError):
    """A certificate, key, cipher list or option was refused; fix and retry."""


class InternalError(DtlsError):
    """OpenSSL failed where it should not; a bug here or in the environment."""


class LimitExceeded(DtlsError):
    """A configured limit (peers, handshakes, queued bytes) refused the work."""


class ConnectionClosed(DtlsError):
    """The association is closed: by our ``close()`` or the peer's close_notify."""


class HandshakeError(DtlsError):
    """The handshake failed; the association is dead.

    ``alert`` is the alert that ended it (sent or received) when there was one;
    any alert we owe the peer is waiting in ``pull()``.
    """

    def __init__(self, message: str, reasons: tuple[str, ...] = (),
                 alert: Alert | None = None) -> None:
        super().__init__(message, reasons)
        self.alert = alert


class CertificateError(HandshakeError):
    """The peer's certificate was refused (chain, expiry, hostname, pin)."""

    def __init__(self, message: str, reasons: tuple[str, ...] = (),
                 alert: Alert | None = None, verify_code: int = 0) -> None:
        super().__init__(message, reasons, alert)
        self.verify_code = verify_code


class FingerprintMismatch(CertificateError):
    """The peer's certificate does not match the pinned fingerprint."""


class AlertReceived(DtlsError):
    """The peer ended an established association with a fatal alert."""

    def __init__(self, alert: Alert, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(f"peer sent {alert}", reasons)
        self.alert = alert


class AssociationError(DtlsError):
    """A sealed association blob cannot be imported: a wrong or removed key,
    tampered or truncated bytes, another format version, a binding or
    context that differs from the exporter's, or a suite the context lacks."""


class ResumptionWarning(UserWarning):
    """A saved session was not offered (corrupt, expired, foreign, or failing the
    pins or CA it must pass); the handshake is a full one instead."""


for _name in __all__:
    globals()[_name].__module__ = "pydtls_ossl"
