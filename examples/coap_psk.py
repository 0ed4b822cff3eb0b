"""A CoAP-shaped exchange over DTLS with a pre-shared key (RFC 7252 §9).

A gateway (a ``DtlsListener``, one UDP socket on 127.0.0.1) and a sensor (a
blocking DTLS socket) authenticate with a PSK and use TLS_PSK_WITH_AES_128_CCM_8,
CoAP's mandatory-to-implement suite. Each request is a 4-byte CoAP header
(confirmable GET, message ID) and a payload; each answer an ACK with 2.05
Content.

    python examples/coap_psk.py
"""

from __future__ import annotations

import socket
import struct
import threading

from pydtls_ossl import DtlsContext

IDENTITY = "sensor-0042"
KEY = bytes.fromhex("5e9c2f1a7b3d4c8e6f0a1b2c3d4e5f60")
SUITE = "PSK-AES128-CCM8"
READINGS = {"temperature": b"21.5 C", "humidity": b"48 %", "battery": b"3.02 V"}


def coap_request(message_id: int, path: str) -> bytes:
    """Version 1, confirmable, no token; code 0.01 GET; the path as payload."""
    return struct.pack("!BBH", 0x40, 0x01, message_id) + path.encode()


def coap_response(request: bytes) -> bytes:
    """Version 1, acknowledgement; code 2.05 Content; same message ID."""
    _, _, message_id = struct.unpack("!BBH", request[:4])
    body = READINGS.get(request[4:].decode(errors="replace"), b"?")
    return struct.pack("!BBH", 0x60, 0x45, message_id) + b"\xff" + body


def serve_gateway(context: DtlsContext, ready: threading.Event, address: list[object]) -> None:
    """The gateway: a DTLS listener answering every CoAP request of one sensor."""
    with context.listen(("127.0.0.1", 0)) as listener:
        address.append(listener.address)
        ready.set()
        connection = listener.accept(timeout=10)
        print(f"gateway: {connection.engine.psk_identity()} joined from port {connection.address[1]}")
        for _ in READINGS:
            connection.send(coap_response(connection.recv()))


def main() -> int:
    gateway_ctx = DtlsContext(psk_keys={IDENTITY: KEY}, psk_identity_hint="gateway", ciphers=SUITE)
    ready, address = threading.Event(), []
    gateway = threading.Thread(target=serve_gateway, args=(gateway_ctx, ready, address))
    gateway.start()
    ready.wait(10)
    sensor_ctx = DtlsContext(psk=(IDENTITY, KEY), ciphers=SUITE)
    ok = True
    with sensor_ctx.wrap_socket(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sensor:
        sensor.settimeout(10)
        sensor.connect(address[0])
        print(f"sensor: {sensor.cipher()[0]} with PSK identity {sensor.engine.psk_identity()}")
        for message_id, path in enumerate(READINGS, start=0x1200):
            sensor.send(coap_request(message_id, path))
            answer = sensor.recv()
            version_type, code, answered_id = struct.unpack("!BBH", answer[:4])
            good = (version_type, code, answered_id) == (0x60, 0x45, message_id)
            ok &= good and answer[5:] == READINGS[path]
            print(f"sensor: GET {path} -> 2.05 {answer[5:].decode()} "
                  f"(mid 0x{answered_id:04x}{'' if good else ' MISMATCH'})")
    gateway.join(10)
    print("all readings received" if ok else "EXCHANGE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
