"""Session resumption with OpenSSL's and GnuTLS's tools, both directions, over UDP."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import DtlsContext
from pydtls_ossl.server import ConnectionEstablished, DataReceived, DtlsServer, ServerEvent
from pydtls_ossl._pump import serve

from .conftest import require_tool
from .interop import PeerProcess, free_udp_port

pytestmark = pytest.mark.interop


class CoreOnUdp:
    """A DtlsServer echoing on a UDP socket in a thread; records resumed/full per peer."""

    def __init__(self, context: DtlsContext) -> None:
        self.server = DtlsServer(context)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.resumed: list[bool] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_event(self, event: ServerEvent) -> None:
        if isinstance(event, ConnectionEstablished):
            engine = self.server.connection(event.address)
            assert engine is not None
            self.resumed.append(engine.session_reused())
        elif isinstance(event, DataReceived):
            self.server.send(event.address, event.data)

    def _run(self) -> None:
        serve(self.server, self.sock, self._on_event, self._stop.is_set)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> CoreOnUdp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.mark.parametrize("tickets", [True, False])
def test_openssl_s_client_resumes_against_our_server(certs: Any, tmp_path: Path,
                                                     tickets: bool) -> None:
    openssl = require_tool("openssl")
    sess = tmp_path / "session.pem"
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, session_tickets=tickets)
    with CoreOnUdp(ctx) as core:
        base = [openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{core.port}"]
        with PeerProcess(base + ["-sess_out", str(sess)]) as first:
            first.wait_for("^New, .*Cipher is")
            first.send_line("first")
            first.wait_for("^first$")
        assert sess.exists()
        with PeerProcess(base + ["-sess_in", str(sess)]) as second:
            second.wait_for("^Reused, .*Cipher is")
            second.send_line("second")
            second.wait_for("^second$")
    assert core.resumed == [False, True]


def test_our_client_resumes_against_openssl_s_server(pem: tuple[str, str], certs: Any) -> None:
    openssl = require_tool("openssl")
    port = free_udp_port()
    with PeerProcess([openssl, "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                      "-cert", pem[0], "-key", pem[1]]) as server:
        server.wait_for("ACCEPT")
        session = None
        for attempt in range(2):
            ctx = DtlsContext()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.connect(("127.0.0.1", port))
                sock = ctx.wrap_socket(raw, expected_peer_fingerprint=certs.server.fingerprint(),
                                       session=session)
                sock.settimeout(10)
                assert sock.session_reused() is (attempt == 1)
                sock.send(f"attempt {attempt}\n".encode())
                server.wait_for(f"attempt {attempt}")
                session = sock.session()
                sock.close()
            server.wait_for("ACCEPT" if attempt == 0 else "attempt 1")


def test_gnutls_cli_resumes_against_our_server(certs: Any) -> None:
    gnutls_cli = require_tool("gnutls-cli")
    ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem)
    with CoreOnUdp(ctx) as core, \
            PeerProcess([gnutls_cli, "--udp", "-p", str(core.port), "127.0.0.1", "--insecure",
                         "--resume"]) as client:
        client.wait_for("This is a resumed session", timeout=20)
        client.send_line("resumed hello")
        client.wait_for("resumed hello")
    assert core.resumed[:2] == [False, True]


def test_our_client_resumes_against_gnutls_serv(pem: tuple[str, str], certs: Any) -> None:
    port = free_udp_port()
    with PeerProcess([require_tool("gnutls-serv"), "--udp", "--echo", "-p", str(port),
                      "--x509certfile", pem[0], "--x509keyfile", pem[1]]) as server:
        server.wait_for("listening on IPv4")
        session = None
        for attempt in range(2):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.connect(("127.0.0.1", port))
                sock = DtlsContext().wrap_socket(
                    raw, expected_peer_fingerprint=certs.server.fingerprint(), session=session)
                sock.settimeout(10)
                assert sock.session_reused() is (attempt == 1)
                sock.send(b"echo me\n")
                assert sock.recv() == b"echo me\n"
                session = sock.session()
                sock.close()
