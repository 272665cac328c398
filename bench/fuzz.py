"""``python -m bench.fuzz``: the long fuzz run of the frontend codec and of a ClientConnection in-process.

Outside CI. The generators and oracles are those of the CI-sized property tests,
``tests/unit/test_fuzz_codec.py`` (loaded from there by path: ``tests/`` is not a package); here each case
gets its own seeded ``random.Random``, so any case can be replayed alone::

    .venv/bin/python -m bench.fuzz                      # 100,000 cases, seed 0
    .venv/bin/python -m bench.fuzz --cases 20000 --seed 7 --time-limit 300
    .venv/bin/python -m bench.fuzz --seed 0 --case 1234 # replay one case, print its whole report

Prints the cases run (per kind), the failures found (grouped by their first error line, with a replay
command for the first case of each group) and the time taken. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

FUZZ_TESTS = Path(__file__).resolve().parent.parent / "tests" / "unit" / "test_fuzz_codec.py"

# Case i is of kind SCHEDULE[i % len(SCHEDULE)]: the in-process client gets half of the cases.
SCHEDULE = (
    "startup",
    "client_preauth",
    "frames",
    "client_session",
    "decoders",
    "client_preauth",
    "auth",
    "client_session",
)
PROGRESS_EVERY = 15.0  # seconds between progress lines (stderr)

_ERROR_LINE = re.compile(r"^\s*([A-Za-z_.]*(?:Error|Exception|Hang)): ")


def load_fuzz_module() -> ModuleType:
    """tests/unit/test_fuzz_codec.py, imported by path under its own module name."""
    spec = importlib.util.spec_from_file_location("parafort_fuzz_codec", FUZZ_TESTS)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {FUZZ_TESTS}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"parafort-fuzz/{seed}/{index}")


def signature(kind: str, exc: BaseException) -> str:
    """What groups failures: the kind and the innermost exception line of the report (or its first)."""
    text = f"{type(exc).__name__}: {exc}"
    hits = [line.strip() for line in text.splitlines() if _ERROR_LINE.match(line)]
    inner = [h for h in hits if not h.startswith("AssertionError")]
    line = (inner or hits or [text.splitlines()[0] if text else type(exc).__name__])[-1]
    return f"{kind}: {line[:160]}"


@dataclass
class Failures:
    groups: dict[str, list[int]] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, index: int, exc: BaseException) -> None:
        key = signature(kind, exc)
        if key not in self.groups:
            self.groups[key] = []
            self.reports[key] = "".join(traceback.format_exception(exc))
        self.groups[key].append(index)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.groups.values())


def run_case(fuzz: ModuleType, seed: int, index: int) -> tuple[str, BaseException | None]:
    kind = SCHEDULE[index % len(SCHEDULE)]
    try:
        fuzz.fuzz_one(case_rng(seed, index), kind)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # AssertionError and Hang from the oracles; anything else is a finding too
        return kind, exc
    return kind, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="number of cases (default 100,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    parser.add_argument("--case", type=int, default=None, help="replay this one case and print its report")
    parser.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds")
    parser.add_argument("--show", type=int, default=3, help="full reports printed (default 3)")
    args = parser.parse_args(argv)

    fuzz = load_fuzz_module()
    logging.getLogger("parafort").addHandler(logging.NullHandler())  # health warnings: not on stderr
    logging.getLogger("parafort").propagate = False

    if args.case is not None:
        kind, exc = run_case(fuzz, args.seed, args.case)
        if exc is None:
            print(f"case {args.case} ({kind}, seed {args.seed}): ok")
            return 0
        print(f"case {args.case} ({kind}, seed {args.seed}): FAILED")
        print("".join(traceback.format_exception(exc)))
        return 1

    tally = Tally()
    print(f"fuzzing {args.cases:,} cases, seed {args.seed}, kinds {', '.join(tally.cases)}")
    run_cases(fuzz, args, tally)
    report(args, tally)
    return 1 if tally.failures.total else 0


@dataclass
class Tally:
    failures: Failures = field(default_factory=Failures)
    cases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCHEDULE, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SCHEDULE, 0.0))
    done: int = 0
    elapsed: float = 0.0
    stopped: str = ""  # why the run ended early, if it did


def run_cases(fuzz: ModuleType, args: argparse.Namespace, tally: Tally) -> None:
    """Run the cases in order, counting into ``tally``; progress lines go to stderr."""
    started = last = time.monotonic()
    try:
        for index in range(args.cases):
            t0 = time.monotonic()
            kind, exc = run_case(fuzz, args.seed, index)
            now = time.monotonic()
            tally.seconds[kind] += now - t0
            tally.cases[kind] += 1
            tally.done += 1
            if exc is not None:
                tally.failures.add(kind, index, exc)
            if now - last >= PROGRESS_EVERY:
                last = now
                rate = tally.done / (now - started)
                line = f"  {tally.done:,} cases, {rate:,.0f}/s, {tally.failures.total} failures"
                print(line, file=sys.stderr)
            if args.time_limit and now - started >= args.time_limit:
                tally.stopped = f" (stopped by --time-limit {args.time_limit:g}s)"
                break
    except KeyboardInterrupt:
        tally.stopped = " (interrupted)"
    tally.elapsed = time.monotonic() - started


def report(args: argparse.Namespace, tally: Tally) -> None:
    failures = tally.failures
    print(f"cases run: {tally.done:,} of {args.cases:,}{tally.stopped}")
    for kind, count in tally.cases.items():
        seconds = tally.seconds[kind]
        rate = count / seconds if seconds else 0.0
        print(f"  {kind:<15} {count:>8,} cases  {seconds:7.1f}s  {rate:8,.0f}/s")
    print(f"failures found: {failures.total} in {len(failures.groups)} distinct group(s)")
    for n, (key, indexes) in enumerate(sorted(failures.groups.items(), key=lambda kv: -len(kv[1]))):
        print(f"  [{len(indexes)}x] {key}")
        print(f"        first: python -m bench.fuzz --seed {args.seed} --case {indexes[0]}")
        if n < args.show:
            text = failures.reports[key]
            text = text[:3000] + (" ..." if len(text) > 3000 else "")
            print("        " + text.replace("\n", "\n        "))
    rate = tally.done / tally.elapsed if tally.elapsed else 0.0
    print(f"time: {tally.elapsed:.1f}s ({rate:,.0f} cases/s)")


if __name__ == "__main__":
    sys.exit(main())
