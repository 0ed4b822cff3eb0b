"""An asyncio DTLS echo server whose peers outlive it, for the restart tests.

    python tests/assoc_server.py STORE [--port N] [--redis] [--reuse-port] [--name X]

STORE is a directory, or with --redis a redis:// URL.

PSK (any identity, key 16 zero bytes) and a directory association store;
SIGTERM moves every established peer into the store and exits, printing
``exported N`` and the server's counters.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from pydtls_ossl import DirectoryAssociationStore, DtlsContext, aio

KEY = bytes(range(32))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--redis", action="store_true")
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    context = DtlsContext(psk_keys=lambda identity: bytes(16), ciphers="PSK-AES128-CCM8",
                          association_keys=[KEY], cookie_secret=bytes(range(16, 48)))
    if args.redis:
        from pydtls_ossl.redis_store import RedisAssociationStore
        store: Any = RedisAssociationStore(args.store)
    else:
        store = DirectoryAssociationStore(args.store)

    async def echo(conn: Any) -> None:
        async for message in conn:
            conn.send(args.name.encode() + message)

    server = await aio.serve(echo, "127.0.0.1", args.port, context=context,
                             association_store=store, export_on_close=True,
                             reuse_port=args.reuse_port)
    print(f"ready {server.address[1]}", flush=True)
    await server.serve_forever()
    stats = server.core.stats
    print(f"exported {stats.evicted} restored {stats.restored} "
          f"handshakes {stats.handshakes_started}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
