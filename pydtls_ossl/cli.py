"""Command line, in the manner of ``openssl s_server/s_client -dtls1_2``.

    python -m pydtls_ossl demo
    python -m pydtls_ossl server [--port 4433] [--echo] [--psk ID:HEX] [--srtp P1,P2] ...
    python -m pydtls_ossl client HOST PORT [--fingerprint FP | --cafile F | --psk ID:HEX | --insecure]
    python -m pydtls_ossl certificate --cert c.pem --key k.pem

``main(argv)`` returns the exit code, so tests run it in-process; a failure is
one line on stderr and a non-zero code.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Sequence, TextIO

from ._errors import DtlsError
from ._ffi import openssl_version
from ._pump import handshake, receive, send
from .certs import generate_certificate
from .context import DtlsContext, Verify
from .engine import Dtls

__all__ = ["main"]

_log = logging.getLogger("pydtls_ossl")
DEMO_LABEL = "EXTRACTOR-dtls_srtp"
DEMO_MESSAGES = (b"hello over DTLS", b"a second datagram", b"x" * 1000)
_RECORD_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}
_HANDSHAKE_TYPES = {1: "client_hello", 2: "server_hello", 3: "hello_verify_request",
                    4: "new_session_ticket", 11: "certificate", 12: "server_key_exchange",
                    13: "certificate_request", 14: "server_hello_done", 15: "certificate_verify",
                    16: "client_key_exchange", 20: "finished"}


def describe(datagram: bytes) -> str:
    """One line for a datagram's records: 'handshake(client_hello) 159 B'."""
    parts, offset = [], 0
    while offset + 13 <= len(datagram):
        kind, epoch = datagram[offset], int.from_bytes(datagram[offset + 3:offset + 5], "big")
        length = int.from_bytes(datagram[offset + 11:offset + 13], "big")
        if kind == 25:  # tls12_cid (RFC 9146): the CID's length is not in the record
            parts.append(f"tls12_cid[epoch {epoch}]")
            break
        name = _RECORD_TYPES.get(kind, f"type{kind}")
        if kind == 22 and epoch == 0 and length:
            name += f"({_HANDSHAKE_TYPES.get(datagram[offset + 13], datagram[offset + 13])})"
        elif epoch:
            name += f"[epoch {epoch}]"
        parts.append(name)
        offset += 13 + length
    return f"{len(datagram)} B: " + ", ".join(parts)


class _TracingSocket:
    """A socket that logs each datagram's records (``-v``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: bytes) -> int:
        _log.info("-> %s", describe(data))
        return self._sock.send(data)

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        _log.info("<- %s", describe(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


# --------------------------------------------------------------------- demo

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


# ------------------------------------------------------------ server/client

def _psk(text: str) -> tuple[str, bytes]:
    identity, _, key = text.partition(":")
    if not identity or not key:
        raise argparse.ArgumentTypeError("--psk takes IDENTITY:HEXKEY")
    return identity, bytes.fromhex(key)


def _context(args: argparse.Namespace, server: bool, out: TextIO) -> DtlsContext:
    options: dict[str, Any] = dict(
        mtu=args.mtu, keylog=args.keylog, ciphers=args.cipher,
        srtp_profiles=args.srtp.split(",") if args.srtp else None,
        alpn_protocols=args.alpn.split(",") if args.alpn else None)
    cert, key = args.cert, args.key
    if server and cert is None and not args.psk:
        generated = generate_certificate("pydtls_ossl-server")
        cert, key = generated.cert_pem, generated.key_pem
        out.write(f"generated a self-signed certificate, sha-256 {generated.fingerprint()}\n")
    if args.psk:
        identity, psk_key = args.psk
        if server:
            options["psk_keys"] = {identity: psk_key}
        else:
            options["psk"] = (identity, psk_key)
    if args.cid is not None:
        options["connection_id_length"] = args.cid
    if server and args.ticket_secret:
        options["ticket_secret"] = bytes.fromhex(args.ticket_secret)
    if not server:
        if args.cafile:
            options["cafile"] = args.cafile
        elif args.insecure:
            options["verify"] = Verify.NONE
    return DtlsContext(cert, key, **options)


def _write_secret(path: str, data: bytes) -> None:
    """Write a file only its owner can read (a session holds its master secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _report(engine: Dtls, args: argparse.Namespace, out: TextIO, who: str) -> None:
    out.write(f"{who}: {engine.version()} {engine.cipher()}\n")
    out.write(f"  session            {'resumed' if engine.session_reused() else 'new'}\n")
    out.write(f"  local fingerprint  {engine.get_fingerprint()}\n")
    out.write(f"  peer fingerprint   {engine.get_peer_fingerprint()}\n")
    if engine.psk_identity():
        out.write(f"  PSK identity       {engine.psk_identity()}\n")
    profile = engine.selected_srtp_profile()
    if profile is not None:
        out.write(f"  SRTP profile       {profile.openssl_name}\n")
    if engine.selected_alpn_protocol():
        out.write(f"  ALPN               {engine.selected_alpn_protocol()}\n")
    if args.cid is not None:
        ours, theirs = engine.connection_id, engine.peer_connection_id
        if ours is None or theirs is None:
            out.write("  connection ID      not negotiated (the peer does not support RFC 9146)\n")
        else:
            out.write(f"  connection ID      ours {ours.hex() or '(none)'}, peer's {theirs.hex() or '(none)'}\n")
    length = args.keymatexportlen or (profile.keying_material_length if profile else 0)
    if length:
        label = args.keymatexport or DEMO_LABEL
        out.write(f"  exported {label} {engine.export_keys(label, length).hex()}\n")
    out.flush()


def run_server(args: argparse.Namespace, out: TextIO) -> int:
    context = _context(args, server=True, out=out)
    with context.listen((args.host, args.port)) as listener:
        host, port = listener.address[:2]
        out.write(f"listening on udp://{host}:{port} (DTLS 1.2); Ctrl-C stops\n")
        out.flush()
        served = 0
        while args.count is None or served < args.count:
            try:
                connection = listener.accept(timeout=args.timeout)
            except TimeoutError:
                out.write("no peer within --timeout\n")
                return 1
            served += 1
            out.write(f"peer {connection.address[0]}:{connection.address[1]} connected\n")
            _report(connection.engine, args, out, "server")
            connection.settimeout(args.timeout)
            try:
                while True:
                    data = connection.recv()
                    out.write(f"received {len(data)} bytes: {data[:60]!r}\n")
                    out.flush()
                    if args.echo:
                        connection.send(data)
            except DtlsError as exc:
                out.write(f"peer gone: {exc}\n")
            except TimeoutError:
                out.write("peer quiet for --timeout; closing\n")
                connection.close()
            out.flush()
    return 0


def run_client(args: argparse.Namespace, out: TextIO) -> int:
    context = _context(args, server=False, out=out)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as raw:
        raw.connect((args.host, args.port))
        sock: Any = _TracingSocket(raw) if args.verbose else raw
        saved = None
        if args.sess_in:
            try:
                with open(args.sess_in, "rb") as f:
                    saved = f.read()
            except FileNotFoundError:
                out.write(f"no session in {args.sess_in}; a full handshake\n")
        engine = Dtls(context=context, expected_peer_fingerprint=args.fingerprint,
                      server_hostname=args.servername, session=saved)
        out.write(f"connecting to udp://{args.host}:{args.port} ...\n")
        out.flush()
        started = time.perf_counter()
        handshake(engine, sock, args.timeout)
        out.write(f"handshake done in {(time.perf_counter() - started) * 1000:.1f} ms\n")
        _report(engine, args, out, "client")
        if args.sess_out:
            session = engine.session()
            if session is None:
                out.write("the server made this session unresumable; nothing saved\n")
            else:
                _write_secret(args.sess_out, session)
        # stdin lines keep their newline, as s_client sends them
        lines = [m.encode() for m in args.message] if args.message else iter(
            sys.stdin.buffer.readline, b"")
        for line in lines:
            send(engine, sock, line)
            if args.message or args.wait_reply:
                reply = receive(engine, sock, args.timeout)
                out.write(f"received {len(reply)} bytes: {reply[:60]!r}\n")
                out.flush()
        engine.close()
        while (datagram := engine.pull()) is not None:
            sock.send(datagram)
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cert", help="certificate (PEM/DER file)")
    parser.add_argument("--key", help="private key (PEM/DER file)")
    parser.add_argument("--psk", type=_psk, help="pre-shared key IDENTITY:HEXKEY")
    parser.add_argument("--cipher", help="OpenSSL cipher list (default: AEAD ECDHE or PSK suites)")
    parser.add_argument("--srtp", help="SRTP profiles, e.g. SRTP_AEAD_AES_128_GCM,SRTP_AES128_CM_SHA1_80")
    parser.add_argument("--alpn", help="ALPN protocols, comma separated")
    parser.add_argument("--keylog", help="append NSS key-log lines here (default: $SSLKEYLOGFILE)")
    parser.add_argument("--mtu", type=int, default=1200, help="largest datagram (default 1200)")
    parser.add_argument("--keymatexport", help="export keying material with this label")
    parser.add_argument("--keymatexportlen", type=int, default=0, help="bytes of keying material")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: no limit)")
    parser.add_argument("--cid", type=int, metavar="LEN",
                        help="offer a Connection ID (RFC 9146) of LEN random bytes (0: send the "
                             "peer's, want none)")
    parser.add_argument("-v", "--verbose", action="store_true", help="trace every datagram")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pydtls_ossl",
                                     description="DTLS 1.2 over OpenSSL's libssl")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="handshake, echo and key export over UDP on 127.0.0.1")
    server = commands.add_parser("server", help="serve DTLS, like openssl s_server -dtls1_2")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=4433)
    server.add_argument("--echo", action="store_true", help="send every record back")
    server.add_argument("--count", type=int, help="exit after serving this many peers")
    server.add_argument("--ticket-secret", help="fleet ticket secret (hex, >= 32 bytes): every "
                        "server given it resumes the others' tickets")
    _add_common(server)
    client = commands.add_parser("client", help="connect, like openssl s_client -dtls1_2")
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("--fingerprint", help="pin the server's certificate (sha-256 AB:CD:...)")
    client.add_argument("--cafile", help="verify the server against these CAs")
    client.add_argument("--servername", help="SNI and hostname to verify")
    client.add_argument("--insecure", action="store_true", help="accept any server (no verification)")
    client.add_argument("--message", action="append", help="send this and print the reply (repeatable);"
                        " without it, stdin lines are sent")
    client.add_argument("--sess-out", help="save the session here after the handshake (like s_client)")
    client.add_argument("--sess-in", help="resume the session saved in this file")
    client.add_argument("--wait-reply", action="store_true", help="with stdin: wait for a reply per line")
    _add_common(client)
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
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "demo":
            return demo(stream)
        if args.command == "server":
            return run_server(args, stream)
        if args.command == "client":
            return run_client(args, stream)
        cert = generate_certificate(args.common_name, key_type=args.key_type, days=args.days)
        cert.write(args.cert, args.key)
        stream.write(f"wrote {args.cert} and {args.key}\nsha-256 {cert.fingerprint()}\n")
        return 0
    except KeyboardInterrupt:
        return 130
    except (DtlsError, OSError, ValueError) as exc:
        print(f"pydtls_ossl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
