"""A DtlsServer in its own process, for the fleet-ticket and Redis tests.

    python tests/resume_server.py CERT KEY [--ticket-secret HEX] [--redis URL]
        [--context-id TEXT] [--no-tickets]

Prints ``ready PORT``, then ``established resumed=True|False`` per peer, and
echoes every record. Stops when its standard input closes.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

from pydtls_ossl import ConnectionEstablished, DataReceived, DtlsContext, DtlsServer
from pydtls_ossl._pump import serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cert")
    parser.add_argument("key")
    parser.add_argument("--ticket-secret")
    parser.add_argument("--redis")
    parser.add_argument("--context-id", default="resume-test")
    parser.add_argument("--no-tickets", action="store_true")
    args = parser.parse_args()
    options: dict[str, object] = {"session_context_id": args.context_id.encode()}
    if args.ticket_secret:
        options["ticket_secret"] = bytes.fromhex(args.ticket_secret)
    if args.redis:
        from pydtls_ossl.redis_store import RedisSessionStore
        options["session_store"] = RedisSessionStore(args.redis)
    if args.no_tickets:
        options["session_tickets"] = False
    server = DtlsServer(DtlsContext(args.cert, args.key, **options))  # type: ignore[arg-type]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    def on_event(event: object) -> None:
        if isinstance(event, ConnectionEstablished):
            engine = server.connection(event.address)
            assert engine is not None
            print(f"established resumed={engine.session_reused()}", flush=True)
        elif isinstance(event, DataReceived):
            server.send(event.address, event.data)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        print(f"ready {sock.getsockname()[1]}", flush=True)
        serve(server, sock, on_event, stop.is_set)


if __name__ == "__main__":
    main()
