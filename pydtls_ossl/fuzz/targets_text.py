"""Targets ``demux`` and ``sdp``: parsers of untrusted bytes and text.

Each must return a value or raise ``ValueError`` for any input, and what
it returns must hold together (a parsed fingerprint parses again to itself).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from .. import certs, demux, sdp
from . import Finding, register

__all__: list[str] = []

_T = TypeVar("_T")


def _value_or_valueerror(call: Callable[[], _T], what: str) -> _T | None:
    try:
        return call()
    except ValueError:
        return None
    except Exception as exc:
        raise Finding(f"{what} raised {type(exc).__name__}: {exc}") from exc


@register("demux", "RFC 7983 demultiplexing (demux.classify, demux.is_rtcp) of any datagram",
          seeds=lambda: {
              "stun": bytes.fromhex("000100002112a442") + bytes(12),
              "dtls": bytes.fromhex("16fefd00000000000000000010"),
              "rtp": bytes.fromhex("80e0000100000001deadbeef"),
              "rtcp": bytes.fromhex("80c80006deadbeef"),
              "turn": bytes.fromhex("40000004cafebabe"),
              "zrtp": bytes.fromhex("10000000"),
              "drop": bytes.fromhex("ff"),
              "empty": b"",
          }, max_len=64, instrument=("pydtls_ossl.demux",))
def demux_target(data: bytes) -> None:
    kind = _value_or_valueerror(lambda: demux.classify(data), "classify()")
    rtcp = _value_or_valueerror(lambda: demux.is_rtcp(data), "is_rtcp()")
    if kind is not None and not isinstance(kind, demux.PacketKind):
        raise Finding(f"classify() returned {kind!r}")
    if rtcp is not None and not isinstance(rtcp, bool):
        raise Finding(f"is_rtcp() returned {rtcp!r}")
    if kind is demux.PacketKind.DTLS and not 20 <= data[0] <= 63:
        raise Finding(f"classify() called first byte {data[0]} DTLS")
    if kind is demux.PacketKind.RTCP and not rtcp:
        raise Finding("classify() says RTCP where is_rtcp() says not")
    if data and 20 <= data[0] <= 63 and kind is not demux.PacketKind.DTLS:
        raise Finding(f"a DTLS first byte {data[0]} classified {kind}")


_ROLES = ("active", "passive", "actpass", "holdconn")


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


@register("sdp", "SDP a=fingerprint / a=setup parsers and certs.parse_fingerprint on any text",
          seeds=lambda: {
              "attribute": b"\x00a=fingerprint:sha-256 " + b":".join(b"%02X" % i for i in range(32)),
              "bare-sha1": b"\x00" + b":".join(b"%02x" % i for i in range(20)),
              "sha-512": b"\x01SHA-512 " + b":".join(b"AB" for _ in range(64)),
              "sha256-nodash": b"\x00sha256 " + b":".join(b"0f" for _ in range(32)),
              "setup": b"\x03actpass",
              "setup-active": b"\x03active",
              "two": b"\x02sha-1 " + b":".join(b"00" for _ in range(20)) + b"\x00"
                     + b"sha-1 " + b":".join(b"00" for _ in range(20)),
              "unicode": "\x00a=fingerprint:sha-256 ＡＢ:٠١".encode(),
          }, max_len=512, instrument=("pydtls_ossl.sdp", "pydtls_ossl.certs"))
def sdp_target(data: bytes) -> None:
    mode = data[0] % 4 if data else 0
    text = _text(data[1:])
    if mode == 0 or mode == 1:
        parsed = _value_or_valueerror(lambda: certs.parse_fingerprint(text), "parse_fingerprint()")
        attr = _value_or_valueerror(lambda: sdp.parse_fingerprint_attribute(text),
                                    "parse_fingerprint_attribute()")
        if parsed is not None:
            algorithm, digest = parsed
            if algorithm not in certs.FINGERPRINT_ALGORITHMS or not isinstance(digest, bytes):
                raise Finding(f"parse_fingerprint() returned {parsed!r}")
            canonical = f"{algorithm} {certs.format_fingerprint(digest)}"
            if certs.parse_fingerprint(canonical) != parsed:
                raise Finding(f"{canonical!r} does not parse back to {parsed!r}")
            line = sdp.fingerprint_attribute(certs.format_fingerprint(digest), algorithm)
            if sdp.parse_fingerprint_attribute(line) != canonical:
                raise Finding(f"{line!r} does not parse back to {canonical!r}")
            if not sdp.fingerprints_equal(text, canonical):
                raise Finding(f"{text!r} is not equal to its own canonical form")
        if attr is not None and certs.parse_fingerprint(attr) != parsed:
            raise Finding(f"parse_fingerprint_attribute() gave {attr!r}, parse_fingerprint() "
                          f"{parsed!r}, for {text!r}")
        _value_or_valueerror(lambda: sdp.fingerprint_attribute(text), "fingerprint_attribute()")
        _value_or_valueerror(lambda: sdp.fingerprint_attribute(text, text), "fingerprint_attribute(x, x)")
    elif mode == 2:
        first, _, second = text.partition("\x00")
        _value_or_valueerror(lambda: sdp.fingerprints_equal(first, second), "fingerprints_equal()")
    else:
        role = _value_or_valueerror(lambda: sdp.answer_setup(text), "answer_setup()")
        server = _value_or_valueerror(lambda: sdp.is_dtls_server(text), "is_dtls_server()")
        if (role is not None) != (text in _ROLES):
            raise Finding(f"answer_setup({text!r}) gave {role!r}")
        if server is not None and text not in ("active", "passive"):
            raise Finding(f"is_dtls_server({text!r}) gave {server!r}")
        for known_role in _ROLES:
            answer = sdp.answer_setup(known_role)
            if not isinstance(answer, sdp.SetupRole):
                raise Finding(f"answer_setup({known_role!r}) gave {answer!r}")
