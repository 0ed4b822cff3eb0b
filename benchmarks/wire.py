"""Over the wire: echo servers on 127.0.0.1 under a C libssl load generator.

    python benchmarks/wire.py            # 3 alternating rounds, 2 s windows
    python benchmarks/wire.py --quick    # seconds (run.py --quick runs this)

``wire_c.c`` (compiled here, like ``bench_c.c``) is both the load generator
(N associations, ECDHE-ECDSA-AES128-GCM, closed-loop echo, one request in
flight per association) and the reference server (DTLSv1_listen + epoll, a
connected socket per peer). The Python servers are ``wire_servers.py``. The
``pion/dtls`` column is an independent reference outside OpenSSL: ``wire_pion.go``
(pion/dtls v2, Go's defaults, so as many threads as CPUs), built here like
``wire_c.c`` when ``go`` and Debian's pion sources (golang-github-pion-dtls.v2-dev,
under /usr/share/gocode) are installed, offline in GOPATH mode; without them the
column says n/a and one line says why. Each
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
from typing import Sequence
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
#: without batches (full runs only): the surfaces with batch_io=False, one recvfrom/sendto
#: per datagram, and aio.serve as on a platform without recvmmsg (a recvfrom loop)
BEFORE = (("aio, no batch", "aio-nobatch"), ("listen, no batch", "listen-nobatch"),
          ("aio, recvfrom loop", "aio-recvfrom"))
#: the independent reference, when it can be built (``build_pion``)
PION = (("pion/dtls", "pion"),)
#: where Debian's golang-*-dev packages put their sources (a GOPATH root)
DEBIAN_GOCODE = Path("/usr/share/gocode")
PION_PACKAGES = ("github.com/pion/dtls/v2", "github.com/pion/udp")


def compile_c(workdir: Path) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    binary = workdir / "wire_c"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(HERE / "wire_c.c"), "-lssl", "-lcrypto"],
                   check=True)
    return binary


def build_pion(workdir: Path) -> tuple[Path | None, str]:
    """``wire_pion.go`` built in ``workdir``, or None and why not.

    Offline, in GOPATH mode over Debian's sources: the program sits in its own
    GOPATH entry with a go.mod, which is what lets Go resolve pion's ``/v2``
    import paths to Debian's unversioned directories (minimal module
    compatibility); no module proxy or download is ever asked. Go's own build
    cache is used (a cold build compiles pion and the standard library: ~20 s).
    """
    go = shutil.which("go")
    if go is None:
        return None, "no go (apt-get install golang-go golang-github-pion-dtls.v2-dev)"
    missing = [p for p in PION_PACKAGES if not (DEBIAN_GOCODE / "src" / p).is_dir()]
    if missing:
        return None, f"no {', '.join(missing)} under {DEBIAN_GOCODE} (golang-github-pion-dtls.v2-dev)"
    package = workdir / "gopath" / "src" / "wire_pion"
    package.mkdir(parents=True)
    shutil.copy(HERE / "wire_pion.go", package / "main.go")
    (package / "go.mod").write_text("module wire_pion\n")
    binary = workdir / "wire_pion"
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"{DEBIAN_GOCODE}:{workdir / 'gopath'}",
               GOPROXY="off", GOFLAGS="", CGO_ENABLED="0")
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(workdir / "gocache")
    try:
        done = subprocess.run([go, "build", "-trimpath", "-o", str(binary), "."], cwd=package, env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "go build took over 300 s"
    if done.returncode != 0:
        return None, "go build failed: " + (done.stderr.strip().splitlines() or ["?"])[0][:160]
    return binary, ""


def pion_version() -> str:
    """The installed pion/dtls, from Debian's package database (the sources carry no version)."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "golang-github-pion-dtls.v2-dev"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def runtime_version() -> str:
    """``go version``'s Go release, e.g. go1.19.8 (the pion column's runtime)."""
    go = shutil.which("go")
    if go is None:
        return "go ?"
    try:
        done = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "go ?"
    return done.stdout.strip() or "go ?"


def _prepare(workdir: Path) -> tuple[Path | None, Path, Path]:
    """The load generator built in ``workdir``, and a server certificate and key there."""
    cert = generate_certificate("wire.pydtls", key_type="ec")
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert.write(cert_path, key_path)
    return compile_c(workdir), cert_path, key_path


def measure(binary: Path, cert: Path, key: Path, surface: str, clients: int, size: int,
            warmup: float, window: float, pion: Path | None = None) -> dict[str, float] | None:
    lifetime = 90 + warmup + window
    if surface == "c":
        command = [str(binary), "server", "0", str(cert), str(key), str(lifetime)]
    elif surface == "pion":
        if pion is None:
            return None
        command = [str(pion), "0", str(cert), str(key), str(lifetime)]
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
        before: bool | None = None, pion: bool = True, only: Sequence[str] = ()) -> list[str]:
    scenarios = QUICK_SCENARIOS if quick else SCENARIOS
    rounds = rounds or (1 if quick else 3)
    window = window or (0.5 if quick else 2.0)
    warmup = 0.2 if quick else 0.5
    surfaces = SURFACES + (BEFORE if (not quick if before is None else before) else ()) + PION
    if only:  # the C server stays: every ratio is to it
        surfaces = tuple(s for s in surfaces if s[1] in only or s[1] == "c")
        pion = pion and "pion" in only
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        binary, cert_path, key_path = _prepare(Path(tmp))
        if binary is None:
            return ["wire: no C compiler, no load generator: skipped"]
        pion_binary, pion_why = build_pion(Path(tmp)) if pion else (None, "not asked for (--no-pion)")
        measured = surfaces if pion_binary or surfaces[-1][1] != "pion" else surfaces[:-1]
        print(f"  [wire: pion/dtls {'built' if pion_binary else 'n/a, ' + pion_why}]", file=sys.stderr,
              flush=True)
        samples: dict[tuple[int, int, str], list[dict[str, float]]] = {}
        started = time.perf_counter()
        for r in range(rounds):
            for clients, size in scenarios:
                order = measured if r % 2 == 0 else tuple(reversed(measured))
                for _, surface in order:
                    result = measure(binary, cert_path, key_path, surface, clients, size, warmup, window,
                                     pion_binary)
                    if result is None:  # a server or handshake hiccup: once more
                        result = measure(binary, cert_path, key_path, surface, clients, size, warmup,
                                         window, pion_binary)
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

        def versus(surface: str, reference: str) -> str:
            ratios = []
            for c, s in scenarios:
                base = med(c, s, reference, "rate")
                ratios.append(f"{(med(c, s, surface, 'rate') or 0) / base:.2f}x" if base else "n/a")
            return " ".join(ratios)

        for name, surface in measured[2:]:
            line = f"{name:>16}: vs plain loop {versus(surface, 'plain')}; vs C server {versus(surface, 'c')}"
            if pion_binary and surface != "pion":
                line += f"; vs pion/dtls {versus(surface, 'pion')}"
            lines.append(line)
        if pion_binary:
            threads = os.environ.get("GOMAXPROCS", f"{os.cpu_count()} (the CPUs)")
            lines.append(f"pion/dtls {pion_version()} (Debian), {runtime_version()}, GOMAXPROCS {threads}")
        else:
            lines.append(f"pion/dtls: n/a, {pion_why}")
    return lines


INSTRUCTION_SURFACES = (("plain loop", "plain"), ("batch loop", "batch"), ("aio.serve", "aio"),
                        ("aio, no batch", "aio-nobatch"), ("listen()", "listen"),
                        ("listen, no batch", "listen-nobatch"),
                        ("aio, recvfrom loop", "aio-recvfrom"))


def instructions(clients: int = 10, size: int = 100, windows: tuple[float, float] = (3.0, 9.0),
                 only: Sequence[str] = ()) -> list[str]:
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
            if only and surface not in only:
                continue
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
    parser.add_argument("--no-pion", action="store_true",
                        help="skip the pion/dtls column (no Go build)")
    parser.add_argument("--surfaces", default="",
                        help="comma-separated surfaces to measure beside the C server "
                             "(plain,batch,aio,listen,aio2,aio-nobatch,listen-nobatch,aio-recvfrom,pion)")
    parser.add_argument("--instructions", action="store_true",
                        help="server instructions per echo under callgrind instead of timing")
    args = parser.parse_args(argv)
    only = [x for x in args.surfaces.split(",") if x]
    if args.instructions:
        print("\n".join(instructions(only=only)))
        return 0
    for line in run(args.quick, args.rounds, args.window, True if args.before else None,
                    pion=not args.no_pion, only=only):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
