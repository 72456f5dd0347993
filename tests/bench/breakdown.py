"""Where the submit path's time goes, from the traces: a stack without workers (so nothing else
competes for the CPU) takes submits from 1, then 16 clients; once it has stopped and flushed its
spans, each phase of `POST /v1/renders` and the time spent inside
the RPC it makes, generation's Submit, which reads the project from metadata itself when it has
not cached it (read from the exported spans); each part's share of the request names the
slowest one.

    .venv/bin/python -m tests.bench.breakdown [--clients 1,16] [--seconds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from shared.contract import phase_attribute
from tests.bench.figures import json_argument, write_json
from tests.bench.loadgen import closed_loop
from tests.bench.rfclient import ensure_project, render_body
from tests.chaos.stack import StackConfig, running_stack

ROUTE = "POST /v1/renders"
PHASES = ("auth", "validation", "enqueue")
# OTLP-JSON writes a span's kind as its enum name or its number, depending on the encoder.
_KINDS: dict[Any, str] = {
    2: "server",
    3: "client",
    "SPAN_KIND_SERVER": "server",
    "SPAN_KIND_CLIENT": "client",
}
RPCS = {"enqueue": ("generation", "Submit")}
NESTED = "ResolveRender"
"""What the Submit handler asks metadata on a cache miss."""


async def _load(clients: list[int], seconds: float, workdir: Path) -> list[dict[str, Any]]:
    """One closed-loop run per client count, each with the wall-clock window its requests fall in."""
    config = StackConfig.product_defaults(0.0, workers=0)
    runs = []
    async with running_stack(workdir, config) as stack:
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        async with aiohttp.ClientSession(stack.url, headers=headers) as http:
            await ensure_project(http, "breakdown")

        async def post(http: aiohttp.ClientSession, n: int) -> int:
            async with http.post("/v1/renders", json=render_body("breakdown", n, steps=4, size=64)) as answer:
                await answer.read()
                return answer.status

        for count in clients:
            since = time.time_ns()
            result = await closed_loop(stack.url, post, count, seconds, warmup_s=0.5, headers=headers)
            runs.append({"load": result.as_json(), "window_ns": (since + 500_000_000, time.time_ns())})
    return runs


def _spans(traces: Path) -> list[dict[str, Any]]:
    """Every span of an OTLP-JSON lines file, with its service name and duration in ms."""
    spans = []
    for line in traces.read_text().splitlines():
        for resource in json.loads(line).get("resourceSpans", []):
            attributes = resource.get("resource", {}).get("attributes", [])
            service = next(
                (a["value"].get("stringValue", "") for a in attributes if a["key"] == "service.name"), ""
            )
            for scope in resource.get("scopeSpans", []):
                for span in scope.get("spans", []):
                    duration = (int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e6
                    kind = _KINDS.get(span.get("kind"), str(span.get("kind", "")))
                    spans.append({**span, "service": service, "ms": duration, "kind": kind})
    return spans


def _phases(request: dict[str, Any]) -> dict[str, float]:
    """The request's phases and their milliseconds, from the attributes of its span."""
    timed = {a["key"]: a["value"] for a in request.get("attributes", [])}
    found = {}
    for phase in PHASES:
        value = timed.get(phase_attribute(phase), {})
        if "doubleValue" in value or "intValue" in value:
            found[phase] = float(value.get("doubleValue", value.get("intValue")))
    return found


def shares(spans: list[dict[str, Any]], window_ns: tuple[int, int] = (0, 2**63)) -> dict[str, Any]:
    """Each part of the request with its mean milliseconds and share of the request's mean: the
    gateway's phases; inside enqueue, the SQL in the callee, its calls to metadata, the rest of
    the callee's handler, and the call itself (client stub, HTTP/2, interceptors)."""
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_trace.setdefault(span["traceId"], []).append(span)
    requests = [
        (root, by_trace[root["traceId"]])
        for root in spans
        if root["service"] == "gateway"
        and root["name"] == ROUTE
        and root["kind"] == "server"
        and window_ns[0] <= int(root["startTimeUnixNano"]) < window_ns[1]
    ]
    if not requests:
        return {"error": f"no {ROUTE} spans in the traces"}
    parts: dict[str, list[float]] = {}

    def add(part: str, ms: float) -> None:
        parts.setdefault(part, []).append(max(0.0, ms))

    totals = []
    for root, trace in requests:
        totals.append(root["ms"])
        phases = _phases(root)
        for phase in ("auth", "validation"):
            add(phase, phases.get(phase, 0.0))
        for phase, (service, rpc) in RPCS.items():
            server = next(
                (s for s in trace if s["service"] == service and s["kind"] == "server"
                 and s["name"].endswith(rpc)),
                None,
            )  # fmt: skip
            if server is None:
                add(f"{phase} (no server span)", phases.get(phase, 0.0))
                continue
            sql = sum(
                s["ms"] for s in trace
                if s["service"] == service and s["kind"] == "client" and not s["name"].startswith("/")
            )  # fmt: skip
            nested = sum(
                s["ms"] for s in trace
                if s["service"] == service and s["kind"] == "client" and s["name"].endswith(NESTED)
            )  # fmt: skip
            add(f"{phase}: SQL in {service}", sql)
            add(f"{phase}: {NESTED} calls to metadata (cache misses)", nested)
            add(f"{phase}: {rpc} handler in {service}, besides SQL and metadata", server["ms"] - sql - nested)
            add(
                f"{phase}: the {rpc} call (stub, HTTP/2, interceptors)", phases.get(phase, 0.0) - server["ms"]
            )
        add("gateway: outside the phases (HTTP, middleware, JSON)", root["ms"] - sum(phases.values()))
    total = sum(totals) / len(totals)
    rows = sorted(
        (
            {"part": name, "avg_ms": round(sum(v) / len(v), 3), "share": round(sum(v) / len(v) / total, 4)}
            for name, v in parts.items()
        ),
        key=lambda row: -float(row["avg_ms"]),
    )
    ordered = sorted(totals)
    return {
        "requests": len(totals),
        "request_avg_ms": round(total, 3),
        "request_p50_ms": round(ordered[len(ordered) // 2], 3),
        "parts": rows,
        "slowest": rows[0],
    }


async def bench(clients: list[int], seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="renderflow-breakdown-") as tmp:
        workdir = Path(tmp)
        runs = await _load(clients, seconds, workdir)
        spans = await asyncio.to_thread(_spans, workdir / "run" / "traces.jsonl")
    by_clients = {
        str(count): {"load": run["load"], **shares(spans, run["window_ns"])}
        for count, run in zip(clients, runs, strict=True)
    }
    return {
        "scenario": "submit_breakdown",
        "settings": {"clients": clients, "seconds": seconds},
        "by_clients": by_clients,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=3.0)
    json_argument(parser)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    result = asyncio.run(bench(clients, args.seconds))
    for count, figures in result["by_clients"].items():
        print(
            f"{ROUTE} at {count} client(s): {figures['load']['rps']} req/s, "
            f"mean {figures.get('request_avg_ms')} ms over {figures.get('requests')} traced requests"
        )
        for row in figures.get("parts", []):
            print(f"  {row['part']:<58} {row['avg_ms']:>8.3f} ms  {row['share']:>6.1%}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
