"""Demultiplex one UDP 5-tuple shared by STUN, DTLS, SRTP and more (RFC 7983).

WebRTC sends ICE (STUN), DTLS and SRTP/SRTCP over the same socket; the
first byte says which protocol a datagram belongs to.
"""

from __future__ import annotations

import enum

__all__ = ["PacketKind", "classify", "is_rtcp"]


class PacketKind(enum.Enum):
    STUN = "stun"
    ZRTP = "zrtp"
    DTLS = "dtls"
    TURN_CHANNEL = "turn-channel"
    RTP = "rtp"
    RTCP = "rtcp"
    DROP = "drop"


def is_rtcp(datagram: bytes) -> bool:
    """RTCP packet types 192–223 sit where RTP's marker+payload type is (RFC 5761 §4)."""
    return len(datagram) >= 2 and 192 <= datagram[1] <= 223


def classify(datagram: bytes) -> PacketKind:
    """Which protocol a datagram belongs to, by its first byte (RFC 7983 §7)."""
    if not datagram:
        return PacketKind.DROP
    first = datagram[0]
    if first <= 3:
        return PacketKind.STUN
    if 16 <= first <= 19:
        return PacketKind.ZRTP
    if 20 <= first <= 63:
        return PacketKind.DTLS
    if 64 <= first <= 79:
        return PacketKind.TURN_CHANNEL
    if 128 <= first <= 191:
        return PacketKind.RTCP if is_rtcp(datagram) else PacketKind.RTP
    return PacketKind.DROP
