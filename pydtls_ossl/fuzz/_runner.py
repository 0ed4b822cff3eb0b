"""Running a target under atheris: a parent that reports, a child that fuzzes.

libFuzzer ends its process with ``exit()`` when the runs are done or an
input crashed, so the fuzzing happens in a child process; the parent
streams its progress, enforces the wall-clock bound, and prints the final
line (target, executions, seconds, crashes) whatever the child did.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import Target, get, known

__all__ = ["ATHERIS_MISSING", "Result", "child_main", "default_corpus", "read_history",
           "replay", "run", "write_history"]

ATHERIS_MISSING = "atheris is not installed: pip install pydtls_ossl[fuzz]"
#: the child: instrument the package while it is first imported, then fuzz
_BOOT = """\
import sys
import atheris
with atheris.instrument_imports(include=sys.argv[1].split(",")):
    import pydtls_ossl.fuzz
    pydtls_ossl.fuzz.targets()
from pydtls_ossl.fuzz._runner import child_main
child_main(atheris, sys.argv[2:])
"""
_PROGRESS = re.compile(r"^#(\d+)\s+(\w+)\s+(.*)$")


def default_corpus(name: str) -> Path:
    """tests/corpus/NAME in the source tree this package runs from."""
    return Path(__file__).resolve().parents[2] / "tests" / "corpus" / name


# ------------------------------------------------------------------ history

def write_history(path: Path, inputs: Sequence[bytes]) -> None:
    """The inputs a kept engine saw, as 4-byte big-endian lengths and bytes."""
    path.write_bytes(b"".join(len(d).to_bytes(4, "big") + d for d in inputs))


def read_history(path: Path) -> list[bytes]:
    blob = path.read_bytes()
    out, pos = [], 0
    while pos + 4 <= len(blob):
        size = int.from_bytes(blob[pos:pos + 4], "big")
        out.append(blob[pos + 4:pos + 4 + size])
        pos += 4 + size
    return out


def replay(name: str, inputs: Sequence[bytes]) -> None:
    """Run inputs through a fresh target in order, in this process; raises what it raises."""
    target = get(name)
    target.reset()
    for data in inputs:
        target.run(data)


# -------------------------------------------------------------------- child

def child_main(atheris: Any, argv: list[str]) -> None:
    """In the child: ``argv`` is TARGET ARTIFACT_PREFIX then libFuzzer's flags."""
    from . import _signal

    name, prefix = argv[0], argv[1]
    target = get(name)
    _signal.enable(atheris)
    reported: dict[str, int] = {}

    def one_input(data: bytes) -> None:
        try:
            target.run(data)
        except BaseException:
            history = target.history()
            if len(history) > 1:
                digest = hashlib.sha1(data).hexdigest()
                path = Path(f"{prefix}history-{digest}")
                write_history(path, history)
                print(f"fuzz-child: the kept state had seen {len(history)} inputs; "
                      f"history written to {path}", file=sys.stderr, flush=True)
            raise
        for bug, count in known.hits.items():
            if count != reported.get(bug) and ((count & (count - 1)) == 0 or count % 1000 == 0):
                reported[bug] = count
                print(f"fuzz-child: known {bug} {count}", file=sys.stderr, flush=True)

    atheris.Setup([sys.argv[0]] + argv[2:], one_input)
    atheris.Fuzz()


# ------------------------------------------------------------------- parent

@dataclass
class Result:
    target: str
    executions: int
    seconds: float
    crashes: int
    artifact: str | None
    known: dict[str, int]
    returncode: int

    def line(self) -> str:
        rate = self.executions / self.seconds if self.seconds > 0 else 0.0
        # counts as last reported by the child: powers of two, then every 1000
        known_text = ",".join(f"{k}:{v}" for k, v in sorted(self.known.items())) or "none"
        return (f"fuzz: target={self.target} executions={self.executions} "
                f"seconds={self.seconds:.1f} exec/s={rate:.0f} crashes={self.crashes} "
                f"known={known_text}")


def _seed_dir(target: Target, corpus: Path | None, scratch: Path) -> Path:
    path = corpus if corpus is not None else default_corpus(target.name)
    if path.is_dir() and any(path.iterdir()):
        return path
    if corpus is not None:
        raise SystemExit(f"fuzz: no seed corpus in {corpus}")
    # installed without the source tree: record seeds now, through the library
    seeds = scratch / "seeds"
    seeds.mkdir()
    for seed_name, data in target.seeds().items():
        (seeds / seed_name).write_bytes(data)
    print(f"fuzz: {path} not found; recorded {len(target.seeds())} seeds", flush=True)
    return seeds


def run(name: str, runs: int, *, corpus: Path | None = None, seed: int = 1,
        max_time: float | None = None, artifacts: Path = Path("fuzz-artifacts"),
        strict: bool = False, verbose: bool = False, keep: Path | None = None,
        out: Any = None) -> Result:
    """Fuzz one target in a child process; print progress and the final line."""
    out = out if out is not None else sys.stdout
    target = get(name)
    if importlib.util.find_spec("atheris") is None:
        raise SystemExit(ATHERIS_MISSING)
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"pydtls-fuzz-{name}-") as tmp:
        scratch = Path(tmp)
        seeds = _seed_dir(target, corpus, scratch)
        work = keep if keep is not None else scratch / "new"
        work.mkdir(parents=True, exist_ok=True)
        prefix = f"{artifacts}{os.sep}{name}-"
        flags = [f"-runs={runs}", f"-seed={seed}", f"-max_len={target.max_len}",
                 "-timeout=60", "-rss_limit_mb=4096", "-print_final_stats=1",
                 f"-artifact_prefix={prefix}"]
        if max_time is not None:
            flags.append(f"-max_total_time={max(1, int(max_time))}")
        env = dict(os.environ)
        if strict:
            env["PYDTLS_FUZZ_STRICT"] = "1"
        cmd = [sys.executable, "-c", _BOOT, ",".join(target.instrument), name, prefix,
               *flags, str(work), str(seeds)]
        start = time.monotonic()
        executions, artifact, found = 0, None, dict[str, int]()
        last_progress = 0.0
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=env)
        assert proc.stdout is not None
        deadline = None if max_time is None else start + max_time + 120
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    print("fuzz: the child outlived its wall-clock bound; killed", file=out)
                    break
                if verbose:
                    print(line, file=out, flush=True)
                m = _PROGRESS.match(line)
                if m:
                    executions = max(executions, int(m.group(1)))
                    now = time.monotonic()
                    if not verbose and (m.group(2) in ("INITED", "DONE") or now - last_progress >= 10):
                        last_progress = now
                        print(f"fuzz: {name} #{m.group(1)} {m.group(2).lower()} "
                              f"{m.group(3)} ({now - start:.0f} s)", file=out, flush=True)
                    continue
                if line.startswith("stat::number_of_executed_units:"):
                    executions = int(line.split(":", 3)[-1])
                elif line.startswith("Done ") and " runs in " in line:
                    executions = max(executions, int(line.split()[1]))
                elif "Test unit written to " in line:
                    artifact = line.split("Test unit written to ", 1)[1].strip()
                elif line.startswith("fuzz-child: known "):
                    _, _, bug, count = line.split(" ", 3)
                    found[bug] = int(count)
                if not verbose and (line.startswith(("fuzz-child:", "=== ", "Traceback", "  "))
                                    or "Error" in line or "Finding" in line
                                    or "ERROR" in line or artifact and artifact in line):
                    print(line, file=out, flush=True)
        finally:
            returncode = proc.wait()
        seconds = time.monotonic() - start
    crashes = 1 if artifact is not None or returncode != 0 else 0
    result = Result(name, executions, seconds, crashes, artifact, found, returncode)
    if artifact is not None:
        print(f"fuzz: the crashing input is in {artifact}", file=out)
    elif returncode != 0:
        print(f"fuzz: the child exited with status {returncode}", file=out)
    print(result.line(), file=out, flush=True)
    return result


def import_atheris() -> Any:
    """atheris, or SystemExit with how to install it."""
    try:
        return importlib.import_module("atheris")
    except ImportError:
        raise SystemExit(ATHERIS_MISSING) from None
