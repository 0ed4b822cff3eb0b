"""Many engines on many threads at once: no crash, no cross-talk, no shared error queue.

An engine is used by one thread at a time; different engines run in parallel (cffi
releases the GIL around the handshake's C calls) and share contexts. Every public call is followed by
a check that this thread's OpenSSL error queue is empty, as the library promises.
The server core's cross-thread ``send()`` is not tested here (it does not exist yet).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from pydtls_ossl import (AlertDescription, Dtls, DtlsContext, DtlsError, FingerprintMismatch,
                         HandshakeError, generate_certificate)
from pydtls_ossl._callbacks import take_callback_error
from pydtls_ossl._ffi import lib

THREADS = 8
SUITE = "PSK-AES128-GCM-SHA256"
LAYERS = ("engine", "openssl")
JOIN_TIMEOUT = 120.0


def run_threads(work: Callable[[int], Any], count: int = THREADS) -> list[Any]:
    """Run work(i) on ``count`` threads released together; re-raise the first failure."""
    start = threading.Barrier(count, timeout=30)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"worker-{i}", daemon=True)
               for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


def queue_empty() -> None:
    assert lib.ERR_peek_error() == 0, f"OpenSSL error queue not empty on {threading.current_thread().name}"


def checked(call: Callable[..., Any], *args: Any) -> Any:
    """Call one public method; the thread's error queue is empty afterwards, raise or not."""
    try:
        return call(*args)
    finally:
        queue_empty()


def handshake(client: Dtls, server: Dtls) -> None:
    checked(client.handshake)
    for _ in range(10):
        while (datagram := checked(client.pull)) is not None:
            checked(server.feed, datagram)
        checked(server.handshake)
        while (datagram := checked(server.pull)) is not None:
            checked(client.feed, datagram)
        if checked(client.handshake) and server.is_handshake_finished():
            return
    raise AssertionError("handshake did not finish")


def identity() -> str:
    return f"id-{threading.current_thread().name}"


def key_of(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()[:16]


class Shared:
    """Contexts every thread uses at once: PSK (callbacks both sides) and certificates,
    for each record layer. The PSK keys depend on the identity, and the client picks its
    identity from the thread it runs on, so callbacks crossing threads fail handshakes."""

    def __init__(self, certs: Any) -> None:
        self.certs = certs
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []  # (thread running the server callback, identity)
        self.active = self.most_active = 0
        self.rendezvous: threading.Barrier | None = None
        self.psk: dict[str, tuple[DtlsContext, DtlsContext]] = {}
        self.cert: dict[str, tuple[DtlsContext, DtlsContext]] = {}
        for layer in LAYERS:
            self.psk[layer] = (
                DtlsContext(psk=lambda hint: (identity(), key_of(identity())), ciphers=SUITE,
                            record_layer=layer),  # type: ignore[arg-type]
                DtlsContext(psk_keys=self.server_key, psk_identity_hint="shared", ciphers=SUITE,
                            record_layer=layer))  # type: ignore[arg-type]
            self.cert[layer] = (
                DtlsContext(certs.client.cert_pem, certs.client.key_pem, record_layer=layer),  # type: ignore[arg-type]
                DtlsContext(certs.server.cert_pem, certs.server.key_pem, record_layer=layer))  # type: ignore[arg-type]

    def server_key(self, name: str) -> bytes | None:
        with self.lock:
            self.seen.append((threading.current_thread().name, name))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            if name.startswith("raise-"):
                raise RuntimeError(name)
            rendezvous = self.rendezvous
            if rendezvous is not None:  # every thread inside a callback at the same time
                rendezvous.wait()
            return key_of(name) if name.startswith("id-") else None
        finally:
            with self.lock:
                self.active -= 1

    def pair(self, kind: str, layer: str) -> tuple[Dtls, Dtls]:
        if kind == "psk":
            client_ctx, server_ctx = self.psk[layer]
            return Dtls(context=client_ctx), Dtls(is_server=True, context=server_ctx)
        client_ctx, server_ctx = self.cert[layer]
        return (Dtls(context=client_ctx, expected_peer_fingerprint=self.certs.server.fingerprint()),
                Dtls(is_server=True, context=server_ctx,
                     expected_peer_fingerprint=self.certs.client.fingerprint()))


@pytest.fixture(scope="module")
def shared(certs: Any) -> Iterator[Shared]:
    yield Shared(certs)


def exchange(client: Dtls, server: Dtls, tag: bytes) -> None:
    """Records both ways, one per call and in batches, each checked to be this thread's."""
    for j in range(30):
        for src, dst, side in ((client, server, b"c"), (server, client, b"s")):
            data = tag + b":%s:%d:" % (side, j) + bytes(j * 13 % 400)
            assert checked(src.write, data) == len(data)
            (datagram,) = [checked(src.pull)]
            assert checked(dst.feed, datagram) == 1
            assert checked(dst.read) == data, "a record from another thread's association"
    payloads = [tag + b":batch:%d" % j for j in range(64)]
    datagrams = checked(client.write_batch, payloads)
    assert checked(server.feed_batch, datagrams) == payloads


def test_many_threads_handshake_and_exchange_on_shared_contexts(shared: Shared) -> None:
    rounds = 60

    def work(i: int) -> list[bytes]:
        keys = []
        for k in range(rounds):
            kind, layer = ("psk", "cert")[(i + k) % 2], LAYERS[(i + k // 2) % 2]
            client, server = shared.pair(kind, layer)
            handshake(client, server)
            assert client.record_layer == server.record_layer == layer
            if kind == "psk":
                assert checked(server.psk_identity) == identity(), "callback crossed threads"
            else:
                assert checked(client.get_peer_fingerprint) == shared.certs.server.fingerprint()
            exchange(client, server, b"t%d:r%d" % (i, k))
            key = checked(client.export_keys, "EXPERIMENTAL-threads", 32)
            assert checked(server.export_keys, "EXPERIMENTAL-threads", 32) == key
            keys.append(key)
            checked(client.close)
            for datagram in drain_checked(client):
                checked(server.feed, datagram)
            assert server.state.name == "PEER_CLOSED"
            checked(server.close)
        return keys

    results = run_threads(work)
    every_key = [key for keys in results for key in keys]
    assert len(every_key) == THREADS * rounds and len(set(every_key)) == len(every_key)
    psk_rounds = sum(1 for i in range(THREADS) for k in range(rounds) if (i + k) % 2 == 0)
    with shared.lock:
        mine = [(t, n) for t, n in shared.seen if n.startswith("id-worker-")]
    assert len(mine) >= psk_rounds
    assert all(n == f"id-{t}" for t, n in mine), "each callback ran on its own engine's thread"


def drain_checked(engine: Dtls) -> list[bytes]:
    out = []
    while (datagram := checked(engine.pull)) is not None:
        out.append(datagram)
    return out


def test_psk_callbacks_run_on_every_thread_at_once(shared: Shared) -> None:
    """All threads inside the server's PSK callback at the same moment: OpenSSL calls into
    Python from several threads concurrently, and each gets its own identity's key."""
    shared.most_active = 0
    shared.rendezvous = threading.Barrier(THREADS, timeout=20)
    try:
        def work(i: int) -> str | None:
            client, server = shared.pair("psk", LAYERS[i % 2])
            handshake(client, server)
            exchange(client, server, b"together %d" % i)
            return checked(server.psk_identity)

        identities = run_threads(work)
    finally:
        shared.rendezvous = None
    assert identities == [f"id-worker-{i}" for i in range(THREADS)]
    assert shared.most_active >= THREADS


#: half the threads shake hands correctly; two have a PSK callback raise, one a pin that
#: does not match, one an unknown identity; one good thread gets garbage interleaved.
MODES: list[Any] = ["good", "good", "good", 3, 0, 2, 1, 2]
FAILING_ROUNDS = 24
OUTCOME = {"good": "ok", 3: "ok", 0: "pin", 1: "unknown", 2: "raised"}


def failing_work(shared: Shared, wrong_pin: str) -> Callable[[int], list[str]]:
    """Half the threads shake hands correctly; the others fail, each in its own way."""

    def work(i: int) -> list[str]:
        outcomes = []
        for k in range(FAILING_ROUNDS):
            mode = MODES[i]
            layer = LAYERS[k % 2]
            if mode == 0:  # pinned certificate does not match
                client_ctx, server_ctx = shared.cert[layer]
                client = Dtls(context=client_ctx, expected_peer_fingerprint=wrong_pin)
                server = Dtls(is_server=True, context=server_ctx)
            elif mode in (1, 2):  # unknown PSK identity / a PSK callback that raises
                client_ctx = DtlsContext(psk=("raise-%d-%d" % (i, k) if mode == 2 else "nobody",
                                              key_of("x")), ciphers=SUITE, record_layer=layer)  # type: ignore[arg-type]
                client, server = Dtls(context=client_ctx), Dtls(is_server=True, context=shared.psk[layer][1])
            elif mode == 3:  # garbage interleaved with a handshake that succeeds
                client, server = shared.pair("cert", layer)
            else:
                client, server = shared.pair(("psk", "cert")[k % 2], layer)
            try:
                if mode == 3:
                    checked(client.handshake)
                    for _ in range(10):
                        for datagram in drain_checked(client):
                            checked(server.feed, b"\x16\xfe\xfd" + datagram[3:40] + b"\xff" * 30)
                            checked(server.feed, datagram)
                        for datagram in drain_checked(server):
                            checked(client.feed, datagram[:20])
                            checked(client.feed, datagram)
                        if checked(client.handshake) and checked(server.handshake):
                            break
                else:
                    handshake(client, server)
                exchange(client, server, b"t%d:%d" % (i, k))
                outcomes.append("ok")
            except DtlsError as exc:
                queue_empty()
                outcomes.append(judge_failure(mode, i, k, exc, client, server))
            assert take_callback_error() is None, "a callback's exception was left behind"
        return outcomes

    return work


def judge_failure(mode: Any, i: int, k: int, exc: DtlsError, client: Dtls, server: Dtls) -> str:
    """The failure is this thread's own, with this thread's reasons, and both sides end."""
    assert mode in (0, 1, 2), f"worker {i}: unexpected {exc!r}"
    for engine in (client, server):  # drive the other side to its end too
        for datagram in drain_checked(engine):
            checked((server if engine is client else client).feed, datagram)
    errors = []
    for engine in (client, server):
        try:
            checked(engine.handshake)
        except DtlsError as error:
            errors.append(error)
    queue_empty()
    text = " ".join(" ".join(e.reasons) for e in errors)
    if mode == 0:
        assert any(isinstance(e, FingerprintMismatch) for e in errors), errors
        assert "psk" not in text.lower()
        return "pin"
    server_error = next(e for e in errors if isinstance(e, HandshakeError) and e.alert is not None
                        and not e.alert.received)
    assert server_error.alert.description == AlertDescription.UNKNOWN_PSK_IDENTITY  # type: ignore[union-attr]
    assert "certificate" not in text.lower()
    if mode == 2:
        cause = server_error.__cause__
        assert isinstance(cause, RuntimeError) and str(cause) == "raise-%d-%d" % (i, k), \
            f"worker {i} round {k} got another callback's exception: {cause!r}"
        return "raised"
    assert server_error.__cause__ is None
    return "unknown"


def test_failed_handshakes_leave_nothing_for_other_threads(shared: Shared) -> None:
    wrong_pin = generate_certificate("nobody").fingerprint()
    results = run_threads(failing_work(shared, wrong_pin))
    for i, outcomes in enumerate(results):
        assert outcomes == [OUTCOME[MODES[i]]] * FAILING_ROUNDS, f"worker {i}: {outcomes}"


def test_an_engine_moves_between_threads_one_at_a_time(shared: Shared) -> None:
    """Handshake on one thread, records on another, a failed handshake on the second before
    it takes the engine over, close on a third: nothing of one thread's failure shows up
    in the other engine, on either thread."""
    handoff: queue.Queue[tuple[Dtls, Dtls]] = queue.Queue()
    wrong_pin = generate_certificate("nobody").fingerprint()

    def first() -> None:
        for layer in LAYERS:
            client, server = shared.pair("cert", layer)
            handshake(client, server)
            handoff.put((client, server))

    def second() -> list[tuple[Dtls, Dtls]]:
        taken = []
        for layer in LAYERS:
            client_ctx, server_ctx = shared.cert[layer]
            bad = Dtls(context=client_ctx, expected_peer_fingerprint=wrong_pin)
            with pytest.raises(FingerprintMismatch):
                handshake(bad, Dtls(is_server=True, context=server_ctx))
            client, server = handoff.get(timeout=30)
            exchange(client, server, b"moved %s" % layer.encode())
            taken.append((client, server))
        return taken

    def third(pairs: list[tuple[Dtls, Dtls]]) -> None:
        for client, server in pairs:
            exchange(server, client, b"third thread")
            checked(client.close)
            for datagram in drain_checked(client):
                checked(server.feed, datagram)
            with pytest.raises(DtlsError):
                checked(server.read)

    outcome: dict[str, Any] = {}

    def runner(name: str, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        def body() -> None:
            try:
                outcome[name] = fn(*args)
            except BaseException as exc:
                outcome[name + " error"] = exc
        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    threads = [runner("first", first), runner("second", second)]
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    last = runner("third", third, outcome.get("second", []))
    last.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads + [last])
    for name in ("first", "second", "third"):
        if name + " error" in outcome:
            raise outcome[name + " error"]
    assert len(outcome["second"]) == 2
