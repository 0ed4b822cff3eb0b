"""pydtls_ossl: DTLS 1.2 (RFC 6347) for Python over OpenSSL's libssl.

The core is the sans-IO ``Dtls`` engine: ``feed()`` received datagrams,
send what ``pull()`` returns, drive ``handshake()``, then ``write()``/
``read()`` one record at a time. ``DtlsContext`` holds what many engines
share. See README.md for a tour.
"""

from ._errors import (Alert, AlertDescription, AlertReceived, AssociationError,
                      CertificateError,
                      ConfigurationError, ConnectionClosed, DtlsError, FingerprintMismatch,
                      HandshakeError, InternalError, LimitExceeded, ResumptionWarning)
from ._ffi import openssl_version
from .certs import (Certificate, certificate_fingerprint, fingerprints_equal, format_fingerprint,
                    generate_certificate, parse_fingerprint)
from .context import DEFAULT_CIPHERS, DEFAULT_GROUPS, DtlsContext, Verify
from .engine import CONTINUE, FINISHED, ConnectionState, Dtls, HandshakeStatus
from .server import (AddressChanged, ConnectionEstablished, ConnectionEvicted, ConnectionRestored,
                     ConnectionTerminated, DataReceived, DtlsServer, ServerStats)
from .server_socket import ServerSocket
from .srtp import SrtpKeys, SrtpProfile
from .stores import (AssociationStore, DirectoryAssociationStore, MemoryAssociationStore,
                     MemorySessionStore, SessionStore)

__version__ = "0.1.0"

__all__ = [
    "Alert", "AlertDescription", "AlertReceived", "AssociationError", "CONTINUE", "Certificate", "CertificateError",
    "AddressChanged", "ConfigurationError", "ConnectionClosed", "ConnectionEstablished", "ConnectionEvicted", "ConnectionRestored", "ConnectionState",
    "ConnectionTerminated", "DEFAULT_CIPHERS", "DEFAULT_GROUPS", "DataReceived", "Dtls",
    "DtlsContext", "DtlsError", "DtlsServer", "ServerSocket", "ServerStats", "FINISHED", "FingerprintMismatch",
    "HandshakeError", "HandshakeStatus", "InternalError", "LimitExceeded", "ResumptionWarning", "AssociationStore", "DirectoryAssociationStore", "MemoryAssociationStore",
    "MemorySessionStore", "SessionStore", "SrtpKeys",
    "SrtpProfile", "Verify",
    "certificate_fingerprint", "fingerprints_equal", "format_fingerprint",
    "generate_certificate", "openssl_version", "parse_fingerprint",
]
