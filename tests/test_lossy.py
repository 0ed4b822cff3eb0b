"""Handshakes over a seeded lossy link, driven by the engines' own timers."""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest

from pydtls_ossl import ConnectionState, Dtls, DtlsContext, HandshakeError, Verify

from .helpers import LossyLink, Pair, drain, lossy_handshake


@pytest.mark.parametrize("seed", range(8))
def test_handshake_completes_under_20_percent_loss(make_pair: Callable[..., Pair], seed: int) -> None:
    p = make_pair(initial_rto=0.02)
    forward = LossyLink(seed, loss=0.2)
    backward = LossyLink(seed + 1000, loss=0.2)
    lossy_handshake(p.client, p.server, forward, backward)
    assert forward.sent + backward.sent >= 4
    p.transfer()  # what the storm left queued (a retransmission) goes in datagrams of its own
    assert p.roundtrip(b"through the storm") == b"through the storm"


def test_losses_actually_happen_across_seeds(make_pair: Callable[..., Pair]) -> None:
    dropped = 0
    for seed in range(8):
        p = make_pair(initial_rto=0.02)
        forward, backward = LossyLink(seed, 0.2), LossyLink(seed + 1000, 0.2)
        lossy_handshake(p.client, p.server, forward, backward)
        dropped += forward.dropped + backward.dropped
    assert dropped >= 4, "the simulator must exercise retransmission"


def test_data_over_lossy_link_arrives_at_most_once(pair: Pair) -> None:
    link = LossyLink(3, loss=0.2, duplicate=0.2, reorder=0.5)
    sent = [b"msg %d" % i for i in range(300)]
    for message in sent:
        pair.client.write(message)
        for datagram in link.carry(drain(pair.client)):
            pair.server.feed(datagram)
    got = []
    while (data := pair.server.read()) is not None:
        got.append(data)
    assert len(got) == len(set(got)), "no duplicates delivered"
    assert set(got) <= set(sent)
    assert len(sent) - len(got) == link.dropped


def test_handshake_gives_up_when_the_peer_is_gone(certs: Any) -> None:
    client = Dtls(context=DtlsContext(verify=Verify.NONE, initial_rto=0.02, max_rto=0.02))
    client.handshake()
    retransmissions = 0
    with pytest.raises(HandshakeError, match="timed out"):
        for _ in range(200):
            retransmissions += len(drain(client))
            timeout = client.get_timeout()
            assert timeout is not None and timeout <= 0.02
            time.sleep(timeout)
            client.handle_timeout()
    assert retransmissions > 10
    assert client.state is ConnectionState.FAILED


def test_rto_below_openssl_timer_granularity_is_refused() -> None:
    with pytest.raises(ValueError, match="initial_rto"):
        DtlsContext(verify=Verify.NONE, initial_rto=0.001)
    with pytest.raises(ValueError, match="max_rto must not be below"):
        DtlsContext(verify=Verify.NONE, initial_rto=0.5, max_rto=0.1)
