"""What tracing costs, and what it shows.

1. Overhead: submit throughput and CPU per submit of the whole stack (real processes, `renderflow
   run`'s stages) with tracing on (spans of every hop to `traces.jsonl`), with 10 % of traces
   sampled, with tracing off but metrics on, and with all off (`OTEL_SDK_DISABLED=true`): a stack per
   mode side by side, `clients` closed-loop clients sent to each in turn for `windows` short windows;
   the ratios on / off. No workers, so only the submit path counts.
2. With `--scenario N`: N renders through a traced stack with workers, some with references that
   fail (a 404, a closed port), then `renderflow trace-report` on the spans of that run.

    .venv/bin/python -m tests.bench.bench_tracing [--clients 8] [--window 3] [--windows 10]
    .venv/bin/python -m tests.bench.bench_tracing --windows 0 --scenario 50 [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.bench.figures import json_argument, latency_summary, ratio, write_json
from tests.bench.loadgen import closed_loop
from tests.bench.rfclient import ensure_project, render_body, wait_terminal
from tests.chaos.stack import Stack, StackConfig, running_stack
from tests.conftest import free_port

PROJECT = "bench"
MODES = {
    "on": ("tracing on (every span)", {}),
    "sampled": (
        "tracing on, 10 % of traces sampled",
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    ),
    "metrics": ("tracing off, metrics on", {"OTEL_TRACES_EXPORTER": "none"}),
    "off": ("all off (OTEL_SDK_DISABLED=true)", {"OTEL_SDK_DISABLED": "true"}),
}
"""Each mode: what it is, and the environment of its stack."""


def _config(workers: int, step_ms: float, env: dict[str, str]) -> StackConfig:
    # Product settings but fsync off: with a durable commit per submit, a slow disk hides every other
    # cost. Each process's /metrics is off but the gateway's (ports 9100+ may be taken here).
    extra_env = {"RENDERFLOW_LOCAL_METRICS_BASE_PORT": "0", **env}
    config = StackConfig.product_defaults(step_ms, workers=workers, log_level="WARNING", extra_env=extra_env)
    return dataclasses.replace(config, pg_fast=True)


@dataclass
class Tally:
    """What one mode's stack did over all its windows."""

    submits: int = 0
    errors: int = 0
    cpu_s: float = 0.0
    """CPU time of the stack's processes (PostgreSQL aside) while under load."""
    latencies_ms: list[float] = field(default_factory=list)


async def overhead(clients: int, window_s: float, windows: int) -> dict[str, Any]:
    """One stack per mode, side by side; `windows` short windows of load go to each in turn (the
    order rotating), so that whatever else this machine does weighs on every mode alike. Besides
    submits per second, the CPU time the stack's processes spent per submit, which other load on
    the machine disturbs far less."""
    print(f"Submits, {clients} clients, {windows} windows of {window_s:g} s per mode, modes in turns:")
    tallies = {mode: Tally() for mode in MODES}
    async with contextlib.AsyncExitStack() as exits:
        stacks: dict[str, Stack] = {}
        for mode, (_, env) in MODES.items():
            workdir = exits.enter_context(tempfile.TemporaryDirectory(prefix=f"renderflow-tracing-{mode}-"))
            stacks[mode] = await exits.enter_async_context(running_stack(Path(workdir), _config(0, 0.0, env)))
            async with aiohttp.ClientSession(stacks[mode].url, headers=_auth(stacks[mode])) as http:
                await ensure_project(http, PROJECT)
        order = list(MODES)
        for window in range(windows):
            rates = {}
            for mode in order[window % len(order) :] + order[: window % len(order)]:
                stack, tally = stacks[mode], tallies[mode]
                cpu_before = _cpu_s(stack)
                result = await closed_loop(
                    stack.url, _submit, clients, window_s, warmup_s=0.5, headers=_auth(stack)
                )
                tally.cpu_s += _cpu_s(stack) - cpu_before
                tally.submits += len(result.latencies_ms)
                tally.errors += result.errors
                tally.latencies_ms += result.latencies_ms
                rates[mode] = result.rps
            print(
                f"  window {window + 1:>2}: " + "  ".join(f"{m} {r:6.1f}/s" for m, r in rates.items()),
                flush=True,
            )
        span_bytes = {mode: _size(stack.run_dir / "traces.jsonl") for mode, stack in stacks.items()}
    figures: dict[str, Any] = {"clients": clients, "window_s": window_s, "windows": windows}
    for mode, tally in tallies.items():
        summary = latency_summary(tally.latencies_ms)
        figures[mode] = {
            "rps": round(tally.submits / (windows * window_s), 1),
            # The CPU count includes the warm-ups, whose submits are not counted: a slight overstatement.
            "cpu_ms_per_submit": round(tally.cpu_s * 1000 / max(tally.submits, 1), 3),
            "errors": tally.errors,
            "span_bytes": span_bytes[mode],
            **{k: v for k, v in summary.items() if k != "samples_ms"},
        }
        row = figures[mode]
        print(
            f"{MODES[mode][0]:<36} {row['rps']:7.1f} submits/s  "
            f"{row['cpu_ms_per_submit']:5.2f} ms CPU/submit  p50 {row['p50_ms']:6.2f} ms  "
            f"p99 {row['p99_ms']:6.2f} ms  errors {row['errors']}  spans {row['span_bytes']:,} B"
        )
    figures["ratio"] = ratio(figures["on"]["rps"], figures["off"]["rps"])
    figures["cpu_ratio"] = ratio(figures["on"]["cpu_ms_per_submit"], figures["off"]["cpu_ms_per_submit"])
    print(
        f"submit throughput, tracing on / off: {figures['ratio']}; "
        f"CPU per submit, on / off: {figures['cpu_ratio']}"
    )
    return figures


def _cpu_s(stack: Stack) -> float:
    """User and system CPU seconds of the stack's processes so far."""
    total = 0.0
    for pid in stack.supervisor.pids().values():
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _submit(http: aiohttp.ClientSession, n: int) -> int:
    async with http.post("/v1/renders", json=render_body(PROJECT, n, steps=4, size=64)) as answer:
        await answer.read()
        return answer.status


def _auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}


async def scenario(renders: int, workdir: Path) -> dict[str, Any]:
    """`renders` renders through a traced stack; 1 in 10 with a required reference that 404s, 1 in
    10 with one at a closed port, 1 in 10 with an optional one that 404s, 1 in 5 with a good one.
    Then the trace report of the run, and the renders finished as the workers' `/metrics` count them."""
    metrics_base = _free_port_range(13)
    env = {"RENDERFLOW_LOCAL_METRICS_BASE_PORT": str(metrics_base)}
    async with (
        running_stack(workdir, _config(2, 20.0, env)) as stack,
        aiohttp.ClientSession(stack.url, headers=_auth(stack)) as http,
    ):
        await ensure_project(http, PROJECT)
        closed = f"http://127.0.0.1:{free_port()}/gone.png"
        ids = []
        for n in range(renders):
            async with http.post("/v1/renders", json=_scenario_body(stack, n, closed)) as answer:
                assert answer.status == 202, await answer.text()
                ids.append((await answer.json())["id"])
        ends = await asyncio.gather(*(wait_terminal(http, render_id) for render_id in ids))
        finished: dict[str, float] = {}
        for worker in (1, 2):  # worker n serves /metrics on base + 10 + n
            async with http.get(f"http://127.0.0.1:{metrics_base + 10 + worker}/metrics") as answer:
                for family in text_string_to_metric_families(await answer.text()):
                    for sample in family.samples:
                        if sample.name == "renderflow_renders_finished_total":
                            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                            finished[labels] = finished.get(labels, 0) + sample.value
    outcomes: dict[str, int] = {}
    for kind, _ in ends:
        outcomes[kind] = outcomes.get(kind, 0) + 1
    print(f"\n{renders} renders: {outcomes}; renderflow_renders_finished_total of the workers:")
    for labels, count in sorted(finished.items()):
        print(f"  {{{labels}}} {count:g}")
    print(f"spans in {stack.run_dir / 'traces.jsonl'}\n", flush=True)
    command = (sys.executable, "-m", "tools.cli.main", "trace-report", str(stack.run_dir / "traces.jsonl"))
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    report = (await process.communicate())[0].decode()
    print(report)
    return {"renders": renders, "outcomes": outcomes, "finished": finished, "report": report}


def _free_port_range(size: int) -> int:
    """A base port such that base+1 .. base+size are free right now."""
    for _ in range(100):
        base = random.randrange(20_000, 60_000 - size)
        try:
            with contextlib.ExitStack() as held:
                for port in range(base + 1, base + size + 1):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free range of ports")


def _scenario_body(stack: Stack, n: int, closed_url: str) -> dict[str, Any]:
    body = render_body(PROJECT, n, steps=4, size=64)
    if n % 10 == 3:
        body["reference"] = {"url": stack.origin.url(f"/status/404?render={n}"), "required": True}
    elif n % 10 == 7:
        body["reference"] = {"url": closed_url, "required": True}
    elif n % 10 == 5:
        body["reference"] = {"url": stack.origin.url(f"/status/404?render={n}")}
    elif n % 5 == 1:
        body["reference"] = {"url": stack.origin.url("/image/reference")}
    return body


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.windows:
        results["overhead"] = await overhead(args.clients, args.window, args.windows)
    if args.scenario:
        workdir = args.keep or Path(tempfile.mkdtemp(prefix="renderflow-traced-"))
        try:
            results["scenario"] = await scenario(args.scenario, workdir)
        finally:
            if args.keep is None:
                shutil.rmtree(workdir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8, help="closed-loop submit clients (default 8)")
    parser.add_argument("--window", type=float, default=3.0, help="seconds of one window (default 3)")
    parser.add_argument("--windows", type=int, default=10, help="windows per mode (default 10; 0: none)")
    parser.add_argument("--scenario", type=int, default=0, metavar="N", help="also run N traced renders")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="run the scenario in DIR and keep it")
    json_argument(parser)
    args = parser.parse_args()
    write_json(args.json, asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
