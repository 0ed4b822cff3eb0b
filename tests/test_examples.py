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
