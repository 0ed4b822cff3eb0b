from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pydtls_ossl import Certificate, Dtls, DtlsContext, generate_certificate, openssl_version

from .helpers import Pair


def pytest_report_header(config: pytest.Config) -> str:
    return f"libssl: {openssl_version()}; openssl app: {shutil.which('openssl')}"


class Certs:
    """Certificates made once per session through the library itself."""

    def __init__(self) -> None:
        self.server = generate_certificate("server.test", subject_alt_names=["DNS:localhost"])
        self.client = generate_certificate("client.test")
        self.ca = generate_certificate("Test CA", is_ca=True, days=365)
        self.signed = generate_certificate("localhost", issuer=self.ca,
                                           subject_alt_names=["DNS:localhost", "IP:127.0.0.1"])
        self.rsa = generate_certificate("rsa.test", key_type="rsa")


@pytest.fixture(scope="session")
def certs() -> Certs:
    return Certs()


@pytest.fixture
def make_pair(certs: Certs) -> Callable[..., Pair]:
    """Build a client/server pair; both pin each other's certificate by default."""

    def make(mtu: int = 1200, client_cert: Certificate | None = None,
             server_cert: Certificate | None = None, initial_rto: float = 1.0) -> Pair:
        s_cert = server_cert or certs.server
        c_cert = client_cert or certs.client
        server = Dtls(is_server=True, context=DtlsContext(s_cert.cert_pem, s_cert.key_pem, mtu=mtu,
                                                          initial_rto=initial_rto),
                      expected_peer_fingerprint=c_cert.fingerprint())
        client = Dtls(context=DtlsContext(c_cert.cert_pem, c_cert.key_pem, mtu=mtu,
                                          initial_rto=initial_rto),
                      expected_peer_fingerprint=s_cert.fingerprint())
        return Pair(client, server)

    return make


@pytest.fixture
def pair(make_pair: Callable[..., Pair]) -> Iterator[Pair]:
    p = make_pair()
    p.handshake()
    yield p
    p.client.close()
    p.server.close()


@pytest.fixture
def pem(tmp_path: Path, certs: Certs) -> tuple[str, str]:
    """The server certificate and key as files, for third-party peers."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    certs.server.write(cert, key)
    return str(cert), str(key)


def require_tool(name: str) -> str:
    """Path of a third-party peer; CI sets PYDTLS_REQUIRE_INTEROP so a missing one fails."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("PYDTLS_REQUIRE_INTEROP"):
            pytest.fail(f"{name} is required for interop tests (PYDTLS_REQUIRE_INTEROP is set)")
        pytest.skip(f"{name} not installed (apt-get install {'gnutls-bin' if 'gnutls' in name else name})")
    return path


class RedisServer:
    """A real redis-server on a free loopback port, which a test may stop and restart."""

    def __init__(self, path: str) -> None:
        import socket
        import subprocess
        import time
        self._subprocess, self._time, self._socket = subprocess, time, socket
        self.path = path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = self._subprocess.Popen(
            [self.path, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no"], stdout=self._subprocess.DEVNULL, stderr=self._subprocess.STDOUT)
        deadline = self._time.monotonic() + 10
        while True:
            try:
                with self._socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self._time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            self._time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_tool("redis-server"))
    yield server
    server.stop()


@pytest.fixture
def server_ctx(certs: Certs) -> DtlsContext:
    """A server context with the session's server certificate."""
    return DtlsContext(certs.server.cert_pem, certs.server.key_pem)


@pytest.fixture
def client_ctx(certs: Certs) -> DtlsContext:
    """A client context that trusts the server certificate as its CA."""
    return DtlsContext(cadata=certs.server.cert_pem)


@pytest.fixture
def pem_files(tmp_path: Path, certs: Certs) -> dict[str, Path]:
    """The server and client certificates and keys as PEM files: server_cert, server_key, ..."""
    files = {}
    for name in ("server", "client"):
        cert = getattr(certs, name)
        files[f"{name}_cert"], files[f"{name}_key"] = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        cert.write(files[f"{name}_cert"], files[f"{name}_key"])
    return files
