"""A two-worker echo service for tests/test_workers.py: each reply names its worker's pid."""

from __future__ import annotations

import os
import sys
from typing import Any

from pydtls_ossl import DtlsContext
from pydtls_ossl.reuseport import serve_workers


async def echo(conn: Any) -> None:
    async for message in conn:
        conn.send(b"%d:" % os.getpid() + message)


if __name__ == "__main__":
    cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    context = DtlsContext(open(cert, "rb").read(), open(key, "rb").read())
    statuses = serve_workers(echo, "127.0.0.1", port, context=context, workers=2,
                             on_ready=lambda pids: print("workers", *pids, flush=True))
    print("exited", *statuses, flush=True)
