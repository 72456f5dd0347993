"""`make bench`: every benchmark scenario in one run, one after another (they would distort each
other side by side on 2 cores), then one table, `bench-results/bench.json` and
`bench-results/latency.png`.

Each scenario is a script run as `python -m tests.bench.<name> --json <file>`; a script that is
missing, fails, or takes no `--json` is reported as such and the run goes on. With
`RENDERFLOW_BENCH_URL` (and `RENDERFLOW_BENCH_KEY`, `DATABASE_URL`) the scripts that support it
measure that stack instead of starting one.

    .venv/bin/python -m tests.bench.run_all [--out bench-results] [--only a,b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tests.bench.chart import draw_chart
from tests.bench.summary import chart_series, ratios, table


@dataclass(frozen=True)
class Scenario:
    """One benchmark script, the arguments of a full and of a quick run, and its time limit."""

    name: str
    module: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    timeout_s: float = 180.0


# Arguments chosen so that the whole run stays under 10 minutes on 2 cores.
SCENARIOS = (
    Scenario(
        "ceilings", "bench_ceilings", ("--reps", "3", "--seconds", "2"), ("--reps", "1", "--seconds", "1")
    ),
    Scenario("gateway", "bench_gateway", ("--requests", "3000"), ("--requests", "500")),
    Scenario("submit", "bench_submit", ("--scale", "0.5"), ("--scale", "0.25")),
    Scenario("breakdown", "breakdown", (), ("--seconds", "1.5")),
    Scenario(
        "baseline",
        "bench_baseline",
        ("--reps", "3", "--baseline-batch-reps", "2"),
        ("--reps", "1", "--baseline-batch-reps", "1"),
        240.0,
    ),
    Scenario("queue", "bench_queue", (), ("--reps", "1", "--workers", "1,2")),
    Scenario("streams", "bench_streams", (), ("--streams", "20")),
    Scenario("procrastinate", "bench_procrastinate", ("--reps", "3"), ("--reps", "1", "--jobs", "256")),
    Scenario("imagefetch", "bench_imagefetch", ("--hits", "1000"), ("--hits", "200", "--hangs", "3")),
    Scenario("tracing", "bench_tracing", ("--windows", "4"), ("--windows", "1")),
    Scenario("feed", "bench_feed", ("--changes", "200"), ("--changes", "50")),
    Scenario(
        "webhooks", "bench_webhooks", ("--renders", "256", "--reps", "6"), ("--renders", "128", "--reps", "2")
    ),
    Scenario(
        "artifacts",
        "bench_artifacts",
        ("--renders", "20", "--downloads", "20"),
        ("--renders", "5", "--downloads", "5"),
        120.0,
    ),
)
BUDGET_S = 600.0


@dataclass
class Outcome:
    """How one scenario's script ran."""

    name: str
    status: str = "ok"
    """ok, missing, failed, timeout, or no_json (ran, but takes no --json: see `output`)."""
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    output: str = ""


def _run(command: list[str], timeout_s: float, log: Path) -> tuple[int | None, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log.write_text(text)
        return None, text
    text = done.stdout + done.stderr
    log.write_text(text)
    return done.returncode, text


def run_scenario(scenario: Scenario, out: Path, quick: bool) -> Outcome:
    """Runs one script; its JSON lands in `out/raw/<name>.json`, its output in `out/logs/`."""
    outcome = Outcome(scenario.name)
    if not (Path(__file__).parent / f"{scenario.module}.py").exists():
        outcome.status = "missing"
        return outcome
    raw = out / "raw" / f"{scenario.name}.json"
    raw.unlink(missing_ok=True)
    log = out / "logs" / f"{scenario.name}.log"
    args = list(scenario.quick_args if quick else scenario.args)
    command = [sys.executable, "-m", f"tests.bench.{scenario.module}", *args, "--json", str(raw)]
    started = time.monotonic()
    code, text = _run(command, scenario.timeout_s, log)
    if code == 2 and "--json" in text and "unrecognized arguments" in text:
        code, text = _run(command[:-2], scenario.timeout_s, log)
        outcome.status = "no_json" if code == 0 else "failed"
    elif code is None:
        outcome.status = "timeout"
    elif code != 0:
        outcome.status = "failed"
    outcome.seconds = round(time.monotonic() - started, 1)
    outcome.output = text[-4000:]
    if raw.exists():
        try:
            outcome.result = json.loads(raw.read_text())
        except json.JSONDecodeError:
            outcome.status = "failed"
    return outcome


def _machine() -> dict[str, Any]:
    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "procrastinate": installed("procrastinate"),
        "aiohttp": installed("aiohttp"),
        "grpcio": installed("grpcio"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--quick", action="store_true", help="one short repetition of each (a smoke run)")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    out: Path = args.out
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outcomes: dict[str, Outcome] = {}
    for scenario in chosen:
        if (
            scenario.name == "procrastinate"
            and outcomes.get("queue", Outcome("queue", "missing")).status != "ok"
        ):
            # No queue figure of Renderflow's from bench_queue: measure it beside the peer instead.
            scenario = Scenario(scenario.name, scenario.module, (*scenario.args, "--renderflow"),
                                (*scenario.quick_args, "--renderflow"), scenario.timeout_s + 120)  # fmt: skip
        print(f"[{time.monotonic() - started:5.0f} s] {scenario.name} ...", flush=True)
        outcome = run_scenario(scenario, out, args.quick)
        outcomes[scenario.name] = outcome
        print(
            f"[{time.monotonic() - started:5.0f} s] {scenario.name}: {outcome.status} in {outcome.seconds} s",
            flush=True,
        )
        if outcome.status in ("failed", "timeout"):
            print("  " + "\n  ".join(outcome.output.strip().splitlines()[-8:]), flush=True)
    results = {name: o.result for name, o in outcomes.items() if o.result}
    derived = ratios(results)
    document = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_s": round(time.monotonic() - started, 1),
        "machine": _machine(),
        "target": os.environ.get("RENDERFLOW_BENCH_URL") or "stacks started by each script",
        "quick": args.quick,
        "scenarios": {
            name: {
                "status": o.status,
                "seconds": o.seconds,
                "result": o.result,
                **({"output": o.output} if o.status != "ok" else {}),
            }
            for name, o in outcomes.items()
        },
        "ratios": derived,
    }
    (out / "bench.json").write_text(json.dumps(document, indent=2))
    draw_chart(chart_series(results), out / "latency.png")
    print()
    statuses = {n: (o.status, o.seconds) for n, o in outcomes.items()}
    print(table(results, statuses, derived, {n: o.output for n, o in outcomes.items()}))
    print(f"\nwrote {out / 'bench.json'} and {out / 'latency.png'} in {document['total_s']:.0f} s")
    if document["total_s"] > BUDGET_S:
        print(f"note: over the {BUDGET_S:.0f} s budget (a busy machine, or scenarios to trim)")
    return 0 if all(o.status in ("ok", "missing", "no_json") for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
