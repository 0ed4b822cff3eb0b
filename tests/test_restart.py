"""A server process restarts; its 200 peers never notice (associations in a store)."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest

from pydtls_ossl import DtlsContext

from .interop import PeerProcess

SCRIPT = Path(__file__).resolve().parent / "assoc_server.py"
PEERS = 200


def echo(sock: object, data: bytes) -> bytes:
    sock.send(data)  # type: ignore[attr-defined]
    return sock.recv()  # type: ignore[attr-defined, no-any-return]


def test_restart_exports_on_sigterm_and_the_next_process_serves_the_same_peers(tmp_path: Path) -> None:
    store = tmp_path / "store"
    client_ctx = DtlsContext(psk=("device", bytes(16)), ciphers="PSK-AES128-CCM8", initial_rto=0.2)
    first = PeerProcess([sys.executable, str(SCRIPT), str(store)])
    clients = []
    try:
        port = int(first.wait_for(r"ready (\d+)").group(1))
        for i in range(PEERS):
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw.connect(("127.0.0.1", port))
            wrapped = client_ctx.wrap_socket(raw)
            wrapped.settimeout(10)
            assert echo(wrapped, b"before %d" % i) == b"before %d" % i
            clients.append(wrapped)
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait_for(r"exported (\d+)").group(1) == str(PEERS)
        assert first.proc.wait(10) == 0
    finally:
        first.close()
    assert len(list(store.glob("*.assoc"))) == PEERS
    second = PeerProcess([sys.executable, str(SCRIPT), str(store), "--port", str(port)])
    try:
        second.wait_for(r"ready (\d+)")
        for i, wrapped in enumerate(clients):  # the same associations: no handshake on our side
            assert wrapped.engine.is_handshake_finished()
            assert echo(wrapped, b"after %d" % i) == b"after %d" % i
        second.proc.send_signal(signal.SIGTERM)
        counters = second.wait_for(r"exported (\d+) restored (\d+) handshakes (\d+)")
        assert counters.group(2) == str(PEERS), "every peer came back from the store"
        assert counters.group(3) == "0", "no peer shook hands again"
    finally:
        second.close()
        for wrapped in clients:
            wrapped._sock.close()


def third_party_client(tool: str, port: int) -> list[str]:
    from .conftest import require_tool
    if tool == "openssl":
        return [require_tool("openssl"), "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
                "-psk", "00" * 16, "-psk_identity", "device", "-cipher", "PSK-AES128-CCM8@SECLEVEL=0"]
    return [require_tool("gnutls-cli"), "--udp", "-p", str(port), "127.0.0.1",
            "--pskusername=device", "--pskkey=" + "00" * 16,
            "--priority", "NONE:+VERS-DTLS1.2:+COMP-NULL:+SIGN-ALL:+GROUP-ALL:+PSK:+AES-128-CCM-8:+AEAD"]


@pytest.mark.interop
@pytest.mark.parametrize("tool", ["openssl", "gnutls"])
def test_a_third_party_peer_keeps_talking_across_our_restart(tool: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = PeerProcess([sys.executable, str(SCRIPT), str(store)])
    try:
        port = int(first.wait_for(r"ready (\d+)").group(1))
        with PeerProcess(third_party_client(tool, port)) as peer:
            peer.wait_for("Cipher is PSK-AES128-CCM8" if tool == "openssl" else "Handshake was completed")
            peer.send_line("before the restart")
            peer.wait_for("^(- Received\\[\\d+\\]: )?before the restart$")
            first.proc.send_signal(signal.SIGTERM)
            assert first.wait_for(r"exported (\d+)").group(1) == "1"
            first.proc.wait(10)
            second = PeerProcess([sys.executable, str(SCRIPT), str(store), "--port", str(port)])
            try:
                second.wait_for(r"ready (\d+)")
                peer.send_line("after the restart")
                peer.wait_for("^(- Received\\[\\d+\\]: )?after the restart$")
                second.proc.send_signal(signal.SIGTERM)
                counters = second.wait_for(r"exported (\d+) restored (\d+) handshakes (\d+)")
                assert counters.group(2) == "1" and counters.group(3) == "0"
            finally:
                second.close()
    finally:
        first.close()


_CLIENT_AFTER_RESTART = """
import socket, sys
from pydtls_ossl import Dtls, DtlsContext
from pydtls_ossl._pump import receive, send
local, server, blob_path, echo = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "echo"
ctx = DtlsContext(psk=("device", bytes(16)), ciphers="PSK-AES128-GCM-SHA256",
                  association_keys=[bytes(range(32))])
engine = Dtls.import_association(open(blob_path, "rb").read(), context=ctx, binding=b"me")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind(("127.0.0.1", int(local)))
    sock.connect(("127.0.0.1", server))
    send(engine, sock, b"from the new process\\n")
    if echo:
        print("got", receive(engine, sock, 10).decode().strip(), flush=True)
    else:
        print("sent", flush=True)
        print("got", receive(engine, sock, 10).decode().strip(), flush=True)
"""


@pytest.mark.interop
@pytest.mark.parametrize("tool", ["openssl", "gnutls"])
def test_our_client_moves_to_a_new_process_and_the_server_keeps_talking(tool: str,
                                                                       tmp_path: Path) -> None:
    from pydtls_ossl import Dtls
    from pydtls_ossl._pump import handshake, receive, send

    from .conftest import require_tool
    from .interop import free_udp_port
    port = free_udp_port()
    if tool == "openssl":
        args = [require_tool("openssl"), "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                "-psk", "00" * 16, "-nocert", "-cipher", "PSK-AES128-GCM-SHA256"]
        ready = "ACCEPT"
    else:
        passwd = tmp_path / "psk.passwd"
        passwd.write_text(f"device:{'00' * 16}\n")
        args = [require_tool("gnutls-serv"), "--udp", "--echo", "-p", str(port), "--pskpasswd",
                str(passwd), "--priority",
                "NONE:+VERS-DTLS1.2:+COMP-NULL:+SIGN-ALL:+GROUP-ALL:+PSK:+AES-128-GCM:+AEAD"]
        ready = "listening on IPv4"
    ctx = DtlsContext(psk=("device", bytes(16)), ciphers="PSK-AES128-GCM-SHA256",
                      association_keys=[bytes(range(32))])
    with PeerProcess(args) as server:
        server.wait_for(ready)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            local = sock.getsockname()[1]
            sock.connect(("127.0.0.1", port))
            engine = Dtls(context=ctx)
            handshake(engine, sock, 10)
            send(engine, sock, b"from the first process\n")
            if tool == "openssl":
                server.wait_for("from the first process")
            else:
                assert receive(engine, sock, 10) == b"from the first process\n"
            blob = tmp_path / "client.assoc"
            blob.write_bytes(engine.export_association(b"me"))
        with PeerProcess([sys.executable, "-c", _CLIENT_AFTER_RESTART, str(local), str(port),
                          str(blob), "echo" if tool == "gnutls" else "lines"]) as moved:
            if tool == "openssl":
                moved.wait_for("^sent$")
                server.wait_for("from the new process")
                server.send_line("s_server still here")
                moved.wait_for("^got s_server still here$")
            else:
                moved.wait_for("^got from the new process$")
