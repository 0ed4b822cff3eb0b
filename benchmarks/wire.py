"""Over the wire: echo servers on 127.0.0.1 under a C libssl load generator.

    python benchmarks/wire.py            # 3 alternating rounds, 2 s windows
    python benchmarks/wire.py --quick    # seconds (run.py --quick runs this)

``wire_c.c`` (compiled here, like ``bench_c.c``) is both the load generator
(N associations, ECDHE-ECDSA-AES128-GCM, closed-loop echo, one request in
flight per association) and the reference server (DTLSv1_listen + epoll, a
connected socket per peer). The Python servers are ``wire_servers.py``. Each
measurement starts a fresh server, completes N handshakes, warms up, then
counts one window; surfaces alternate within each round and the medians are
reported, with ratios to the C server of the same run. Server CPU per echo is
the server process's run time (all threads) over the window / echoes.
Every process is bounded in time and stops by itself; loopback only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pydtls_ossl import generate_certificate  # noqa: E402
from pydtls_ossl._batch_io import batch_available  # noqa: E402

SCENARIOS = ((1, 100), (50, 100), (500, 100), (500, 1000))
QUICK_SCENARIOS = ((1, 100), (50, 100), (500, 100))
#: (column, wire_servers.py surface or "c")
SURFACES = (("C server", "c"), ("plain loop", "plain"), ("batch loop", "batch"),
            ("aio.serve", "aio"), ("listen()", "listen"), ("aio.serve x2 workers", "aio2"))
#: the surfaces as they were: one recvfrom/sendto per datagram (full runs only)
BEFORE = (("aio, no batch", "aio-nobatch"), ("listen, no batch", "listen-nobatch"))


def compile_c(workdir: Path) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    binary = workdir / "wire_c"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(HERE / "wire_c.c"), "-lssl", "-lcrypto"],
                   check=True)
    return binary


def _prepare(workdir: Path) -> tuple[Path | None, Path, Path]:
    """The load generator built in ``workdir``, and a server certificate and key there."""
    cert = generate_certificate("wire.pydtls", key_type="ec")
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert.write(cert_path, key_path)
    return compile_c(workdir), cert_path, key_path


def measure(binary: Path, cert: Path, key: Path, surface: str, clients: int, size: int,
            warmup: float, window: float) -> dict[str, float] | None:
    lifetime = 90 + warmup + window
    if surface == "c":
        command = [str(binary), "server", "0", str(cert), str(key), str(lifetime)]
    else:
        command = [sys.executable, str(HERE / "wire_servers.py"), surface, "0", str(cert), str(key),
                   str(lifetime)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("port="):
            return None
        port = line.strip().split("=", 1)[1]
        done = subprocess.run([str(binary), "client", "127.0.0.1", port, str(clients), str(size),
                               str(warmup), str(window), str(server.pid)],
                              capture_output=True, text=True, timeout=lifetime)
        if done.returncode != 0:
            print(f"  {surface} {clients}x{size}: {done.stderr.strip()[:200]}", file=sys.stderr)
            return None
        return {k: float(v) for k, v in (f.split("=") for f in done.stdout.split())}
    except subprocess.TimeoutExpired:
        return None
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run(quick: bool, rounds: int | None = None, window: float | None = None,
        before: bool | None = None) -> list[str]:
    scenarios = QUICK_SCENARIOS if quick else SCENARIOS
    rounds = rounds or (1 if quick else 3)
    window = window or (0.5 if quick else 2.0)
    warmup = 0.2 if quick else 0.5
    surfaces = SURFACES + (BEFORE if (not quick if before is None else before) else ())
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        binary, cert_path, key_path = _prepare(Path(tmp))
        if binary is None:
            return ["wire: no C compiler, no load generator: skipped"]
        samples: dict[tuple[int, int, str], list[dict[str, float]]] = {}
        started = time.perf_counter()
        for r in range(rounds):
            for clients, size in scenarios:
                order = surfaces if r % 2 == 0 else tuple(reversed(surfaces))
                for _, surface in order:
                    result = measure(binary, cert_path, key_path, surface, clients, size, warmup, window)
                    if result is None:  # a server or handshake hiccup: once more
                        result = measure(binary, cert_path, key_path, surface, clients, size, warmup,
                                         window)
                    if result is not None:
                        samples.setdefault((clients, size, surface), []).append(result)
                print(f"  [{time.perf_counter() - started:6.1f} s] wire round {r + 1}: "
                      f"{clients} x {size} B", file=sys.stderr, flush=True)

        def med(clients: int, size: int, surface: str, key: str) -> float | None:
            s = samples.get((clients, size, surface))
            return statistics.median(x[key] for x in s) if s else None

        lines.append(f"Over the wire, 127.0.0.1, {os.cpu_count()} CPUs: echoes/s (ratio to the C server), "
                     f"p50/p99 ms, [timeouts]; {rounds} round(s) x {window:g} s, medians; "
                     f"batch helper {'on' if batch_available() else 'off (fallback)'}")
        names = [name for name, _ in surfaces]
        width = 26
        lines.append("| N x bytes | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for clients, size in scenarios:
            base = med(clients, size, "c", "rate")
            cells = []
            for _, surface in surfaces:
                rate = med(clients, size, surface, "rate")
                if rate is None:
                    cells.append("n/a".ljust(width))
                    continue
                p50, p99 = med(clients, size, surface, "p50_us"), med(clients, size, surface, "p99_us")
                timeouts = sum(int(x["timeouts"]) for x in samples[(clients, size, surface)])
                cell = f"{rate / 1000:.1f}k"
                if surface != "c" and base:
                    cell += f" ({rate / base:.2f}x)"
                cell += f", {p50 / 1000:.2f}/{p99 / 1000:.2f} ms"  # type: ignore[operator]
                if timeouts:
                    cell += f" [{timeouts}]"
                cells.append(cell.ljust(width))
            lines.append(f"| {clients} x {size} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Server CPU us per echo (two datagrams: one in, one out); "
                     "load generator CPU us per echo and how busy it was")
        lines.append("| N x bytes | " + " | ".join(names) + " | client us, busy (vs C server) |")
        lines.append("|---" * (len(names) + 2) + "|")
        for clients, size in scenarios:
            cells = []
            for _, surface in surfaces:
                cpu = med(clients, size, surface, "server_cpu_us")
                if surface == "aio2":  # the load generator reads one process: the supervisor
                    cpu = None
                cells.append("n/a" if cpu is None else f"{cpu:.1f}")
            ccpu, busy = med(clients, size, "c", "client_cpu_us"), med(clients, size, "c", "client_busy")
            client = "n/a" if ccpu is None else f"{ccpu:.1f} us, {busy:.0%}"
            lines.append(f"| {clients} x {size} | " + " | ".join(cells) + f" | {client} |")
        lines.append("")
        plain = {(c, s): med(c, s, "plain", "rate") for c, s in scenarios}
        cserver = {(c, s): med(c, s, "c", "rate") for c, s in scenarios}
        for name, surface in surfaces[2:]:
            vs_plain = [f"{(med(c, s, surface, 'rate') or 0) / p:.2f}x" if p else "n/a"
                        for (c, s), p in plain.items()]
            vs_c = [f"{(med(c, s, surface, 'rate') or 0) / b:.2f}x" if b else "n/a"
                    for (c, s), b in cserver.items()]
            lines.append(f"{name:>16}: vs plain loop {' '.join(vs_plain)}; vs C server {' '.join(vs_c)}")
    return lines


INSTRUCTION_SURFACES = (("plain loop", "plain"), ("batch loop", "batch"), ("aio.serve", "aio"),
                        ("aio, no batch", "aio-nobatch"), ("listen()", "listen"),
                        ("listen, no batch", "listen-nobatch"))


def instructions(clients: int = 10, size: int = 100, windows: tuple[float, float] = (3.0, 9.0)) -> list[str]:
    """Server instructions per echo under callgrind, for each Python surface: two runs
    that differ only in the counted window, so start-up and handshakes cancel out."""
    if shutil.which("valgrind") is None:
        return ["wire --instructions: needs valgrind"]
    lines = [f"Server instructions per echo (callgrind; {clients} clients x {size} B; "
             f"runs of {windows[0]:g} s and {windows[1]:g} s, the difference):"]
    with tempfile.TemporaryDirectory() as tmp:
        binary, cert_path, key_path = _prepare(Path(tmp))
        if binary is None:
            return ["wire --instructions: no C compiler"]
        for name, surface in INSTRUCTION_SURFACES:
            totals, echoes = [], []
            for window in windows:
                out = Path(tmp) / f"cg.{surface}.{window}"
                server = subprocess.Popen(
                    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                     str(HERE / "wire_servers.py"), surface, "0", str(cert_path), str(key_path),
                     str(300)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                try:
                    assert server.stdout is not None
                    port = server.stdout.readline().strip().split("=", 1)[1]
                    done = subprocess.run([str(binary), "client", "127.0.0.1", port, str(clients),
                                           str(size), "3", str(window), str(server.pid)],
                                          capture_output=True, text=True, timeout=300)
                    stats = {k: float(v) for k, v in (f.split("=") for f in done.stdout.split())}
                finally:
                    server.terminate()
                    server.wait(60)
                echoes.append(stats["echoes"])
                totals.append(next(int(line.split()[1]) for line in out.read_text().splitlines()
                                   if line.startswith(("summary:", "totals:"))))
            per = (totals[1] - totals[0]) / max(1.0, echoes[1] - echoes[0])
            lines.append(f"  {name:<18} {per:>10,.0f} per echo ({per / 2:,.0f} per datagram), "
                         f"{int(echoes[1] - echoes[0])} echoes apart")
            print(f"  [wire instructions: {surface} done]", file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes (CI)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--window", type=float, help="seconds counted per measurement")
    parser.add_argument("--before", action="store_true",
                        help="also the asyncio and listener surfaces without batching")
    parser.add_argument("--instructions", action="store_true",
                        help="server instructions per echo under callgrind instead of timing")
    args = parser.parse_args(argv)
    if args.instructions:
        print("\n".join(instructions()))
        return 0
    for line in run(args.quick, args.rounds, args.window, True if args.before else None):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
