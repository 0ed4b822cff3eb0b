"""SO_REUSEPORT worker processes (pydtls_ossl.reuseport): two serve one port, and stop together."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import Dtls, DtlsContext
from pydtls_ossl._pump import handshake, receive, send
from pydtls_ossl.reuseport import run_workers, serve_workers

from .interop import free_udp_port

APP = Path(__file__).with_name("reuseport_app.py")


def test_two_workers_share_a_port_and_stop_on_sigterm(pem_files: dict[str, Path], certs: Any) -> None:
    port = free_udp_port()
    proc = subprocess.Popen([sys.executable, str(APP), str(pem_files["server_cert"]),
                             str(pem_files["server_key"]), str(port)],
                            stdout=subprocess.PIPE, text=True, cwd=APP.parent.parent)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("workers"), line
        workers = set(line.split()[1:])
        assert len(workers) == 2
        seen = set()
        context = DtlsContext(verify="none")
        for i in range(40):  # 40 source ports: the kernel's hash spreads them
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.connect(("127.0.0.1", port))
                client = Dtls(context=context)
                for _ in range(20):  # until the workers have bound the port
                    try:
                        handshake(client, sock, timeout=5)
                        break
                    except OSError:  # refused: the workers have not bound the port yet
                        client = Dtls(context=context)
                        time.sleep(0.1)
                send(client, sock, b"hi %d" % i)
                pid, _, rest = receive(client, sock).partition(b":")
                assert rest == b"hi %d" % i
                seen.add(pid.decode())
        assert seen == workers
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert out.split() == ["exited", "0", "0"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_workers_reports_each_status() -> None:
    statuses = run_workers(3, lambda index: (_ for _ in ()).throw(RuntimeError("x")) if index == 1
                           else None)
    assert statuses == [0, 1, 0]
    with pytest.raises(ValueError):
        run_workers(0, print)
    with pytest.raises(ValueError, match="fixed port"):
        serve_workers(lambda conn: None, "127.0.0.1", 0, context=DtlsContext(verify="none"))  # type: ignore[arg-type, return-value]
