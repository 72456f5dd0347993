"""`python -m tests.chaos` (`make chaos`): the stack under steady load through worker kills, a
PostgreSQL restart, image-fetch and metadata kills and a hanging origin; prints each fault's error
window and recovery, and exits 1 when an invariant breaks.

    .venv/bin/python -m tests.chaos [--short] [--rate 4] [--worker-kills 3] [--pg-down 3]
        [--faults worker_kill,pg_restart,...] [--json chaos.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tests.chaos.faults import FAULT_KINDS
from tests.chaos.report import render_text, verdict
from tests.chaos.scenario import ChaosOptions, run_chaos


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="one fault of each kind, small load")
    parser.add_argument("--rate", type=float, help="submits per second of the steady load")
    parser.add_argument("--worker-kills", type=int, help="how many times a worker is killed")
    parser.add_argument("--pg-down", type=float, help="seconds PostgreSQL stays down")
    parser.add_argument("--faults", help=f"comma-separated subset of {','.join(FAULT_KINDS)}")
    parser.add_argument("--json", type=Path, help="write the verdict as JSON here")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (logs, traces)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = ChaosOptions.short() if args.short else ChaosOptions()
    if args.rate:
        options = replace(options, rate=args.rate)
    if args.worker_kills is not None:
        options = replace(options, worker_kills=args.worker_kills)
    if args.pg_down is not None:
        options = replace(options, pg_down_s=args.pg_down)
    if args.faults:
        chosen = tuple(f.strip() for f in args.faults.split(",") if f.strip())
        unknown = set(chosen) - set(FAULT_KINDS)
        if unknown:
            print(f"unknown faults: {sorted(unknown)}; known: {FAULT_KINDS}", file=sys.stderr)
            return 2
        options = replace(options, faults=chosen)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="renderflow-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        run = asyncio.run(run_chaos(workdir, options, say=lambda line: print(line, flush=True)))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = verdict(run)
    print()
    print(render_text(result))
    print(f"\nchaos run took {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_json(), indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
