"""Command line: ``python -m pydtls_ossl demo`` and ``certificate``.

``main(argv)`` returns an exit code so tests can run it in-process.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from typing import Sequence, TextIO

from ._errors import DtlsError
from ._ffi import openssl_version
from ._pump import handshake, receive, send
from .certs import generate_certificate
from .engine import Dtls

__all__ = ["main"]

DEMO_LABEL = "EXTRACTOR-dtls_srtp"
DEMO_MESSAGES = (b"hello over DTLS", b"a second datagram", b"x" * 1000)


def _demo_server(sock: socket.socket, engine: Dtls, report: dict[str, object]) -> None:
    try:
        first, peer = sock.recvfrom(65535)
        sock.connect(peer)
        engine.feed(first)
        handshake(engine, sock)
        report["keys"] = engine.export_keys(DEMO_LABEL, 60)
        report["peer_fingerprint"] = engine.get_peer_fingerprint()
        for _ in DEMO_MESSAGES:
            send(engine, sock, receive(engine, sock))
    except Exception as exc:  # reported by the main thread
        report["error"] = exc


def demo(out: TextIO) -> int:
    """Server and client on 127.0.0.1 over real UDP, each pinning the other."""
    server_cert = generate_certificate("demo-server")
    client_cert = generate_certificate("demo-client")
    server = Dtls(is_server=True, cert=server_cert.cert_pem, key=server_cert.key_pem,
                  expected_peer_fingerprint=client_cert.fingerprint())
    client = Dtls(cert=client_cert.cert_pem, key=client_cert.key_pem,
                  expected_peer_fingerprint=server_cert.fingerprint())
    server_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server_sock, client_sock, server, client:
        server_sock.bind(("127.0.0.1", 0))
        address = server_sock.getsockname()
        report: dict[str, object] = {}
        thread = threading.Thread(target=_demo_server, args=(server_sock, server, report))
        thread.start()
        out.write(f"{openssl_version()}; server on udp://{address[0]}:{address[1]}\n")
        client_sock.connect(address)
        started = time.perf_counter()
        try:
            handshake(client, client_sock)
            elapsed = time.perf_counter() - started
            out.write(f"handshake finished in {elapsed * 1000:.1f} ms: "
                      f"{client.version()} {client.cipher()}\n")
            out.write(f"client fingerprint  sha-256 {client.get_fingerprint()}\n")
            out.write(f"server fingerprint  sha-256 {client.get_peer_fingerprint()}\n")
            for message in DEMO_MESSAGES:
                send(client, client_sock, message)
                echo = receive(client, client_sock)
                shown = message if len(message) < 40 else message[:20] + b"..."
                out.write(f"echo {len(echo):4d} bytes {'ok' if echo == message else 'MISMATCH'}: "
                          f"{shown!r}\n")
                if echo != message:
                    return 1
            keys = client.export_keys(DEMO_LABEL, 60)
        finally:
            thread.join(15)
        if "error" in report:
            raise report["error"]  # type: ignore[misc]
        out.write(f"{DEMO_LABEL} client {keys.hex()}\n")
        out.write(f"{DEMO_LABEL} server {report['keys'].hex()}\n")  # type: ignore[attr-defined]
        same = keys == report["keys"] and report["peer_fingerprint"] == client.get_fingerprint()
        out.write("keying material identical on both sides\n" if same else "KEYS DIFFER\n")
        return 0 if same else 1


def _certificate(args: argparse.Namespace, out: TextIO) -> int:
    cert = generate_certificate(args.common_name, key_type=args.key_type, days=args.days)
    cert.write(args.cert, args.key)
    out.write(f"wrote {args.cert} and {args.key}\nsha-256 {cert.fingerprint()}\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pydtls_ossl",
                                     description="DTLS 1.2 over OpenSSL's libssl")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="handshake, echo and key export over UDP on 127.0.0.1")
    cert = commands.add_parser("certificate", help="write a self-signed certificate and key")
    cert.add_argument("--cert", default="cert.pem")
    cert.add_argument("--key", default="key.pem")
    cert.add_argument("--common-name", default="pydtls_ossl")
    cert.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    cert.add_argument("--days", type=float, default=30)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run a command; return its exit code. Errors print one line to stderr."""
    args = _parser().parse_args(argv)
    stream = out if out is not None else sys.stdout
    try:
        if args.command == "demo":
            return demo(stream)
        return _certificate(args, stream)
    except (DtlsError, OSError) as exc:
        print(f"pydtls_ossl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
