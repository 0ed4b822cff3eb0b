"""Target ``cid``: Connection ID records (RFC 9146) at an established association
and at the server core that routes by them.

Input layout: the first byte picks the mode (low 2 bits) and the suite (bits
2-3: AES-128-GCM, ChaCha20-Poly1305, AES-128-CCM_8 with PSK, AES-256-GCM).
Modes 0 and 1 come from the peer's address, 2 and 3 from a new one: 0 and 2
feed the rest as a datagram, 1 and 3 XOR the rest into a fresh CID record
from the client (all zeros: the genuine record). With bit 4 set, the victim
is mid-handshake instead: a fresh engine pair stops just before the last
flight of the full handshake (bit 5: the client's CKE/CCS/Finished to the
server, or the server's CCS/Finished to the client) reaches its receiver,
which is first fed the rest (mode 0) or that flight with the rest XORed
into its epoch-1 (CID) records (mode 1), then the genuine flight: the
handshake must finish and carry a record each way.

What is checked on every input:
- nothing raises, OpenSSL's error queue is empty, the association stays
  established and carries a record each way afterwards;
- a record is delivered only if the datagram carries the genuine fresh record
  byte for byte;
- the server core moves the peer to another address only for the genuine
  fresh record (RFC 9146 §6: it authenticates and is the newest seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .. import AddressChanged, DataReceived, Dtls, DtlsContext, DtlsServer, generate_certificate
from .._ffi import lib
from . import Finding, register

__all__: list[str] = []

_SUITES = ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "PSK-AES128-CCM8",
           "ECDHE-ECDSA-AES256-GCM-SHA384")
_PSK = ("fuzz-device", bytes(range(16)))
_HOME = ("192.0.2.1", 5684)
_USES = 2048
_CID_EPOCH1 = b"\x19\xfe\xfd\x00\x01"  # a tls12_cid record header at epoch 1


@lru_cache(maxsize=1)
def _certificate() -> tuple[bytes, bytes]:
    cert = generate_certificate("fuzz.cid")
    return cert.cert_pem, cert.key_pem


@lru_cache(maxsize=None)
def _contexts(suite: str) -> tuple[DtlsContext, DtlsContext]:
    if suite.startswith("PSK"):
        return (DtlsContext(psk=_PSK, ciphers=suite, connection_id=b"\x01\x02\x03"),
                DtlsContext(psk_keys=dict([_PSK]), ciphers=suite, connection_id=True))
    cert, key = _certificate()
    return (DtlsContext(verify="none", ciphers=suite, connection_id=b"\x01\x02\x03"),
            DtlsContext(cert, key, ciphers=suite, connection_id=True))


@dataclass
class _Live:
    client: Dtls
    server: DtlsServer
    uses: int = 0
    moves: int = 0

    def engine(self) -> Dtls:
        engine = self.server.connection(_HOME)
        if engine is None:
            raise Finding("the association left the server core")
        return engine


def _converse(client: Dtls, server: DtlsServer, address: object) -> list[object]:
    events: list[object] = []
    for _ in range(40):
        moved = False
        while (datagram := client.pull()) is not None:
            server.feed(datagram, address)
            moved = True
        for datagram, _to in server.datagrams_to_send():
            client.feed(datagram)
            moved = True
        events += list(server.events())
        if not client.is_handshake_finished():
            client.handshake()
        if not moved and client.is_handshake_finished():
            break
    return events


_lives: dict[str, _Live] = {}


def _live(suite: str) -> _Live:
    live = _lives.get(suite)
    if live is None or live.uses >= _USES or live.moves:
        client_ctx, server_ctx = _contexts(suite)
        client = Dtls(context=client_ctx)
        server = DtlsServer(server_ctx)
        client.handshake()
        _converse(client, server, _HOME)
        if _HOME not in server or not client.is_handshake_finished() or not client.peer_connection_id:
            raise Finding(f"no CID association with {suite}")
        live = _lives[suite] = _Live(client, server)
    return live


def _fresh(client: Dtls, size: int) -> tuple[bytes, bytes]:
    payload = bytes((i * 13 + size) & 0xFF for i in range(1 + size % 64))
    client.write(payload)
    record = client.pull()
    if record is None or client.pull() is not None:
        raise Finding("one write did not make one datagram")
    return payload, record


def _check_queue(what: str) -> None:
    if lib.ERR_peek_error() != 0:
        raise Finding(f"{what} left an error in OpenSSL's queue")


def _seeds() -> dict[str, bytes]:
    live = _live(_SUITES[0])
    _, record = _fresh(live.client, 5)
    live.server.feed(record, _HOME)
    list(live.server.events())
    flipped = bytearray(record)
    flipped[-3] ^= 0x20
    return {"raw-record": b"\x00" + record, "mutate-tag": b"\x01" + bytes(len(record) - 1) + b"\x04",
            "core-replay": b"\x02" + record, "core-flipped": b"\x02" + bytes(flipped),
            "core-genuine": b"\x03", "chacha-raw": b"\x04" + record,
            "ccm8-mutate": b"\x09" + bytes(8) + b"\x80", "empty": b"",
            "handshake-raw": b"\x10" + record, "handshake-flipped": b"\x11" + bytes(20) + b"\x01",
            "handshake-client": b"\x35" + bytes(30) + b"\x40"}


def _handshake_mode(data: bytes, suite: str, what: str) -> None:
    """The Finished translation before the handover, fed garbage or damaged CID records."""
    head, rest = data[0], data[1:]
    client_ctx, server_ctx = _contexts(suite)
    client, server = Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)
    to_server = not head & 0x20
    victim = server if to_server else client
    client.handshake()
    flight: list[bytes] = []
    for _ in range(20):
        out = [d for d in iter(client.pull, None)]
        if to_server and any(_CID_EPOCH1 in d for d in out):
            flight = out
            break
        for d in out:
            server.feed(d)
        out = [d for d in iter(server.pull, None)]
        if not to_server and any(_CID_EPOCH1 in d for d in out):
            flight = out
            break
        for d in out:
            client.feed(d)
        client.handshake()
    if not flight:
        raise Finding(f"{what}: no CID record in the last flight")
    if head & 1:
        damaged = []
        for d in flight:
            at = d.find(_CID_EPOCH1)  # the CID record (the flight's last)
            mask = rest.ljust(len(d) - at, b"\x00")[:len(d) - at] if at >= 0 else b""
            damaged.append(d[:at] + bytes(x ^ y for x, y in zip(d[at:], mask)) if at >= 0 else d)
        first = damaged
    else:
        first = [rest]
    try:
        for d in first + flight:
            victim.feed(d)
        victim.handshake()
    except Exception as exc:
        raise Finding(f"{what}: {type(exc).__name__}: {exc}") from exc
    _check_queue(what)
    if not victim.is_handshake_finished():
        raise Finding(f"{what}: the genuine flight after that did not finish the handshake "
                      f"({victim.state.name})")
    peer = client if victim is server else server
    for d in iter(victim.pull, None):
        peer.feed(d)
    for src, dst in ((client, server), (server, client)):
        src.write(b"after")
        for d in iter(src.pull, None):
            dst.feed(d)
        if dst.read() != b"after":
            raise Finding(f"{what}: the association does not carry records")
    _check_queue(what)


@register("cid", "Connection ID records at an established association and at the "
          "server core that routes by them", seeds=_seeds, max_len=1500,
          reset=_lives.clear, instrument=("pydtls_ossl.server", "pydtls_ossl.engine"))
def cid_target(data: bytes) -> None:
    head = data[0] if data else 0
    rest = data[1:]
    mode, suite = head & 3, _SUITES[(head >> 2) & 3]
    if head & 0x10:
        _handshake_mode(data, suite, f"cid handshake mode {head & 0x31:#x} ({suite})")
        return
    live = _live(suite)
    live.uses += 1
    what = f"cid mode {mode} ({suite})"
    server, client = live.server, live.client
    expected: list[bytes] = []
    if mode in (0, 2):
        datagram = rest
    else:
        payload, genuine = _fresh(client, len(rest))
        mask = rest[:len(genuine)].ljust(len(genuine), b"\x00")
        datagram = bytes(x ^ y for x, y in zip(genuine, mask)) + rest[len(genuine):]
        if datagram.startswith(genuine):  # every byte of a CID record is authenticated
            expected.append(payload)
    address = _HOME if mode < 2 else ("198.51.100.7", 40000 + head)
    try:
        server.feed(datagram, address)
    except Exception as exc:
        raise Finding(f"{what}: feed raised {type(exc).__name__}: {exc}") from exc
    events = list(server.events())
    _check_queue(what)
    got = [e.data for e in events if isinstance(e, DataReceived)]
    moves = [e for e in events if isinstance(e, AddressChanged)]
    if got != expected:
        raise Finding(f"{what}: delivered {got!r}, expected {expected!r}")
    if moves and not (expected and mode == 3):
        raise Finding(f"{what}: a record that is not the genuine newest one moved the peer")
    if moves:
        live.moves += 1
        return  # a fresh pair next time: this one lives elsewhere now
    engine = live.engine()
    if not engine.is_handshake_finished() or engine.state.name != "ESTABLISHED":
        raise Finding(f"{what}: the association ended: {engine.state.name}")
    while server.datagrams_to_send():
        pass
    payload, record = _fresh(client, 7)
    server.feed(record, _HOME)
    if [e.data for e in server.events() if isinstance(e, DataReceived)] != [payload]:
        raise Finding(f"{what}: the association no longer carries records")
    server.send(_HOME, b"pong")
    out = server.datagrams_to_send()
    if len(out) != 1:
        raise Finding(f"{what}: the server did not answer with one datagram")
    client.feed(out[0][0])
    if client.read() != b"pong":
        raise Finding(f"{what}: the client did not read the server's record")
    _check_queue(what)
