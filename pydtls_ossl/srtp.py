"""DTLS-SRTP (RFC 5764): profiles and the SRTP master keys a handshake yields.

The keying material comes from the RFC 5705 exporter with the label
``EXTRACTOR-dtls_srtp`` and is laid out as client key, server key, client
salt, server salt (RFC 5764 §4.2).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SRTP_EXPORTER_LABEL", "SrtpKeys", "SrtpProfile", "split_srtp_keying_material"]

SRTP_EXPORTER_LABEL = "EXTRACTOR-dtls_srtp"


class SrtpProfile(enum.Enum):
    """The SRTP protection profiles libssl negotiates, with their key sizes.

    Value: (OpenSSL name, IANA id, master key bytes, master salt bytes).
    """

    AES128_CM_SHA1_80 = ("SRTP_AES128_CM_SHA1_80", 0x0001, 16, 14)
    AES128_CM_SHA1_32 = ("SRTP_AES128_CM_SHA1_32", 0x0002, 16, 14)
    AEAD_AES_128_GCM = ("SRTP_AEAD_AES_128_GCM", 0x0007, 16, 12)  # RFC 7714
    AEAD_AES_256_GCM = ("SRTP_AEAD_AES_256_GCM", 0x0008, 32, 12)

    @property
    def openssl_name(self) -> str:
        return str(self.value[0])

    @property
    def id(self) -> int:
        return int(self.value[1])

    @property
    def key_length(self) -> int:
        return int(self.value[2])

    @property
    def salt_length(self) -> int:
        return int(self.value[3])

    @property
    def keying_material_length(self) -> int:
        return 2 * (self.key_length + self.salt_length)

    @classmethod
    def parse(cls, value: SrtpProfile | str | int) -> SrtpProfile:
        """By enum, IANA id, OpenSSL name, or the RFC/GnuTLS spelling."""
        if isinstance(value, SrtpProfile):
            return value
        for profile in cls:
            if value == profile.id:
                return profile
            if isinstance(value, str):
                name = value.upper().replace("HMAC_", "")
                if name in (profile.openssl_name, profile.name, f"SRTP_{profile.name}"):
                    return profile
        raise ValueError(f"unknown SRTP profile {value!r}; known: "
                         + ", ".join(p.openssl_name for p in cls))

    @classmethod
    def by_openssl_name(cls, name: str) -> SrtpProfile:
        for profile in cls:
            if profile.openssl_name == name:
                return profile
        raise ValueError(f"libssl selected an unknown SRTP profile {name!r}")


@dataclass(frozen=True, slots=True)
class SrtpKeys:
    """SRTP master keys and salts for both directions, and which one is ours.

    ``local_*`` protects what this endpoint sends; ``remote_*`` what it
    receives. libsrtp wants ``key + salt`` as one master key: see
    ``local_master``/``remote_master``.
    """

    profile: SrtpProfile
    client_key: bytes
    client_salt: bytes
    server_key: bytes
    server_salt: bytes
    is_server: bool

    @property
    def local_key(self) -> bytes:
        return self.server_key if self.is_server else self.client_key

    @property
    def local_salt(self) -> bytes:
        return self.server_salt if self.is_server else self.client_salt

    @property
    def remote_key(self) -> bytes:
        return self.client_key if self.is_server else self.server_key

    @property
    def remote_salt(self) -> bytes:
        return self.client_salt if self.is_server else self.server_salt

    @property
    def local_master(self) -> bytes:
        return self.local_key + self.local_salt

    @property
    def remote_master(self) -> bytes:
        return self.remote_key + self.remote_salt

    def __repr__(self) -> str:  # keys stay out of logs
        return f"SrtpKeys(profile={self.profile.name}, is_server={self.is_server})"


def split_srtp_keying_material(profile: SrtpProfile, material: bytes, is_server: bool) -> SrtpKeys:
    """Split exported material in RFC 5764 §4.2 order for ``profile``."""
    k, s = profile.key_length, profile.salt_length
    if len(material) != 2 * (k + s):
        raise ValueError(f"{profile.name} needs {2 * (k + s)} bytes of keying material, "
                         f"got {len(material)}")
    return SrtpKeys(profile, client_key=material[:k], server_key=material[k:2 * k],
                    client_salt=material[2 * k:2 * k + s], server_salt=material[2 * k + s:],
                    is_server=is_server)
