"""Sealed export and import of established associations (the engine's record layer)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

from pydtls_ossl import (AssociationError, ConfigurationError, ConnectionClosed, Dtls, DtlsContext,
                         SrtpProfile)

from .helpers import Pair, drain

KEY, OLD_KEY = bytes(range(32)), bytes(range(32, 64))
PSK = ("sensor-17", bytes(range(16)))
CERT_SUITES = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
               "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-CCM8",
               "ECDHE-ECDSA-AES256-CCM"]
PSK_SUITES = ["PSK-AES128-CCM8", "PSK-AES128-GCM-SHA256", "PSK-CHACHA20-POLY1305"]


def cert_pair(certs: Any, suite: str, keys: Any = (KEY,), **options: Any) -> Pair:
    server_ctx = DtlsContext(certs.server.cert_pem, certs.server.key_pem, ciphers=suite,
                             association_keys=list(keys), **options)
    client_ctx = DtlsContext(certs.client.cert_pem, certs.client.key_pem, ciphers=suite,
                             association_keys=list(keys), **options)
    pair = Pair(Dtls(context=client_ctx, expected_peer_fingerprint=certs.server.fingerprint()),
                Dtls(is_server=True, context=server_ctx,
                     expected_peer_fingerprint=certs.client.fingerprint()))
    pair.handshake()
    return pair


def psk_pair(suite: str) -> Pair:
    pair = Pair(Dtls(context=DtlsContext(psk=PSK, ciphers=suite, association_keys=[KEY])),
                Dtls(is_server=True, context=DtlsContext(psk_keys={PSK[0]: PSK[1]}, ciphers=suite,
                                                         association_keys=[KEY])))
    pair.handshake()
    return pair


def snapshot(engine: Dtls) -> dict[str, Any]:
    info = {"cipher": engine.cipher(), "version": engine.version(),
            "srtp": engine.selected_srtp_profile(), "alpn": engine.selected_alpn_protocol(),
            "psk": engine.psk_identity(), "fingerprint": engine.get_peer_fingerprint(),
            "keys": engine.export_keys("EXPERIMENTAL-moved", 48),
            "keys_ctx": engine.export_keys("EXPERIMENTAL-moved", 48, b"c"),
            "max": engine.max_write_size, "server": engine.is_server}
    if info["srtp"] is not None:
        info["srtp_keys"] = engine.srtp_keys()
    return info


def move(pair: Pair, side: str, binding: bytes = b"") -> tuple[bytes, Dtls]:
    old = getattr(pair, side)
    before = snapshot(old)
    blob = old.export_association(binding)
    new = Dtls.import_association(blob, context=old.context, binding=binding)
    assert snapshot(new) == before
    setattr(pair, side, new)
    return blob, new


@pytest.mark.parametrize("suite", CERT_SUITES)
@pytest.mark.parametrize("side", ["client", "server"])
def test_round_trip_certificate_suites(certs: Any, suite: str, side: str) -> None:
    pair = cert_pair(certs, suite)
    for i in range(3):
        assert pair.roundtrip(b"before %d" % i) == b"before %d" % i
        assert pair.roundtrip(b"back %d" % i, "server") == b"back %d" % i
    blob, new = move(pair, side)
    assert new.state.name == "ESTABLISHED" and new.record_layer == "engine"
    for i in range(3):  # the peer notices nothing: same keys, sequence numbers go on
        assert pair.roundtrip(b"after %d" % i) == b"after %d" % i
        assert pair.roundtrip(b"reply %d" % i, "server") == b"reply %d" % i
    assert len(blob) <= 256, f"{suite}: {len(blob)} bytes sealed"


@pytest.mark.parametrize("suite", PSK_SUITES)
def test_round_trip_psk_suites_and_size(suite: str) -> None:
    pair = psk_pair(suite)
    blob, new = move(pair, "server", binding=b"device 17")
    assert new.psk_identity() == PSK[0]
    assert pair.roundtrip(b"\x40\x01after") == b"\x40\x01after"
    assert pair.roundtrip(b"\x60\x45ack", "server") == b"\x60\x45ack"
    assert len(blob) <= 256


def test_srtp_alpn_and_close_survive(certs: Any) -> None:
    pair = cert_pair(certs, "ECDHE-ECDSA-AES128-GCM-SHA256",
                     srtp_profiles=[SrtpProfile.AEAD_AES_128_GCM], alpn_protocols=["webrtc"])
    blob, new = move(pair, "client")
    assert new.selected_srtp_profile() is SrtpProfile.AEAD_AES_128_GCM
    assert new.srtp_keys().local_master == pair.server.srtp_keys().remote_master
    new.close()
    for datagram in drain(new):
        pair.server.feed(datagram)
    assert pair.server.state.name == "PEER_CLOSED"


def test_exported_engine_raises_on_every_call(certs: Any) -> None:
    pair = cert_pair(certs, "ECDHE-ECDSA-AES128-GCM-SHA256")
    pair.client.export_association()
    assert pair.client.state.name == "EXPORTED"
    for call in (lambda: pair.client.write(b"x"), pair.client.read, pair.client.pull,
                 pair.client.handshake, lambda: pair.client.feed(b"\x17" * 40),
                 lambda: pair.client.export_keys("EXPERIMENTAL-x", 8),
                 pair.client.export_association):
        with pytest.raises(ConnectionClosed, match="exported"):
            call()
    pair.client.close()  # idempotent, sends nothing
    assert pair.server.state.name == "ESTABLISHED"


def test_what_cannot_be_exported(certs: Any) -> None:
    no_keys = Pair(Dtls(context=DtlsContext(verify="none")),
                   Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem,
                                                            certs.server.key_pem)))
    no_keys.handshake()
    with pytest.raises(ConfigurationError, match="association_keys"):
        no_keys.client.export_association()
    with pytest.raises(ConfigurationError):
        Dtls.import_association(b"x" * 100, context=DtlsContext(verify="none"))
    libssl = cert_pair(certs, "ECDHE-ECDSA-AES128-GCM-SHA256", record_layer="openssl")
    with pytest.raises(ValueError, match="libssl's record layer"):
        libssl.client.export_association()
    fresh = Dtls(context=DtlsContext(verify="none", association_keys=[KEY]))
    fresh.handshake()
    with pytest.raises(ValueError, match="established"):
        fresh.export_association()
    pair = cert_pair(certs, "ECDHE-ECDSA-AES128-GCM-SHA256")
    pair.client.write(b"queued")
    with pytest.raises(ValueError, match="pull"):
        pair.client.export_association()
    drain(pair.client)
    assert pair.client.export_association()  # once drained
    with pytest.raises(ValueError):
        DtlsContext(verify="none", association_keys=[b"short"])
    with pytest.raises(TypeError):
        DtlsContext(verify="none", association_keys=KEY)  # type: ignore[arg-type]


def test_every_bit_flip_and_truncation_is_refused(certs: Any) -> None:
    pair = cert_pair(certs, "ECDHE-ECDSA-AES128-GCM-SHA256")
    blob = pair.server.export_association(b"peer-a")
    ctx = pair.server.context
    for cut in range(len(blob)):
        with pytest.raises(AssociationError):
            Dtls.import_association(blob[:cut], context=ctx, binding=b"peer-a")
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AssociationError):
            Dtls.import_association(bytes(flipped), context=ctx, binding=b"peer-a")
    with pytest.raises(AssociationError, match="binding"):
        Dtls.import_association(blob, context=ctx, binding=b"peer-b")
    with pytest.raises(AssociationError, match="binding"):
        Dtls.import_association(blob, context=DtlsContext(
            certs.server.cert_pem, certs.server.key_pem, association_keys=[KEY],
            ciphers="ECDHE-ECDSA-CHACHA20-POLY1305"), binding=b"peer-a")
    with pytest.raises(AssociationError, match="version"):
        Dtls.import_association(bytes([blob[0] + 1]) + blob[1:], context=ctx, binding=b"peer-a")
    assert Dtls.import_association(blob, context=ctx, binding=b"peer-a").is_handshake_finished()


def test_key_rotation(certs: Any) -> None:
    pair = cert_pair(certs, "ECDHE-ECDSA-AES128-GCM-SHA256", keys=[OLD_KEY])
    blob = pair.server.export_association()
    suite = dict(ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    rotated = DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                          association_keys=[KEY, OLD_KEY], **suite)
    imported = Dtls.import_association(blob, context=rotated)  # the old key still opens
    pair.server = imported
    assert pair.roundtrip(b"rotated") == b"rotated"
    resealed = imported.export_association()  # sealed under the new first key
    removed = DtlsContext(certs.server.cert_pem, certs.server.key_pem, association_keys=[KEY],
                          **suite)
    with pytest.raises(AssociationError, match="key id"):
        Dtls.import_association(blob, context=removed)
    pair.server = Dtls.import_association(resealed, context=removed)
    assert pair.roundtrip(b"new key") == b"new key"


def test_stale_snapshot_never_reuses_a_sequence_number(certs: Any) -> None:
    pair = cert_pair(certs, "ECDHE-ECDSA-AES128-GCM-SHA256")
    blob = pair.server.export_association()
    live = Dtls.import_association(blob, context=pair.server.context)
    used: set[bytes] = set()
    pair.server = live
    for i in range(100):  # the live side talks on after the snapshot, then "crashes"
        live.write(b"live %d" % i)
        (datagram,) = drain(live)
        used.add(datagram[3:11])  # epoch and sequence number (GCM's explicit nonce too)
        pair.client.feed(datagram)
        assert pair.client.read() == b"live %d" % i
    stale = Dtls.import_association(blob, context=pair.server.context)  # the old blob again
    pair.server = stale
    for i in range(20):
        stale.write(b"stale %d" % i)
        (datagram,) = drain(stale)
        assert datagram[3:11] not in used, "a sequence number (and nonce) used twice"
        pair.client.feed(datagram)
        assert pair.client.read() == b"stale %d" % i, "the peer accepts the imported side"
    assert pair.roundtrip(b"client to stale") == b"client to stale"


def test_import_in_a_fresh_process(certs: Any, tmp_path: Any) -> None:
    """The blob crosses a process boundary; the peer stays in this process."""
    pair = cert_pair(certs, "ECDHE-ECDSA-CHACHA20-POLY1305")
    blob = pair.server.export_association(b"here")
    pair.client.write(b"to the new process")
    (request,) = drain(pair.client)
    (tmp_path / "state").write_bytes(blob)
    (tmp_path / "request").write_bytes(request)
    (tmp_path / "cert.pem").write_bytes(certs.server.cert_pem)
    (tmp_path / "key.pem").write_bytes(certs.server.key_pem)
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pydtls_ossl import Dtls, DtlsContext
        d = Path({str(tmp_path)!r})
        ctx = DtlsContext(d / "cert.pem", d / "key.pem", ciphers="ECDHE-ECDSA-CHACHA20-POLY1305",
                          association_keys=[bytes(range(32))])
        engine = Dtls.import_association((d / "state").read_bytes(), context=ctx, binding=b"here")
        engine.feed((d / "request").read_bytes())
        engine.write(b"answer: " + engine.read())
        (d / "reply").write_bytes(engine.pull())
        print(engine.export_keys("EXPERIMENTAL-moved", 16).hex())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == pair.client.export_keys("EXPERIMENTAL-moved", 16).hex()
    pair.client.feed((tmp_path / "reply").read_bytes())
    assert pair.client.read() == b"answer: to the new process"


def test_blob_is_sealed_not_plain() -> None:
    pair = psk_pair("PSK-AES128-GCM-SHA256")
    blob = pair.server.export_association()
    assert PSK[0].encode() not in blob  # the plaintext carries the identity; the blob must not
    again = psk_pair("PSK-AES128-GCM-SHA256").server.export_association()
    assert blob[6:18] != again[6:18], "a fresh nonce per seal"
