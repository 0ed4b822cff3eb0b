"""Connection ID settings (RFC 9146): which CID each new association asks its peer to use.

A context's ``connection_id=`` is one of: ``None``/``False`` (no extension),
``True`` (random CIDs of ``connection_id_length`` bytes, 8 by default), a
``bytes`` value (every association asks for exactly that CID; ``b""`` means
"I send yours, do not send me one"), or a function returning the bytes for
each new association (a cluster can embed a node id). Server cores route by
CID, so theirs must all have one length.
"""

from __future__ import annotations

import os
from typing import Callable, Union

from ._errors import ConfigurationError

ConnectionIdSpec = Union[bytes, bool, Callable[[], bytes], None]

MAX_CID = 255
DEFAULT_CID_LENGTH = 8


class ConnectionIds:
    """Makes the CID of each association of one context."""

    __slots__ = ("_fixed", "_make", "length", "padding")

    def __init__(self, spec: ConnectionIdSpec, length: int | None, padding: int) -> None:
        if length is not None and (not isinstance(length, int) or not 0 <= length <= MAX_CID):
            raise ValueError(f"connection_id_length is 0 to {MAX_CID} bytes, got {length!r}")
        if not isinstance(padding, int) or not 0 <= padding <= 256:
            raise ValueError(f"record_padding is 0 (none) to 256 bytes, got {padding!r}")
        self.padding = padding
        self._fixed: bytes | None = None
        self._make: Callable[[], bytes] | None = None
        self.length: int | None = length
        if spec is True or (spec is None and length is not None):
            n = DEFAULT_CID_LENGTH if length is None else length
            self.length = n
            self._make = lambda: os.urandom(n)
        elif isinstance(spec, (bytes, bytearray, memoryview)):
            fixed = bytes(spec)
            if len(fixed) > MAX_CID:
                raise ValueError(f"a connection ID is at most {MAX_CID} bytes, got {len(fixed)}")
            if length is not None and length != len(fixed):
                raise ValueError("connection_id_length does not match the connection_id given")
            self._fixed = fixed
            self.length = len(fixed)
        elif callable(spec):
            self._make = spec
        else:
            raise TypeError("connection_id must be None, True, bytes, or a function returning bytes")

    @property
    def generated(self) -> bool:
        """Whether each association gets its own CID (a server core needs that to route)."""
        return self._make is not None

    def new(self) -> bytes:
        """The CID for a new association."""
        if self._fixed is not None:
            return self._fixed
        assert self._make is not None
        cid = self._make()
        if not isinstance(cid, (bytes, bytearray)) or len(cid) > MAX_CID:
            raise ConfigurationError(f"connection_id function must return at most {MAX_CID} bytes")
        cid = bytes(cid)
        if self.length is None:
            self.length = len(cid)
        elif len(cid) != self.length:
            raise ConfigurationError(
                f"connection_id function returned {len(cid)} bytes after {self.length}: "
                "a server routes by CID, so every CID of a context has one length")
        return cid


def connection_ids(spec: ConnectionIdSpec, length: int | None, padding: int) -> ConnectionIds | None:
    """The context's CID settings, or None when it does not negotiate CIDs."""
    if spec is False or (spec is None and length is None):
        if padding:
            raise ValueError("record_padding pads Connection ID records: it needs connection_id=")
        return None
    return ConnectionIds(spec, length, padding)
