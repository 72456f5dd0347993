"""`trace-report --review` on a system that is not Renderflow (tests/support/flawed_app.py): the
review names each of the shop's four flaws at its location, with a saving within 30 % of the one
measured by fixing it, and finds nothing in the fixed shop."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.flawed_app import RENDER_S, Run, run_shop
from tools.tracereport.cli import FINDINGS_EXIT, main
from tools.tracereport.critical import route_paths, slow_vs_fast
from tools.tracereport.findings import Finding, find
from tools.tracereport.model import ReadCounts
from tools.tracereport.selection import Filters, load_spans
from tools.tracereport.traces import TraceSet

FLAWS = {
    "sequential_calls": "GET /items/{id}",
    "blocking_fetch": "GET /preview",
    "serial_loop": "POST /batch",
    "failing_route": "GET /broken",
}


@pytest.fixture(scope="module")
async def shops(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Run]:
    directory = tmp_path_factory.mktemp("shop")
    flawed = await run_shop(pg_server_url, directory / "flawed.jsonl", flawed=True)
    fixed = await run_shop(pg_server_url, directory / "fixed.jsonl", flawed=False)
    return flawed, fixed


def findings_of(run: Run) -> list[Finding]:
    return find(TraceSet(load_spans([run.traces], Filters(), ReadCounts())))


async def test_the_review_names_each_flaw_with_the_saving_fixing_it_brings(shops: tuple[Run, Run]) -> None:
    flawed, fixed = shops
    found = {(f.kind, f.route): f for f in findings_of(flawed)}
    for line in found.values():
        print(line.kind, line.route, round(line.saving_ms, 1), line.location, line.evidence)
    assert set(FLAWS.items()) <= set(found)
    for kind, route in FLAWS.items():
        finding = found[(kind, route)]
        assert finding.occurrences == 10 and finding.exemplars
        if kind == "failing_route":
            assert finding.extra["error_rate"] == 1.0 and finding.extra["exception"] == "KeyError"
            assert "load theme" in finding.location
            continue
        measured = flawed.mean_ms(route) - fixed.mean_ms(route)
        assert abs(finding.saving_ms - measured) <= 0.3 * measured, (kind, finding.saving_ms, measured)
    assert found[("sequential_calls", "GET /items/{id}")].candidate
    assert "no deadline" in found[("blocking_fetch", "GET /preview")].evidence
    assert "render item x8" in found[("serial_loop", "POST /batch")].location


async def test_the_fixed_shop_has_nothing_to_review(shops: tuple[Run, Run]) -> None:
    _, fixed = shops
    assert findings_of(fixed) == []


async def test_the_review_in_markdown_and_the_exit_status_for_ci(
    shops: tuple[Run, Run], tmp_path: Path
) -> None:
    flawed, fixed = shops
    review, page = tmp_path / "review.md", tmp_path / "report.html"
    status = main(
        [str(flawed.traces), "--review", str(review), "--html", str(page), "--fail-on", "failing_route"]
    )
    text = review.read_text()
    assert "<h2>Findings</h2>" in page.read_text() and "Serial loop" in page.read_text()
    clean = main([str(fixed.traces), "--fail-on", "failing_route", "--fail-on", "serial_loop"])
    small = main([str(flawed.traces), "--fail-on", "serial_loop:1000"])  # it saves less than a second
    erring = main([str(flawed.traces), "--max-error-rate", "0.01"])

    assert status == FINDINGS_EXIT and clean == 0 and small == 0 and erring == FINDINGS_EXIT
    assert "## Critical issues" in text and "**GET /broken** fails" in text
    for label in ("Sequential calls (candidate)", "Blocking external fetch", "Serial loop"):
        assert label in text
    assert "## Where the time goes (critical path)" in text and "| `render item` |" in text
    assert "## Slow against fast" in text and "`search.kind=fuzzy`" in text
    assert "## Data quality" in text


async def test_where_each_route_spends_its_time_on_the_critical_path(shops: tuple[Run, Run]) -> None:
    flawed, _ = shops
    paths = {p.route: p for p in route_paths(TraceSet(load_spans([flawed.traces], Filters(), ReadCounts())))}

    batch = {s.name: s for s in paths["POST /batch"].shares}
    assert batch["render item"].share > 0.8  # the eight renders, one after another
    assert batch["render item"].p50_ms == pytest.approx(8 * 1000 * RENDER_S, rel=0.3)
    assert batch["render item"].total_ms == pytest.approx(batch["render item"].p50_ms, rel=0.1)
    assert batch["POST /batch"].root and batch["POST /batch"].share < 0.2
    preview = paths["GET /preview"].shares[0]
    assert preview.name.startswith("GET") and preview.share > 0.8  # waiting for the origin
    assert sum(s.share for s in paths["GET /items/{id}"].shares) <= 1.0 + 1e-9


async def test_slow_against_fast_names_what_sets_the_tail_apart(shops: tuple[Run, Run]) -> None:
    flawed, _ = shops
    found = {s.route: s for s in slow_vs_fast(TraceSet(load_spans([flawed.traces], Filters(), ReadCounts())))}
    search = found["GET /search"]

    assert search.slow >= 1 and search.fast >= 15
    assert "search.kind=fuzzy" in [pair for pair, _, _ in search.over_represented]
    assert search.grew[0][0] == "search" and search.grew[0][2] > 3 * search.grew[0][1]


async def test_diff_of_before_and_after_a_change(
    shops: tuple[Run, Run], capsys: pytest.CaptureFixture[str]
) -> None:
    flawed, fixed = shops
    better = main(["diff", str(flawed.traces), str(fixed.traces)])
    improved = capsys.readouterr()
    worse = main(["diff", str(fixed.traces), str(flawed.traces)])
    regressed = capsys.readouterr()

    assert better == 0 and worse == FINDINGS_EXIT
    assert re.search(r"^POST /batch .* -[89]\d% ", improved.out, re.MULTILINE)  # p95 down 80-99 %
    assert "  - GET /preview > GET" in improved.out  # the fetch left the request's path
    assert "GET /broken: errors 0.0% → 100.0%" in regressed.err
    assert "  ! GET /broken > load theme" in regressed.out and "0% → 100% failed" in regressed.out
    assert "POST /batch: p95" in regressed.err


async def test_one_trace_span_by_span(shops: tuple[Run, Run], capsys: pytest.CaptureFixture[str]) -> None:
    flawed, _ = shops
    [failing] = [f for f in findings_of(flawed) if f.kind == "failing_route"]
    code = main([str(flawed.traces), "--trace", failing.exemplars[0]])
    shown = capsys.readouterr().out

    assert code == 0 and f"trace {failing.exemplars[0]}" in shown
    assert "! GET /broken" in shown and "!   load theme" in shown
    assert "failed at load theme (shop): KeyError" in shown
