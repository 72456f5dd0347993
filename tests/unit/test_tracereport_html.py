"""The HTML report: one well-formed, self-contained page with its charts, span text escaped."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

from tests.unit.test_tracereport_otlp import renders_scenario
from tools.tracereport.html import render_html
from tools.tracereport.model import ReadCounts, read_spans
from tools.tracereport.report import build_report

_VOID = {"meta", "br"}
_ALLOWED = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr", "th", "td",
    "code", "div", "figure", "figcaption", "span", "svg", "rect", "line", "text",
}  # fmt: skip


class _Structure(HTMLParser):
    """Checks that every element is closed in order and collects tags, attributes and SVG labels."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.problems: list[str] = []
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.charts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)
        if tag == "svg":
            self.charts.append(dict(attrs).get("aria-label") or "")
        if tag not in _VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.problems.append(f"unexpected </{tag}> at {self.getpos()}")


def test_html_report_is_a_well_formed_self_contained_page_with_charts(tmp_path: Path) -> None:
    otlp = renders_scenario()
    trace = otlp.new_trace()
    otlp.span(
        "<b>evil</b>", trace, '<script>alert("x")</script>', 30_000, 12,
        attrs={"failure.reason": "<img src=x onerror=alert(1)>", "render.kind": "</svg><script>"},
        error="& <oops>",
    )  # fmt: skip
    otlp.span("gateway", trace, "generation", 30_001, 5, attrs={"render.kind": '"><script>alert(2)</script>'})
    counts = ReadCounts()
    report = build_report(read_spans([otlp.write(tmp_path / "t.jsonl")], counts), counts, top=3)

    page = render_html(report)

    parser = _Structure()
    parser.feed(page)
    parser.close()
    assert page.startswith("<!DOCTYPE html>")
    assert parser.problems == [] and parser.open == []
    assert parser.tags <= _ALLOWED  # no script, img, link, b: nothing from a span became markup
    assert not {"src", "href", "onerror"} & parser.attributes
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "https://" not in page and page.count("http://") == page.count(
        'xmlns="http://www.w3.org/2000/svg"'
    )
    histograms = [c for c in parser.charts if c.startswith("latency of ")]
    assert len(histograms) == len(report.endpoints)
    assert "phase latency against budgets" in parser.charts
    assert "share of time per phase" in parser.charts
    waterfalls = [c for c in parser.charts if c.startswith("waterfall of trace ")]
    assert waterfalls == [f"waterfall of trace {w.trace_id}" for w in report.slowest]
    assert len(waterfalls) == 3
