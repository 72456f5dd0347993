"""The figures of a `make bench` run as one table, the ratios measured in the same run, and the series
of the latency chart. Scripts of other scenarios are read by shape (a mapping with `clients` and a
rate, `p50_ms`/`p99_ms`, `samples_ms` lists), so a new field there needs no change here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from tests.bench.chart import Series
from tests.bench.figures import ratio

RATE_KEYS = ("rps", "per_s", "req_per_s", "requests_per_s", "jobs_per_s", "renders_per_s")


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, node) of a JSON document, depth first."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for index, item in enumerate(value):
            yield from walk(item, f"{path}[{index}]")


def _rate(node: dict[str, Any]) -> float | None:
    for key in RATE_KEYS:
        if isinstance(node.get(key), int | float):
            return float(node[key])
    return None


def rates_by(result: dict[str, Any], unit: str) -> dict[int, float]:
    """Rates in `result` keyed by `unit` (`clients` or `workers`), from mappings holding both."""
    found: dict[int, float] = {}
    for _path, node in walk(result):
        if isinstance(node, dict) and isinstance(node.get(unit), int):
            rate = _rate(node)
            if rate is not None:
                found.setdefault(int(node[unit]), rate)
    return found


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every comparison of the issue, as a ratio of two figures of this run (None when missing)."""
    out: dict[str, Any] = {}
    chain = {int(k): v["rps"] for k, v in results.get("ceilings", {}).get("bare_chain", {}).items()}
    bare = {int(k): v["rps"] for k, v in results.get("ceilings", {}).get("bare_http", {}).items()}
    chain_p99 = {int(k): v["p99_ms"] for k, v in results.get("ceilings", {}).get("bare_chain", {}).items()}
    for key in ("submit", "submit_with_workers"):
        levels = {level["clients"]: level for level in results.get("submit", {}).get(key, [])}
        for clients, level in sorted(levels.items()):
            if clients in chain:
                out[f"{key}_vs_bare_chain@{clients}"] = ratio(level["per_s"], chain[clients])
            if key == "submit" and clients in chain_p99:
                out[f"submit_p99_vs_bare_chain_p99@{clients}"] = ratio(level["p99_ms"], chain_p99[clients])
    for clients, rps in sorted(chain.items()):
        if clients in bare:
            out[f"bare_chain_vs_bare_http@{clients}"] = ratio(rps, bare[clients])
    baseline = results.get("baseline", {})
    if baseline:
        out["request_latency_p50_renderflow_vs_baseline"] = baseline["request_latency"]["ratio_p50"]
        out["request_latency_p99_renderflow_vs_baseline"] = baseline["request_latency"]["ratio_p99"]
        out["time_to_result_p50_renderflow_vs_baseline"] = baseline["request_latency"]["ratio_result_p50"]
        out["batch_makespan_renderflow_vs_baseline"] = baseline["batch_makespan"]["ratio"]
    peer = results.get("procrastinate", {})
    theirs = {int(k): v["jobs_per_s"] for k, v in peer.get("procrastinate", {}).items()}
    ours = rates_by(results.get("queue", {}), "workers")
    source = "bench_queue"
    if not ours and "renderflow_http" in peer:
        ours = {int(k): v["renders_per_s"] for k, v in peer["renderflow_http"].items()}
        source = "bench_procrastinate --renderflow (HTTP end to end)"
    for workers, rate in sorted(ours.items()):
        if workers in theirs:
            out[f"queue_renderflow_vs_procrastinate@{workers}w"] = ratio(rate, theirs[workers])
    if ours:
        out["queue_source"] = source
    for fewer, more in ((1, 2), (2, 4)):
        if fewer in ours and more in ours:
            out[f"queue_{more}w_vs_{fewer}w"] = ratio(ours[more], ours[fewer])
    for _path, node in walk(results.get("tracing", {})):
        if isinstance(node, dict) and isinstance(node.get("on"), dict) and isinstance(node.get("off"), dict):
            out["tracing_on_vs_off"] = ratio(_rate(node["on"]), _rate(node["off"]))
            if isinstance(node.get("metrics"), dict):  # what the spans alone cost
                out["tracing_on_vs_metrics_only"] = ratio(_rate(node["on"]), _rate(node["metrics"]))
    webhooks = results.get("webhooks", {}).get("phases", {})
    if webhooks:
        # Renders/s with every render's webhook at a hanging (slow) receiver ÷ with none: target >= 0.9.
        none = webhooks.get("none", {}).get("renders_per_s")
        out["webhooks_hanging_vs_none"] = ratio(webhooks.get("hanging", {}).get("renders_per_s"), none)
        out["webhooks_slow_vs_none"] = ratio(webhooks.get("slow", {}).get("renders_per_s"), none)
    artifacts = results.get("artifacts", {}).get("ratios", {})
    for key in ("download_s3_vs_local", "to_succeeded_p50_s3_vs_local", "presigned_vs_gateway_s3"):
        if key in artifacts:  # S3 (SeaweedFS) ÷ local directory; presigned URL ÷ through the gateway
            out[f"artifacts_{key}"] = artifacts[key]
    return out


def _scalars(result: dict[str, Any], limit: int = 14) -> list[str]:
    lines = []
    for path, node in walk(result):
        if isinstance(node, bool) or not isinstance(node, int | float) or not path:
            continue
        if any(part in path for part in ("samples", "settings", "reps", "histogram")):
            continue
        lines.append(f"{path} = {node:g}")
    return lines[:limit] + ([f"... ({len(lines) - limit} more in bench.json)"] if len(lines) > limit else [])


def _p50_p99(label: str, figures: dict[str, Any]) -> str:
    return f"{label} p50 {figures['p50_ms']:9.1f} ms  p99 {figures['p99_ms']:9.1f} ms"


def _known(name: str, result: dict[str, Any]) -> list[str]:
    if name == "ceilings":
        return [
            f"{kind:<11} {v['clients']:>3} clients: {v['rps']:>9.1f} req/s  p50 {v['p50_ms']:8.2f} ms  "
            f"p99 {v['p99_ms']:8.2f} ms  errors {v['errors']}"
            for kind in ("bare_http", "bare_chain")
            for v in result[kind].values()
        ]
    if name == "baseline":
        lat, batch, s = result["request_latency"], result["batch_makespan"], result["settings"]
        return [
            f"request latency ({s['clients']} clients x {s['per_client']}, "
            f"{s['generation_s']:g} s generation, {s['origin_delay_s']:g} s origin):",
            _p50_p99("  renderflow 202 ", lat["renderflow_accept"]),
            _p50_p99("  baseline 200   ", lat["baseline"]),
            f"  renderflow time to result p50 {lat['renderflow_result']['p50_ms']:.0f} ms",
            f"batch of {s['batch']} x {s['generation_s']:g} s: renderflow {batch['renderflow_s']:.2f} s, "
            f"baseline {batch['baseline_s']:.2f} s ({batch['renderflow_submitted_as']})",
        ]
    if name == "procrastinate":
        lines = [f"procrastinate {result['procrastinate_version']}, {result['settings']['jobs']} no-op jobs:"]
        for workers, v in result["procrastinate"].items():
            line = f"  {workers} worker(s): {v['jobs_per_s']:.0f} jobs/s"
            if "renderflow_http" in result:
                line += (
                    f"; renderflow {result['renderflow_http'][workers]['renders_per_s']:.0f} renders/s (HTTP)"
                )
            lines.append(line)
        return lines
    if name == "queue":
        return _queue_lines(result)
    if name == "streams":
        n = result["settings"]["streams"]
        return [
            _p50_p99(f"SSE connect -> first event, {n} streams open ", result["connect_to_first_event"]),
            _p50_p99(f"an event -> its client, {n} streams open     ", result["event_to_client"]),
            _p50_p99(
                f"SSE connect -> first event, {n} at one instant",
                result["connect_to_first_event_all_at_once"],
            ),
        ]
    if name == "breakdown":
        lines = []
        for clients, v in result["by_clients"].items():
            load = f"{v['load']['rps']} req/s, mean {v.get('request_avg_ms')} ms"
            lines.append(f"POST /v1/renders at {clients} client(s): {load}")
            lines += [
                f"  {row['share']:>6.1%}  {row['avg_ms']:8.2f} ms  {row['part']}"
                for row in v.get("parts", [])[:5]
            ]
        return lines
    if name == "gateway":
        return [
            f"GET /v1/projects/{{slug}} at {result['clients']} clients: "
            f"{result['requests_per_s']:.1f} req/s, " + _p50_p99("", result).strip()
        ]
    if name == "submit":
        lines = [
            f"POST /v1/renders at {v['clients']:>2} client(s): {v['per_s']:7.1f} req/s  "
            f"p50 {v['p50_ms']:8.1f} ms  p99 {v['p99_ms']:8.1f} ms  errors {v['errors']}"
            for v in result["submit"]
        ]
        for key, label in (
            ("submit_to_first_event", "submit -> first SSE event"),
            ("connect_to_first_event", "SSE connect -> first event"),
            ("to_succeeded_512", "submit -> succeeded, 512x512 (Prefer: wait)"),
        ):
            if key in result:
                lines.append(_p50_p99(f"{label:<44}", result[key]))
        return lines
    if name == "tracing":
        overhead = result["overhead"]
        return [
            f"{mode:<8} {overhead[mode]['rps']:7.1f} submits/s  p50 {overhead[mode]['p50_ms']:7.1f} ms  "
            f"cpu {overhead[mode].get('cpu_ms_per_submit', 0):.2f} ms/submit"
            for mode in ("off", "metrics", "sampled", "on")
            if mode in overhead
        ]
    if name == "webhooks":
        return _webhook_lines(result)
    if name == "artifacts":
        return artifact_lines(result)
    return _scalars(result)


def table(
    results: dict[str, dict[str, Any]],
    statuses: dict[str, tuple[str, float]],
    derived: dict[str, Any],
    outputs: dict[str, str] | None = None,
) -> str:
    """The whole run as text: each scenario's figures (the printed lines of a script without
    `--json`), then the ratios."""
    lines = []
    for name, (status, seconds) in statuses.items():
        lines.append(f"== {name} ({status}, {seconds:g} s)")
        if status == "no_json" and outputs and name in outputs:
            lines += ["  " + line for line in outputs[name].strip().splitlines()[-6:]]
        if name in results:
            try:
                lines += ["  " + line for line in _known(name, results[name])]
            except (KeyError, TypeError):
                lines += ["  " + line for line in _scalars(results[name])]
    lines.append("== ratios (same run)")
    width = max((len(k) for k in derived), default=10)
    lines += [f"  {k:<{width}}  {v}" for k, v in derived.items()]
    return "\n".join(lines)


def _short_label(name: str, path: str, node: dict[str, Any]) -> str:
    """`submit @16`, `baseline renderflow_accept`: the scenario, the client count, the last key."""
    last = re.sub(r"\[\d+\]$", "", path).rsplit(".", 1)[-1]
    if last.isdigit() or last in ("load", "by_clients"):
        last = ""
    clients = f" @{node['clients']}" if isinstance(node.get("clients"), int) else ""
    return f"{name}{clients} {last}".strip()[:44]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def chart_series(results: dict[str, dict[str, Any]]) -> list[Series]:
    """The latency distributions worth a row: every sample list, and ceilings by percentiles."""
    series: list[Series] = []
    for kind in ("bare_http", "bare_chain"):
        for v in results.get("ceilings", {}).get(kind, {}).values():
            label = f"ceiling {kind.replace('_', ' ')} @{v['clients']}"
            series.append(Series(label, percentiles={"p50": v["p50_ms"], "p99": v["p99_ms"]}, group=kind))
    for name, result in results.items():
        if name == "ceilings":
            continue
        for path, node in walk(result):
            if not isinstance(node, dict):
                continue
            label = _short_label(name, path, node)
            if isinstance(node.get("samples_ms"), list) and node["samples_ms"]:
                series.append(Series(label, node["samples_ms"], group=name))
            elif name != "tracing" and _number(node.get("p50_ms")) and _number(node.get("p99_ms")):
                series.append(
                    Series(label, percentiles={"p50": node["p50_ms"], "p99": node["p99_ms"]}, group=name)
                )
    return series


def _queue_lines(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    lines = [f"no-op renders, {s['jobs']} in batches of {s['batch']}, followed on their event streams:"]
    costs: dict[str, Any] = {}
    for workers, v in result["workers"].items():
        lines.append(f"  {workers} worker(s): {v['renders_per_s']:.0f} renders/s")
        costs = v.get("costs", costs)
    if costs:
        cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in costs["cpu_ms_per_render"].items() if ms >= 0.05)
        notifies = sum(costs["notifies_per_render"].values())
        lines += [
            f"  per render: CPU ms {cpu}",
            f"  per render: {costs['statements_per_render']} statements, "
            f"{costs['writing_commits_per_render']} writing commits, "
            f"{costs['wal_fsyncs_per_render']} WAL fsyncs, {costs['wal_bytes_per_render']} WAL bytes, "
            f"{notifies:g} NOTIFYs",
        ]
        waits = costs.get("database_waits")
        if waits:
            lines.append(
                "  PostgreSQL's backends: "
                + ", ".join(f"{w['wait']} on {w['statement'][:24]}… {w['share']:.0%}" for w in waits[:4])
            )
        parts = costs.get("worker_cpu_share_by_part")
        if parts:
            lines.append("  worker CPU by part: " + ", ".join(f"{k} {v:.0%}" for k, v in parts.items()))
    return lines


def _webhook_lines(result: dict[str, Any]) -> list[str]:
    s, ratios_ = result["settings"], result["ratios"]
    lines = [
        f"{s['renders']} renders x {s['reps']} reps, webhook {'/'.join(s['events'])}; renders/s with the "
        f"receiver hanging / answering after {s['slow_s']:g} s ÷ with no webhook "
        f"{ratios_['hanging_vs_none']} / {ratios_['slow_vs_none']} (paired by rep "
        f"{ratios_['hanging_vs_none_paired']} / {ratios_['slow_vs_none_paired']}; target >= 0.9)"
    ]
    for name, phase in result["phases"].items():
        d = phase["deliveries"]
        cpu = ", ".join(f"{part} {ms:.2f}" for part, ms in phase["cpu_ms_per_render"].items() if ms >= 0.05)
        lines += [
            f"  {name:<8} {phase['renders_per_s']:7.1f} renders/s; at its end {d['made']} deliveries, "
            f"{d['delivered']} delivered, {d['in_flight']} in flight, {d['pending']} pending, "
            f"backlog {d['backlog']} ({d['backlog_age_s']:g} s old)",
            f"           CPU ms per render: {cpu}",
        ]
    return lines


def artifact_lines(result: dict[str, Any]) -> list[str]:
    """bench_artifacts' figures: each store's time to succeeded and download rates, and the ratios."""
    s, r, video = result["settings"], result["ratios"], result["settings"]["video"]
    lines = [
        f"video output of {s['output_mb']:g} MB ({video['width']}x{video['height']}, "
        f"{video['duration_s']:g} s), {s['renders']} renders and {s['downloads']} downloads per store "
        f"(MB = 10^6 bytes):"
    ]
    for name, done in result["to_succeeded"].items():
        store = result["store_phase"][name]
        lines.append(
            f"  {name:<5} submit -> succeeded p50 {done['p50_ms']:7.1f} ms  p90 {done['p90_ms']:7.1f} ms"
            f"  (store phase p50 {store['p50_ms']:6.1f} ms, p90 {store['p90_ms']:6.1f} ms)"
        )
    for name, down in result["download"].items():
        many = result["download_concurrent"][name]
        lines.append(
            f"  {name:<5} GET output via gateway {down['mb_per_s']:7.1f} MB/s median, "
            f"{down['best_mb_per_s']:7.1f} best; {s['concurrent']} at once {many['mb_per_s']:7.1f} MB/s"
        )
    for name, pre in result["presigned"].items():
        lines.append(
            f"  {name:<5} presigned URL direct  {pre['mb_per_s']:7.1f} MB/s median, "
            f"{pre['best_mb_per_s']:7.1f} best (via the gateway's 307 in {pre['redirect_p50_ms']:g} ms p50)"
        )
    lines.append(
        f"  s3/local: download {r['download_s3_vs_local']}, {s['concurrent']} at once "
        f"{r['download_concurrent_s3_vs_local']}, "
        f"submit -> succeeded p50 {r['to_succeeded_p50_s3_vs_local']} "
        f"({r['to_succeeded_p50_s3_minus_local_ms']:+g} ms); presigned/gateway {r['presigned_vs_gateway_s3']}"
    )
    return lines
