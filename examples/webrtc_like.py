"""Two WebRTC-like endpoints sharing ONE UDP socket each for STUN, DTLS and SRTP.

The offerer says ``a=setup:actpass``, the answerer answers ``active`` and so
becomes the DTLS client (RFC 5763, RFC 8842). Each side pins the other's
``a=fingerprint``. Every datagram is routed by its first byte (RFC 7983):
STUN binding requests and SRTP-shaped packets are interleaved with the DTLS
handshake on the same socket. At the end both print the agreed SRTP profile
and the same keys, local and remote swapped.

    python examples/webrtc_like.py
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections import Counter

from pydtls_ossl import Dtls, DtlsContext, generate_certificate
from pydtls_ossl.demux import PacketKind, classify
from pydtls_ossl.sdp import (SetupRole, answer_setup, fingerprint_attribute, is_dtls_server,
                             parse_fingerprint_attribute)
from pydtls_ossl.srtp import SrtpKeys

PROFILES = ["SRTP_AEAD_AES_128_GCM", "SRTP_AES128_CM_SHA1_80"]


def stun_binding_request() -> bytes:
    """A STUN header (RFC 5389): Binding Request, no attributes, magic cookie."""
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12)


def rtp_shaped(sequence: int) -> bytes:
    """An RTP header (version 2, payload type 111) and opaque bytes standing in for SRTP."""
    return struct.pack("!BBHII", 0x80, 111, sequence, sequence * 960, 0x1234ABCD) + os.urandom(40)


class Endpoint:
    def __init__(self, name: str, setup: SetupRole) -> None:
        self.name = name
        self.setup = setup
        self.cert = generate_certificate(name)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.received: Counter[PacketKind] = Counter()
        self.dtls: Dtls | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.sequence = 0

    def sdp(self) -> list[str]:
        return [fingerprint_attribute(self.cert.fingerprint()), f"a=setup:{self.setup.value}"]

    def start_dtls(self, remote_sdp: list[str], peer: tuple[str, int]) -> None:
        fingerprint = next(line for line in remote_sdp if line.startswith("a=fingerprint:"))
        self.peer = peer
        context = DtlsContext(self.cert.cert_pem, self.cert.key_pem, srtp_profiles=PROFILES,
                              initial_rto=0.2)
        self.dtls = Dtls(is_server=is_dtls_server(self.setup), context=context,
                         expected_peer_fingerprint=parse_fingerprint_attribute(fingerprint))
        self.dtls.handshake()

    def send_media_and_checks(self) -> None:
        self.sequence += 1
        self.sock.sendto(stun_binding_request(), self.peer)
        self.sock.sendto(rtp_shaped(self.sequence), self.peer)

    def flush_dtls(self) -> None:
        assert self.dtls is not None
        while (datagram := self.dtls.pull()) is not None:
            self.sock.sendto(datagram, self.peer)

    def receive(self) -> None:
        assert self.dtls is not None
        while True:
            try:
                datagram, _ = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            kind = classify(datagram)
            self.received[kind] += 1
            if kind is PacketKind.DTLS:
                self.dtls.feed(datagram)
                if not self.dtls.is_handshake_finished():
                    self.dtls.handshake()

    def tick(self) -> None:
        assert self.dtls is not None
        timeout = self.dtls.get_timeout()
        if timeout == 0:
            self.dtls.handle_timeout()
        self.flush_dtls()


def run(deadline: float = 10.0) -> tuple[SrtpKeys, SrtpKeys, Counter[PacketKind], Counter[PacketKind]]:
    offerer = Endpoint("offerer", SetupRole.ACTPASS)
    answerer = Endpoint("answerer", answer_setup(SetupRole.ACTPASS))
    offerer.setup = answer_setup(answerer.setup)  # the answer fixes the offerer's role
    offer, answer = offerer.sdp(), answerer.sdp()
    offerer.start_dtls(answer, answerer.sock.getsockname())
    answerer.start_dtls(offer, offerer.sock.getsockname())
    assert offerer.dtls is not None and answerer.dtls is not None
    end = time.monotonic() + deadline
    endpoints = (offerer, answerer)
    while not (offerer.dtls.is_handshake_finished() and answerer.dtls.is_handshake_finished()):
        if time.monotonic() > end:
            raise TimeoutError("DTLS did not complete")
        for endpoint in endpoints:
            endpoint.send_media_and_checks()
            endpoint.tick()
        select.select([offerer.sock, answerer.sock], [], [], 0.05)
        for endpoint in endpoints:
            endpoint.receive()
    for endpoint in endpoints:  # the final flight and the media sent alongside it
        endpoint.flush_dtls()
    time.sleep(0.05)
    for endpoint in endpoints:
        endpoint.receive()
    keys = offerer.dtls.srtp_keys(), answerer.dtls.srtp_keys()
    for endpoint in endpoints:
        endpoint.sock.close()
    return keys[0], keys[1], offerer.received, answerer.received


def main() -> None:
    offerer_keys, answerer_keys, offerer_seen, answerer_seen = run()
    for name, keys, seen in (("offerer", offerer_keys, offerer_seen),
                             ("answerer", answerer_keys, answerer_seen)):
        role = "DTLS server" if keys.is_server else "DTLS client"
        print(f"{name} ({role}) profile {keys.profile.openssl_name}")
        print(f"  local  master {keys.local_master.hex()}")
        print(f"  remote master {keys.remote_master.hex()}")
        print("  received " + ", ".join(f"{k.value}={v}" for k, v in sorted(
            seen.items(), key=lambda kv: kv[0].value)))
    same = (offerer_keys.local_master == answerer_keys.remote_master
            and offerer_keys.remote_master == answerer_keys.local_master)
    print("SRTP keys agree (local/remote swapped)" if same else "SRTP KEYS DIFFER")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
