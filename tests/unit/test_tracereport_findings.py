"""Findings from spans alone (the shop of tests/integration/test_trace_review.py proves the four
flaws on real instrumentations; these are the other kinds): repeated calls (N+1) and a long tail,
and what is not one."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_tracereport_otlp import Otlp
from tools.tracereport.findings import Finding, find
from tools.tracereport.model import ReadCounts, read_spans
from tools.tracereport.traces import TraceSet

SERVER = "SPAN_KIND_SERVER"
CLIENT = "SPAN_KIND_CLIENT"


def findings_of(otlp: Otlp, tmp_path: Path) -> list[Finding]:
    return find(TraceSet(read_spans([otlp.write(tmp_path / "t.jsonl")], ReadCounts())))


def test_the_same_statement_many_times_in_one_request_is_n_plus_one(tmp_path: Path) -> None:
    otlp = Otlp()
    for _ in range(3):
        trace = otlp.new_trace()
        root = otlp.span("shop", trace, "GET /orders", 0, 70, kind=SERVER, attrs={"http.method": "GET"})
        for n in range(6):  # one query per order line, each a little apart
            statement = f"SELECT * FROM lines WHERE order_id = {n}"
            attrs: dict[str, object] = {"db.system": "postgresql", "db.statement": statement}
            otlp.span("shop", trace, "SELECT", 5 + n * 10, 8, parent=root, kind=CLIENT, attrs=attrs)
    [found] = findings_of(otlp, tmp_path)
    assert (found.kind, found.route, found.occurrences) == ("repeated_calls", "GET /orders", 3)
    assert found.saving_ms == 40.0 and "SELECT * FROM lines WHERE order_id = ?" in found.location


def test_a_request_far_above_its_median_is_a_long_tail_with_where_it_went(tmp_path: Path) -> None:
    otlp = Otlp()
    for n in range(10):
        trace = otlp.new_trace()
        slow = n == 9
        root = otlp.span(
            "shop", trace, "GET /report", 0, 3000 if slow else 10, kind=SERVER, attrs={"http.method": "GET"}
        )
        otlp.span("shop", trace, "render pdf", 1, 2990 if slow else 5, parent=root)
    found = [f for f in findings_of(otlp, tmp_path) if f.kind == "long_tail"]
    assert len(found) == 1
    assert "max 3000 ms" in found[0].evidence and "render pdf" in found[0].evidence


def test_calls_at_once_and_a_short_warm_up_are_nothing(tmp_path: Path) -> None:
    otlp = Otlp()
    for n in range(10):
        trace = otlp.new_trace()
        root = otlp.span(
            "shop", trace, "GET /item", 0, 30 if n == 0 else 2, kind=SERVER, attrs={"http.method": "GET"}
        )
        for table in ("price", "stock"):  # together, not one after another
            attrs: dict[str, object] = {"db.system": "postgresql", "db.statement": f"SELECT * FROM {table}"}
            otlp.span("shop", trace, "SELECT", 0.5, 1, parent=root, kind=CLIENT, attrs=attrs)
    assert findings_of(otlp, tmp_path) == []
