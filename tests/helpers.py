"""Test helpers: an in-memory engine pair, a seeded lossy link, and the
Python memory the library itself holds."""

from __future__ import annotations

import os
import random
import time
import tracemalloc
from dataclasses import dataclass, field

import pydtls_ossl
from pydtls_ossl import Dtls

MAX_ROUNDS = 200


def library_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Bytes that allocations in the package's own files grew by between two snapshots
    (matched by the package's directory: a clone named pydtls_ossl holds the tests too)."""
    package = os.path.join(os.path.dirname(os.path.abspath(pydtls_ossl.__file__)), "*")
    ours = [tracemalloc.Filter(True, package)]
    return sum(s.size_diff for s in after.filter_traces(ours).compare_to(
        before.filter_traces(ours), "filename"))


@dataclass
class Pair:
    """A client and a server engine wired back to back in memory.

    ``transfer()`` moves every queued datagram once each way and records
    their sizes; ``handshake()`` repeats it until both sides finish.
    """

    client: Dtls
    server: Dtls
    sizes: list[tuple[str, int]] = field(default_factory=list)

    def transfer(self) -> int:
        moved = 0
        for name, src, dst in (("client", self.client, self.server),
                               ("server", self.server, self.client)):
            while (datagram := src.pull()) is not None:
                self.sizes.append((name, len(datagram)))
                dst.feed(datagram)
                moved += 1
        return moved

    def handshake(self) -> None:
        self.client.handshake()
        for _ in range(MAX_ROUNDS):
            self.transfer()
            if self.client.handshake() and self.server.handshake():
                self.transfer()
                return
        raise AssertionError("handshake did not finish in memory")

    def roundtrip(self, data: bytes, sender: str = "client") -> bytes | None:
        src, dst = (self.client, self.server) if sender == "client" else (self.server, self.client)
        assert src.write(data) == len(data)
        datagram = src.pull()
        assert datagram is not None and src.pull() is None
        dst.feed(datagram)
        return dst.read()


class LossyLink:
    """Drops, duplicates and reorders datagrams with a seeded generator."""

    def __init__(self, seed: int, loss: float, duplicate: float = 0.05,
                 reorder: float = 0.1) -> None:
        self.random = random.Random(seed)
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self.sent = self.dropped = 0

    def carry(self, datagrams: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for datagram in datagrams:
            self.sent += 1
            if self.random.random() < self.loss:
                self.dropped += 1
                continue
            out.append(datagram)
            if self.random.random() < self.duplicate:
                out.append(datagram)
        if len(out) > 1 and self.random.random() < self.reorder:
            self.random.shuffle(out)
        return out


def drain(engine: Dtls) -> list[bytes]:
    out = []
    while (datagram := engine.pull()) is not None:
        out.append(datagram)
    return out


def lossy_handshake(client: Dtls, server: Dtls, forward: LossyLink, backward: LossyLink,
                    limit: float = 30.0) -> float:
    """Drive both engines over lossy links with their own timers; return seconds taken."""
    start = time.monotonic()
    client.handshake()
    while not (client.is_handshake_finished() and server.is_handshake_finished()):
        if time.monotonic() - start > limit:
            raise AssertionError("lossy handshake did not finish in time")
        delivered = 0
        for datagram in forward.carry(drain(client)):
            server.feed(datagram)
            delivered += 1
        for datagram in backward.carry(drain(server)):
            client.feed(datagram)
            delivered += 1
        client.handshake()
        server.handshake()
        if delivered:
            continue
        timers = [t for t in (client.get_timeout(), server.get_timeout()) if t is not None]
        if not timers:
            raise AssertionError("handshake stalled with no retransmission timer running")
        time.sleep(min(timers))
        client.handle_timeout()
        server.handle_timeout()
    return time.monotonic() - start
