"""A ``DtlsServer``'s parked peers: quiet established associations held in C
(``csrc/lot.c``) with no Python objects, by address and by Connection ID.

The lot owns what it holds: an association on the engine's record layer is
sealed (exported under the lot's own random key, the ``pd_conn`` freed) and
imported again when it is taken; any other is kept as its ``pd_conn``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

from ._ffi import ffi, lib

if TYPE_CHECKING:
    from .context import DtlsContext

_take = lib.pd_lot_take


def lot_key(address: Any) -> bytes | None:
    """A socket address as the lot's key; None for one it cannot hold (not an IP tuple)."""
    if type(address) is tuple and len(address) in (2, 4) and type(address[0]) is str \
            and all(type(part) is int for part in address[1:]):
        return (f"{len(address)}{address[0]}|" + "|".join(map(str, address[1:]))).encode()
    return None


def lot_address(key: bytes) -> Any:
    """The address ``lot_key()`` made ``key`` of."""
    text = key.decode()
    host, *rest = text[1:].rsplit("|", int(text[0]) - 1)
    return (host, *map(int, rest))


class Taken(NamedTuple):
    """What came out of the lot. ``conn`` is None when the entry went but its
    sealed association did not import again (memory ran out)."""

    conn: Any
    address: Any
    last_seen: float
    mem: int


def _free(context: DtlsContext, lot: Any) -> None:
    del context  # held until now: the parked engines' SSL_CTX (and session cache) outlives them
    lib.pd_lot_free(lot)


class ParkingLot:
    """Parked peers by address (and CID), oldest first; ``len()`` of them."""

    __slots__ = ("_lot", "_count", "_key", "_key_len", "_seen", "_mem")

    def __init__(self, context: DtlsContext) -> None:
        lot = lib.pd_lot_new(context.ssl_ctx, context.initial_rto_us, context.max_rto_us)
        if lot == ffi.NULL:
            raise MemoryError("cannot allocate a parking lot")
        self._lot = ffi.gc(lot, functools.partial(_free, context))
        self._count = 0
        self._key = ffi.new("unsigned char[]", lib.PD_LOT_KEY_MAX)
        self._key_len = ffi.new("size_t *")
        self._seen = ffi.new("double *")
        self._mem = ffi.new("long long *")

    def __len__(self) -> int:
        return self._count

    def __contains__(self, address: Any) -> bool:
        key = lot_key(address) if self._count else None
        return key is not None and bool(lib.pd_lot_has(self._lot, key, len(key)))

    def park(self, address: Any, cid: bytes | None, conn: Any, last_seen: float) -> int:
        """Take ``conn`` over (the caller must disown it): the bytes it is counted as
        now, or 0 when it was not taken (the caller keeps it, unless the export
        succeeded and memory then ran out, which leaves it failed)."""
        key = lot_key(address)
        if key is None:
            return 0
        alt = cid or b""
        mem = int(lib.pd_lot_put(self._lot, key, len(key), alt, len(alt), conn, last_seen))
        self._count += mem > 0
        return mem

    def take(self, address: Any) -> Taken | None:
        """The peer parked at ``address``, out of the lot (None: none there)."""
        key = lot_key(address) if self._count else None
        if key is None:
            return None
        conn = _take(self._lot, 0, key, len(key), ffi.NULL, ffi.NULL, self._seen, self._mem)
        return self._taken(conn, address)

    def take_cid(self, cid: bytes) -> Taken | None:
        """The peer parked with Connection ID ``cid`` (None: none)."""
        if not self._count or not cid:
            return None
        conn = _take(self._lot, 1, cid, len(cid), self._key, self._key_len, self._seen, self._mem)
        return self._taken(conn, None)

    def take_oldest(self, until: float) -> Taken | None:
        """The peer heard from longest ago, if last seen at or before ``until``."""
        if not self._count:
            return None
        conn = lib.pd_lot_take_oldest(self._lot, until, self._key, self._key_len,
                                      self._seen, self._mem)
        return self._taken(conn, None)

    def oldest_seen(self) -> float | None:
        return float(lib.pd_lot_oldest_seen(self._lot)) if self._count else None

    def _taken(self, conn: Any, address: Any) -> Taken | None:
        found = conn != ffi.NULL
        if not found and lib.pd_lot_count(self._lot) == self._count:
            return None
        self._count -= 1
        if address is None:
            address = lot_address(ffi.buffer(self._key, self._key_len[0])[:])
        return Taken(conn if found else None, address, float(self._seen[0]), int(self._mem[0]))
