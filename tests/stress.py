"""`python -m tests.stress` (`make test-stress`): the whole suite, several times in a row, beside
processes that keep every core busy, as a loaded CI machine would. A test that fails only here is
a bug in the code or in the test (a race, a wall-clock wait), never noise.

    .venv/bin/python -m tests.stress [--runs 5] [--hogs N] [-- PYTEST_ARGS...]

Prints each run's outcome and time; exits 1 when any run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _spin() -> None:
    while True:
        pass


@contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """`count` processes that each keep a core busy, until the block ends."""
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for hog in hogs:
        hog.start()
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="whole-suite runs in a row (default 5)")
    parser.add_argument(
        "--hogs",
        type=int,
        default=1,
        help="processes keeping a core busy beside the suite (default 1: on 2 cores, half the machine)",
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    outcomes: list[tuple[int, float]] = []
    with cpu_hogs(args.hogs):
        for run in range(1, args.runs + 1):
            print(f"run {run}/{args.runs}, {args.hogs} CPU hog(s) beside it ...", flush=True)
            started = time.monotonic()
            code = subprocess.call(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args]
            )
            outcomes.append((code, time.monotonic() - started))
            print(
                f"run {run}: {'passed' if code == 0 else f'FAILED (exit {code})'} in {outcomes[-1][1]:.0f} s",
                flush=True,
            )
    failed = [run for run, (code, _) in enumerate(outcomes, 1) if code != 0]
    print(f"{args.runs - len(failed)} of {args.runs} runs passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
