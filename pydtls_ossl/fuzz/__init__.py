"""Fuzz targets for pydtls_ossl, run under atheris (libFuzzer).

``python -m pydtls_ossl.fuzz --list`` names the targets;
``python -m pydtls_ossl.fuzz TARGET --runs N`` runs one, seeded from
``tests/corpus/TARGET/``. A target is a function of one input (bytes) that
returns normally or raises: ``Finding`` when an invariant broke, anything
else when the library raised what it must not. Targets keep engines alive
between inputs (a handshake per input would cost more than the input), so
each one documents how its state is chosen by the input and when it is
rebuilt.

Adding a target is a few lines::

    from pydtls_ossl.fuzz import register

    @register("session_bytes", "Dtls session import: bytes in, a session or ValueError out",
              seeds=lambda: {"empty": b""})
    def session_bytes(data: bytes) -> None:
        ...

and, if it lives in a new module, naming that module in ``TARGET_MODULES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Finding", "Target", "TARGET_MODULES", "get", "register", "targets"]

#: Modules whose import registers targets, in listing order.
TARGET_MODULES = ("pydtls_ossl.fuzz.targets_engine", "pydtls_ossl.fuzz.targets_server",
                  "pydtls_ossl.fuzz.targets_text", "pydtls_ossl.fuzz.targets_blobs",
                  "pydtls_ossl.fuzz.targets_cid")


class Finding(AssertionError):
    """An invariant of the library broke for this input (a bug to report)."""


@dataclass(frozen=True)
class Target:
    """One fuzz target: ``run(data)`` checks one input; ``seeds()`` builds its
    seed corpus (name -> input) from real traffic through the library."""

    name: str
    description: str
    run: Callable[[bytes], None]
    seeds: Callable[[], dict[str, bytes]]
    max_len: int = 2048
    #: modules atheris instruments for coverage (Python code only)
    instrument: tuple[str, ...] = field(default=("pydtls_ossl",))
    #: forget kept state, so the next input starts from a fresh engine
    reset: Callable[[], None] = field(default=lambda: None)
    #: the inputs the kept state has seen, oldest first (to reproduce a finding)
    history: Callable[[], list[bytes]] = field(default=lambda: [])


_TARGETS: dict[str, Target] = {}
_loaded = False


def register(name: str, description: str, *, seeds: Callable[[], dict[str, bytes]],
             max_len: int = 2048, instrument: tuple[str, ...] = ("pydtls_ossl",),
             reset: Callable[[], None] | None = None,
             history: Callable[[], list[bytes]] | None = None,
             ) -> Callable[[Callable[[bytes], None]], Callable[[bytes], None]]:
    """Decorator: register ``run`` as target ``name``."""

    def decorate(run: Callable[[bytes], None]) -> Callable[[bytes], None]:
        if name in _TARGETS:
            raise ValueError(f"fuzz target {name!r} registered twice")
        _TARGETS[name] = Target(name, description, run, seeds, max_len, instrument,
                                reset or (lambda: None), history or (lambda: []))
        return run

    return decorate


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in TARGET_MODULES:
            importlib.import_module(module)


def targets() -> dict[str, Target]:
    """Every registered target, by name."""
    _load()
    return dict(_TARGETS)


def get(name: str) -> Target:
    _load()
    try:
        return _TARGETS[name]
    except KeyError:
        raise ValueError(f"no fuzz target {name!r}; known: {', '.join(_TARGETS)}") from None
