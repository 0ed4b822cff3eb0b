"""DTLS 1.2 record framing as RFC 6347 §4.1 defines it, for the fuzz oracles.

Written from the RFC, independently of the C code it checks: the oracles ask
"could a well-behaved stack act on this datagram?" and compare the answer
with what the engine did.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["HEADER", "Record", "frame", "framed_records", "is_actionable_plaintext"]

HEADER = 13
_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE, _APPLICATION_DATA = 20, 21, 22, 23
_VERSIONS = (b"\xfe\xfd", b"\xfe\xff")  # DTLS 1.2, and 1.0 as HelloVerifyRequest uses


class Record(NamedTuple):
    start: int      # offset of the header in the datagram
    type: int
    version: bytes
    epoch: int
    seq: int
    body: bytes

    @property
    def end(self) -> int:
        return self.start + HEADER + len(self.body)


def framed_records(datagram: bytes) -> tuple[list[Record], bool]:
    """The records a receiver frames out of one datagram, and whether the
    datagram was framed to its last byte (False: a cut record or trailing bytes)."""
    out: list[Record] = []
    off, n = 0, len(datagram)
    while n - off >= HEADER:
        length = int.from_bytes(datagram[off + 11:off + 13], "big")
        if length > n - off - HEADER:
            return out, False
        out.append(Record(off, datagram[off], bytes(datagram[off + 1:off + 3]),
                          int.from_bytes(datagram[off + 3:off + 5], "big"),
                          int.from_bytes(datagram[off + 5:off + 11], "big"),
                          bytes(datagram[off + HEADER:off + HEADER + length])))
        off += HEADER + length
    return out, off == n


def frame(datagram: bytes) -> list[Record] | None:
    """All records of a datagram framed exactly, or None."""
    records, whole = framed_records(datagram)
    return records if whole else None


def _fragments_tile(body: bytes) -> bool:
    """A handshake record body is a run of whole fragments (RFC 6347 §4.2.2)."""
    pos = 0
    while pos < len(body):
        if len(body) - pos < 12:
            return False
        msg_len = int.from_bytes(body[pos + 1:pos + 4], "big")
        frag_off = int.from_bytes(body[pos + 6:pos + 9], "big")
        frag_len = int.from_bytes(body[pos + 9:pos + 12], "big")
        if frag_len > len(body) - pos - 12 or frag_off + frag_len > msg_len:
            return False
        pos += 12 + frag_len
    return True


def _actionable(r: Record) -> bool:
    if r.epoch != 0 or r.version not in _VERSIONS:
        return False
    if r.type == _CHANGE_CIPHER_SPEC:
        return r.body == b"\x01"
    if r.type == _ALERT:
        return len(r.body) == 2 and r.body[0] in (1, 2)
    return r.type == _HANDSHAKE and bool(r.body) and _fragments_tile(r.body)


def is_actionable_plaintext(datagram: bytes) -> bool:
    """True when a receiver frames out of the datagram an unprotected (epoch 0)
    handshake message, alert or ChangeCipherSpec that is well formed as a record.

    Before the keys exist nothing is authenticated, so any DTLS 1.2 stack
    acts on such a record, and a malformed or hostile message in it may
    rightly fail a handshake in progress (whatever else the datagram holds:
    a receiver may process the valid records and drop the rest). Anything
    else — framing garbage, unknown types or versions, epoch-0 application
    data, protected records that do not authenticate — is an invalid record
    that RFC 6347 §4.1.2.7 says to drop, so it must never fail or stall an
    association.
    """
    records, _ = framed_records(datagram)
    return any(_actionable(r) for r in records)
