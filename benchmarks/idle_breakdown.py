"""Where an idle association's memory goes in the server core, per peer.

    python benchmarks/idle_breakdown.py [--suite psk|cert] [--peers N] [--dhat]

Establishes N peers through one ``DtlsServer`` (the same contexts, fake clock
and release schedule as the idle rows of ``run.py``; here the clients live in
the same process and are dropped once done, since this counts objects, not
RSS), lets the core release them, then reports per peer:

- the Python objects the core keeps for a peer, by ``sys.getsizeof``;
- what tracemalloc sees allocated by Python code, by source line;
- the C heap (glibc mallinfo2) and pymalloc's allocated blocks, against the
  sizes of the library's C structs, read from its own source compiled here;
- with ``--dhat``: live C allocations at the end, by call site, from a run of
  this script under valgrind's DHAT (slow: a minute or so for 2,000 peers).

Nothing is asserted; it prints a breakdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (the benchmark's contexts, schedule and memory probes)
from pydtls_ossl import Dtls, generate_certificate  # noqa: E402
from pydtls_ossl._ffi import ffi  # noqa: E402
from pydtls_ossl.server import DtlsServer  # noqa: E402

STRUCTS = {"pd_conn": "pd_conn", "struct pd_rl": "struct pd_rl", "pd_node": "pd_node",
           "pd_lot_entry": "pd_lot_entry"}


def struct_sizes() -> dict[str, int]:
    """sizeof each C struct, from the library's source as build_ffi.py assembles it."""
    sys.path.insert(0, str(HERE.parent))
    import build_ffi  # noqa: PLC0415

    source = "#define _GNU_SOURCE\n" + build_ffi._source() + "".join(  # io.c: recvmmsg
        f"const unsigned long pd_sizeof_{i} = sizeof({c});\n" for i, c in enumerate(STRUCTS.values()))
    done = subprocess.run([os.environ.get("CC", "cc"), "-w", "-S", "-o", "-", "-x", "c", "-"],
                          input=source, capture_output=True, text=True)
    sizes = {}
    for i, name in enumerate(STRUCTS):
        found = re.search(rf"pd_sizeof_{i}:\s*\n\s*\.quad\s+(\d+)", done.stdout)
        if found:
            sizes[name] = int(found.group(1))
    return sizes


def chunk(request: int) -> int:
    """glibc's chunk for a malloc(request) on 64-bit: 8 bytes of header, 16-byte aligned."""
    return max(32, (request + 8 + 15) & ~15)


class Setup:
    def __init__(self, suite: str) -> None:
        cert = generate_certificate("bench.pydtls", key_type="ec")
        peer = generate_certificate("bench.client", key_type="ec")
        self.suite = suite
        self.clock = [1000.0]
        ctx = run.suite_server_context(suite, cert.cert_pem, cert.key_pem)
        fp = peer.fingerprint()
        self.server = DtlsServer(ctx, max_connections=10**7, max_handshakes=10**6,
                                 idle_timeout=1e9, release_after=run.RELEASE_AFTER,
                                 expected_peer_fingerprint=(lambda a: fp) if suite == "cert" else None,
                                 clock=lambda: self.clock[0])
        self.cctx = run.suite_client_context(suite, peer.cert_pem, peer.key_pem)
        self.server_fp = cert.fingerprint()

    def peer(self, i: int) -> None:
        server, address = self.server, run.CoreChild.address(i)
        client = Dtls(context=self.cctx, expected_peer_fingerprint=(
            self.server_fp if self.suite == "cert" else None))
        client.handshake()
        for _ in range(40):
            while (datagram := client.pull()) is not None:
                server.feed(datagram, address)
            for event in server.events():
                if isinstance(event, run.DataReceived):
                    server.send(address, event.data)
            for datagram, _ in server.datagrams_to_send():
                client.feed(datagram)
            if client.is_handshake_finished():
                if (data := client.read()) == b"ping":
                    return
                if data is None and client.pull() is None and address in server:
                    client.write(b"ping")
        raise RuntimeError(f"peer {i} did not finish")

    def populate(self, count: int) -> None:
        for i in range(count):
            self.peer(i)
            if i % run.CHUNK == run.CHUNK - 1:
                self.tick()
        self.tick()

    def tick(self) -> None:
        self.clock[0] += run.RELEASE_AFTER * 1.5
        self.server.handle_timeout()
        list(self.server.events())


def python_objects(server: DtlsServer) -> list[tuple[str, float]]:
    """Bytes per peer of what the core keeps for it, object by object."""
    n = len(server._peers)
    peer = next(iter(server._peers.values()))
    address = peer.address
    timers = server._timers
    rows = [
        ("_Peer (10 slots)", sys.getsizeof(peer)),
        ("Dtls engine (6 slots, weakref)", sys.getsizeof(peer.engine)),
        ("cffi cdata owning pd_conn (ffi.gc)", sys.getsizeof(peer.conn)),
        ("  the pd_conn_new cdata it keeps alive", sys.getsizeof(ffi.cast("pd_conn *", peer.conn))),
        ("address tuple", sys.getsizeof(address)),
        ("  host str", sys.getsizeof(address[0])),
        ("  port int", sys.getsizeof(address[1]) if not -5 <= address[1] <= 256 else 0),
        ("_Peer.deadline float (own object)", sys.getsizeof(peer.deadline)),
        ("_Peer.last_seen float (own with a real clock)", sys.getsizeof(peer.last_seen)),
        ("_peers dict, share of its table", sys.getsizeof(server._peers) / n),
        ("timer heap list, share of its array", sys.getsizeof(timers) / n),
    ]
    live = [t for t in timers if t[3] in server._peers and server._peers[t[3]].generation == t[2]]
    per = len(timers) / n
    if live:
        t = live[0]
        rows.append((f"timer entries: {per:.2f} per peer x (4-tuple + float + seq int)",
                     per * (sys.getsizeof(t) + sys.getsizeof(t[0]) + sys.getsizeof(t[1]))))
    return rows


def report(suite: str, count: int) -> None:
    setup = Setup(suite)
    gc.collect()
    rss0, heap0, py0 = run.rss(), run.malloc_in_use(), run.pymalloc_in_use()
    started = time.perf_counter()
    setup.populate(count)
    gc.collect()
    rss1, heap1, py1 = run.rss(), run.malloc_in_use(), run.pymalloc_in_use()
    server = setup.server
    released = sum(1 for p in server._peers.values() if p.conn.buffers_released)
    parked = server.stats.parked
    print(f"{suite} ({run.SUITES[suite]}): {len(server):,} peers idle, {parked:,} parked in C "
          f"(csrc/lot.c), {released:,} more released in memory, "
          f"in {time.perf_counter() - started:.1f} s, clients in this process (dropped when done)")
    if parked:
        print(f"  parked: no Python objects; the lot counts {server.stats.connection_memory / len(server):,.0f} B "
              f"per peer (its entry, and the sealed association or the pd_conn)")
    print(f"  per peer: C heap (mallinfo2) {(heap1 - heap0) / count:,.0f} B, "
          f"pymalloc blocks {(py1 - py0) / count:,.0f} B (RSS here {(rss1 - rss0) / count:,.0f} B: "
          f"clients in-process, so not the row's)")

    if server._peers:
        print("  Python objects per peer in memory (sys.getsizeof):")
        total = 0.0
        for name, size in python_objects(server):
            total += size
            print(f"    {name:<58} {size:>7,.0f} B")
        print(f"    {'sum':<58} {total:>7,.0f} B")

    traced = min(count, 3_000)  # a second core, traced: tracemalloc's own traces use malloc too
    second = Setup(suite)
    gc.collect()
    tracemalloc.start(1)
    snap0 = tracemalloc.take_snapshot()
    second.populate(traced)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    print(f"  tracemalloc, per peer, by line ({traced:,} peers in a second core; the line that "
          f"allocated):")
    shown = 0.0
    for stat in sorted(snap1.compare_to(snap0, "lineno"), key=lambda s: -s.size_diff)[:12]:
        if stat.size_diff < traced * 4:
            break
        frame = stat.traceback[0]
        shown += stat.size_diff / traced
        line = linecache_line(frame.filename, frame.lineno)
        print(f"    {stat.size_diff / traced:>6,.0f} B {stat.count_diff / traced:5.2f} blocks  "
              f"{Path(frame.filename).name}:{frame.lineno}  {line[:70]}")
    print(f"    {shown:>6,.0f} B in all")
    del second

    sizes = struct_sizes()
    print("  C structs (sizeof, from csrc/; malloc chunk = request + 8, 16-aligned):")
    for name, size in sizes.items():
        print(f"    {name:<20} {size:>5} B   chunk {chunk(size):>5} B")


def linecache_line(filename: str, lineno: int) -> str:
    import linecache  # noqa: PLC0415
    return linecache.getline(filename, lineno).strip()


def dhat_child(suite: str, count: int) -> None:
    setup = Setup(suite)
    setup.populate(count)
    gc.collect()
    sys.stdout.flush()
    os._exit(0)  # DHAT's t-end: the peers still alive


def dhat_sites(suite: str, count: int) -> dict[str, list[int]]:
    """Live bytes and blocks at the end, by the first frame past the allocators."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dhat.json"
        subprocess.run(["valgrind", "--tool=dhat", f"--dhat-out-file={out}", sys.executable,
                        __file__, "--dhat-child", suite, str(count)], check=True,
                       capture_output=True)
        data = json.loads(out.read_text())
    frames = data["ftbl"]
    wrappers = re.compile(r"\b(malloc|calloc|realloc|CRYPTO_malloc|CRYPTO_zalloc|CRYPTO_realloc|"
                          r"CRYPTO_strdup|CRYPTO_strndup|CRYPTO_memdup|PyMem_\w+|_PyMem_\w+|"
                          r"PyObject_Malloc|PyObject_Realloc|_PyObject_\w+alloc\w*|"
                          r"_PyObject_Malloc|_PyObject_Calloc|pymalloc_\w+)\b")
    sites: dict[str, list[int]] = {}
    for pp in data["pps"]:
        if not pp.get("eb"):
            continue
        names = [frames[i] for i in pp["fs"]]
        site = next((f for f in names[1:] if not wrappers.search(f.split(":")[1] if ":" in f else f)),
                    names[0])
        site = re.sub(r"^0x[0-9A-F]+: ", "", site)
        entry = sites.setdefault(site, [0, 0, 0])
        entry[0] += pp["eb"]
        entry[1] += pp["ebk"]
        entry[2] += chunk(pp["eb"] // pp["ebk"]) * pp["ebk"]
    return sites


def dhat(suite: str, count: int) -> None:
    """Per-peer live C allocations: the difference between runs of count and 2 x count peers."""
    small, large = dhat_sites(suite, count), dhat_sites(suite, 2 * count)
    print(f"  live malloc'd blocks per peer by call site (DHAT at the end, {2 * count:,} peers "
          f"less {count:,}; pymalloc's small objects are not malloc'd and not here):")
    req = chunked = 0.0
    rows = []
    for site, (eb, ebk, ch) in large.items():
        eb0, ebk0, ch0 = small.get(site, [0, 0, 0])
        rows.append(((eb - eb0) / count, (ebk - ebk0) / count, (ch - ch0) / count, site))
    for eb, ebk, ch, site in sorted(rows, reverse=True):
        if abs(eb) < 4:
            continue
        req += eb
        chunked += ch
        print(f"    {eb:>7,.0f} B requested, {ch:>7,.0f} B in chunks, {ebk:5.2f} blocks  {site[:100]}")
    print(f"    {req:>7,.0f} B requested, {chunked:>7,.0f} B in chunks per peer, in all")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(run.SUITES), action="append")
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--dhat", action="store_true", help="also run under valgrind's DHAT")
    parser.add_argument("--dhat-peers", type=int, default=1_000, help="and twice as many")
    parser.add_argument("--dhat-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dhat_child:
        dhat_child(args.dhat_child[0], int(args.dhat_child[1]))
        return 0
    for suite in args.suite or list(run.SUITES):
        report(suite, args.peers)
        if args.dhat:
            dhat(suite, args.dhat_peers)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
