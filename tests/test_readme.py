"""The README's tour is code a user will paste: run it."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_tour_runs(capsys: object) -> None:
    tour = python_blocks()[0]
    assert "export_keys" in tour
    exec(compile(tour, "README.md", "exec"), {})
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "DTLSv1.2" in out


def test_readme_starts_with_the_two_commands() -> None:
    commands = re.findall(r"```\n(.*?)\n```", README.read_text(), flags=re.S)[:2]
    assert commands[0].endswith("python -m pydtls_ossl demo")
    assert "pytest" in commands[1]


def test_readme_webrtc_snippet_runs() -> None:
    webrtc = python_blocks()[2]
    assert "srtp_keys" in webrtc and "classify" in webrtc
    namespace: dict[str, object] = {}
    exec(compile(webrtc, "README.md", "exec"), namespace)
    on_datagram = namespace["on_datagram"]
    for datagram in (b"\x00\x01" + bytes(18), b"\x80\x60" + bytes(10), b"\x16\xfe\xff" + bytes(10)):
        on_datagram(datagram)  # type: ignore[operator]


def test_readme_psk_snippet_runs() -> None:
    from .helpers import Pair
    psk = python_blocks()[3]
    assert "psk_keys" in psk
    namespace: dict[str, object] = {}
    exec(compile(psk, "README.md", "exec"), namespace)
    pair = Pair(namespace["sensor"], namespace["gateway"])  # type: ignore[arg-type]
    pair.handshake()
    assert pair.server.psk_identity() == "sensor-0042"
