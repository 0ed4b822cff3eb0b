"""A ``DtlsServer`` alone in a process, driven over stdin/stdout, so that its RSS
is the server's own (the clients live in the test's process).

    python tests/core_process.py STORE_DIR

PSK-AES128-CCM8 (key 16 bytes 0..15), a directory association store,
``release_after=1``, ``evict_after=60``, on a clock the parent moves. Frames are
a 4-byte length and a pickle; each request gets one reply:

- ``("feed", [(address, datagram), ...])`` -> ``[(datagram, address), ...]`` to send
  (every record received is echoed back);
- ``("tick", seconds)`` -> the server's counters, after ``handle_timeout()`` (again
  while ``get_timeout()`` is 0, as a server loop would);
- ``("rss",)`` -> bytes resident after ``gc.collect()``, and then after
  ``malloc_trim(0)`` too (what is in use, without the allocator's free pages);
- ``("close_all",)`` -> the number of peers left;
- ``("exit",)`` -> None.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import pickle
import sys

from pydtls_ossl import DataReceived, DirectoryAssociationStore, DtlsContext, DtlsServer

KEY = bytes(range(32))
PSK = bytes(range(16))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> int:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    context = DtlsContext(psk_keys=lambda identity: PSK, ciphers="PSK-AES128-CCM8",
                          association_keys=[KEY], initial_rto=0.05)
    now = [1000.0]
    server = DtlsServer(context, association_store=DirectoryAssociationStore(sys.argv[1]),
                        release_after=1.0, evict_after=60.0, max_connections=10**6,
                        max_handshakes=10**5, clock=lambda: now[0])
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return 1
        message = pickle.loads(inp.read(int.from_bytes(head, "big")))
        command = message[0]
        reply: object = None
        if command == "feed":
            for address, datagram in message[1]:
                server.feed(datagram, address)
            for event in server.events():
                if type(event) is DataReceived:
                    server.send(event.address, event.data)
            reply = server.datagrams_to_send()
        elif command == "tick":
            now[0] += message[1]
            for _ in range(10_000):  # as a server loop runs: while get_timeout() says now
                server.handle_timeout()
                for _ in server.events():
                    pass
                server.datagrams_to_send()
                if server.get_timeout() != 0:
                    break
            reply = dict(dataclasses.asdict(server.stats), peers=len(server))
        elif command == "rss":
            gc.collect()
            resident = rss()
            ctypes.CDLL(None).malloc_trim(0)
            reply = (resident, rss())
        elif command == "close_all":
            server.close_all()
            server.datagrams_to_send()
            for _ in server.events():
                pass
            reply = len(server)
        elif command != "exit":
            raise SystemExit(f"unknown command {command!r}")
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(len(data).to_bytes(4, "big") + data)
        out.flush()
        if command == "exit":
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
