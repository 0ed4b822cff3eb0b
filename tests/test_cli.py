"""The command line, in-process and once through ``python -m``."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from pydtls_ossl import certificate_fingerprint
from pydtls_ossl.cli import main


def test_demo_in_process() -> None:
    out = io.StringIO()
    assert main(["demo"], out=out) == 0
    text = out.getvalue()
    assert "DTLSv1.2" in text and "ECDHE-ECDSA-AES128-GCM-SHA256" in text
    client = [line for line in text.splitlines() if line.startswith("EXTRACTOR-dtls_srtp client")]
    server = [line for line in text.splitlines() if line.startswith("EXTRACTOR-dtls_srtp server")]
    assert client and server and client[0].split()[-1] == server[0].split()[-1]
    assert len(bytes.fromhex(client[0].split()[-1])) == 60
    assert text.count("ok:") == 3 and "identical" in text


def test_demo_via_python_m() -> None:
    done = subprocess.run([sys.executable, "-m", "pydtls_ossl", "demo"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "keying material identical on both sides" in done.stdout


def test_certificate_command(tmp_path: Path) -> None:
    out = io.StringIO()
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert main(["certificate", "--cert", str(cert), "--key", str(key), "--key-type", "rsa"],
                out=out) == 0
    assert certificate_fingerprint(cert) in out.getvalue()
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_failure_is_one_line_and_nonzero(tmp_path: Path, capsys: object) -> None:
    target = tmp_path / "missing-dir" / "c.pem"
    assert main(["certificate", "--cert", str(target), "--key", str(tmp_path / "k.pem")]) == 1
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("pydtls_ossl: ") and err.count("\n") == 1
