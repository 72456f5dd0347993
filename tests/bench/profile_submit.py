"""Where a submit's time goes, under load: the stack without workers (real processes, as
`bench_tracing` starts it), closed-loop clients submitting, and while they do:

- CPU per submit of the gateway, generation, the other services, PostgreSQL and the whole machine (psutil),
  and of each of the gateway's and generation's threads (an exporter thread shows apart);
- with `--waits`, what PostgreSQL's backends were doing, sampled from pg_stat_activity every 5 ms
  (`Lock/transactionid`: waiting for a row lock; `IO/WALSync`: flushing a commit; `CPU`: running);
- with `--py-spy DIR`, py-spy profiles (raw, folded stacks) of the gateway and generation in DIR,
  when py-spy is installed (`.venv/bin/pip install py-spy`).

    .venv/bin/python -m tests.bench.profile_submit [--clients 64] [--seconds 10] [--durable]
        [--mode on|sampled|metrics|off] [--waits] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import psutil

from tests.bench.bench_tracing import MODES, PROJECT, _auth, _config, _submit
from tests.bench.costs import process_cpu_s, sampled_waits
from tests.bench.figures import percentile
from tests.bench.loadgen import closed_loop
from tests.bench.rfclient import ensure_project
from tests.chaos.stack import Stack, running_stack

PROFILED = ("gateway", "generation")


def _thread_cpu_s(stack: Stack) -> dict[tuple[str, int, str], float]:
    found = {}
    for name in PROFILED:
        pid = stack.supervisor.pids()[name]
        for thread in psutil.Process(pid).threads():
            try:
                label = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                label = "?"
            found[(name, thread.id, label)] = thread.user_time + thread.system_time
    return found


def _py_spy(stack: Stack, out: Path | None, seconds: float, mode: str) -> list[subprocess.Popen[bytes]]:
    if out is None:
        return []
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("py-spy is not installed: no profiles (`.venv/bin/pip install py-spy`)")
        return []
    out.mkdir(parents=True, exist_ok=True)
    record = [py_spy, "record", "--full-filenames", "--rate", "100", "--duration", str(round(seconds))]
    return [
        subprocess.Popen(
            [*record, "--format", "raw", "--output", str(out / f"{name}.{mode}.raw"), "--pid", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in stack.supervisor.pids().items()
        if name in PROFILED
    ]


async def profile(args: argparse.Namespace) -> None:
    config = dataclasses.replace(_config(0, 0.0, MODES[args.mode][1]), pg_fast=not args.durable)
    with tempfile.TemporaryDirectory(prefix="renderflow-profile-") as workdir:
        async with running_stack(Path(workdir), config) as stack:
            async with aiohttp.ClientSession(stack.url, headers=_auth(stack)) as http:
                await ensure_project(http, PROJECT)
            await closed_loop(stack.url, _submit, args.clients, 2.0, headers=_auth(stack))  # warm
            spies = _py_spy(stack, args.py_spy, args.seconds, args.mode)
            threads_before, before = _thread_cpu_s(stack), process_cpu_s(stack)
            async with sampled_waits(stack.database_url, args.waits) as waits:
                result = await closed_loop(
                    stack.url, _submit, args.clients, args.seconds, warmup_s=0.0, headers=_auth(stack)
                )
            threads_after, after = _thread_cpu_s(stack), process_cpu_s(stack)
            for spy in spies:
                spy.wait()
    submits = max(len(result.latencies_ms), 1)
    print(
        f"{MODES[args.mode][0]}, {args.clients} clients, {'durable' if args.durable else 'fsync off'}: "
        f"{result.rps:.1f} submits/s, p50 {percentile(result.latencies_ms, 0.5):.1f} ms, "
        f"p99 {percentile(result.latencies_ms, 0.99):.1f} ms, errors {result.errors}"
    )
    print("CPU per submit (ms):")
    for name in before:
        spent = (after[name] - before[name]) * 1000 / submits
        if spent >= 0.005:
            print(f"  {name:<16} {spent:7.3f}")
    print("by thread (ms per submit):")
    for key in sorted(threads_after, key=lambda k: threads_before.get(k, 0.0) - threads_after[k]):
        spent = (threads_after[key] - threads_before.get(key, 0.0)) * 1000 / submits
        if spent >= 0.01:
            print(f"  {key[0]:<11} {key[2]:<16} {spent:7.3f}")
    if waits:
        print("PostgreSQL backends, sampled while active:")
        for (wait, statement), count in waits.most_common(12):
            print(f"  {count:6d}  {wait:<24} {statement}")
    if spies and args.py_spy is not None:
        print(f"py-spy profiles in {args.py_spy}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--mode", choices=list(MODES), default="on", help="tracing and metrics, as bench_tracing"
    )
    parser.add_argument("--durable", action="store_true", help="PostgreSQL with fsync on (the product's)")
    parser.add_argument("--waits", action="store_true", help="sample pg_stat_activity's wait events")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR", help="write py-spy profiles here")
    asyncio.run(profile(parser.parse_args()))


if __name__ == "__main__":
    main()
