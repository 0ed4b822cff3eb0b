"""Two server processes on one port (SO_REUSEPORT) over one Redis association store.

When the process that holds some peers stops, the kernel sends their datagrams
to the other one, which takes their associations out of Redis (an atomic
GETDEL: one process continues each) and carries on: no new handshake.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path
from typing import Any

from pydtls_ossl import DtlsContext

from .interop import PeerProcess

SCRIPT = Path(__file__).resolve().parent / "assoc_server.py"
PEERS = 40


def node(url: str, name: str, port: int = 0) -> PeerProcess:
    return PeerProcess([sys.executable, str(SCRIPT), url, "--redis", "--reuse-port",
                        "--name", name, "--port", str(port)])


def test_a_peer_moves_to_the_other_process_when_its_owner_stops(redis_server: Any) -> None:
    client_ctx = DtlsContext(psk=("device", bytes(16)), ciphers="PSK-AES128-CCM8", initial_rto=0.2)
    a = node(redis_server.url, "A")
    b = None
    clients = []
    try:
        port = int(a.wait_for(r"ready (\d+)").group(1))
        b = node(redis_server.url, "B", port)
        b.wait_for(r"ready (\d+)")
        owners: dict[str, list[Any]] = {"A": [], "B": []}
        for i in range(PEERS):
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw.connect(("127.0.0.1", port))
            wrapped = client_ctx.wrap_socket(raw)  # the cookie round may cross processes: one secret
            wrapped.settimeout(10)
            wrapped.send(b"who")
            reply = wrapped.recv()
            owners[reply[:1].decode()].append(wrapped)
            clients.append(wrapped)
        stopped, survivor = (a, b) if len(owners["A"]) >= len(owners["B"]) else (b, a)
        moved = owners["A"] if stopped is a else owners["B"]
        stopped.proc.send_signal(signal.SIGTERM)
        assert stopped.wait_for(r"exported (\d+)").group(1) == str(len(moved))
        stopped.proc.wait(10)
        survivor_name = "B" if stopped is a else "A"
        for wrapped in moved:
            wrapped.send(b"still")
            assert wrapped.recv() == survivor_name.encode() + b"still"
        survivor.proc.send_signal(signal.SIGTERM)
        counters = survivor.wait_for(r"exported (\d+) restored (\d+) handshakes (\d+)")
        assert int(counters.group(2)) == len(moved), "the moved peers came from Redis"
        assert int(counters.group(3)) == PEERS - len(moved), "none of them shook hands again"
    finally:
        for process in (a, b):
            if process is not None:
                process.close()
        for wrapped in clients:
            wrapped._sock.close()
