"""Measure the constants ``csrc/memory.c`` uses for DtlsServer's memory budgets.

    python benchmarks/memory_constants.py [--peers N]

``pd_memory()`` sums an engine's own allocations from their sizes, but what
libssl holds inside an ``SSL`` object, and inside an ``EVP_CIPHER_CTX``, it
cannot see. This script measures those with glibc's ``mallinfo2()`` (bytes in
use on the C heap; Python's small objects live in pymalloc's arenas, which it
does not count): N server engines are brought to a state, the heap is read,
the server core frees them (``close_all()``), and the heap is read again; the
difference per engine, less what ``pd_memory()`` counts of the engine's own
allocations, is libssl's part. Clients live in the same process but are not
freed in between, so they do not enter the difference.

Rows: an ``SSL`` mid-handshake (ECDHE-ECDSA P-256, and PSK, after the
server's first flight), an ``SSL`` kept after the handshake
(``record_layer="openssl"``) with and without its buffers, and one cipher
context of the engine's record layer (AES-128-GCM). Then ``pd_memory()``
against the measured heap for each state, as a check. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import malloc_in_use  # noqa: E402
from pydtls_ossl import Dtls, DtlsContext, DtlsServer, Verify, generate_certificate  # noqa: E402
from pydtls_ossl._ffi import lib  # noqa: E402

PSK = bytes(range(16))


def contexts(kind: str) -> tuple[DtlsContext, DtlsContext]:
    if kind == "psk":
        return (DtlsContext(psk_keys={"dev": PSK}, ciphers="PSK-AES128-CCM8", session_cache=False),
                DtlsContext(psk=("dev", PSK), ciphers="PSK-AES128-CCM8"))
    cert = generate_certificate("memory.pydtls", key_type="ec")
    layer = "openssl" if kind == "openssl" else "engine"
    return (DtlsContext(cert.cert_pem, cert.key_pem, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256",
                        session_cache=False, record_layer=layer),
            DtlsContext(verify=Verify.NONE, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))


def handshakes(server: DtlsServer, cctx: DtlsContext, n: int, finish: bool) -> dict[Any, Dtls]:
    clients = {(f"10.0.{i >> 8}.{i & 255}", 5000): Dtls(context=cctx) for i in range(n)}
    for client in clients.values():
        client.handshake()
    for _ in range(3 if not finish else 8):  # hello, HVR, hello + cookie, flight 2, ...
        for address, client in clients.items():
            while (d := client.pull()) is not None:
                server.feed(d, address)
        if not finish and server.handshaking == n:
            break
        for d, address in server.datagrams_to_send():
            clients[address].feed(d)
            if not clients[address].is_handshake_finished():
                clients[address].handshake()
    server.datagrams_to_send()
    list(server.events())
    return clients


def own_bytes(server: DtlsServer, ctx_count: int) -> int:
    """pd_memory() of every engine, less its libssl constants (so: the engine's own)."""
    total = 0
    for address in list(server._peers):
        conn = server._peers[address].conn
        total += lib.pd_memory(conn)
        if conn.ssl != lib.pd_dead_conn().ssl:
            total -= (lib.PD_MEM_SSL_HANDSHAKE if conn.state < lib.PD_STATE_ESTABLISHED
                      else lib.PD_MEM_SSL_RELEASED if conn.buffers_released
                      else lib.PD_MEM_SSL_ESTABLISHED)
    return total - ctx_count * len(server._peers) * lib.PD_MEM_CIPHER_CTX


def estimated(server: DtlsServer) -> int:
    return sum(lib.pd_memory(p.conn) for p in server._peers.values())


def freed_by_close(server: DtlsServer) -> int:
    gc.collect()
    before = malloc_in_use()
    server.close_all()
    server.datagrams_to_send()
    list(server.events())
    gc.collect()
    return before - malloc_in_use()


def measure(kind: str, n: int, state: str) -> tuple[float, float, float]:
    """(libssl's or the cipher context's bytes per engine, measured heap per engine,
    pd_memory() per engine)."""
    sctx, cctx = contexts(kind)
    server = DtlsServer(sctx, max_handshakes=10 * n, max_connections=10 * n, clock=lambda: 0.0)
    clients = handshakes(server, cctx, n, finish=state != "handshake")
    ctx_count = 0
    if state == "established" and kind != "openssl":
        for address, client in clients.items():  # a record each way: both contexts exist
            client.write(b"x")
            while (d := client.pull()) is not None:
                server.feed(d, address)
            server.send(address, b"y")
        for d, address in server.datagrams_to_send():
            clients[address].feed(d)
        list(server.events())
        ctx_count = 2
    if state == "released":
        for address in clients:
            engine = server.connection(address)
            assert engine is not None
            engine.release_buffers()
    count = len(server)
    want = lib.PD_STATE_HANDSHAKING if state == "handshake" else lib.PD_STATE_ESTABLISHED
    if count != n or any(p.conn.state != want for p in server._peers.values()):
        raise RuntimeError(f"{kind}/{state}: not every engine reached the state")
    own = own_bytes(server, ctx_count)
    guess = estimated(server)
    heap = freed_by_close(server)
    if ctx_count:
        part = (heap - own) / (ctx_count * count)
    else:
        part = (heap - own) / count
    return part, heap / count, guess / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    args = parser.parse_args(argv)
    n = args.peers
    rows = [
        ("SSL mid-handshake, ECDHE-ECDSA", "PD_MEM_SSL_HANDSHAKE", "cert", "handshake"),
        ("SSL mid-handshake, PSK-CCM_8", "PD_MEM_SSL_HANDSHAKE", "psk", "handshake"),
        ("SSL after handshake (libssl's layer)", "PD_MEM_SSL_ESTABLISHED", "openssl", "established"),
        ("  ... after SSL_free_buffers", "PD_MEM_SSL_RELEASED", "openssl", "released"),
        ("one cipher context (AES-128-GCM)", "PD_MEM_CIPHER_CTX", "engine", "established"),
        ("one cipher context (AES-128-CCM_8)", "PD_MEM_CIPHER_CTX", "psk", "established"),
        ("idle engine, engine's layer (GCM)", None, "engine", "released"),
        ("idle engine, engine's layer (CCM_8)", None, "psk", "released"),
    ]
    print(f"{n} engines per row; bytes per engine (C heap, glibc mallinfo2)")
    print(f"| {'what':<38} | {'measured part':>13} | {'constant':>8} | {'heap/engine':>11} "
          f"| {'pd_memory':>9} |")
    print(f"| {'-' * 38} | {'-' * 13}: | {'-' * 8}: | {'-' * 11}: | {'-' * 9}: |")
    for label, const, kind, state in rows:
        part, heap, guess = measure(kind, n, state)
        value = getattr(lib, const) if const else None
        print(f"| {label:<38} | {part if const else 0:>13,.0f} | "
              f"{'' if value is None else f'{value:,}':>8} | {heap:>11,.0f} | {guess:>9,.0f} |")


if __name__ == "__main__":
    main()
