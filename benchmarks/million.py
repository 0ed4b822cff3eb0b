"""A million devices: PSK-AES128-CCM8 associations through one DtlsServer.

    python benchmarks/million.py [--devices N] [--sample K] [--idle-peers M]

CoAP-style devices (``TLS_PSK_WITH_AES_128_CCM_8``, no public-key operation)
shake hands with one ``DtlsServer`` that runs alone in a child process, fed
datagrams over a pipe as in ``run.py``'s idle rows (``CoreChild``), so the
child's RSS is the server's own. The clients live in this process, created
in chunks of ``run.CHUNK``; each shakes hands (with the cookie exchange),
sends one record that the core echoes, and is dropped, except ``K`` sample
clients spread over the population. The core's fake clock moves on after
every chunk, so quiet peers are released (cipher contexts freed, keys kept)
as in a live server. At the end every sample client sends one more record,
and each must come out of the core as its own ``DataReceived``.

Reported: the server's RSS empty, after a warm-up round, and with N idle
peers; RSS per association (less the warmed-up empty server); handshakes/s
for the first and the last 100,000 (each a wall-clock rate of the whole
loop, client work included: the clients run on the other core); CPython's
cyclic GC in the server process, timed with ``gc.callbacks`` (the library
must not change the application's GC settings, so nothing here disables or
freezes it: it runs as it would in the application). A progress line goes
to stderr every 100,000 devices. Nothing is asserted but delivery.

``--idle-peers M`` also prints ``run.py``'s idle-peer rows (both suites:
PSK-AES128-CCM8, and ECDHE-ECDSA-AES128-GCM with a pinned client) at M peers.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (contexts, the pipe framing, the client side of the core child)
from pydtls_ossl import openssl_version  # noqa: E402
from pydtls_ossl.server import ConnectionEstablished, DataReceived, DtlsServer  # noqa: E402

DEVICES = 1_000_000
SAMPLE = 1_000
STEP = 100_000  # a progress line, and the window of the first / last rate


# --------------------------------------------------- the server, alone in a child

class GcTimer:
    """Sums the time of CPython's cyclic collections, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self.longest = 0.0
        self._start = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        generation = info["generation"]
        self.seconds[generation] += took
        self.count[generation] += 1
        self.longest = max(self.longest, took)

    def stats(self) -> dict[str, object]:
        return {"gc_seconds": list(self.seconds), "gc_count": list(self.count),
                "gc_longest": self.longest}


def child() -> int:
    """The server end: run.core_child's loop, trimmed to what this row needs, plus the
    GC timer and the process's CPU time. Answers one frame per command."""
    timer = GcTimer()  # before anything of the server exists
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    started_rss = run.rss()
    clock = [1000.0]
    server = DtlsServer(run.suite_server_context("psk"), max_connections=10**7,
                        max_handshakes=10**6, idle_timeout=1e9, release_after=run.RELEASE_AFTER,
                        handshake_timeout=1e6, clock=lambda: clock[0])
    counts = {"established": 0, "data": 0, "other": 0}
    feed, events, send, next_event = server.feed, server.events, server.send, server.next_event
    while True:
        message = run._recv_frame(inp)
        command = message[0]  # type: ignore[index]
        if command == "feed":  # (datagrams, echo): as in run.core_child
            for address, datagram in message[1]:  # type: ignore[index]
                feed(datagram, address)
            for event in events():
                if type(event) is DataReceived:
                    counts["data"] += 1
                    if message[2]:  # type: ignore[index]
                        send(event.address, event.data)
                elif type(event) is ConnectionEstablished:
                    counts["established"] += 1
                else:
                    counts["other"] += 1
            run._send_frame(out, server.datagrams_to_send())
        elif command == "tick":
            clock[0] += message[1]  # type: ignore[index]
            server.handle_timeout()
            for _ in events():
                counts["other"] += 1
            server.datagrams_to_send()
            run._send_frame(out, None)
        elif command == "stats":  # no gc.collect(): the heap as the application has it
            stats: dict[str, object] = {"rss": run.rss(), "started_rss": started_rss,
                                        "peers": len(server), "cpu": time.process_time(),
                                        **counts, **timer.stats()}
            if message[1]:  # type: ignore[index]  # the slow probes, at the end only
                stats["malloc"] = run.malloc_in_use()
                stats["pymalloc"] = run.pymalloc_in_use()
            run._send_frame(out, stats)
        elif command == "deliver":  # one record per sample peer: whose arrived, and how fast
            delivered, latencies, clock_ns = {}, [], time.perf_counter_ns
            for address, datagram in message[1]:  # type: ignore[index]
                start = clock_ns()
                feed(datagram, address)
                while (event := next_event()) is not None:
                    if type(event) is DataReceived:
                        delivered[event.address] = event.data
                        counts["data"] += 1
                latencies.append((clock_ns() - start) / 1e9)
            server.datagrams_to_send()
            run._send_frame(out, (delivered, latencies))
        elif command == "close_all":  # the warm-up round's peers go
            server.close_all()
            server.datagrams_to_send()
            for _ in events():
                pass
            run._send_frame(out, len(server))
        elif command == "tracked":  # objects the cyclic GC tracks (after the RSS reading)
            run._send_frame(out, len(gc.get_objects()))
        elif command == "exit":
            run._send_frame(out, None)
            return 0
        else:
            raise SystemExit(f"million child: unknown command {command!r}")


class MillionChild(run.CoreChild):
    """run.CoreChild's client side (``establish``: groups in flight, one echoed record
    each, sample clients kept) driving this file's child instead of run.py's."""

    def __init__(self) -> None:  # noqa: D107  (no Columns: PSK needs no certificates)
        self.suite = "psk"
        self.proc = subprocess.Popen([sys.executable, __file__, "--child"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)  # type: ignore[union-attr]
            except OSError:
                pass
        self.cctx = run.suite_client_context("psk")
        self.server_fp = ""


# ------------------------------------------------------------------ the run

def million(devices: int = DEVICES, sample: int = SAMPLE, progress: bool = True,
            window: int = STEP) -> dict[str, object]:
    """Establish ``devices`` peers, then one record from each of ``sample`` of them;
    rates are taken over the first and the last ``window`` devices."""
    sample = min(sample, devices)
    every = max(1, devices // sample) if sample else 0
    step = max(1, min(window, devices))
    marks: list[tuple[int, float]] = []  # (devices so far, perf_counter)
    with MillionChild() as core:
        empty = core.call("stats", True)
        core.warm_up()  # a round of handshakes in flight, closed: their working set stays
        warm = core.call("stats", True)
        kept: dict[tuple[str, int], object] = {}
        start = time.perf_counter()
        marks.append((0, start))
        done = 0
        while done < devices:
            n = min(run.CHUNK, devices - done, (done // step + 1) * step - done)
            kept.update(core.establish(n, done, every, sample - len(kept)))
            done += n
            core.call("tick", run.RELEASE_AFTER * 1.5)  # quiet peers are released
            if done % step == 0 or done == devices:
                now = time.perf_counter()
                marks.append((done, now))
                if progress:
                    s = core.call("stats", False)
                    last = (done - marks[-2][0]) / (now - marks[-2][1])
                    print(f"  {done:>9,} devices  {done / (now - start):7,.0f} handshakes/s so far, "
                          f"{last:7,.0f} the last {done - marks[-2][0]:,}  server RSS "
                          f"{s['rss'] / 2**20:7,.1f} MiB  GC {sum(s['gc_seconds']):6.2f} s "
                          f"({s['gc_count'][2]} gen-2)  [{now - start:6.1f} s]",
                          file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - start
        core.call("tick", run.RELEASE_AFTER * 1.5)
        idle = core.call("stats", True)
        datagrams, expected = [], {}
        for i, (address, client) in enumerate(kept.items()):
            payload = b"reading %d" % i
            client.write(payload)  # type: ignore[attr-defined]
            datagrams.append((address, client.pull()))  # type: ignore[attr-defined]
            expected[address] = payload
        delivered, latencies = core.call("deliver", datagrams)  # type: ignore[misc]
        after = core.call("stats", False)
        tracked = core.call("tracked")
    ok = sum(1 for a, p in expected.items() if delivered.get(a) == p)
    if idle["peers"] != devices or idle["established"] != devices + 2 * run.CoreChild.GROUP:  # type: ignore[index]
        raise RuntimeError(f"not every device established: {idle}")
    first = marks[1][0] / (marks[1][1] - marks[0][1])
    last = (marks[-1][0] - marks[-2][0]) / (marks[-1][1] - marks[-2][1])
    latencies.sort()
    return {"devices": devices, "sample": len(expected), "delivered": ok, "elapsed": elapsed,
            "first_rate": first, "last_rate": last, "window": step,
            "empty": empty, "warm": warm, "idle": idle, "after": after, "tracked": tracked,
            "median_latency": latencies[len(latencies) // 2] if latencies else 0.0,
            "per_association": (idle["rss"] - warm["rss"]) / devices}  # type: ignore[index]


def report(r: dict[str, object]) -> list[str]:
    idle, warm, empty, after = r["idle"], r["warm"], r["empty"], r["after"]
    devices, mib = r["devices"], 2**20
    gc_s, gc_n = idle["gc_seconds"], idle["gc_count"]  # type: ignore[index]
    cpu = idle["cpu"] - warm["cpu"]  # type: ignore[index,operator]
    total = idle["rss"]  # type: ignore[index]
    return [
        f"{devices:,} PSK-AES128-CCM8 devices through one DtlsServer ({openssl_version()}, "
        f"Python {sys.version.split()[0]}), {r['sample']:,} sampled:",
        f"  server RSS: {empty['rss'] / mib:,.1f} MiB empty, {warm['rss'] / mib:,.1f} MiB after "  # type: ignore[index]
        f"a warm-up round, {total / mib:,.1f} MiB with {devices:,} idle peers ({total / 1e9:.3f} GB)",
        "  target <= 1.2 GB for a million: " + (
            f"{'met' if total <= 1.2e9 else 'MISSED'}" if devices >= 1_000_000 else
            f"projected {(warm['rss'] + r['per_association'] * 1e6) / 1e9:.2f} GB "  # type: ignore[index,operator]
            f"at this RSS per association"),
        f"  RSS per association: {r['per_association']:,.0f} B "
        f"({r['per_association'] / 1024:.2f} KB: C heap {(idle['malloc'] - warm['malloc']) / devices:,.0f} B "  # type: ignore[index,operator]
        f"+ Python objects {(idle['pymalloc'] - warm['pymalloc']) / devices:,.0f} B + the "  # type: ignore[index,operator]
        f"allocators' slack; less the warmed-up empty server)",
        f"  handshakes/s (cookie exchange + one echoed record each, wall clock): first "
        f"{r['window']:,} {r['first_rate']:,.0f}, last {r['window']:,} {r['last_rate']:,.0f} "
        f"({r['last_rate'] / r['first_rate']:.2f}x); {devices / r['elapsed']:,.0f} overall, "  # type: ignore[operator]
        f"{r['elapsed']:,.1f} s",
        f"  cyclic GC in the server: {sum(gc_s):.2f} s of {cpu:.1f} s CPU "
        f"({sum(gc_s) / cpu:.1%}); collections gen0/1/2 {gc_n[0]:,}/{gc_n[1]:,}/{gc_n[2]:,}, "
        f"gen-2 {gc_s[2]:.2f} s, longest pause {idle['gc_longest'] * 1e3:.0f} ms; "  # type: ignore[index]
        f"{r['tracked']:,} objects tracked at the end ({r['tracked'] / devices:.1f} per peer)",  # type: ignore[operator]
        f"  one record from each sample device: {r['delivered']:,} / {r['sample']:,} delivered "
        f"as DataReceived (median {r['median_latency'] * 1e6:.0f} us feed -> event, cipher "
        f"contexts rebuilt); RSS after {after['rss'] / mib:,.1f} MiB",  # type: ignore[index]
    ]


def million_rows(devices: int) -> list[tuple[str, None, float, None, str, str]]:
    """run.py's row 9: (name, C, ours, pyOpenSSL, target, unit) for ``run.row``. The
    rates are over the first and the last tenth of the devices."""
    r = million(devices, min(SAMPLE, devices), progress=False, window=max(1, devices // 10))
    if r["delivered"] != r["sample"]:
        raise RuntimeError(f"million: {r['delivered']} of {r['sample']} sample records delivered")
    idle, warm, per = r["idle"], r["warm"], r["per_association"]
    gc_s, gc_n = idle["gc_seconds"], idle["gc_count"]  # type: ignore[index]
    cpu = idle["cpu"] - warm["cpu"]  # type: ignore[index,operator]
    projected = (warm["rss"] + per * 1e6) / 1e6  # type: ignore[index,operator]
    tenth = f"{max(1, devices // 10):,}"
    return [
        (f"9. {devices:,} PSK-CCM8 devices, one core: server RSS", None, idle["rss"] / 1e6, None,  # type: ignore[index]
         f"{per:,.0f} B per association; <= 1,200 MB at 1M (projected {projected:,.0f}; "
         f"python benchmarks/million.py)", " MB"),
        (f"   handshakes/s, first {tenth} devices", None, r["first_rate"], None,  # type: ignore[arg-type]
         f"last {tenth}: {r['last_rate']:,.0f} ({r['last_rate'] / r['first_rate']:.2f}x), "  # type: ignore[operator]
         "must not degrade", ""),
        ("   cyclic GC in the server, s", None, sum(gc_s), None,
         f"{sum(gc_s) / cpu:.1%} of its CPU, {gc_n[2]} gen-2; {r['delivered']:,}/{r['sample']:,} "
         f"sample records delivered", " s"),
    ]


def idle_rows(peers: int) -> list[str]:
    """run.py's idle-peer rows (row 5) for both suites at ``peers``."""
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        cols = run.Columns(Path(tmp))
        for suite, name in run.SUITES.items():
            idle = run.core_idle_memory(cols, suite, peers)
            lines.append(f"idle peer via the core, {name} ({peers:,}): {idle['rss']:,.0f} B RSS "
                         f"({idle['malloc']:,.0f} B malloc'd + {idle['pymalloc']:,.0f} B Python "
                         f"objects); target <= 1 KB: "
                         f"{'met' if idle['rss'] <= 1024 else 'missed'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=DEVICES, help="associations (1,000,000)")
    parser.add_argument("--sample", type=int, default=SAMPLE,
                        help="devices kept alive to send one record at the end (1,000)")
    parser.add_argument("--idle-peers", type=int, default=0,
                        help="also print run.py's idle rows for both suites at this many peers")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child()
    result = million(args.devices, args.sample)
    for line in report(result):
        print(line, flush=True)
    if args.idle_peers:
        for line in idle_rows(args.idle_peers):
            print(line, flush=True)
    return 0 if result["delivered"] == result["sample"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
