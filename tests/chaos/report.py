"""The verdict of a chaos run: per fault, what users saw and what was lost; and every broken
invariant (lost, stuck or duplicated renders, unexplained failures, untyped or lingering errors)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.chaos.faults import FaultWindow
from tests.chaos.load import Response
from tests.chaos.scenario import ChaosRun, RenderFacts

# A render's failure counts as caused by a fault when its life overlaps the fault plus this much.
FAULT_REACH_S = 15.0


@dataclass
class FaultReport:
    """One fault as clients lived it."""

    label: str
    kind: str
    detail: str
    duration_s: float
    submits: int = 0
    errors: int = 0
    first_error_s: float | None = None
    """Seconds from the fault's start to the first error answer."""
    last_error_s: float | None = None
    recovery_s: float = 0.0
    """Seconds from the fault's end until clients stopped seeing errors (0: none after it)."""
    first_accept_after_s: float | None = None
    """Seconds from the fault's end to the first 202 answer to a submit sent after it."""
    by_status: dict[str, int] = field(default_factory=dict)
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    accepted: int = 0
    lost: int = 0
    stuck: int = 0
    duplicates: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Failed renders by `code/reason`."""
    without_reference: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)
    """Renders running in a killed worker, by how they ended."""


@dataclass
class Verdict:
    """The whole run: per-fault reports, totals, and the invariants that broke."""

    faults: list[FaultReport]
    totals: dict[str, Any]
    violations: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _label(response: Response) -> str:
    return f"{response.status or 'no answer'} {response.code}".strip()


def _owner(windows: list[FaultWindow], sent: float) -> FaultWindow | None:
    for window in windows:
        if window.started <= sent < window.observed_until:
            return window
    return None


def _explained(run: ChaosRun, facts: RenderFacts) -> bool:
    error = facts.error or {}
    key = (str(error.get("code", "")), str(error.get("reason", "")))
    finished = (facts.finished_wall - run.wall_offset) if facts.finished_wall else float("inf")
    return any(
        key in w.explains and facts.sent <= w.ended + FAULT_REACH_S and finished >= w.started
        for w in run.faults
    )


def _fault_report(run: ChaosRun, window: FaultWindow) -> FaultReport:
    assert run.load is not None
    mine = [r for r in run.load.responses if window.started <= r.sent < window.observed_until]
    errors = [r for r in mine if r.error]
    report = FaultReport(
        window.label,
        window.kind,
        window.detail,
        round(window.ended - window.started, 2),
        len(mine),
        len(errors),
    )
    if errors:
        answered = [r.sent + r.latency_s for r in errors]
        report.first_error_s = round(min(answered) - window.started, 2)
        report.last_error_s = round(max(answered) - window.started, 2)
        report.recovery_s = round(max(0.0, max(answered) - window.ended), 2)
        report.by_status = dict(Counter(_label(r) for r in errors).most_common())
    after = [r.sent + r.latency_s for r in mine if not r.error and r.sent >= window.ended]
    if after:
        report.first_accept_after_s = round(min(after) - window.ended, 2)
    latencies = [r.latency_s * 1000 for r in mine]
    report.latency_p50_ms = round(statistics.median(latencies), 1) if latencies else 0.0
    report.latency_p99_ms = round(_percentile(latencies, 0.99), 1)
    renders = [f for f in run.renders.values() if window.started <= f.sent < window.observed_until]
    report.accepted = len(renders)
    report.lost = sum(not f.found for f in renders)
    report.stuck = sum(f.found and f.status not in ("succeeded", "failed", "cancelled") for f in renders)
    report.duplicates = sum(f.terminal_events > 1 or f.outputs > 1 for f in renders)
    report.failed = sum(f.status == "failed" for f in renders)
    report.failures = dict(
        Counter(
            f"{(f.error or {}).get('code')}/{(f.error or {}).get('reason')}"
            for f in renders
            if f.status == "failed"
        )
    )
    report.without_reference = sum(f.without_reference for f in renders)
    ended = Counter(
        f"{run.renders[r].status} after {run.renders[r].attempts} attempts"
        for r in window.in_flight
        if r in run.renders
    )
    report.in_flight = dict(ended)
    return report


def _render_violations(run: ChaosRun) -> tuple[list[str], list[str]]:
    violations: list[str] = []
    notes: list[str] = []
    for facts in run.renders.values():
        rid = facts.render_id
        at = f"(sent at +{facts.sent - run.started:.1f} s, reference {facts.reference})"
        if not facts.found:
            violations.append(f"lost: render {rid} got a 202 but the API does not know it {at}")
            continue
        if facts.status not in ("succeeded", "failed", "cancelled"):
            violations.append(f"stuck: render {rid} is still {facts.status} {at}")
            continue
        if facts.terminal_events != 1:
            violations.append(f"render {rid} has {facts.terminal_events} terminal events {at}")
        if facts.outputs > 1:
            violations.append(f"render {rid} has {facts.outputs} output files {at}")
        if facts.status == "succeeded":
            if not facts.artifact_sha256:
                violations.append(f"render {rid} succeeded but its output file is missing {at}")
            elif facts.output_sha256 and facts.artifact_sha256 != facts.output_sha256:
                violations.append(f"render {rid}: the stored output differs from the recorded one {at}")
        elif facts.artifact_sha256:
            notes.append(f"render {rid} ended {facts.status} but left an output file {at}")
        if facts.status != "succeeded" and not _explained(run, facts):
            error = facts.error or {}
            violations.append(
                f"render {rid} {facts.status} with {error.get('code')}/{error.get('reason')}"
                f" ({error.get('message')}), which no fault explains {at}"
            )
    return violations, notes


def verdict(run: ChaosRun) -> Verdict:
    """Judges a run against the invariants."""
    assert run.load is not None
    options = run.options
    reports = [_fault_report(run, w) for w in run.faults]
    violations, notes = _render_violations(run)
    untyped = [r for r in run.load.responses if r.error and not r.typed]
    if untyped:
        kinds = Counter(_label(r) for r in untyped)
        violations.append(f"{len(untyped)} client-visible error(s) were not typed: {dict(kinds)}")
    stray = [r for r in run.load.responses if r.error and _owner(run.faults, r.sent) is None]
    if stray:
        kinds = Counter(_label(r) for r in stray)
        violations.append(f"{len(stray)} error(s) outside every fault window: {dict(kinds)}")
    for report in reports:
        if report.recovery_s > options.errors_stop_within_s:
            violations.append(
                f"{report.label}: errors went on {report.recovery_s:.1f} s after the fault ended"
                f" (limit {options.errors_stop_within_s:g} s)"
            )
        if report.first_accept_after_s is None:
            violations.append(f"{report.label}: no submit was accepted after the fault ended")
        if report.kind == "metadata_kill" and report.errors:
            # The load's project, chain and rules are in generation's cache, and its key in the
            # gateway's: submits need nothing of metadata while it is down.
            violations.append(f"{report.label}: {report.errors} submit(s) failed while metadata was down")
    temp_files = [f for f in run.stray_files if f.rsplit("/", 1)[-1].startswith(".")]
    if temp_files:
        notes.append(f"{len(temp_files)} temporary file(s) left in the artifact directory by killed writers")
    others = [f for f in run.stray_files if f not in temp_files]
    if others:
        notes.append(f"{len(others)} artifact file(s) of no accepted render: {others[:5]}")
    statuses = Counter(f.status or "lost" for f in run.renders.values())
    totals = {
        "submits": len(run.load.responses),
        "accepted": len(run.load.accepted),
        "errors": sum(r.error for r in run.load.responses),
        "renders": dict(statuses),
        "retried_renders": sum(f.attempts > 1 for f in run.renders.values()),
        "drain_s": round(run.drained_s, 1),
        "restarts": {k: v for k, v in run.restarts.items() if v},
    }
    return Verdict(reports, totals, violations, notes)


def render_text(result: Verdict) -> str:
    """The per-fault table, totals and violations, for a terminal."""
    header = (
        f"{'fault':<26} {'down s':>6} {'submits':>7} {'errors':>6} {'error window s':>15} "
        f"{'recovery s':>10} {'lost':>4} {'dup':>3} {'stuck':>5} {'failed':>6}  errors by status/code"
    )
    lines = [header, "-" * len(header)]
    for r in result.faults:
        window = "-" if r.first_error_s is None else f"{r.first_error_s:.1f}→{r.last_error_s:.1f}"
        codes = ", ".join(f"{k} x{v}" for k, v in r.by_status.items()) or "-"
        lines.append(
            f"{r.label:<26} {r.duration_s:>6.1f} {r.submits:>7} {r.errors:>6} {window:>15} "
            f"{r.recovery_s:>10.1f} {r.lost:>4} {r.duplicates:>3} {r.stuck:>5} {r.failed:>6}  {codes}"
        )
        extras = []
        if r.in_flight:
            extras.append(
                "renders in the killed worker: " + ", ".join(f"{k} x{v}" for k, v in r.in_flight.items())
            )
        if r.failures:
            extras.append("failed: " + ", ".join(f"{k} x{v}" for k, v in r.failures.items()))
        if r.without_reference:
            extras.append(f"{r.without_reference} went on without their optional reference")
        if r.first_accept_after_s is not None:
            extras.append(f"first 202 {r.first_accept_after_s:.2f} s after the fault ended")
        extras.append(f"submit p50 {r.latency_p50_ms:.0f} ms, p99 {r.latency_p99_ms:.0f} ms")
        lines.append(f"{'':<26} {r.detail}; " + "; ".join(extras))
    t = result.totals
    lines.append("")
    lines.append(
        f"totals: {t['submits']} submits, {t['accepted']} accepted, {t['errors']} errors; renders "
        f"{t['renders']}; {t['retried_renders']} ran more than once; drained in {t['drain_s']} s; "
        f"restarts {t['restarts']}"
    )
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.violations:
        lines.append(f"INVARIANTS BROKEN ({len(result.violations)}):")
        lines.extend(f"  - {v}" for v in result.violations[:40])
        if len(result.violations) > 40:
            lines.append(f"  ... and {len(result.violations) - 40} more")
    else:
        lines.append("all invariants hold: nothing lost, stuck or duplicated; every error typed and brief")
    return "\n".join(lines)
