"""RFC 7983 demultiplexing and SDP fingerprint/setup helpers."""

from __future__ import annotations

from typing import Any

import pytest

from pydtls_ossl.demux import PacketKind, classify
from pydtls_ossl.sdp import (SetupRole, answer_setup, fingerprint_attribute, fingerprints_equal,
                             is_dtls_server, parse_fingerprint_attribute)


@pytest.mark.parametrize("first, kind", [
    (0, PacketKind.STUN), (1, PacketKind.STUN), (3, PacketKind.STUN),
    (4, PacketKind.DROP), (15, PacketKind.DROP),
    (16, PacketKind.ZRTP), (19, PacketKind.ZRTP),
    (20, PacketKind.DTLS), (22, PacketKind.DTLS), (63, PacketKind.DTLS),
    (64, PacketKind.TURN_CHANNEL), (79, PacketKind.TURN_CHANNEL),
    (80, PacketKind.DROP), (127, PacketKind.DROP),
    (128, PacketKind.RTP), (191, PacketKind.RTP),
    (192, PacketKind.DROP), (255, PacketKind.DROP),
])
def test_first_byte_ranges(first: int, kind: PacketKind) -> None:
    assert classify(bytes([first, 0x60]) + bytes(10)) is kind


def test_rtp_versus_rtcp_by_payload_type() -> None:
    assert classify(bytes([0x80, 0x60]) + bytes(10)) is PacketKind.RTP      # PT 96
    assert classify(bytes([0x80, 0xE0]) + bytes(10)) is PacketKind.RTP      # marker + PT 96
    assert classify(bytes([0x80, 200]) + bytes(6)) is PacketKind.RTCP       # sender report
    assert classify(bytes([0x81, 201]) + bytes(6)) is PacketKind.RTCP       # receiver report
    assert classify(b"") is PacketKind.DROP


def test_fingerprint_attribute_round_trip(certs: Any) -> None:
    fp = certs.server.fingerprint()
    line = fingerprint_attribute(fp)
    assert line == f"a=fingerprint:sha-256 {fp}"
    assert parse_fingerprint_attribute(line.replace("sha-256", "SHA-256").lower()
                                       .replace("a=fingerprint:sha-256", "a=fingerprint:SHA-256")) \
        == f"sha-256 {fp}"
    assert fingerprints_equal(parse_fingerprint_attribute(line), fp.lower())
    with pytest.raises(ValueError):
        parse_fingerprint_attribute("a=setup:actpass")
    with pytest.raises(ValueError):
        fingerprint_attribute(fp, "sha-1")


def test_setup_roles() -> None:
    assert answer_setup("actpass") is SetupRole.ACTIVE
    assert answer_setup(SetupRole.ACTIVE) is SetupRole.PASSIVE
    assert answer_setup("passive") is SetupRole.ACTIVE
    assert is_dtls_server("passive") and not is_dtls_server("active")
    with pytest.raises(ValueError, match="answer_setup"):
        is_dtls_server("actpass")
    with pytest.raises(ValueError):
        answer_setup("sideways")
