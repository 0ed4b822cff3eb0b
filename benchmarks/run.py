"""Benchmark pydtls_ossl against plain C libssl and pyOpenSSL, in one run.

    python benchmarks/run.py            # a few seconds per measurement
    python benchmarks/run.py --quick    # a smoke run (CI)

The C column is ``bench_c.c``, compiled here with the system C compiler
against the system libssl; the pyOpenSSL column runs ``pyopenssl_column.py``
under an interpreter that has pyOpenSSL, preferring one on the same libssl.
Columns are measured in alternating rounds and the median is reported, since
a shared machine's speed drifts. Ratios are column / C. Nothing is asserted.

The last section, over the wire, is ``wire.py``: echo servers on 127.0.0.1
(a C libssl server, the plain ``DtlsServer`` loop, the loop over the batch
helper, ``aio.serve``, ``DtlsContext.listen()``) under a C load generator;
``--no-wire`` skips it.

Rows that only pydtls_ossl has (the C and pyOpenSSL columns print n/a):
idle peers and evicted peers through the server core, measured with the
``DtlsServer`` alone in a child process (``--core-child``) fed over pipes by
clients in this process, so the child's RSS is the server's own (read once
glibc handed back its free pages, ``settled_rss``); a warm-up
round of handshakes, closed again, is in the baseline (handshakes in flight
hold memory that is no peer's), and quiet peers are released as the fake
clock moves on, as a live server releases them. Association export/import
rates and sealed sizes for PSK-AES128-CCM8 and pinned ECDHE-ECDSA-AES128-GCM.
``idle_breakdown.py`` says where an idle peer's bytes go. Row 9 is
``million.py`` (PSK-AES128-CCM8 devices through one core) at 10,000 devices
(``--quick``) or 100,000; ``python benchmarks/million.py`` runs the million.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import gc
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pydtls_ossl import Dtls, DtlsContext, generate_certificate, openssl_version  # noqa: E402
from pydtls_ossl.server import (ConnectionEstablished, ConnectionEvicted,  # noqa: E402
                                ConnectionRestored, DataReceived, DtlsServer)
from pydtls_ossl.certs import certificate_fingerprint  # noqa: E402
from pydtls_ossl.stores import DirectoryAssociationStore  # noqa: E402

CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"
GROUPS = "X25519:P-256"
SIZES = (100, 1163)  # 1163: the largest record payload at MTU 1200 with AES-128-GCM
BATCH = 64
#: how a resumed handshake finds its session: the server's session-ID cache, or a ticket
RESUMPTION = {"cache": "session cache", "ticket": "session ticket"}
#: the suites of the association rows: a CoAP-style PSK device, and a WebRTC-style
#: certificate peer whose fingerprint the server pins
SUITES = {"psk": "PSK-AES128-CCM8", "cert": "ECDHE-ECDSA-GCM pinned"}
PSK_IDENTITY, PSK_KEY = "sensor-0042", bytes.fromhex("5e9c2f1a7b3d4c8e6f0a1b2c3d4e5f60")
BINDING = b"198.51.100.7|5684"


# ----------------------------------------------------------------- helpers

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def settled_rss() -> int:
    """RSS once glibc has handed back its free pages. A ``DtlsServer`` trims the heap
    itself after peers worth 1 MiB end (parked or closed), so a difference of plain
    RSS readings around a server would count the pages one reading happened to hold."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS as it is
    return rss()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)
    except (OSError, AttributeError):
        return 0


def pymalloc_in_use() -> int:
    """Bytes in pymalloc's allocated blocks (Python's small objects, which mallinfo2
    does not see: pymalloc maps its arenas itself). CPython's debug statistics."""
    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()  # type: ignore[attr-defined]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        for line in f.read().decode(errors="replace").splitlines():
            if line.startswith("# bytes in allocated blocks"):
                return int(line.split("=")[1].replace(",", ""))
    return 0


#: Set by --count-child: run exactly this many operations instead of for a time.
COUNT_LIMIT = 0


def timed_rate(body: Callable[[], int], seconds: float) -> float:
    """Run ``body`` (returns units done) until ``seconds`` pass; units per second."""
    done, start = 0, time.perf_counter()
    end = start + seconds
    while (done < COUNT_LIMIT) if COUNT_LIMIT else (time.perf_counter() < end):
        done += body()
    return done / (time.perf_counter() - start)



# -------------------------------------------- association rows' contexts

def suite_server_context(suite: str, cert: bytes | str | None = None, key: bytes | str | None = None,
                         association_keys: list[bytes] | None = None) -> DtlsContext:
    """The server context of an association row: session cache off (as in every
    column), tickets on; ``cert`` suites pin the client, hence the context id."""
    if suite == "psk":
        return DtlsContext(psk_keys={PSK_IDENTITY: PSK_KEY}, ciphers="PSK-AES128-CCM8",
                           session_cache=False, association_keys=association_keys)
    return DtlsContext(cert, key, ciphers=CIPHER, groups=GROUPS, session_cache=False,
                       session_context_id=b"pydtls-bench", association_keys=association_keys)


def suite_client_context(suite: str, cert: bytes | str | None = None,
                         key: bytes | str | None = None) -> DtlsContext:
    if suite == "psk":
        return DtlsContext(psk=(PSK_IDENTITY, PSK_KEY), ciphers="PSK-AES128-CCM8")
    return DtlsContext(cert, key, ciphers=CIPHER, groups=GROUPS)


def pump_handshake(client: Dtls, server: Dtls) -> None:
    client.handshake()
    for _ in range(50):
        while (datagram := client.pull()) is not None:
            server.feed(datagram)
        while (datagram := server.pull()) is not None:
            client.feed(datagram)
        if client.is_handshake_finished() and server.is_handshake_finished():
            return
    raise RuntimeError("handshake did not finish")


def one_record_each_way(client: Dtls, server: Dtls) -> None:
    client.write(b"ping")
    server.feed(client.pull())  # type: ignore[arg-type]
    if server.read() != b"ping":
        raise RuntimeError("the server did not get the record")
    server.write(b"pong")
    client.feed(server.pull())  # type: ignore[arg-type]
    if client.read() != b"pong":
        raise RuntimeError("the client did not get the record")


# ------------------------------------------------------------ our column

class Ours:
    def __init__(self, cert_pem: bytes, key_pem: bytes, record_layer: str = "engine") -> None:
        self.cert_pem, self.key_pem = cert_pem, key_pem
        # the profile of every column: tickets on, server session cache off
        self.sctx = DtlsContext(cert_pem, key_pem, ciphers=CIPHER, groups=GROUPS,
                                record_layer=record_layer, session_cache=False)  # type: ignore[arg-type]
        self.cctx = DtlsContext(cadata=cert_pem, ciphers=CIPHER, groups=GROUPS,
                                record_layer=record_layer)  # type: ignore[arg-type]

    def _handshake_pair(self, sctx: DtlsContext | None = None,
                        session: bytes | None = None) -> tuple[Dtls, Dtls]:
        client = Dtls(context=self.cctx, session=session)
        server = Dtls(is_server=True, context=sctx or self.sctx)
        client.handshake()
        pull_c, pull_s, feed_c, feed_s = client.pull, server.pull, client.feed, server.feed
        for _ in range(50):
            while (datagram := pull_c()) is not None:
                feed_s(datagram)
            while (datagram := pull_s()) is not None:
                feed_c(datagram)
            if client.is_handshake_finished() and server.is_handshake_finished():
                return client, server
        raise RuntimeError("handshake did not finish")

    def handshakes(self, seconds: float) -> float:
        def ten() -> int:
            for _ in range(10):
                self._handshake_pair()  # both freed as the references drop
            return 10
        return timed_rate(ten, seconds)

    def resumed_handshakes(self, seconds: float, how: str) -> float:
        """Abbreviated handshakes offering the session of one full handshake.

        ``how``: "cache" resumes from the server's session-ID cache (tickets
        off), "ticket" from RFC 5077 tickets (server cache off). Raises unless
        every measured handshake resumed, on both ends.
        """
        if how not in RESUMPTION:
            raise ValueError(f"resumption is one of {sorted(RESUMPTION)}, not {how!r}")
        sctx = DtlsContext(self.cert_pem, self.key_pem, ciphers=CIPHER, groups=GROUPS,
                           session_cache=how == "cache", session_tickets=how == "ticket")
        session = self._handshake_pair(sctx)[0].session()
        if session is None:
            raise RuntimeError("the first handshake left no session")

        def ten() -> int:
            for _ in range(10):
                client, server = self._handshake_pair(sctx, session)
                if not (client.session_reused() and server.session_reused()):
                    raise RuntimeError(f"a measured handshake did not resume ({how})")
            return 10
        return timed_rate(ten, seconds)

    def threaded_handshakes(self, seconds: float, threads: int) -> float:
        counts = [0] * threads

        def run(i: int) -> None:
            counts[i] = int(self.handshakes(seconds) * seconds)

        start = time.perf_counter()
        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(counts) / (time.perf_counter() - start)

    def _through_core(self, server: DtlsServer, address: tuple[str, int]) -> None:
        client = Dtls(context=self.cctx)
        client.handshake()
        for _ in range(50):
            while (datagram := client.pull()) is not None:
                server.feed(datagram, address)
            for datagram, _ in server.datagrams_to_send():
                client.feed(datagram)
            if client.is_handshake_finished() and address in server and \
                    server.connection(address).is_handshake_finished():  # type: ignore[union-attr]
                return
        raise RuntimeError("handshake through the server core did not finish")

    def cookie_handshakes(self, seconds: float) -> float:
        server = DtlsServer(self.sctx)
        port = [0]

        def ten() -> int:
            for _ in range(10):
                port[0] += 1
                address = ("127.0.0.1", port[0])
                self._through_core(server, address)
                server.close(address)
                server.datagrams_to_send()
                list(server.events())
            return 10
        return timed_rate(ten, seconds)

    def hello_verify_requests(self, seconds: float) -> float:
        server = DtlsServer(self.sctx)
        client = Dtls(context=self.cctx)
        client.handshake()
        hello = client.pull()
        addresses = [("127.0.0.1", 1024 + i) for i in range(1000)]
        feed, out = server.feed, server.datagrams_to_send

        def thousand() -> int:
            for address in addresses:
                feed(hello, address)  # type: ignore[arg-type]
            if len(out()) != 1000:
                raise RuntimeError("expected one HelloVerifyRequest per hello")
            return 1000
        return timed_rate(thousand, seconds)

    def records(self, seconds: float, size: int) -> float:
        return self._one_way(*self._handshake_pair(), seconds, size)

    @staticmethod
    def _one_way(client: Dtls, server: Dtls, seconds: float, size: int) -> float:
        """Records per second, one ``write``/``pull``/``feed``/``read`` each."""
        write, pull, feed, read = client.write, client.pull, server.feed, server.read
        data = b"x" * size

        def thousand() -> int:
            for _ in range(1000):
                write(data)
                feed(pull())  # type: ignore[arg-type]
                read()
            return 1000
        return timed_rate(thousand, seconds)

    def batch_records(self, seconds: float, size: int) -> float:
        client, server = self._handshake_pair()
        batch = [b"x" * size] * BATCH

        def sixteen() -> int:
            for _ in range(16):
                if len(server.feed_batch(client.write_batch(batch))) != BATCH:
                    raise RuntimeError("records lost")
            return 16 * BATCH
        return timed_rate(sixteen, seconds)

    def memory(self, count: int, release: bool) -> tuple[float, float]:
        """(RSS, malloc) bytes per idle established server-side association."""
        keep = []
        gc.collect()
        rss_before, heap_before = rss(), malloc_in_use()
        for _ in range(count):
            client, server = self._handshake_pair()
            client.write(b"ping")
            server.feed(client.pull())  # type: ignore[arg-type]
            server.read()
            server.write(b"pong")
            client.feed(server.pull())  # type: ignore[arg-type]
            client.read()
            if release:
                server.release_buffers()  # what DtlsServer does to a quiet peer
            keep.append(server)
            del client
        gc.collect()
        return (rss() - rss_before) / count, (malloc_in_use() - heap_before) / count

    def server_core_scale(self, count: int) -> tuple[float, float, float]:
        """(seconds to establish ``count`` peers through one core, total RSS MB, per-peer KB)."""
        clock = [time.monotonic()]
        server = DtlsServer(self.sctx, max_connections=count + 10, max_handshakes=64,
                            release_after=1.0, idle_timeout=1e9, clock=lambda: clock[0])
        before = settled_rss()
        start = time.perf_counter()
        for i in range(count):
            self._through_core(server, (f"127.0.{i // 60000}.1", 1 + i % 60000))  # labels only
            server.datagrams_to_send()
            if i % 100 == 99:  # peers go quiet as time passes; the core releases them
                clock[0] += 1.0
                server.handle_timeout()
                list(server.events())
        elapsed = time.perf_counter() - start
        list(server.events())
        clock[0] += 2.0
        server.handle_timeout()
        gc.collect()
        if len(server) != count or not all(
                isinstance(e, ConnectionEstablished) for e in server.events()):
            raise RuntimeError("not every association survived")
        after = settled_rss()
        return elapsed, after / 1e6, (after - before) / count / 1024

    # ------------------------------------------------ association export/import

    def _client_cert(self):  # type: ignore[no-untyped-def]
        if getattr(self, "_peer_cert", None) is None:
            self._peer_cert = generate_certificate("bench.client", key_type="ec")
        return self._peer_cert

    def association_pair(self, suite: str) -> tuple[Dtls, Dtls, DtlsContext]:
        """(client, server, server context): established, one record each way, the server
        context able to seal (``association_keys``); ``cert`` pins both ends."""
        sctx = suite_server_context(suite, self.cert_pem, self.key_pem, [os.urandom(32)])
        if suite == "psk":
            client = Dtls(context=suite_client_context("psk"))
            server = Dtls(is_server=True, context=sctx)
        else:
            peer = self._client_cert()
            client = Dtls(context=suite_client_context("cert", peer.cert_pem, peer.key_pem),
                          expected_peer_fingerprint=certificate_fingerprint(self.cert_pem))
            server = Dtls(is_server=True, context=sctx, expected_peer_fingerprint=peer.fingerprint())
        pump_handshake(client, server)
        one_record_each_way(client, server)
        if server.record_layer != "engine":
            raise RuntimeError(f"{suite}: the association kept libssl's record layer")
        return client, server, sctx

    def association_moves(self, seconds: float, suite: str) -> tuple[float, float]:
        """(exports/s, imports/s) of one server association moved out and back in a chain:
        each import continues the engine the last export ended; the client then still
        talks to the last one. Each call is timed on its own."""
        client, server, sctx = self.association_pair(suite)
        export_s = import_s = 0.0
        done, clock = 0, time.perf_counter
        end = clock() + seconds
        imported = Dtls.import_association
        while (done < COUNT_LIMIT) if COUNT_LIMIT else (clock() < end):
            for _ in range(100):
                t0 = clock()
                blob = server.export_association(BINDING)
                t1 = clock()
                server = imported(blob, context=sctx, binding=BINDING)
                import_s += clock() - t1
                export_s += t1 - t0
            done += 100
        one_record_each_way(client, server)  # the peer noticed nothing
        return done / export_s, done / import_s

    def association_imports(self, seconds: float, suite: str) -> float:
        """Imports of one blob, every engine kept (so no free is counted): the
        instruction rows subtract this from a move to get an export."""
        client, server, sctx = self.association_pair(suite)
        blob = server.export_association(BINDING)
        kept: list[Dtls] = []
        imported, keep = Dtls.import_association, kept.append

        def hundred() -> int:
            for _ in range(100):
                keep(imported(blob, context=sctx, binding=BINDING))
            return 100
        rate = timed_rate(hundred, seconds)
        one_record_each_way(client, kept[-1])
        return rate

    def cid_records(self, seconds: float, size: int, cid_len: int) -> float:
        """Records one way with Connection IDs of ``cid_len`` bytes both ways (0: none
        negotiated), the same loop as ``records``: the per-record cost of CID records."""
        cids = {"connection_id_length": cid_len} if cid_len else {}
        sctx = DtlsContext(self.cert_pem, self.key_pem, ciphers=CIPHER, groups=GROUPS,
                           session_cache=False, **cids)
        self.cctx = DtlsContext(cadata=self.cert_pem, ciphers=CIPHER, groups=GROUPS, **cids)
        client, server = self._handshake_pair(sctx)
        if (client.peer_connection_id or b"") != (server.connection_id or b"") or \
                len(server.connection_id or b"") != cid_len:
            raise RuntimeError("connection IDs not negotiated as asked")
        return self._one_way(client, server, seconds, size)

    def sealed_bytes(self, suite: str) -> int:
        return len(self.association_pair(suite)[1].export_association(BINDING))


INSTRUCTION_METRICS = [  # (label, C mode and args, our method and args, pyOpenSSL metric, n1, n2)
    ("full handshake", "handshake", ["1"], "handshakes", [], "handshake", 20, 60),
    ("resumed handshake, session cache", "resume", ["cache"], "resumed_handshakes", ["cache"],
     "resume", 20, 60),
    ("resumed handshake, session ticket", "resume", ["ticket"], "resumed_handshakes", ["ticket"],
     "resume", 20, 60),
    ("handshake with cookie exchange", "cookie-handshake", [], "cookie_handshakes", [],
     "cookie-handshake", 20, 60),
    ("HelloVerifyRequest", "listen", [], "hello_verify_requests", [], "listen", 2000, 6000),
    ("record 100 B, one per call", "records", ["100"], "records", ["100"], "records", 2000, 6000),
    ("record 1163 B, one per call", "records", ["1163"], "records", ["1163"], "records", 2000,
     6000),
    ("record 100 B, batch", "records-batch", ["100"], "batch_records", ["100"], "", 2048, 6144),
    ("record 1163 B, batch", "records-batch", ["1163"], "batch_records", ["1163"], "", 2048, 6144),
]


def callgrind_total(command: list[str], workdir: Path) -> int:
    out = workdir / "callgrind.out"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                   capture_output=True, check=True)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError("no instruction total in callgrind output")


def instructions(cols: Columns, workdir: Path) -> None:
    """Instructions per operation under callgrind: repeatable where wall clocks drift."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind")
    cert, key = str(cols.cert), str(cols.key)
    print(f"{'instructions per operation':<32}  {'C':>12}  {'pydtls_ossl':>12}  {'ratio':>6}  "
          f"{'pyOpenSSL':>12}  {'ratio':>6}")
    measured: dict[str, dict[str, float]] = {}
    for label, c_mode, c_args, ours, ours_args, py_metric, n1, n2 in INSTRUCTION_METRICS:
        commands: dict[str, Callable[[int], list[str]]] = {
            "c": lambda n: [str(cols.c_binary), c_mode, f"n{n}", cert, key, *c_args],
            "ours": lambda n: [sys.executable, __file__, "--count-child", ours, str(n), cert, key,
                               *ours_args],
        }
        if cols.pyopenssl is not None and py_metric:
            python = cols.pyopenssl[0]
            commands["py"] = lambda n: [python, str(HERE / "pyopenssl_column.py"), py_metric,
                                        f"n{n}", cert, key, *ours_args]
        per_op: dict[str, float] = {}
        for column, command in commands.items():
            totals = [callgrind_total(command(n), workdir) for n in (n1, n2)]
            per_op[column] = (totals[1] - totals[0]) / (n2 - n1)
            print(f"  [{label}: {column} done]", file=sys.stderr, flush=True)
        measured[label] = per_op
        c, o, p = per_op["c"], per_op["ours"], per_op.get("py")
        print(f"{label:<32}  {c:>12,.0f}  {o:>12,.0f}  {c / o:>5.2f}x  "
              f"{fmt(p):>12}  {(f'{c / p:.2f}x' if p else 'n/a'):>6}")
        if label == "resumed handshake, session ticket":
            full = measured["full handshake"]
            for how in RESUMPTION.values():
                resumed = measured[f"resumed handshake, {how}"]
                costs = [resumed[k] / full[k] if k in resumed and k in full else None
                         for k in ("c", "ours", "py")]
                print(f"{'  resumed / full, ' + how.split()[1]:<32}  {fmt(costs[0]):>12}  "
                      f"{fmt(costs[1]):>12}  {'':>6}  {fmt(costs[2]):>12}")
    print("association (ours only):")
    for suite, name in SUITES.items():  # neither libssl nor pyOpenSSL has them
        per: dict[str, float] = {}
        for method in ("association_imports", "association_moves"):
            totals = [callgrind_total([sys.executable, __file__, "--count-child", method, str(n),
                                       cert, key, suite], workdir) for n in (2000, 6000)]
            per[method] = (totals[1] - totals[0]) / 4000
            print(f"  [association {name}: {method} done]", file=sys.stderr, flush=True)
        for label, value in ((f"  import, {name}", per["association_imports"]),
                             (f"  export, {name}",
                              per["association_moves"] - per["association_imports"])):
            print(f"{label:<32}  {'n/a':>12}  {value:>12,.0f}  {'n/a':>6}  {'n/a':>12}  {'n/a':>6}")
    print("connection ID (ours only; RFC 9146 records, 8-byte CIDs both ways, AES-128-GCM):")
    for size in (100, 1163 - 9):
        per = {}
        for cid_len in (0, 8):
            totals = [callgrind_total([sys.executable, __file__, "--count-child", "cid_records", str(n),
                                       cert, key, str(size), str(cid_len)], workdir) for n in (2000, 6000)]
            per[cid_len] = (totals[1] - totals[0]) / 4000
            print(f"  [cid {size} B, {cid_len}: done]", file=sys.stderr, flush=True)
        for label, value in ((f"  record {size} B, no CID", per[0]), (f"  record {size} B, CID", per[8])):
            print(f"{label:<32}  {'n/a':>12}  {value:>12,.0f}  {'n/a':>6}  {'n/a':>12}  {'n/a':>6}")
        print(f"{'  CID / no CID':<32}  {'':>12}  {per[8] / per[0]:>12.2f}")
    print("ratio = C instructions / column instructions (1.00x: as lean as the C loop)")
    print("association import: Dtls.import_association of one blob, engines kept; export: a move\n"
          "  (export, then import of its blob) less an import, so it includes freeing the engine")
    print("resumed / full = a resumed handshake's instructions / a full one's, in each column")


def memory_in_child(count: int, release: bool, layer: str = "engine") -> tuple[float, float]:
    """Measure in a fresh process, so memory freed by other rows is not reused."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(count),
                          "release" if release else "keep", layer], capture_output=True, text=True,
                         check=True)
    rss_per, heap_per = out.stdout.split()
    return float(rss_per), float(heap_per)


# ------------------------------------------- the server core, alone in a child

#: a released peer's quiet time, and the eviction time, on the core's fake clock (the
#: clock moves 1.5 s per CHUNK peers, so no peer is evicted while the others arrive)
RELEASE_AFTER, EVICT_AFTER, CHUNK = 1.0, 3600.0, 1024


def _send_frame(stream, message: object) -> None:  # type: ignore[no-untyped-def]
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(4, "big") + data)
    stream.flush()


def _recv_frame(stream) -> object:  # type: ignore[no-untyped-def]
    head = stream.read(4)
    if len(head) != 4:
        raise EOFError("the other side of the core pipe went away")
    return pickle.loads(stream.read(int.from_bytes(head, "big")))


class DiskStore(DirectoryAssociationStore):
    """A DirectoryAssociationStore that keeps the total size of the blobs it holds."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.sealed_bytes = 0

    def put(self, key: bytes, blob: bytes) -> None:
        super().put(key, blob)
        self.sealed_bytes += len(blob)

    def take(self, key: bytes) -> bytes | None:
        blob = super().take(key)
        if blob is not None:
            self.sealed_bytes -= len(blob)
        return blob


def core_child(suite: str, cert_path: str, key_path: str, client_fp: str, mode: str) -> int:
    """A DtlsServer alone in this process, fed through stdin/stdout by ``CoreChild``.

    The clients live in the parent, so this process's RSS is the server's own:
    its Python objects, its C state and malloc's overhead, nothing of the peers.
    """
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    store = DiskStore(mode.split(":", 1)[1]) if mode.startswith("disk:") else None  # else "keep"
    evict = store is not None
    ctx = suite_server_context(suite, cert_path, key_path,
                               [bytes(range(32))] if evict else None)
    clock = [1000.0]
    server = DtlsServer(ctx, max_connections=10**7, max_handshakes=10**6, idle_timeout=1e9,
                        release_after=RELEASE_AFTER, handshake_timeout=1e6,
                        association_store=store, evict_after=EVICT_AFTER if evict else None,
                        expected_peer_fingerprint=(lambda address: client_fp)
                        if suite == "cert" else None,
                        clock=lambda: clock[0])
    counts = {"established": 0, "data": 0, "evicted": 0, "restored": 0, "other": 0}
    feed, events, send = server.feed, server.events, server.send

    def drain(echo: bool) -> None:
        for event in events():
            if type(event) is DataReceived:
                counts["data"] += 1
                if echo:
                    send(event.address, event.data)
            elif type(event) is ConnectionEstablished:
                counts["established"] += 1
            elif type(event) is ConnectionEvicted:
                counts["evicted"] += 1
            elif type(event) is ConnectionRestored:
                counts["restored"] += 1
            else:
                counts["other"] += 1

    while True:
        message = _recv_frame(inp)
        command = message[0]  # type: ignore[index]
        if command == "feed":  # (datagrams, echo): every DataReceived is sent back
            for address, datagram in message[1]:  # type: ignore[index]
                feed(datagram, address)
            drain(message[2])  # type: ignore[index]
            _send_frame(out, server.datagrams_to_send())
        elif command == "tick":  # the clock moves on; the core's timers run, while due
            clock[0] += message[1]  # type: ignore[index]
            for _ in range(10_000):
                server.handle_timeout()
                drain(False)
                server.datagrams_to_send()
                if server.get_timeout() != 0:
                    break
            _send_frame(out, dict(counts))
        elif command == "memory":  # settled_rss() collects first: what follows sees that too
            _send_frame(out, {"rss": settled_rss(), "malloc": malloc_in_use(),
                              "pymalloc": pymalloc_in_use(), "peers": len(server),
                              "stored": len(store) if store is not None else 0,
                              "stored_bytes": store.sealed_bytes if store is not None else 0,
                              **counts})
        elif command == "timed":  # seconds from feed() to its DataReceived, per datagram
            latencies, clock_ns, next_event = [], time.perf_counter_ns, server.next_event
            for address, datagram in message[1]:  # type: ignore[index]
                start = clock_ns()
                feed(datagram, address)
                while (event := next_event()) is not None and type(event) is not DataReceived:
                    if type(event) is ConnectionRestored:
                        counts["restored"] += 1
                took = clock_ns() - start
                if event is None or event.address != address:
                    raise RuntimeError(f"no DataReceived for {address!r}")
                counts["data"] += 1
                latencies.append(took / 1e9)
            drain(False)
            server.datagrams_to_send()
            _send_frame(out, latencies)
        elif command == "close_all":  # forget every peer (the warm-up round)
            server.close_all()
            server.datagrams_to_send()
            for _ in events():
                pass
            _send_frame(out, len(server))
        elif command == "exit":
            _send_frame(out, None)
            return 0
        else:
            raise SystemExit(f"core child: unknown command {command!r}")


class CoreChild:
    """The parent's end: the clients of ``count`` peers, driven through the child's core.

    Clients shake hands in groups of ``GROUP``; two groups are in flight at once,
    so the parent's client work overlaps the child's server work on two cores.
    """

    GROUP = 32

    def __init__(self, suite: str, cols: "Columns", mode: str = "keep") -> None:
        self.suite = suite
        peer = cols.client_cert
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--core-child", suite, str(cols.cert), str(cols.key),
             peer.fingerprint(), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)  # type: ignore[union-attr]
            except OSError:
                pass  # the default 64 KB: groups are small enough for it too
        self.cctx = suite_client_context(suite, peer.cert_pem, peer.key_pem)
        self.server_fp = certificate_fingerprint(cols.cert.read_bytes())

    def send(self, message: object) -> None:
        _send_frame(self.proc.stdin, message)

    def recv(self) -> object:
        return _recv_frame(self.proc.stdout)

    def call(self, *message: object) -> object:
        self.send(message)
        return self.recv()

    def close(self) -> None:
        self.call("exit")
        self.proc.wait(timeout=60)

    def __enter__(self) -> "CoreChild":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            if exc[0] is None:
                self.close()
            else:
                self.proc.kill()
                self.proc.wait()

    def _client(self) -> Dtls:
        if self.suite == "psk":
            return Dtls(context=self.cctx)
        return Dtls(context=self.cctx, expected_peer_fingerprint=self.server_fp)

    @staticmethod
    def address(i: int) -> tuple[str, int]:
        return (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 5684 + (i >> 24))

    def populate(self, count: int, keep: int = 0) -> dict[tuple[str, int], Dtls]:
        """``count`` established peers, as a live server gets them: each CHUNK of
        peers arrives while the clock moves on, and the core releases the quiet
        ones (``release_after``) as they go, so their freed buffers serve the next
        handshakes. Before the baseline of a measurement, ``warm_up()``."""
        kept: dict[tuple[str, int], Dtls] = {}
        every = max(1, count // keep) if keep else 0
        for start in range(0, count, CHUNK):
            kept.update(self.establish(min(CHUNK, count - start), start, every, keep - len(kept)))
            self.call("tick", RELEASE_AFTER * 1.5)
        return kept

    def warm_up(self) -> None:
        """Handshakes in flight take memory that is not any peer's (a group's SSL
        objects): run one round of them and close those peers, so the baseline
        taken after it already holds that working set."""
        self.establish(2 * self.GROUP, start=1 << 24)
        self.call("close_all")

    def establish(self, count: int, start: int = 0, every: int = 0,
                  keep: int = 0) -> dict[tuple[str, int], Dtls]:
        """Shake hands with peers ``start`` to ``start + count``, one record each way
        (echoed by the core); clients are dropped once done, except up to ``keep``
        whose index is a multiple of ``every``."""
        kept: dict[tuple[str, int], Dtls] = {}
        entries: dict[tuple[str, int], list] = {}  # address -> [client, phase, rounds, index]
        groups: list[list[tuple[str, int]]] = [[], []]
        next_i, end = start, start + count
        inflight: list[int] = []

        def refill(g: list[tuple[str, int]]) -> None:
            nonlocal next_i
            while len(g) < self.GROUP and next_i < end:
                address = self.address(next_i)
                client = self._client()
                client.handshake()
                entries[address] = [client, 0, 0, next_i]
                g.append(address)
                next_i += 1

        def outgoing(g: list[tuple[str, int]]) -> list[tuple[tuple[str, int], bytes]]:
            out = []
            for address in g:
                pull = entries[address][0].pull
                while (datagram := pull()) is not None:
                    out.append((address, datagram))
            return out

        for k in (0, 1):
            refill(groups[k])
            if groups[k]:
                self.send(("feed", outgoing(groups[k]), True))
                inflight.append(k)
        while inflight:
            k = inflight.pop(0)
            for datagram, address in self.recv():  # type: ignore[attr-defined]
                entries[address][0].feed(datagram)
            still = []
            for address in groups[k]:
                entry = entries[address]
                client = entry[0]
                entry[2] += 1
                if entry[1] == 0 and client.is_handshake_finished():
                    client.write(b"ping")
                    entry[1] = 1
                elif entry[1] == 1 and (data := client.read()) is not None:
                    if data != b"ping":
                        raise RuntimeError("the core echoed something else")
                    del entries[address]
                    if every and entry[3] % every == 0 and len(kept) < keep:
                        kept[address] = client
                    continue
                if entry[2] > 40:
                    raise RuntimeError(f"peer {address!r} did not finish through the core")
                still.append(address)
            groups[k] = still
            refill(still)
            if still:
                self.send(("feed", outgoing(still), True))
                inflight.append(k)
        return kept

    def timed(self, clients: dict[tuple[str, int], Dtls], payload: bytes) -> list[float]:
        """Each kept client sends one record; seconds from the core's feed() to its event."""
        datagrams = []
        for address, client in clients.items():
            client.write(payload)
            datagrams.append((address, client.pull()))
        return self.call("timed", datagrams)  # type: ignore[return-value]


def core_idle_memory(cols: "Columns", suite: str, count: int) -> dict[str, float]:
    """Bytes per idle association held by the server core alone (clients in the parent):
    RSS, C heap (mallinfo2) and Python's small objects (pymalloc), per peer."""
    with CoreChild(suite, cols) as child:
        child.warm_up()
        before = child.call("memory")
        child.populate(count)
        idle = child.call("memory")
    warm = 2 * CoreChild.GROUP
    if idle["peers"] != count or idle["established"] != count + warm \
            or idle["data"] != count + warm:  # type: ignore[index]
        raise RuntimeError(f"{suite}: not every peer established and echoed: {idle}")
    return {k: (idle[k] - before[k]) / count for k in ("rss", "malloc", "pymalloc")}  # type: ignore[index]


def core_eviction(cols: "Columns", count: int, sample: int) -> dict[str, object]:
    """PSK peers in one core, released (parked), evicted into a directory store (on disk,
    so the child's RSS holds none of the blobs), restored."""
    with tempfile.TemporaryDirectory() as store, CoreChild("psk", cols, f"disk:{store}") as child:
        child.warm_up()
        before = child.call("memory")
        clients = child.populate(count, keep=sample)  # quiet: buffers, cipher contexts released
        held = child.call("memory")
        released = child.timed(clients, b"released")  # in memory, contexts rebuilt
        active = child.timed(clients, b"active")      # in memory, contexts live
        child.call("tick", EVICT_AFTER + 1)
        evicted = child.call("memory")
        restored = child.timed(clients, b"restored")  # out of the store, imported
        after = child.call("memory")
    if held["peers"] != count or evicted["peers"] != 0 or evicted["evicted"] != count \
            or held["evicted"] != 0 \
            or after["restored"] != len(clients):  # type: ignore[index]
        raise RuntimeError(f"eviction did not go as planned: {held} {evicted} {after}")
    return {"before": before, "held": held, "evicted": evicted, "sample": len(clients),
            "restored_s": statistics.median(restored), "released_s": statistics.median(released),
            "active_s": statistics.median(active)}


# ------------------------------------------------------------ columns

class Columns:
    def __init__(self, workdir: Path) -> None:
        cert = generate_certificate("bench.pydtls", key_type="ec")
        self.cert, self.key = workdir / "cert.pem", workdir / "key.pem"
        cert.write(self.cert, self.key)
        self.client_cert = generate_certificate("bench.client", key_type="ec")
        self.ours = Ours(cert.cert_pem, cert.key_pem)
        self.ours._peer_cert = self.client_cert
        self.c_binary = self._compile(workdir)
        self.pyopenssl = self._find_pyopenssl()

    def _compile(self, workdir: Path) -> Path | None:
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            return None
        binary = workdir / "bench_c"
        subprocess.run([compiler, "-O2", "-o", str(binary), str(HERE / "bench_c.c"),
                        "-lssl", "-lcrypto", "-lpthread"], check=True)
        return binary

    def _find_pyopenssl(self) -> tuple[str, str] | None:
        """(interpreter, its libssl), preferring one on the same libssl as ours."""
        found = []
        for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
            if not Path(python).exists():
                continue
            done = subprocess.run([python, str(HERE / "pyopenssl_column.py"), "version", "0",
                                   str(self.cert), str(self.key)], capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.startswith("version="):
                found.append((python, done.stdout.strip().split("=", 1)[1]))
        same = [f for f in found if f[1] == openssl_version()]
        return (same or found)[0] if found else None

    def c(self, mode: str, seconds: float, arg: str = "") -> float:
        assert self.c_binary is not None
        out = subprocess.run([str(self.c_binary), mode, str(seconds), str(self.cert), str(self.key),
                              *([arg] if arg else [])], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().split("=", 1)[1])

    def py(self, metric: str, seconds: float, arg: str = "") -> float | None:
        if self.pyopenssl is None:
            return None
        out = subprocess.run([self.pyopenssl[0], str(HERE / "pyopenssl_column.py"), metric,
                              str(seconds), str(self.cert), str(self.key), *([arg] if arg else [])],
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1].split("=", 1)[1])


def interleaved(runs: list[Callable[[], float | None]], rounds: int) -> list[float | None]:
    """Median of each measurement over alternating rounds."""
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            value = run()
            if value is not None:
                samples[i].append(value)
    return [statistics.median(s) if s else None for s in samples]


# --------------------------------------------------------------- report

def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}{unit}"
    return f"{value:.2f}{unit}"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--seconds", type=float, help="seconds per measurement round")
    parser.add_argument("--associations", type=int, help="associations for the memory rows")
    parser.add_argument("--core-peers", type=int, help="peers for the server-core scale row")
    parser.add_argument("--idle-peers", type=int, help="peers for the idle rows through the core")
    parser.add_argument("--evict-peers", type=int, help="PSK peers for the eviction rows")
    parser.add_argument("--devices", type=int,
                        help="PSK devices for the million-device rows (benchmarks/million.py)")
    parser.add_argument("--no-wire", action="store_true",
                        help="skip the over-the-wire section (wire.py: real UDP on loopback)")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per operation under callgrind instead of timing")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--count-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--core-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.core_child:
        suite, cert_path, key_path, client_fp, mode = args.core_child
        return core_child(suite, cert_path, key_path, client_fp, mode)
    if args.count_child:
        global COUNT_LIMIT
        method, count, cert_path, key_path, *extra = args.count_child
        COUNT_LIMIT = int(count)
        ours = Ours(Path(cert_path).read_bytes(), Path(key_path).read_bytes())
        getattr(ours, method)(1e9, *(int(e) if e.isdigit() else e for e in extra))
        return 0
    if args.memory_child:
        cert = generate_certificate("bench.pydtls")
        rss_per, heap_per = Ours(cert.cert_pem, cert.key_pem, args.memory_child[2]).memory(
            int(args.memory_child[0]), release=args.memory_child[1] == "release")
        print(rss_per, heap_per)
        return 0
    quick = args.quick
    seconds = args.seconds or (0.2 if quick else 1.0)
    rounds = 1 if quick else 3
    associations = args.associations or (500 if quick else 10_000)
    core_peers = args.core_peers or (1_000 if quick else 100_000)
    idle_peers = args.idle_peers or 10_000  # fewer, and a round of handshakes weighs more than the peers
    evict_peers = args.evict_peers or (2_000 if quick else 100_000)

    with tempfile.TemporaryDirectory() as tmp:
        cols = Columns(Path(tmp))
        if args.instructions:
            instructions(cols, Path(tmp))
            return 0
        ours = cols.ours
        if cols.c_binary is None:
            print("no C compiler found: the C column is n/a", file=sys.stderr)
        version_out = subprocess.run([str(cols.c_binary), "version", "0", str(cols.cert), str(cols.key)],
                                     capture_output=True, text=True) if cols.c_binary else None
        print(f"pydtls_ossl benchmark: Python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"{'quick' if quick else f'{rounds} rounds x {seconds:g} s'} per measurement")
        print(f"  C column:           {version_out.stdout.strip().split('=', 1)[1] if version_out else 'n/a'}"
              f" (bench_c.c, system compiler)")
        print(f"  pydtls_ossl column: {openssl_version()}")
        print(f"  pyOpenSSL column:   "
              + (f"{cols.pyopenssl[1]} via {cols.pyopenssl[0]}" if cols.pyopenssl else "n/a (not installed)"))
        print(f"  profile: DTLS 1.2, {CIPHER}, P-256 certificate verified by the client, "
              f"groups {GROUPS}, MTU 1200")
        print()
        rows: list[tuple[str, float | None, float | None, float | None, str, str, bool]] = []

        started = time.perf_counter()

        def row(name: str, c: float | None, ours_v: float | None, py: float | None,
                target: str = "", unit: str = "", ratios: bool = True) -> None:
            """``ratios``: print each column / C (off for rows that are ratios themselves)."""
            rows.append((name, c, ours_v, py, target, unit, ratios))
            print(f"  [{time.perf_counter() - started:6.1f} s] measured: {name.strip()}",
                  file=sys.stderr, flush=True)

        # full and resumed handshakes in the same alternating rounds, so that
        # resumed / full compares measurements taken side by side
        c_hs, o_hs, p_hs, c_rc, o_rc, p_rc, c_rt, o_rt, p_rt = interleaved([
            lambda: cols.c("handshake", seconds, "1"),
            lambda: ours.handshakes(seconds),
            lambda: cols.py("handshake", seconds),
            lambda: cols.c("resume", seconds, "cache"),
            lambda: ours.resumed_handshakes(seconds, "cache"),
            lambda: cols.py("resume", seconds, "cache"),
            lambda: cols.c("resume", seconds, "ticket"),
            lambda: ours.resumed_handshakes(seconds, "ticket"),
            lambda: cols.py("resume", seconds, "ticket")], rounds)
        row("1. full handshakes/s", c_hs, o_hs, p_hs, ">= 0.95x")
        row("1. resumed handshakes/s, session cache", c_rc, o_rc, p_rc)
        row("1. resumed handshakes/s, session ticket", c_rt, o_rt, p_rt)

        def cost(full: float | None, resumed: float | None) -> float | None:
            return full / resumed if full and resumed else None
        row("   resumed / full, cost, session cache", cost(c_hs, c_rc), cost(o_hs, o_rc),
            cost(p_hs, p_rc), "a resumed handshake costs X of a full one", ratios=False)
        row("   resumed / full, cost, session ticket", cost(c_hs, c_rt), cost(o_hs, o_rt),
            cost(p_hs, p_rt), "(each column: full rate / resumed rate)", ratios=False)
        c_ck, o_ck, p_ck = interleaved([lambda: cols.c("cookie-handshake", seconds),
                                        lambda: ours.cookie_handshakes(seconds),
                                        lambda: cols.py("cookie-handshake", seconds)], rounds)
        row("2. handshakes/s with cookie exchange", c_ck, o_ck, p_ck, ">= 0.95x")
        c_hv, o_hv, p_hv = interleaved([lambda: cols.c("listen", seconds),
                                        lambda: ours.hello_verify_requests(seconds),
                                        lambda: cols.py("listen", seconds)], rounds)
        row("3. HelloVerifyRequests/s (spoofed)", c_hv, o_hv, p_hv, ">= 1.0x")
        for size in SIZES:
            c_r, o_r, p_r = interleaved([lambda: cols.c("records", seconds, str(size)),
                                         lambda: ours.records(seconds, size),
                                         lambda: cols.py("records", seconds, str(size))], rounds)
            target = ">= 0.40x" if size > 1000 else ">= 0.30x"
            row(f"4. records/s {size} B, one per call", c_r, o_r, p_r, target)
            row(f"   MB/s {size} B, one per call", c_r and c_r * size / 1e6, o_r and o_r * size / 1e6,
                p_r and p_r * size / 1e6)
            c_b, o_b = interleaved([lambda: cols.c("records-batch", seconds, str(size)),
                                    lambda: ours.batch_records(seconds, size)], rounds)
            row(f"4. records/s {size} B, batch of {BATCH}", c_b, o_b, None, ">= 0.75x")
        o_keep_rss, o_keep_heap = memory_in_child(associations, release=False)
        o_rel_rss, o_rel_heap = memory_in_child(associations, release=True)
        l_keep_rss, _ = memory_in_child(associations, release=False, layer="openssl")
        l_rel_rss, _ = memory_in_child(associations, release=True, layer="openssl")
        c_keep = cols.c("memory", associations)
        c_rel = cols.c("memory", associations, "release")
        p_keep = cols.py("memory", associations)
        row(f"5. KB RSS per idle association ({associations:,}), buffers kept",
            c_keep / 1024, o_keep_rss / 1024, p_keep and p_keep / 1024, "", " KB")
        row("5. KB RSS per idle association, buffers released", c_rel / 1024, o_rel_rss / 1024, None,
            "<= 24 KB", " KB")
        row("   KB malloc'd per association, kept / released", None, None, None,
            f"{o_keep_heap / 1024:.1f} / {o_rel_heap / 1024:.1f} KB (ours)")
        row("   ours with record_layer='openssl', kept", None, l_keep_rss / 1024, None, "", " KB")
        row("   ours with record_layer='openssl', released", None, l_rel_rss / 1024, None, "", " KB")
        for suite, name in SUITES.items():
            idle = core_idle_memory(cols, suite, idle_peers)
            row(f"5. KB RSS per idle peer via the core, {name} ({idle_peers:,})", None,
                idle["rss"] / 1024, None, "<= 1 KB", " KB")
            row("   KB malloc'd + KB Python objects per idle peer", None, None, None,
                f"{idle['malloc'] / 1024:.2f} + {idle['pymalloc'] / 1024:.2f} KB (ours)")
        elapsed, total_mb, per_peer = ours.server_core_scale(core_peers)
        rate = core_peers / elapsed
        row(f"6. {core_peers:,} peers in one server core: handshakes/s", None, rate, None,
            f">= 0.9x ours ({rate / (o_hs or rate):.2f}x of row 1, "
            f"{rate / (o_ck or rate):.2f}x of row 2, the same cookie exchange)")
        row(f"   total RSS MB ({per_peer:.1f} KB per peer)", None, total_mb, None,
            "<= 2,500 MB" if core_peers >= 100_000 else
            f"<= 2,500 MB at 100k (projected {total_mb + (100_000 - core_peers) * per_peer / 1024:,.0f})")
        ev = core_eviction(cols, evict_peers, min(1_000, evict_peers))
        before, held, evicted = ev["before"], ev["held"], ev["evicted"]  # type: ignore[misc]
        per_kb = (held["rss"] - before["rss"]) / evict_peers / 1024
        row(f"6. {evict_peers:,} PSK peers evicted: server RSS before them", None,
            before["rss"] / 1e6, None, "", " MB")
        row("   RSS with them, idle in memory", None, held["rss"] / 1e6, None,
            f"{per_kb:.2f} KB per peer", " MB")
        row("   RSS after evict_after evicted them all", None, evicted["rss"] / 1e6, None,
            f"store: {evicted['stored_bytes'] / evict_peers:.0f} B sealed per peer", " MB")
        row("   MB malloc'd + Python objects, before / with / evicted", None, None, None,
            " / ".join(f"{m['malloc'] / 1e6:.1f} + {m['pymalloc'] / 1e6:.1f}"
                       for m in (before, held, evicted)) + " MB")
        row(f"   us feed -> DataReceived, after a restore (median of {ev['sample']:,})", None,
            ev["restored_s"] * 1e6, None,  # type: ignore[operator]
            f"{ev['restored_s'] / ev['active_s']:.1f}x an active peer's")  # type: ignore[operator]
        row("   us feed -> DataReceived, peer in memory, released", None,
            ev["released_s"] * 1e6, None)  # type: ignore[operator]
        row("   us feed -> DataReceived, peer in memory, active", None, ev["active_s"] * 1e6, None)  # type: ignore[operator]
        c1, c2 = interleaved([lambda: cols.c("handshake", seconds, "1"),
                              lambda: cols.c("handshake", seconds, "2")], rounds)
        o1, o2 = interleaved([lambda: ours.threaded_handshakes(seconds, 1),
                              lambda: ours.threaded_handshakes(seconds, 2)], rounds)
        p2 = cols.py("handshake", seconds, "2")
        row("7. handshakes/s, 2 threads", c2, o2, p2, "")
        row("   2 threads / 1 thread (each column)", c2 and c1 and c2 / c1, o2 and o1 and o2 / o1,
            p2 and p_hs and p2 / p_hs, ">= 1.7x (ours)")
        for suite, name in SUITES.items():
            moves = [ours.association_moves(seconds, suite) for _ in range(rounds)]
            row(f"8. association exports/s, {name}", None,
                statistics.median(m[0] for m in moves), None)
            row(f"   association imports/s, {name}", None,
                statistics.median(m[1] for m in moves), None)
        for suite, name in SUITES.items():
            row(f"   sealed bytes per association, {name}", None, ours.sealed_bytes(suite), None,
                "<= 256 B", " B")
        from million import million_rows  # benchmarks/million.py, beside this file
        for million_row in million_rows(args.devices or (10_000 if quick else 100_000)):
            row(*million_row)

    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'C':>11}  {'pydtls_ossl':>11}  {'ratio':>6}  {'pyOpenSSL':>10}  "
          f"{'ratio':>6}  target")
    for name, c, o, p, target, unit, ratios in rows:
        ratio_o = ratio(o, c) if ratios and c is not None and "KB" not in unit else ""
        ratio_p = ratio(p, c) if ratios and c is not None and "KB" not in unit else ""
        print(f"{name:<{width}}  {fmt(c, unit):>11}  {fmt(o, unit):>11}  {ratio_o:>6}  "
              f"{fmt(p, unit):>10}  {ratio_p:>6}  {target}")
    if not args.no_wire:
        from wire import run as wire_run  # benchmarks/wire.py, beside this file
        print()
        for line in wire_run(quick):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
