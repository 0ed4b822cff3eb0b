"""Targets ``session`` and ``association``: the bytes a caller stores and hands back.

``session``: saved session bytes (``Dtls.session()``, or bare DER) offered by a
client: a ``ResumptionWarning`` and a full handshake, or the session offered;
never another exception, never an error left in OpenSSL's queue.

``association``: sealed association blobs (``Dtls.export_association()``)
imported: ``AssociationError``, or (only for the genuine blob) an engine that
continues the association with its peer.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

from .. import (AssociationError, Dtls, DtlsContext, ResumptionWarning, generate_certificate)
from .._ffi import lib
from . import Finding, register

__all__: list[str] = []

_KEY = bytes(range(32))


@lru_cache(maxsize=1)
def _contexts() -> tuple[DtlsContext, DtlsContext, str]:
    cert = generate_certificate("fuzz.server")
    server = DtlsContext(cert.cert_pem, cert.key_pem, association_keys=[_KEY])
    client = DtlsContext(association_keys=[_KEY])
    return server, client, cert.fingerprint()


def _pair() -> tuple[Dtls, Dtls]:
    server_ctx, client_ctx, pin = _contexts()
    client = Dtls(context=client_ctx, expected_peer_fingerprint=pin)
    server = Dtls(is_server=True, context=server_ctx)
    client.handshake()
    for _ in range(20):
        for src, dst in ((client, server), (server, client)):
            while (datagram := src.pull()) is not None:
                dst.feed(datagram)
        if client.is_handshake_finished() and server.is_handshake_finished():
            return client, server
        client.handshake()
        server.handshake()
    raise RuntimeError("the fuzz pair did not shake hands")


def _check_queue(what: str) -> None:
    if lib.ERR_peek_error() != 0:
        raise Finding(f"{what} left an error in OpenSSL's queue")


def _session_seeds() -> dict[str, bytes]:
    client, _ = _pair()
    session = client.session()
    assert session is not None
    bare = session[:session.rindex(b"\x00pydtls-session\x00")]
    flipped = bytearray(session)
    flipped[len(session) // 2] ^= 0x10
    return {"framed": session, "bare-der": bare, "truncated": session[:100], "empty": b"",
            "flipped": bytes(flipped)}


@register("session", "Dtls(session=...) with saved session bytes: a warning or an offer",
          seeds=_session_seeds, max_len=4096,
          instrument=("pydtls_ossl._resumption", "pydtls_ossl.engine"))
def session_target(data: bytes) -> None:
    _, client_ctx, pin = _contexts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResumptionWarning)
        try:
            engine = Dtls(context=client_ctx, expected_peer_fingerprint=pin, session=data)
        except Exception as exc:
            raise Finding(f"session= raised {type(exc).__name__}: {exc}") from exc
    _check_queue("session=")
    if engine.state.name != "NEW":
        raise Finding(f"a client with session= starts in {engine.state.name}")
    engine.handshake()  # the ClientHello goes out, with or without the session
    if engine.pull() is None:
        raise Finding("no ClientHello after session=")
    _check_queue("handshake() after session=")


@lru_cache(maxsize=1)
def _genuine() -> tuple[bytes, Any]:
    client, server = _pair()
    blob = server.export_association(b"fuzz")
    return blob, client


@lru_cache(maxsize=1)
def _genuine_blobs() -> frozenset[bytes]:
    """This process's export, and the recorded seed's (sealed under the same key)."""
    from ._runner import default_corpus
    recorded = set()
    corpus = default_corpus("association")
    if corpus.is_dir():
        recorded = {p.read_bytes() for p in corpus.iterdir() if p.name.startswith("genuine")}
    return frozenset(recorded | {_genuine()[0]})


def _association_seeds() -> dict[str, bytes]:
    blob, _ = _genuine()
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x01
    return {"genuine": blob, "truncated": blob[:40], "next-version": bytes([blob[0] + 1]) + blob[1:],
            "empty": b"", "flipped": bytes(flipped)}


@register("association", "Dtls.import_association() of sealed blobs: AssociationError or the real one",
          seeds=_association_seeds, max_len=4096,
          instrument=("pydtls_ossl.engine",))
def association_target(data: bytes) -> None:
    server_ctx, _, _ = _contexts()
    blob, _ = _genuine()
    try:
        engine = Dtls.import_association(data, context=server_ctx, binding=b"fuzz")
    except AssociationError:
        _check_queue("import_association()")
        return
    except Exception as exc:
        raise Finding(f"import_association raised {type(exc).__name__}: {exc}") from exc
    _check_queue("import_association()")
    if data not in _genuine_blobs():
        raise Finding("a blob that nobody exported was imported")
    if not engine.is_handshake_finished() or engine.cipher() is None:
        raise Finding("the imported engine is not established")
    engine.write(b"alive")
    if engine.pull() is None:
        raise Finding("the imported engine wrote nothing")
