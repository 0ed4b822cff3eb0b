"""Established echo latency during a storm of new ECDHE handshakes, with and without
``DtlsServer(handshake_workers=N)``.

    python benchmarks/offload.py [--seconds 5] [--workers 2] [--storm 32] [--echo 16]

Three processes on loopback UDP: the server (a ``DtlsServer`` on one socket, a
select loop, an application that echoes each record), a storm of clients that
run full ECDHE-ECDSA P-256 handshakes back to back (``--storm`` at a time, each
closed once done), and a prober whose ``--echo`` established clients send one
record every millisecond, round robin, and time each echo. The prober's
latencies give p50/p99; the server counts the handshakes completed. Rows: no
storm (the floor), the storm with handshakes on the caller's thread, the storm
with workers. The storm's own client-side cryptography shares the machine, as
it would not in production. Nothing is asserted; it prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydtls_ossl import DataReceived, Dtls, DtlsContext, DtlsServer, Verify, generate_certificate  # noqa: E402

CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"


def client_context() -> DtlsContext:
    return DtlsContext(verify=Verify.NONE, ciphers=CIPHER, initial_rto=0.5)


class UdpClient:
    """One client engine on its own socket."""

    def __init__(self, server: Any, ctx: DtlsContext) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(server)
        self.sock.setblocking(False)
        self.engine = Dtls(context=ctx)
        self.engine.handshake()
        self.flush()

    def flush(self) -> None:
        while (d := self.engine.pull()) is not None:
            try:
                self.sock.send(d)
            except OSError:
                pass

    def receive(self) -> None:
        while True:
            try:
                d = self.sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            self.engine.feed(d)
            if not self.engine.is_handshake_finished():
                try:
                    self.engine.handshake()
                except Exception:
                    return
        self.flush()

    def tick(self) -> None:
        if self.engine.get_timeout() == 0:
            self.engine.handle_timeout()
        self.flush()

    def close(self) -> None:
        try:
            self.engine.close()
            self.flush()
        finally:
            self.sock.close()


def pump(clients: list[UdpClient], wait: float) -> None:
    by_fd = {c.sock.fileno(): c for c in clients}
    readable, _, _ = select.select(list(by_fd), [], [], wait)
    for fd in readable:
        by_fd[fd].receive()
        by_fd[fd].flush()


def storm(server: Any, concurrent: int, stop: Any) -> None:
    ctx = client_context()
    slots = [UdpClient(server, ctx) for _ in range(concurrent)]
    while not stop.is_set():
        pump(slots, 0.01)
        for i, c in enumerate(slots):
            c.tick()
            if c.engine.is_handshake_finished() or time.monotonic() - getattr(c, "born", time.monotonic()) > 5:
                c.close()
                slots[i] = UdpClient(server, ctx)
                slots[i].born = time.monotonic()  # type: ignore[attr-defined]
    for c in slots:
        c.sock.close()


def prober(server: Any, count: int, seconds: float, ready: Any, go: Any, out: Any) -> None:
    ctx = client_context()
    clients = [UdpClient(server, ctx) for _ in range(count)]
    deadline = time.monotonic() + 30
    while not all(c.engine.is_handshake_finished() for c in clients):
        pump(clients, 0.01)
        for c in clients:
            c.tick()
        if time.monotonic() > deadline:
            raise SystemExit("prober: handshakes did not finish")
    ready.set()
    go.wait()
    sent: dict[int, float] = {}
    latencies: list[float] = []
    by_fd = {c.sock.fileno(): (i, c) for i, c in enumerate(clients)}
    end = time.monotonic() + seconds
    next_send = time.monotonic()
    turn = 0
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_send:
            i = turn % count
            turn += 1
            next_send += 0.001
            if i not in sent:  # one outstanding record per client
                c = clients[i]
                c.engine.write(b"ping %d" % i)
                c.flush()
                sent[i] = time.perf_counter()
        readable, _, _ = select.select(list(by_fd), [], [], max(0.0, next_send - time.monotonic()))
        for fd in readable:
            i, c = by_fd[fd]
            c.receive()
            while c.engine.read() is not None:
                if i in sent:
                    latencies.append(time.perf_counter() - sent.pop(i))
    lost = len(sent)
    for c in clients:
        c.close()
    out.put((latencies, lost))


def serve(workers: int | None, with_storm: bool, args: argparse.Namespace,
          cert: Any) -> tuple[float, float, float, int, float]:
    ctx = DtlsContext(cert.cert_pem, cert.key_pem, ciphers=CIPHER, session_cache=False)
    core = DtlsServer(ctx, handshake_workers=workers, max_handshakes=4096)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)

    def wake() -> None:
        try:
            wake_w.send(b"\0")
        except OSError:
            pass

    core.wakeup = wake
    address = sock.getsockname()
    mpc = mp.get_context("fork")
    ready, go, stop, out = mpc.Event(), mpc.Event(), mpc.Event(), mpc.Queue()
    probe = mpc.Process(target=prober, args=(address, args.echo, args.seconds, ready, go, out))
    probe.start()
    stormer = None
    started = completed_at_go = 0
    t_go = 0.0
    result = None
    while result is None:
        timer = core.get_timeout()
        readable, _, _ = select.select([sock, wake_r], [], [], 0.01 if timer is None else min(timer, 0.01))
        if wake_r in readable:
            try:
                wake_r.recv(4096)
            except BlockingIOError:
                pass
        for _ in range(64):
            try:
                datagram, peer = sock.recvfrom(2048)
            except (BlockingIOError, ConnectionRefusedError):
                break
            core.feed(datagram, peer)
        core.handle_timeout()
        for event in core.events():
            if type(event) is DataReceived and event.address in core:
                core.send(event.address, event.data)
        for datagram, peer in core.datagrams_to_send():
            try:
                sock.sendto(datagram, peer)
            except OSError:
                pass
        if ready.is_set() and not go.is_set():
            if with_storm and stormer is None:
                stormer = mpc.Process(target=storm, args=(address, args.storm, stop))
                stormer.start()
                started = time.monotonic()
            if stormer is None or time.monotonic() - started > 1.0:  # the storm is raging
                completed_at_go = core.stats.handshakes_completed
                t_go = time.monotonic()
                go.set()
        if go.is_set() and not out.empty():
            result = out.get()
    elapsed = time.monotonic() - t_go
    rate = (core.stats.handshakes_completed - completed_at_go) / elapsed
    stop.set()
    if stormer is not None:
        stormer.join(10)
    probe.join(10)
    core.close_all()
    sock.close()
    latencies, lost = result
    latencies.sort()
    p50 = statistics.median(latencies) * 1e3
    p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1e3
    return rate, p50, p99, len(latencies), lost


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--storm", type=int, default=32, help="concurrent handshakes in the storm")
    parser.add_argument("--echo", type=int, default=16, help="established echo clients")
    args = parser.parse_args(argv)
    cert = generate_certificate("offload.pydtls", key_type="ec")
    print(f"{os.cpu_count()} CPUs; {args.seconds:g} s per row; {args.echo} echo clients, one record "
          f"per ms; storm: {args.storm} concurrent ECDHE-ECDSA P-256 handshakes")
    print("| server | handshakes/s | echo p50 (ms) | echo p99 (ms) | echoes | lost |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [("no storm", None, False), ("storm, handshakes on the caller's thread", None, True),
            (f"storm, handshake_workers={args.workers}", args.workers, True)]
    for label, workers, with_storm in rows:
        rate, p50, p99, n, lost = serve(workers, with_storm, args, cert)
        print(f"| {label} | {rate:,.0f} | {p50:.3f} | {p99:.3f} | {n:,} | {lost} |", flush=True)


if __name__ == "__main__":
    main()
