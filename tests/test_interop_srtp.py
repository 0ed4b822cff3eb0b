"""DTLS-SRTP interop over real UDP on 127.0.0.1: OpenSSL's apps and GnuTLS, both roles."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from pydtls_ossl import Dtls, DtlsContext
from pydtls_ossl._pump import handshake, receive, send
from pydtls_ossl.srtp import SrtpProfile, split_srtp_keying_material

from .conftest import require_tool
from .interop import PeerProcess, accept_first, free_udp_port

pytestmark = pytest.mark.interop
LABEL = "EXTRACTOR-dtls_srtp"
# GnuTLS 3.7 (Debian 12) has no GCM SRTP profiles; those are checked against OpenSSL.
GNUTLS_NAMES = {
    SrtpProfile.AES128_CM_SHA1_80: "SRTP_AES128_CM_HMAC_SHA1_80",
    SrtpProfile.AES128_CM_SHA1_32: "SRTP_AES128_CM_HMAC_SHA1_32",
}


@pytest.fixture
def pem(tmp_path: Path, certs: Any) -> tuple[str, str]:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    certs.server.write(cert, key)
    return str(cert), str(key)


def check_keys(engine: Dtls, profile: SrtpProfile, peer_hex: str) -> None:
    """Our split of the peer's printed material equals our own srtp_keys()."""
    material = bytes.fromhex(peer_hex)
    assert material == engine.export_keys(LABEL, len(material))
    ours = engine.srtp_keys()
    theirs = split_srtp_keying_material(profile, material[:profile.keying_material_length],
                                        engine.is_server)
    assert ours == theirs


def our_client(port: int, profile: SrtpProfile, certs: Any) -> tuple[Dtls, socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    client = Dtls(context=DtlsContext(srtp_profiles=[profile]),
                  expected_peer_fingerprint=certs.server.fingerprint())
    handshake(client, sock)
    assert client.selected_srtp_profile() is profile
    return client, sock


def our_server(sock: socket.socket, profile: SrtpProfile, certs: Any) -> Dtls:
    server = Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                                                      srtp_profiles=[profile]))
    server.feed(accept_first(sock))
    handshake(server, sock)
    assert server.selected_srtp_profile() is profile
    return server


@pytest.mark.parametrize("profile", list(SrtpProfile))
def test_our_client_with_openssl_s_server(profile: SrtpProfile, pem: tuple[str, str],
                                          certs: Any) -> None:
    openssl = require_tool("openssl")
    port = free_udp_port()
    with PeerProcess([openssl, "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}",
                      "-cert", pem[0], "-key", pem[1], "-use_srtp", profile.openssl_name,
                      "-keymatexport", LABEL, "-keymatexportlen", "60"]) as peer:
        peer.wait_for("ACCEPT")
        client, sock = our_client(port, profile, certs)
        with sock:
            peer.wait_for(f"SRTP Extension negotiated, profile={profile.openssl_name}")
            material = peer.wait_for(r"Keying material: ([0-9A-F]+)").group(1)
            assert client.export_keys(LABEL, 60).hex().upper() == material
            if profile.keying_material_length <= 60:
                check_keys(client, profile, material)
            send(client, sock, b"srtp ok\n")
            peer.wait_for("srtp ok")


@pytest.mark.parametrize("profile", list(SrtpProfile))
def test_openssl_s_client_with_our_server(profile: SrtpProfile, certs: Any) -> None:
    openssl = require_tool("openssl")
    length = profile.keying_material_length
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with PeerProcess([openssl, "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
                          "-use_srtp", profile.openssl_name, "-keymatexport", LABEL,
                          "-keymatexportlen", str(length)]) as peer:
            server = our_server(sock, profile, certs)
            peer.wait_for(f"SRTP Extension negotiated, profile={profile.openssl_name}")
            check_keys(server, profile, peer.wait_for(r"Keying material: ([0-9A-F]+)").group(1))
            peer.send_line("from s_client")
            assert receive(server, sock) == b"from s_client\n"


@pytest.mark.parametrize("profile", list(GNUTLS_NAMES))
def test_our_client_with_gnutls_serv(profile: SrtpProfile, pem: tuple[str, str],
                                     certs: Any) -> None:
    gnutls_serv = require_tool("gnutls-serv")
    port = free_udp_port()
    with PeerProcess([gnutls_serv, "--udp", "--echo", "-p", str(port),
                      "--x509certfile", pem[0], "--x509keyfile", pem[1],
                      f"--srtp-profiles={GNUTLS_NAMES[profile]}"]) as peer:
        peer.wait_for("listening on IPv4")
        client, sock = our_client(port, profile, certs)  # gnutls-serv demands a cookie round
        with sock:
            for i in range(5):
                send(client, sock, b"echo %d" % i)
                assert receive(client, sock) == b"echo %d" % i
            assert len(client.srtp_keys().local_master) == profile.key_length + profile.salt_length


@pytest.mark.parametrize("profile", list(GNUTLS_NAMES))
def test_gnutls_cli_with_our_server(profile: SrtpProfile, certs: Any) -> None:
    gnutls_cli = require_tool("gnutls-cli")
    length = profile.keying_material_length
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with PeerProcess([gnutls_cli, "--udp", "-p", str(port), "127.0.0.1", "--insecure",
                          f"--srtp-profiles={GNUTLS_NAMES[profile]}",
                          f"--keymatexport={LABEL}", f"--keymatexportsize={length}"]) as peer:
            server = our_server(sock, profile, certs)
            peer.wait_for(f"SRTP profile: {GNUTLS_NAMES[profile]}")
            check_keys(server, profile, peer.wait_for(r"Key material: ([0-9a-fA-F]+)").group(1))
            peer.send_line("from gnutls")
            assert receive(server, sock) == b"from gnutls\n"
            send(server, sock, b"from pydtls_ossl\n")
            peer.wait_for("from pydtls_ossl")
