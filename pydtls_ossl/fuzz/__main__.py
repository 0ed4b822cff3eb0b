"""``python -m pydtls_ossl.fuzz``: list, run, replay targets; record seed corpora.

    python -m pydtls_ossl.fuzz --list
    python -m pydtls_ossl.fuzz TARGET --runs N [--corpus DIR] [--seed S] [--max-time SEC]
    python -m pydtls_ossl.fuzz TARGET --replay FILE...        (no atheris needed)
    python -m pydtls_ossl.fuzz TARGET --replay-history FILE   (the inputs kept state saw)
    python -m pydtls_ossl.fuzz --make-corpus [--out DIR] [TARGET...]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import traceback
from pathlib import Path

from . import get, targets
from ._runner import default_corpus, read_history, replay, run


def make_corpus(names: list[str], out: Path | None) -> None:
    """Record every target's seeds through the library, replacing the old ones."""
    for name in names or list(targets()):
        target = get(name)
        directory = (out / name) if out is not None else default_corpus(name)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        seeds = target.seeds()
        for seed_name, data in sorted(seeds.items()):
            digest = hashlib.sha1(data).hexdigest()[:8]
            (directory / f"{seed_name}-{digest}").write_bytes(data)
        size = sum(len(d) for d in seeds.values())
        print(f"{name}: {len(seeds)} seeds, {size} bytes in {directory}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydtls_ossl.fuzz",
                                     description="Fuzz pydtls_ossl under atheris (libFuzzer).")
    parser.add_argument("target", nargs="*", help="target name (several with --make-corpus)")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--runs", type=int, default=100_000, help="executions (default 100000)")
    parser.add_argument("--corpus", type=Path, help="seed directory (default tests/corpus/TARGET)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--max-time", type=float, help="wall-clock bound in seconds")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"),
                        help="where crashing inputs go (default ./fuzz-artifacts)")
    parser.add_argument("--keep", type=Path, help="keep the inputs libFuzzer found in DIR")
    parser.add_argument("--strict", action="store_true",
                        help="report known, unfixed bugs too (see pydtls_ossl.fuzz.known)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer's output")
    parser.add_argument("--replay", type=Path, nargs="+", metavar="FILE",
                        help="run these inputs in this process, each from fresh state")
    parser.add_argument("--replay-history", type=Path, metavar="FILE",
                        help="run a history file's inputs in order from fresh state")
    parser.add_argument("--make-corpus", action="store_true", help="record the seed corpora")
    parser.add_argument("--out", type=Path, help="with --make-corpus: a directory instead of tests/corpus")
    args = parser.parse_args(argv)

    if args.list:
        for target in targets().values():
            print(f"{target.name:14} {target.description}")
        return 0
    if args.make_corpus:
        make_corpus(args.target, args.out)
        return 0
    if len(args.target) != 1:
        parser.error("name one target (see --list)")
    name = args.target[0]
    get(name)  # unknown names fail here, before anything starts
    if args.replay or args.replay_history:
        files = [args.replay_history] if args.replay_history else args.replay
        failed = 0
        for path in files:
            inputs = read_history(path) if args.replay_history else [path.read_bytes()]
            try:
                replay(name, inputs)
            except BaseException as exc:  # report every file, then fail
                failed += 1
                print(f"{path}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            else:
                print(f"{path}: ok ({len(inputs)} input(s))")
        return 1 if failed else 0
    if args.runs <= 0:
        parser.error("--runs must be positive")
    result = run(name, args.runs, corpus=args.corpus, seed=args.seed, max_time=args.max_time,
                 artifacts=args.artifacts, strict=args.strict, verbose=args.verbose,
                 keep=args.keep)
    return 1 if result.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
