"""The wolfSSL DTLS 1.2 peer for RFC 9146 Connection ID interop tests.

``bash .ci/wolfssl`` builds a Debian sid root (its libwolfssl has
WOLFSSL_DTLS_CID) with ``tests/peers/wolfssl_peer.c`` compiled in it; this
module finds it and runs it as ``chroot ROOT /peer/wolfssl_peer ...``.  The
root is ``$WOLFSSL_ROOT`` or ``/var/tmp/pydtls-wolfssl``; chroot needs root.

Files a test passes (certificate, key, CA) are copied into ``ROOT/tmp/`` in
a directory of the peer's own, removed by :meth:`WolfPeer.close`.  The
peer's command line and its line protocol on stdout are described at the
top of ``tests/peers/wolfssl_peer.c``.  In short::

    server = WolfPeer("server", cert=..., key=..., cid=b"\\xaa\\xbb")
    client = ...                      # pydtls_ossl, to 127.0.0.1:server.port
    hs = server.expect_handshake()    # hs.tx_cid, hs.rx_cid, hs.cid
    server.expect("RECV ")            # every record is echoed as b"echo:" + data
    server.expect_peer()              # ("127.0.0.1", port) after a NAT rebinding

    client = WolfPeer("client", port=..., cid=b"\\x01")
    client.expect_handshake()
    assert client.send_text("hi") == "echo:hi"
    client.rebind(); client.close_association()

Self-test (wolfSSL against itself): ``python3 -m tests.wolfssl``.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

DEFAULT_ROOT = "/var/tmp/pydtls-wolfssl"
PEER_IN_ROOT = "/peer/wolfssl_peer"
BUILD_COMMAND = "bash .ci/wolfssl"
SOURCE = Path(__file__).resolve().parent / "peers" / "wolfssl_peer.c"

# A file the peer reads: a path on the host, or the PEM contents themselves.
FileArg = str | os.PathLike[str] | bytes


class WolfPeerError(AssertionError):
    """The peer failed, exited, or did not print what was expected in time."""


def root_dir() -> Path:
    return Path(os.environ.get("WOLFSSL_ROOT") or DEFAULT_ROOT)


def peer_binary() -> Path:
    """The peer's path on the host (inside the root)."""
    return root_dir() / PEER_IN_ROOT.lstrip("/")


def available() -> str | None:
    """None when the peer can be run here, else why not (naming the build command)."""
    binary = peer_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return f"no wolfSSL peer at {binary}: build it with `{BUILD_COMMAND}` (as root)"
    built_from = root_dir() / "peer" / "src" / SOURCE.name
    if SOURCE.is_file() and (not built_from.is_file() or built_from.read_bytes() != SOURCE.read_bytes()):
        return f"the wolfSSL peer at {binary} was not built from this {SOURCE.name}: rebuild it with `{BUILD_COMMAND}`"
    if os.geteuid() != 0:
        return f"the wolfSSL peer runs under chroot, which needs root (built by `{BUILD_COMMAND}`)"
    if shutil.which("chroot") is None:
        return f"no chroot command to run the wolfSSL peer (built by `{BUILD_COMMAND}`)"
    return None


def wolfssl_version() -> str:
    """wolfSSL's version string as the peer reports it, e.g. ``'5.9.2'``."""
    out = subprocess.run(["chroot", str(root_dir()), PEER_IN_ROOT, "--version"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return out.strip().removeprefix("wolfSSL ")


def unescape(text: str) -> bytes:
    """A RECV payload back to bytes (the peer writes ``\\xHH`` for bytes outside 0x20..0x7e and backslash)."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                  text.encode("latin-1"))


def _hex_or_empty(field: str) -> bytes:
    return b"" if field == "-" else bytes.fromhex(field)


@dataclass(frozen=True)
class Handshake:
    """The peer's HANDSHAKE line.

    ``tx_cid``: the CID the peer puts in the records it sends; ``rx_cid``: the
    CID it expects in the records it receives (``b""`` for none); ``cid``:
    whether the connection_id extension was negotiated (possibly with empty
    CIDs).
    """

    cipher: str
    tx_cid: bytes
    rx_cid: bytes
    cid: bool
    line: str

    @classmethod
    def parse(cls, line: str) -> Handshake:
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        try:
            return cls(cipher=fields["cipher"], tx_cid=_hex_or_empty(fields["tx_cid"]),
                       rx_cid=_hex_or_empty(fields["rx_cid"]), cid=fields.get("cid") == "on",
                       line=line)
        except (KeyError, ValueError) as exc:
            raise WolfPeerError(f"unparsable HANDSHAKE line {line!r}") from exc


class WolfPeer:
    """One run of ``wolfssl_peer client|server`` in the root.

    ``cid``: None for ``--no-cid``, ``b""`` for ``--cid-empty``, else the CID
    the peer asks its peer to use (at most 10 bytes in this wolfSSL build).
    ``port``: the server's port (client), or the port to bind (server; 0 for
    an ephemeral one).  After the constructor returns, the peer has printed
    READY and :attr:`port` is the server's listening port (server) or the
    client's local port (client).
    """

    def __init__(self, mode: Literal["client", "server"], *, port: int = 0,
                 host: str = "127.0.0.1", cid: bytes | None = None,
                 cert: FileArg | None = None, key: FileArg | None = None,
                 ca: FileArg | None = None, request_cert: bool = False,
                 psk_identity: str | None = None, psk_key: bytes | None = None,
                 cipher: str | None = None, timeout: float | None = None,
                 extra_args: Sequence[str] = (), ready_timeout: float = 10.0) -> None:
        reason = available()
        if reason is not None:
            raise WolfPeerError(reason)
        self.mode = mode
        self.root = root_dir()
        self.lines: list[str] = []      # every line read, in order (by the reader thread)
        self._pending: list[str] = []   # lines read and not yet expected
        self.returncode: int | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._eof = False
        self._closed = False
        (self.root / "tmp").mkdir(exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix="pydtls-wolf-", dir=self.root / "tmp"))
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            args = [mode, "--host", host, "--port", str(port)]
            if cid is None:
                args.append("--no-cid")
            elif cid == b"":
                args.append("--cid-empty")
            else:
                args += ["--cid", cid.hex()]
            for option, value in (("--cert", cert), ("--key", key), ("--ca", ca)):
                if value is not None:
                    args += [option, self._stage(option[2:], value)]
            if request_cert:
                args.append("--request-cert")
            if (psk_identity is None) != (psk_key is None):
                raise ValueError("psk_identity and psk_key go together")
            if psk_identity is not None and psk_key is not None:
                args += ["--psk-identity", psk_identity, "--psk-key", psk_key.hex()]
            if cipher is not None:
                args += ["--cipher", cipher]
            if timeout is not None:
                args += ["--timeout", f"{timeout:g}"]
            args += list(extra_args)
            self.args = ["chroot", str(self.root), PEER_IN_ROOT, *args]
            self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT)
            self._reader = threading.Thread(target=self._read, name=f"wolfssl-peer-{mode}",
                                            daemon=True)
            self._reader.start()
            self.port = int(self.expect("READY ", ready_timeout).split()[1])
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- plumbing

    def _stage(self, name: str, value: FileArg) -> str:
        """Copy (or write) a file into the root; return its path as the peer sees it."""
        dest = self._tmp / f"{name}.pem"
        if isinstance(value, bytes):
            dest.write_bytes(value)
        else:
            shutil.copyfile(value, dest)
        return "/" + str(dest.relative_to(self.root))

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def output(self) -> str:
        """Every line read so far (expected or not)."""
        return "\n".join(self.lines)

    def _fail(self, message: str) -> WolfPeerError:
        status = "" if self.proc is None or self.proc.poll() is None else f", exit status {self.proc.returncode}"
        return WolfPeerError(f"wolfssl_peer {self.mode}: {message}{status}; command: "
                             f"{' '.join(self.args) if hasattr(self, 'args') else '?'}; output:\n"
                             + "\n".join(self.lines[-40:]))

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """The oldest line not yet expected that starts with ``prefix``, waiting for it.

        Lines are consumed one at a time: lines with other prefixes stay
        for later calls (so PEER and HANDSHAKE, say, can be expected in
        either order), lines with the same prefix come back in order.
        Raises WolfPeerError on timeout, on the peer's exit, or when it
        prints an ``ERROR`` line (unless that is what is expected).
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, line in enumerate(self._pending):
                if line.startswith(prefix):
                    del self._pending[i]
                    return line
            if not prefix.startswith("ERROR"):
                for line in self._pending:
                    if line.startswith("ERROR"):
                        raise self._fail(f"failed while waiting for {prefix!r}: {line}")
            if self._eof:
                raise self._fail(f"exited before printing {prefix!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"did not print {prefix!r} within {timeout:g} s")
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                self._eof = True
                if self.proc is not None:
                    try:
                        self.returncode = self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                continue
            self._pending.append(item)

    def send_line(self, command: str) -> None:
        """One command line to the client's stdin (``send TEXT``, ``rebind``, ``close``)."""
        if self.proc is None or self.proc.stdin is None:
            raise self._fail("not running")
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise self._fail(f"cannot write {command!r}: {exc}") from exc

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the peer to exit on its own; its exit status."""
        if self.proc is None:
            raise self._fail("not running")
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise self._fail(f"still running after {timeout:g} s") from exc
        return self.returncode

    def close(self) -> None:
        """Stop the peer (if it still runs), reap it, and remove its files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self.returncode = proc.returncode
            reader = getattr(self, "_reader", None)
            if reader is not None:
                reader.join(5)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            # Lines the reader queued after the last expect(), for output().
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._pending.append(item)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> WolfPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------- the protocol

    def expect_handshake(self, timeout: float = 10.0) -> Handshake:
        return Handshake.parse(self.expect("HANDSHAKE ", timeout))

    def expect_peer(self, timeout: float = 10.0) -> tuple[str, int]:
        """Server: the next PEER line, as (ip, port)."""
        line = self.expect("PEER ", timeout)
        host, _, port = line.split(" ", 1)[1].rpartition(":")
        return host.strip("[]"), int(port)

    def expect_recv(self, timeout: float = 10.0) -> bytes:
        """The next application record the peer received."""
        return unescape(self.expect("RECV ", timeout)[len("RECV "):])

    def send_text(self, text: str, timeout: float = 10.0) -> str:
        """Client: send one record, return the reply record's text (``echo:...`` from a wolfssl_peer server)."""
        if "\n" in text or "\r" in text:
            raise ValueError("one line of text")
        self.send_line(f"send {text}")
        return self.expect("RECV ", timeout)[len("RECV "):]

    def rebind(self, timeout: float = 10.0) -> int:
        """Client: move to a new UDP socket (new source port); returns the new local port."""
        self.send_line("rebind")
        return int(self.expect("REBOUND ", timeout).split()[1])

    def close_association(self, timeout: float = 10.0) -> int:
        """Client: send close_notify and wait for the exit; its status (0)."""
        self.send_line("close")
        self.expect("CLOSED", timeout)
        return self.wait(timeout)


# ------------------------------------------------------------------ self-test

def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """An ECDSA P-256 CA and a server certificate signed by it, with the openssl command."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=wolfssl test CA", "-days", "2")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", "1", "-out", "server.pem", "-days", "2")
    return directory / "server.pem", directory / "server.key", directory / "ca.pem"


def _pairing(server_kw: dict[str, object], client_kw: dict[str, object], rebind: bool) -> str:
    with WolfPeer("server", timeout=10, **server_kw) as server:  # type: ignore[arg-type]
        with WolfPeer("client", port=server.port, timeout=10, **client_kw) as client:  # type: ignore[arg-type]
            c = client.expect_handshake()
            s = server.expect_handshake()
            first = server.expect_peer()
            assert first == ("127.0.0.1", client.port), (first, client.port)
            assert (c.tx_cid, c.rx_cid) == (s.rx_cid, s.tx_cid), (c, s)
            assert client.send_text("hello") == "echo:hello"
            assert server.expect_recv() == b"hello"
            if rebind:
                port = client.rebind()
                assert client.send_text("after rebind") == "echo:after rebind"
                assert server.expect_peer() == ("127.0.0.1", port)
            assert client.close_association() == 0
            server.expect("CLOSED")
            assert server.wait() == 0
            return f"{c.cipher}, client tx_cid={c.tx_cid.hex() or '-'} rx_cid={c.rx_cid.hex() or '-'}"


def self_test() -> None:
    reason = available()
    if reason is not None:
        raise SystemExit(f"wolfSSL peer unavailable: {reason}")
    print(f"wolfSSL {wolfssl_version()} at {peer_binary()}")
    psk = {"psk_identity": "client1", "psk_key": bytes.fromhex("00112233445566778899aabbccddeeff")}
    with tempfile.TemporaryDirectory() as d:
        cert, key, ca = _make_certs(Path(d))
        pem = {"cert": cert, "key": key}
        cases: list[tuple[str, dict[str, object], dict[str, object], bool]] = [
            ("certs, CID both ways, rebind", {**pem, "cid": b"\xaa\xbb\xcc\xdd"},
             {"ca": ca, "cid": b"\x01\x02"}, True),
            ("certs, client CID empty, rebind", {**pem, "cid": bytes(range(10))},
             {"cid": b""}, True),
            ("certs, server CID empty", {**pem, "cid": b""}, {"cid": b"\x05"}, False),
            ("certs, no CID", {**pem}, {"ca": ca}, False),
            ("ECDHE-PSK-CHACHA20, CID both ways, rebind", {**psk, "cid": b"\x0a\x0b"},
             {**psk, "cid": b"\x0c"}, True),
            ("PSK-CHACHA20, CID both ways, rebind",
             {**psk, "cid": b"\x0a\x0b", "cipher": "PSK-CHACHA20-POLY1305"},
             {**psk, "cid": b"\x0c", "cipher": "PSK-CHACHA20-POLY1305"}, True),
        ]
        for name, server_kw, client_kw, rebind in cases:
            t = time.monotonic()
            print(f"ok   {name}: {_pairing(server_kw, client_kw, rebind)} "
                  f"({time.monotonic() - t:.2f} s)")
        # Without CID the server must not follow a new address.
        with WolfPeer("server", timeout=10, cert=cert, key=key, cid=b"\x11") as server:
            with WolfPeer("client", port=server.port, cid=None) as client:
                assert not client.expect_handshake().cid
                assert client.send_text("x") == "echo:x"
                client.rebind()
                client.send_line("send lost")
                server.expect("DROP ")
                client.expect("ERROR ")
                print("ok   no CID: a rebound client is dropped (DROP), the client times out")
    leftovers = list((root_dir() / "tmp").glob("pydtls-wolf-*"))
    assert not leftovers, leftovers
    print("self-test passed")


if __name__ == "__main__":
    self_test()
