"""The compiled binding, its version check, and checked-call helpers.

Every OpenSSL failure goes through ``drain_errors`` so the thread's error
queue is empty again when a public call returns or raises.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ._errors import DtlsError
from ._openssl import ffi, lib

__all__ = ["ffi", "lib", "drain_errors", "check", "check_ptr", "openssl_version"]

_E = TypeVar("_E", bound=DtlsError)


def _major_minor(number: int) -> tuple[int, int]:
    return number >> 28, (number >> 20) & 0xFF


if _major_minor(lib.OpenSSL_version_num()) != _major_minor(lib.OPENSSL_VERSION_NUMBER):
    raise ImportError(
        "pydtls_ossl._openssl was built against OpenSSL "
        f"{_major_minor(lib.OPENSSL_VERSION_NUMBER)} but "
        f"{ffi.string(lib.OpenSSL_version(lib.OPENSSL_VERSION)).decode()} is loaded;"
        " rebuild with `pip install --force-reinstall --no-binary :all: .`"
    )

if not lib.pd_init():
    raise ImportError("pydtls_ossl: OpenSSL refused to register the datagram BIO")


def openssl_version() -> str:
    """The version text of the libssl this process runs, e.g. 'OpenSSL 3.0.19 ...'."""
    return str(ffi.string(lib.OpenSSL_version(lib.OPENSSL_VERSION)).decode())


def drain_errors() -> tuple[str, ...]:
    """Empty the thread's OpenSSL error queue into readable reasons."""
    reasons: list[str] = []
    data = ffi.new("const char **")
    flags = ffi.new("int *")
    buf = ffi.new("char[256]")
    while True:
        code = lib.ERR_get_error_all(ffi.NULL, ffi.NULL, ffi.NULL, data, flags)
        if code == 0:
            return tuple(reasons)
        lib.ERR_error_string_n(code, buf, len(buf))
        text = ffi.string(buf).decode(errors="replace")
        if flags[0] & lib.ERR_TXT_STRING and data[0] != ffi.NULL:
            extra = ffi.string(data[0]).decode(errors="replace")
            if extra:
                text = f"{text}: {extra}"
        reasons.append(text)


def check(result: int, error: type[_E], message: str) -> int:
    """Return ``result`` if it is positive, else raise ``error`` with the queue."""
    if result <= 0:
        raise error(message, drain_errors())
    return result


def check_ptr(ptr: Any, error: type[_E], message: str) -> Any:
    """Return ``ptr`` if it is not NULL, else raise ``error`` with the queue."""
    if ptr == ffi.NULL:
        raise error(message, drain_errors())
    return ptr
