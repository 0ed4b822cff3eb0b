"""Coverage libFuzzer cannot see: what the C code did.

atheris instruments Python only; the engine's work happens in C. Targets
report what they observed (a state reached, an alert sent, a resend) with
``feature(...)``; under atheris each distinct feature bumps one of a block
of reserved coverage counters, so an input that makes C behave in a new
way is kept in the corpus. Without atheris it does nothing.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["enable", "feature"]

_SIZE = 4096
_counters: list[int] = []
_trace: Callable[[int], None] | None = None


def enable(atheris: Any) -> None:
    """Reserve the counters (before ``atheris.Setup``)."""
    global _trace
    reserve = getattr(atheris, "_reserve_counter", None)
    trace = getattr(atheris, "_trace_branch", None)
    if reserve is None or trace is None:
        return  # another atheris: Python coverage only
    _counters[:] = [reserve() for _ in range(_SIZE)]
    _trace = trace


def feature(*key: object) -> None:
    if _trace is not None:
        _trace(_counters[hash(key) % _SIZE])
