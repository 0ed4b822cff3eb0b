"""The per-record C helpers keep the GIL; everything else still releases it.

A second thread counts whenever it runs, and yields the GIL after each count.
With the switch interval set to 1000 s, it can only run while this thread
makes a call that releases the GIL, so its count tells which calls do.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Iterator

import pytest

from pydtls_ossl import Dtls
from pydtls_ossl._openssl import lib

from .helpers import Pair


@pytest.fixture
def other_thread() -> Iterator[Callable[[Callable[[], object], int], int]]:
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1
            time.sleep(0)  # gives the GIL back

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000)
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()

    def runs_during(call: Callable[[], object], times: int) -> int:
        before = count[0]
        for _ in range(times):
            call()
        return count[0] - before

    try:
        yield runs_during
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        thread.join(5)


def test_record_helpers_keep_the_gil(other_thread: Callable[[Callable[[], object], int], int],
                                     pair: Pair) -> None:
    conn = pair.server._conn
    for call in (lib.pd_io_available, lambda: lib.pd_read(conn), lambda: lib.pd_pull(conn),
                 lambda: lib.pd_get_timeout(conn)):
        assert other_thread(call, 100_000) == 0


def test_other_calls_still_release_it(other_thread: Callable[[Callable[[], object], int], int],
                                      make_pair: Callable[..., Pair]) -> None:
    client: Dtls = make_pair().client
    client.handshake()  # a live handshake timer: handle_timeout is on the handshake's path
    conn = client._conn
    for call in (lib.OpenSSL_version_num, lambda: lib.pd_handle_timeout(conn)):
        ran = 0
        for _ in range(20):  # the other thread wins some releases, not each one
            ran += other_thread(call, 100_000)
            if ran:
                break
        assert ran > 0
