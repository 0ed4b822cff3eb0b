"""The server core driven by one thread while others send through send_threadsafe()."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

from pydtls_ossl import Dtls, DtlsContext, DtlsServer, Verify

from .test_server import Net, addr

PEERS = 6
RECORDS = 300


def test_other_threads_send_through_send_threadsafe(certs: Any) -> None:
    server = DtlsServer(DtlsContext(certs.server.cert_pem, certs.server.key_pem, initial_rto=0.05))
    wakeups = []
    server.wakeup = lambda: wakeups.append(threading.get_ident())
    net = Net(server)
    clients = {addr(i): net.add(addr(i), Dtls(context=DtlsContext(verify=Verify.NONE,
                                                                 initial_rto=0.05)))
               for i in range(PEERS)}
    net.run(lambda: all(c.is_handshake_finished() for c in clients.values())
            and server.handshaking == 0)

    def sender(i: int) -> None:
        for n in range(RECORDS):
            server.send_threadsafe(addr(i), f"{i}:{n}".encode())
        server.send_threadsafe(("192.0.2.1", 9), b"to nobody")  # a peer that is not there

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(PEERS)]
    for thread in threads:
        thread.start()
    received: dict[Any, list[bytes]] = defaultdict(list)
    deadline = time.monotonic() + 30
    # Only this thread touches the core (feed, datagrams_to_send, timers) and the clients.
    while sum(map(len, received.values())) < PEERS * RECORDS:
        assert time.monotonic() < deadline, "records sent from other threads did not arrive"
        for datagram, address in server.datagrams_to_send():
            clients[address].feed(datagram)
            while (data := clients[address].read()) is not None:
                received[address].append(data)
    for thread in threads:
        thread.join()
    server.datagrams_to_send()
    for i in range(PEERS):
        assert received[addr(i)] == [f"{i}:{n}".encode() for n in range(RECORDS)]  # own, in order
    assert server.stats.sends_dropped == PEERS
    assert len(wakeups) == PEERS * (RECORDS + 1)
    assert set(wakeups) == {t.ident for t in threads}
