"""A small seeded mutator, to run targets without atheris (tests, replays).

Not a replacement for libFuzzer: no coverage feedback, only the classic
byte-level mutations of seeds, so a bounded in-process run is reproducible
from its seed alone.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

__all__ = ["mutate", "run_mutations"]

_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFE, 0xFD, 20, 21, 22, 23, 12, 13)


def mutate(data: bytes, rng: random.Random, others: Sequence[bytes] = (), max_len: int = 2048) -> bytes:
    """One to four random byte-level edits of ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:                                   # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:                                 # an interesting byte
            out[rng.randrange(len(out))] = rng.choice(_INTERESTING)
        elif op == 2 and out:                                 # a random byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 3:                                         # insert bytes
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 4 and out:                                 # erase a run
            del out[pos:pos + rng.randint(1, 16)]
        elif op == 5 and out:                                 # duplicate a run
            start = rng.randrange(len(out))
            out[pos:pos] = out[start:start + rng.randint(1, 64)]
        elif op == 6 and out:                                 # truncate
            del out[rng.randrange(len(out)):]
        elif op == 7 and others:                              # splice another seed in
            other = rng.choice(others)
            start = rng.randrange(len(other) + 1)
            out[pos:] = other[start:]
        elif op == 8 and len(out) >= 2:                       # a 16-bit length field
            i = rng.randrange(len(out) - 1)
            value = rng.choice((0, 1, 12, 13, 0xFF, 0x100, 0x3FFF, 0x4000, 0xFFFF,
                                int.from_bytes(out[i:i + 2], "big") + rng.choice((-1, 1))))
            out[i:i + 2] = (value & 0xFFFF).to_bytes(2, "big")
    return bytes(out[:max_len])


def run_mutations(run: Callable[[bytes], None], seeds: Sequence[bytes], count: int, seed: int,
                  max_len: int = 2048) -> int:
    """Run every seed, then ``count`` mutants of them; returns the executions.
    An exception from ``run`` propagates with the input attached as ``fuzz_input``."""
    rng = random.Random(seed)
    pool = list(seeds) or [b""]
    executed = 0
    for i in range(len(pool) + count):
        data = pool[i] if i < len(pool) else mutate(rng.choice(pool), rng, pool, max_len)
        try:
            run(data)
        except BaseException as exc:
            exc.fuzz_input = data  # type: ignore[attr-defined]
            raise
        executed += 1
    return executed
