"""SDP pieces DTLS-SRTP needs: ``a=fingerprint`` (RFC 8122) and ``a=setup`` (RFC 5763)."""

from __future__ import annotations

import enum

from .certs import fingerprints_equal, parse_fingerprint

__all__ = ["SetupRole", "answer_setup", "fingerprint_attribute", "fingerprints_equal",
           "is_dtls_server", "parse_fingerprint_attribute"]


def fingerprint_attribute(fingerprint: str, algorithm: str = "sha-256") -> str:
    """``'a=fingerprint:sha-256 AB:CD:…'`` for an SDP body."""
    parsed_algorithm, digest = parse_fingerprint(f"{algorithm} {fingerprint}")
    return f"a=fingerprint:{parsed_algorithm} " + ":".join(f"{b:02X}" for b in digest)


def parse_fingerprint_attribute(line: str) -> str:
    """``'a=fingerprint:SHA-256 ab:cd:…'`` -> ``'sha-256 AB:CD:…'``, ready to pin."""
    text = line.strip()
    if not text.lower().startswith("a=fingerprint:"):
        raise ValueError(f"not an a=fingerprint line: {line!r}")
    algorithm, digest = parse_fingerprint(text.split(":", 1)[1])
    return f"{algorithm} " + ":".join(f"{b:02X}" for b in digest)


class SetupRole(enum.Enum):
    """``a=setup`` values (RFC 4145, RFC 5763 §5)."""

    ACTIVE = "active"
    PASSIVE = "passive"
    ACTPASS = "actpass"
    HOLDCONN = "holdconn"


def answer_setup(offered: SetupRole | str) -> SetupRole:
    """The complementary role: what the answerer picks for an offer (to ``actpass``
    it answers ``active``, RFC 8842 §5.3), and what the offerer becomes once the
    answer arrives."""
    role = SetupRole(offered)
    return {SetupRole.ACTPASS: SetupRole.ACTIVE, SetupRole.ACTIVE: SetupRole.PASSIVE,
            SetupRole.PASSIVE: SetupRole.ACTIVE, SetupRole.HOLDCONN: SetupRole.HOLDCONN}[role]


def is_dtls_server(local_role: SetupRole | str) -> bool:
    """``active`` starts the handshake (DTLS client); ``passive`` is the DTLS server."""
    role = SetupRole(local_role)
    if role in (SetupRole.ACTPASS, SetupRole.HOLDCONN):
        raise ValueError(f"a={role.value} does not fix a DTLS role; resolve it with answer_setup()")
    return role is SetupRole.PASSIVE
