"""A DTLS service as a cluster: N worker processes on one UDP port, one Redis.

    python examples/cluster.py --workers 2 --port 5684 --redis redis://127.0.0.1:6379/0

Each worker is an asyncio echo server with SO_REUSEPORT, so the kernel
spreads the peers over the workers. They share:
- one cookie secret: a HelloVerifyRequest from one worker is honoured by all;
- one set of association keys and one Redis association store: a worker that
  stops (SIGTERM, or --run-for runs out) moves its established peers into
  Redis, and their next datagrams, which the kernel now sends to another
  worker, take them back out there. The peers notice nothing.
In production, the secrets come from your secret store, not from the command
line, and a supervisor restarts workers one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

from pydtls_ossl import DtlsContext, aio
from pydtls_ossl.redis_store import RedisAssociationStore

PSK = bytes(16)  # every device's key, for the example: psk_keys=fn(identity) in real life


def context(secrets: bytes) -> DtlsContext:
    return DtlsContext(psk_keys=lambda identity: PSK, ciphers="PSK-AES128-CCM8",
                       cookie_secret=secrets[:32], association_keys=[secrets[32:64]])


async def worker(name: str, port: int, redis_url: str, secrets: bytes, run_for: float) -> None:
    async def echo(conn: Any) -> None:
        async for message in conn:
            conn.send(f"{name}: ".encode() + message)

    server = await aio.serve(echo, "0.0.0.0", port, context=context(secrets),
                             association_store=RedisAssociationStore(redis_url),
                             export_on_close=True, reuse_port=True)
    print(f"worker {name} (pid {os.getpid()}) serving udp://0.0.0.0:{port}", flush=True)
    if run_for > 0:
        asyncio.get_running_loop().call_later(run_for, server.close)
    await server.serve_forever()  # SIGTERM: peers move to Redis, then it returns
    print(f"worker {name} stopped: {server.core.stats.evicted} peers moved to Redis", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--port", type=int, default=5684)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--run-for", type=float, default=0, help="stop after this many seconds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one worker
    args = parser.parse_args(argv)
    secrets = bytes.fromhex(os.environ.get("CLUSTER_SECRETS", "")) or os.urandom(64)
    if args.worker is not None:
        asyncio.run(worker(args.worker, args.port, args.redis, secrets, args.run_for))
        return 0
    env = dict(os.environ, CLUSTER_SECRETS=secrets.hex())
    import subprocess
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--port", str(args.port),
                               "--redis", args.redis, "--run-for", str(args.run_for)], env=env)
             for i in range(args.workers)]
    signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
