"""DTLS-SRTP: profile negotiation and the RFC 5764 §4.2 key split."""

from __future__ import annotations

from typing import Any

import pytest

from pydtls_ossl import ConnectionClosed, Dtls, DtlsContext, HandshakeError
from pydtls_ossl.srtp import SrtpProfile, split_srtp_keying_material

from .helpers import Pair
from .test_verification import run_to_failure


def srtp_pair(certs: Any, client: list[Any] | None, server: list[Any] | None,
              **server_kw: Any) -> Pair:
    return Pair(Dtls(context=DtlsContext(verify="none", srtp_profiles=client)),
                Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem,
                                                         srtp_profiles=server, **server_kw)))


def test_hand_checked_split_vector() -> None:
    keys = split_srtp_keying_material(SrtpProfile.AES128_CM_SHA1_80, bytes(range(60)), is_server=False)
    assert keys.client_key == bytes(range(0x00, 0x10))
    assert keys.server_key == bytes(range(0x10, 0x20))
    assert keys.client_salt == bytes(range(0x20, 0x2E))
    assert keys.server_salt == bytes(range(0x2E, 0x3C))
    assert keys.local_master == bytes(range(0x00, 0x10)) + bytes(range(0x20, 0x2E))
    assert keys.remote_master == bytes(range(0x10, 0x20)) + bytes(range(0x2E, 0x3C))
    gcm = split_srtp_keying_material(SrtpProfile.AEAD_AES_256_GCM, bytes(range(88)), is_server=True)
    assert gcm.client_key == bytes(range(0, 32)) and gcm.server_key == bytes(range(32, 64))
    assert gcm.client_salt == bytes(range(64, 76)) and gcm.server_salt == bytes(range(76, 88))
    assert gcm.local_key == gcm.server_key and gcm.remote_salt == gcm.client_salt
    assert "key" not in repr(gcm).lower().replace("srtpkeys", "")
    with pytest.raises(ValueError, match="needs 60 bytes"):
        split_srtp_keying_material(SrtpProfile.AES128_CM_SHA1_32, bytes(59), False)


def test_profile_names_and_lengths() -> None:
    assert SrtpProfile.parse("SRTP_AES128_CM_HMAC_SHA1_80") is SrtpProfile.AES128_CM_SHA1_80
    assert SrtpProfile.parse("srtp_aead_aes_128_gcm") is SrtpProfile.AEAD_AES_128_GCM
    assert SrtpProfile.parse(8) is SrtpProfile.AEAD_AES_256_GCM
    assert [p.keying_material_length for p in SrtpProfile] == [60, 60, 56, 88]
    with pytest.raises(ValueError, match="unknown SRTP profile"):
        SrtpProfile.parse("SRTP_NULL_SHA1_80")


@pytest.mark.parametrize("profile", list(SrtpProfile))
def test_each_profile_negotiates_and_keys_mirror(certs: Any, profile: SrtpProfile) -> None:
    p = srtp_pair(certs, [profile], [profile])
    p.handshake()
    assert p.client.selected_srtp_profile() is profile is p.server.selected_srtp_profile()
    client_keys, server_keys = p.client.srtp_keys(), p.server.srtp_keys()
    assert len(client_keys.local_key) == profile.key_length
    assert len(client_keys.local_salt) == profile.salt_length
    assert client_keys.local_master == server_keys.remote_master
    assert client_keys.remote_master == server_keys.local_master
    assert client_keys.local_master != client_keys.remote_master
    material = p.client.export_keys("EXTRACTOR-dtls_srtp", profile.keying_material_length)
    k, s = profile.key_length, profile.salt_length
    assert client_keys.client_key == material[:k]
    assert client_keys.server_salt == material[2 * k + s:]


def test_server_preference_wins(certs: Any) -> None:
    p = srtp_pair(certs, ["SRTP_AES128_CM_SHA1_32", "SRTP_AEAD_AES_128_GCM"],
                  ["SRTP_AEAD_AES_128_GCM", "SRTP_AES128_CM_SHA1_32"])
    p.handshake()
    assert p.client.selected_srtp_profile() is SrtpProfile.AEAD_AES_128_GCM


def test_no_overlap_fails_on_required_server_inside_handshake(certs: Any) -> None:
    p = srtp_pair(certs, ["SRTP_AES128_CM_SHA1_32"], ["SRTP_AES128_CM_SHA1_80"])
    client_error, server_error = run_to_failure(p)
    assert isinstance(server_error, HandshakeError) and "SRTP" in str(server_error)
    assert isinstance(client_error, HandshakeError)
    assert client_error.alert is not None and client_error.alert.name == "handshake_failure"


def test_client_without_srtp_refused_by_required_server(certs: Any) -> None:
    client_error, server_error = run_to_failure(srtp_pair(certs, None, ["SRTP_AES128_CM_SHA1_80"]))
    assert isinstance(server_error, HandshakeError) and "SRTP" in str(server_error)
    assert isinstance(client_error, HandshakeError)


def test_required_client_refuses_server_without_srtp(certs: Any) -> None:
    client_error, server_error = run_to_failure(srtp_pair(certs, ["SRTP_AES128_CM_SHA1_80"], None))
    assert isinstance(client_error, HandshakeError) and "SRTP" in str(client_error)
    assert isinstance(server_error, ConnectionClosed), "the client tells the server it is leaving"


def test_optional_srtp_may_end_without_a_profile(certs: Any) -> None:
    p = Pair(Dtls(context=DtlsContext(verify="none", srtp_profiles=["SRTP_AES128_CM_SHA1_80"],
                                      srtp_required=False)),
             Dtls(is_server=True, context=DtlsContext(certs.server.cert_pem, certs.server.key_pem)))
    p.handshake()
    assert p.client.selected_srtp_profile() is None
    with pytest.raises(ValueError, match="no DTLS-SRTP profile"):
        p.client.srtp_keys()


def test_empty_profile_list_is_refused() -> None:
    with pytest.raises(ValueError):
        DtlsContext(verify="none", srtp_profiles=[])
