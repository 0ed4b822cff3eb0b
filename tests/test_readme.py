"""The README's tour is code a user will paste: run it."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def block_with(marker: str) -> str:
    found = [block for block in python_blocks() if marker in block]
    assert len(found) == 1, f"exactly one README block uses {marker!r}"
    return found[0]


def test_readme_tour_runs(capsys: object) -> None:
    tour = block_with("def pump(")
    assert "export_keys" in tour
    exec(compile(tour, "README.md", "exec"), {})
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "DTLSv1.2" in out


def test_readme_starts_with_the_two_commands() -> None:
    commands = re.findall(r"```\n(.*?)\n```", README.read_text(), flags=re.S)[:2]
    assert commands[0].endswith("python -m pydtls_ossl demo")
    assert "pytest" in commands[1]


def test_readme_webrtc_snippet_runs() -> None:
    webrtc = block_with("classify(datagram)")
    assert "srtp_keys" in webrtc
    namespace: dict[str, object] = {}
    exec(compile(webrtc, "README.md", "exec"), namespace)
    on_datagram = namespace["on_datagram"]
    for datagram in (b"\x00\x01" + bytes(18), b"\x80\x60" + bytes(10), b"\x16\xfe\xff" + bytes(10)):
        on_datagram(datagram)  # type: ignore[operator]


def test_readme_psk_snippet_runs() -> None:
    from .helpers import Pair
    psk = block_with("psk_identity_hint")
    namespace: dict[str, object] = {}
    exec(compile(psk, "README.md", "exec"), namespace)
    pair = Pair(namespace["sensor"], namespace["gateway"])  # type: ignore[arg-type]
    pair.handshake()
    assert pair.server.psk_identity() == "sensor-0042"


def test_readme_asyncio_snippet_runs(tmp_path: Path, monkeypatch: object) -> None:
    import asyncio

    from pydtls_ossl import generate_certificate
    generate_certificate("localhost").write(tmp_path / "cert.pem", tmp_path / "key.pem")
    monkeypatch.chdir(tmp_path)  # type: ignore[attr-defined]
    namespace: dict[str, object] = {}
    exec(compile(block_with("aio.serve"), "README.md", "exec"), namespace)
    asyncio.run(namespace["main"]())  # type: ignore[operator]


def test_readme_socket_snippet_compiles() -> None:
    compile(block_with("wrap_socket"), "README.md", "exec")


def test_readme_per_peer_pin_snippet_runs(certs: object) -> None:
    from pydtls_ossl import Dtls, DtlsContext
    from pydtls_ossl.server import ConnectionEstablished, ConnectionTerminated

    from .test_server import Net

    snippet = block_with("expected_peer_fingerprint=offers")
    namespace: dict[str, object] = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    core, alice, server_cert = namespace["core"], namespace["alice"], namespace["server_cert"]
    net = Net(core)  # type: ignore[arg-type]
    for port, cert in ((5004, alice), (5004 + 1, alice)):
        net.add(("127.0.0.1", port), Dtls(context=DtlsContext(
            cert.cert_pem, cert.key_pem, initial_rto=0.05),  # type: ignore[attr-defined]
            expected_peer_fingerprint=server_cert.fingerprint()))  # type: ignore[attr-defined]
    net.run(lambda: core.handshaking == 0 and sum(  # type: ignore[attr-defined]
        isinstance(e, (ConnectionEstablished, ConnectionTerminated)) for e in net.events) == 2)
    outcomes = {e.address[1]: type(e).__name__ for e in net.events
                if isinstance(e, (ConnectionEstablished, ConnectionTerminated))}
    assert outcomes == {5004: "ConnectionEstablished", 5005: "ConnectionTerminated"}


def test_readme_resumption_snippets_run() -> None:
    namespace: dict[str, object] = {}
    exec(compile(block_with("session_reused()"), "README.md", "exec"), namespace)
    fleet = block_with("FLEET_SECRET")
    namespace = {}
    exec(compile(fleet, "README.md", "exec"), namespace)
    from pydtls_ossl import Dtls, DtlsContext

    from .test_server import Net
    cert = namespace["cert"]
    client_ctx = DtlsContext(initial_rto=0.05)
    pin = cert.fingerprint()  # type: ignore[attr-defined]
    net_a = Net(namespace["node_a"])  # type: ignore[arg-type]
    first = net_a.add(("127.0.0.1", 1), Dtls(context=client_ctx, expected_peer_fingerprint=pin))
    net_a.run(lambda: first.is_handshake_finished() and namespace["node_a"].handshaking == 0)  # type: ignore[attr-defined]
    net_b = Net(namespace["node_b"])  # type: ignore[arg-type]
    again = net_b.add(("127.0.0.1", 2), Dtls(context=client_ctx, expected_peer_fingerprint=pin,
                                            session=first.session()))
    net_b.run(lambda: again.is_handshake_finished() and namespace["node_b"].handshaking == 0)  # type: ignore[attr-defined]
    assert again.session_reused()


def test_readme_association_snippet_runs() -> None:
    from pydtls_ossl import Dtls, DtlsContext

    from .helpers import Pair
    namespace: dict[str, object] = {}
    exec(compile(block_with("association_keys=KEYS"), "README.md", "exec"), namespace)
    ctx = namespace["ctx"]
    pair = Pair(Dtls(context=DtlsContext(psk=("sensor-9", bytes(16)), ciphers="PSK-AES128-CCM8")),
                Dtls(is_server=True, context=ctx))  # type: ignore[arg-type]
    pair.handshake()
    blob = pair.server.export_association(binding=b"sensor-9@198.51.100.7")
    pair.server = Dtls.import_association(blob, context=ctx,  # type: ignore[arg-type]
                                          binding=b"sensor-9@198.51.100.7")
    assert pair.roundtrip(b"\x40\x01still here") == b"\x40\x01still here"


def test_readme_connection_id_snippet_runs() -> None:
    from pydtls_ossl import AddressChanged, DataReceived, Dtls, DtlsServer
    from .test_cid import converse
    block = block_with("connection_id=True")
    namespace: dict[str, object] = {"KEY": b"\x5e" * 16}
    exec(compile(block, "README.md", "exec"), namespace)
    server: DtlsServer = namespace["core"]  # type: ignore[assignment]
    sensor = Dtls(context=namespace["sensor_ctx"])  # type: ignore[arg-type]
    sensor.handshake()
    converse(server, sensor, ("10.0.0.2", 40001))
    sensor.write(b"reading")
    events = converse(server, sensor, ("10.0.0.2", 51234))  # the NAT picked another port
    assert any(isinstance(e, AddressChanged) and e.old_address == ("10.0.0.2", 40001) for e in events)
    assert DataReceived(("10.0.0.2", 51234), b"reading") in events


def test_readme_server_socket_snippet_runs(certs: object) -> None:
    import socket
    import threading

    from pydtls_ossl import DtlsContext

    namespace: dict[str, object] = {}
    exec(compile(block_with("ServerSocket(server, sock)"), "README.md", "exec"), namespace)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    done = threading.Event()
    context = DtlsContext(certs.server.cert_pem, certs.server.key_pem)  # type: ignore[attr-defined]
    thread = threading.Thread(target=namespace["echo_server"], args=(context, sock, done.is_set))
    thread.start()
    try:
        client_ctx = DtlsContext(cadata=certs.server.cert_pem)  # type: ignore[attr-defined]
        with client_ctx.wrap_socket(socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                                    server_hostname="localhost") as client:
            client.settimeout(10)
            client.connect(sock.getsockname())
            for message in (b"one", b"two" * 300, b"three"):
                client.send(message)
                assert client.recv() == message
    finally:
        done.set()
        thread.join(10)
        sock.close()
    assert not thread.is_alive()
