"""How far the spans can be trusted, for the review to say (pure): spans whose parent never
arrived, traces without their root, children placed outside their parent in time (clocks of two
hosts apart), and calls without the attributes a finding needs."""

from __future__ import annotations

from dataclasses import dataclass

from tools.tracereport.traces import TraceSet

SKEW_MS = 1.0
"""How far a child may start before, or end after, its parent before that counts as clock skew."""


@dataclass(frozen=True)
class Quality:
    spans: int
    traces: int
    orphans: int
    """Spans whose parent is not in the input (exported elsewhere, dropped, or still running)."""
    without_root: int
    """Traces none of whose spans is a root: the request that began them is missing."""
    skewed: int
    """Spans outside their parent's time by more than SKEW_MS: another host's clock, or work that
    outlived the span that started it."""
    calls_without_detail: int
    """Database spans without their statement and named by a verb alone, outgoing HTTP spans
    without their URL: repeated calls cannot be told apart among them."""

    @property
    def clean(self) -> bool:
        return not (self.orphans or self.without_root or self.skewed or self.calls_without_detail)


def data_quality(traces: TraceSet) -> Quality:
    orphans = skewed = without_detail = without_root = 0
    for spans in traces.traces.values():
        ids = {span.span_id: span for span in spans}
        roots = 0
        for span in spans:
            if span.parent_id is None:
                roots += 1
            elif (parent := ids.get(span.parent_id)) is None:
                orphans += 1
            elif (parent.start_ns - span.start_ns) / 1e6 > SKEW_MS or (
                span.end_ns - parent.end_ns
            ) / 1e6 > SKEW_MS:
                skewed += 1
            attrs = span.attributes
            is_db = "db.system" in attrs or "db.system.name" in attrs
            is_http_call = span.kind == "client" and (
                "http.request.method" in attrs or "http.method" in attrs
            )
            # A span named after its statement's block (`submit_render`) says which it is; one named
            # by a verb alone (`SELECT`, `GET`) without the statement or URL does not.
            generic = span.name.isupper() and " " not in span.name
            if generic and (
                (is_db and not (attrs.get("db.query.text") or attrs.get("db.statement")))
                or (is_http_call and not (attrs.get("url.full") or attrs.get("http.url")))
            ):
                without_detail += 1
        without_root += roots == 0
    return Quality(len(traces), len(traces.traces), orphans, without_root, skewed, without_detail)
