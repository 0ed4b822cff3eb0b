"""The examples run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_webrtc_like_example() -> None:
    done = subprocess.run([sys.executable, str(EXAMPLES / "webrtc_like.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "SRTP keys agree (local/remote swapped)" in lines
    profiles = {line.split()[-1] for line in lines if " profile " in line}
    assert profiles == {"SRTP_AEAD_AES_128_GCM"}
    local = [line.split()[-1] for line in lines if "local  master" in line]
    remote = [line.split()[-1] for line in lines if "remote master" in line]
    assert local[0] == remote[1] and local[1] == remote[0] and local[0] != local[1]
    received = [line for line in lines if line.strip().startswith("received")]
    assert all("stun=" in line and "rtp=" in line and "dtls=" in line for line in received)


def test_coap_psk_example() -> None:
    done = subprocess.run([sys.executable, str(EXAMPLES / "coap_psk.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sensor: PSK-AES128-CCM8 with PSK identity sensor-0042" in done.stdout
    assert "gateway: sensor-0042 joined" in done.stdout
    assert done.stdout.count("-> 2.05") == 3 and "all readings received" in done.stdout


def test_cluster_example(redis_server: object) -> None:
    """Two workers on one port; a device talks to the cluster while the workers stop."""
    import socket

    from pydtls_ossl import DtlsContext

    from .interop import PeerProcess, free_udp_port

    port = free_udp_port()
    url = redis_server.url  # type: ignore[attr-defined]
    with PeerProcess([sys.executable, str(EXAMPLES / "cluster.py"), "--workers", "2",
                      "--port", str(port), "--redis", url, "--run-for", "20"]) as cluster:
        cluster.wait_for("worker 0 .* serving")
        cluster.wait_for("worker 1 .* serving")
        ctx = DtlsContext(psk=("device-1", bytes(16)), ciphers="PSK-AES128-CCM8", initial_rto=0.2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.connect(("127.0.0.1", port))
            device = ctx.wrap_socket(raw)
            device.settimeout(10)
            device.send(b"reading 1")
            reply = device.recv()
            assert reply.endswith(b": reading 1")
            owner = reply.split(b":")[0].decode()
            cluster.proc.send_signal(15)  # both workers move their peers to Redis and stop
            cluster.wait_for(f"worker {owner} stopped: 1 peers moved to Redis")
        assert cluster.proc.wait(20) == 0
