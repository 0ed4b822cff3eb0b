"""The CLI server and client, with each other, with OpenSSL's apps, and with tshark."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import require_tool
from .interop import PeerProcess, free_udp_port

pytestmark = pytest.mark.interop
CLI = [sys.executable, "-m", "pydtls_ossl"]


def cli_server(port: int, *extra: str) -> PeerProcess:
    server = PeerProcess([*CLI, "server", "--port", str(port), "--echo", "--count", "1",
                          "--timeout", "10", *extra])
    server.wait_for("listening on udp://")
    return server


def cli_client(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "client", "127.0.0.1", str(port), *extra], capture_output=True,
                          text=True, timeout=30)


def test_cli_server_and_client(tmp_path: Path) -> None:
    port = free_udp_port()
    with cli_server(port, "--srtp", "SRTP_AEAD_AES_128_GCM", "--alpn", "coap") as server:
        fingerprint = server.wait_for(r"sha-256 ([0-9A-F:]+)").group(1)
        done = cli_client(port, "--fingerprint", fingerprint, "--srtp", "SRTP_AEAD_AES_128_GCM",
                          "--alpn", "coap", "--message", "one", "--message", "two", "-v")
        assert done.returncode == 0, done.stderr
        assert "received 3 bytes: b'one'" in done.stdout and "b'two'" in done.stdout
        assert "SRTP profile       SRTP_AEAD_AES_128_GCM" in done.stdout
        assert "ALPN               coap" in done.stdout
        assert "-> 168 B: handshake(client_hello)" in done.stderr or "client_hello" in done.stderr
        exported = [line.split()[-1] for line in done.stdout.splitlines() if "exported" in line]
        server.wait_for("peer gone")
        assert exported and exported[0] in server.output()


def test_cli_client_failure_is_one_line(tmp_path: Path) -> None:
    port = free_udp_port()
    with cli_server(port):
        done = cli_client(port, "--fingerprint", "sha-256 " + ":".join(["00"] * 32),
                          "--message", "never sent", "--timeout", "5")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "FingerprintMismatch" in done.stderr


def test_cli_client_with_openssl_s_server(tmp_path: Path, certs: Any) -> None:
    openssl = require_tool("openssl")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    certs.server.write(cert, key)
    port = free_udp_port()
    with PeerProcess([openssl, "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                      "-cert", str(cert), "-key", str(key)]) as peer:
        peer.wait_for("ACCEPT")
        client = PeerProcess([*CLI, "client", "127.0.0.1", str(port),
                              "--fingerprint", certs.server.fingerprint(), "--timeout", "10"])
        with client:
            client.wait_for("handshake done")
            client.send_line("from the pydtls_ossl cli")
            peer.wait_for("from the pydtls_ossl cli")
            peer.send_line("from s_server")
            client.send_line("again")
            peer.wait_for("again")


def test_openssl_s_client_with_cli_server() -> None:
    openssl = require_tool("openssl")
    port = free_udp_port()
    with cli_server(port) as server, PeerProcess(
            [openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}"]) as client:
        client.wait_for("Cipher is ECDHE-ECDSA")
        client.send_line("hello cli server")
        server.wait_for("received 17 bytes: b'hello cli server")
        client.wait_for("^hello cli server$")


def _tshark_can_capture(tshark: str) -> str | None:
    probe = subprocess.run([tshark, "-i", "lo", "-a", "duration:1", "-q", "-w", os.devnull],
                           capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return (probe.stderr.strip().splitlines() or ["tshark failed"])[-1]
    return None


def test_keylog_lets_tshark_decrypt_a_capture(tmp_path: Path) -> None:
    tshark = require_tool("tshark")
    reason = _tshark_can_capture(tshark)
    if reason is not None:
        pytest.skip(f"tshark cannot capture on loopback here: {reason}")
    port, keys, capture = free_udp_port(), tmp_path / "keys.txt", tmp_path / "cap.pcapng"
    # tshark 4.0 logs "Capture started" at level message; 4.4 and 4.6 at info.
    with PeerProcess([tshark, "-i", "lo", "-f", f"udp port {port}", "-w", str(capture),
                      "-a", "duration:15", "--log-level", "info", "--log-domains", "Main"]) as sniffer:
        sniffer.wait_for("Capture started")  # "Capturing on" comes before it is live
        time.sleep(1.0)
        with cli_server(port, "--keylog", str(keys)) as server:
            done = cli_client(port, "--insecure", "--message", "secret-message-42")
            assert done.returncode == 0, done.stderr
            server.wait_for("peer gone")
        time.sleep(0.5)
        sniffer.proc.send_signal(signal.SIGINT)  # tshark flushes its file on Ctrl-C
        sniffer.wait_for("packets? captured")
        sniffer.proc.wait(10)
    assert "CLIENT_RANDOM" in keys.read_text()
    fields = [tshark, "-r", str(capture), "-d", f"udp.port=={port},dtls", "-Y", "data",
              "-T", "fields", "-e", "data.data"]
    decrypted = subprocess.run([*fields, "-o", f"tls.keylog_file:{keys}"], capture_output=True,
                               text=True, timeout=30).stdout.split()
    assert b"secret-message-42".hex() in decrypted, "decrypted both ways with the key log"
    assert decrypted.count(b"secret-message-42".hex()) == 2
    without = subprocess.run(fields, capture_output=True, text=True, timeout=30).stdout.split()
    assert b"secret-message-42".hex() not in without, "and not without it"


def test_cli_resumes_with_sess_out_and_sess_in(tmp_path: Path) -> None:
    port = free_udp_port()
    saved = tmp_path / "session.bin"
    server = PeerProcess([*CLI, "server", "--port", str(port), "--echo", "--count", "2",
                          "--timeout", "10", "--ticket-secret", "ab" * 32])
    with server:
        server.wait_for("listening on udp://")
        fingerprint = server.wait_for(r"sha-256 ([0-9A-F:]+)").group(1)
        first = cli_client(port, "--fingerprint", fingerprint, "--message", "hi",
                           "--sess-out", str(saved))
        assert first.returncode == 0, first.stderr
        assert "session            new" in first.stdout
        assert saved.stat().st_mode & 0o777 == 0o600 and saved.stat().st_size > 100
        server.wait_for("peer gone")
        second = cli_client(port, "--fingerprint", fingerprint, "--message", "again",
                            "--sess-in", str(saved))
        assert second.returncode == 0, second.stderr
        assert "session            resumed" in second.stdout
        server.wait_for("session            resumed")


def test_cli_connection_ids() -> None:
    port = free_udp_port()
    with cli_server(port, "--cid", "6") as server:
        fingerprint = server.wait_for(r"sha-256 ([0-9A-F:]+)").group(1)
        done = cli_client(port, "--fingerprint", fingerprint, "--cid", "4", "--message", "cid", "-v")
        assert done.returncode == 0, done.stderr
        ours, theirs = re.search(r"connection ID +ours ([0-9a-f]+), peer's ([0-9a-f]+)",
                                 done.stdout).groups()  # type: ignore[union-attr]
        assert len(ours) == 8 and len(theirs) == 12
        assert "tls12_cid[epoch 1]" in done.stderr
        server.wait_for(f"connection ID +ours {theirs}, peer's {ours}")
        server.wait_for("peer gone")


def test_cli_cid_with_a_peer_without_cid(tmp_path: Path, certs: Any) -> None:
    openssl = require_tool("openssl")
    port = free_udp_port()
    cert, key = tmp_path / "s.pem", tmp_path / "s.key"
    certs.server.write(cert, key)
    with PeerProcess([openssl, "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                      "-cert", str(cert), "-key", str(key)]) as server:
        server.wait_for("ACCEPT")
        done = cli_client(port, "--fingerprint", certs.server.fingerprint(), "--cid", "4",
                          "--message", "x", "--timeout", "3")
        assert "connection ID      not negotiated" in done.stdout, done.stdout + done.stderr
