"""What the trace report reads: the Collector file exporter's JSON lines, plain, rotated, gzip or
zstd; a file that is one JSON document; a truncated last line; and what it says of the data's
quality (orphans, traces without their root, clock skew, calls without their statement)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import zstandard

from tests.unit.test_tracereport_otlp import Otlp
from tools.tracereport.cli import expand_paths
from tools.tracereport.model import ReadCounts, read_spans
from tools.tracereport.quality import data_quality
from tools.tracereport.traces import TraceSet


def two_traces() -> Otlp:
    otlp = Otlp()
    first = otlp.new_trace("first")
    root = otlp.span("shop", first, "GET /items", 0, 50, kind="SPAN_KIND_SERVER")
    otlp.span(
        "shop",
        first,
        "SELECT",
        5,
        10,
        parent=root,
        attrs={"db.system": "postgresql", "db.statement": "SELECT 1"},
    )
    otlp.span("shop", first, "SELECT", 20, 10, parent=root, attrs={"db.system": "postgresql"})  # no statement
    otlp.span("worker", first, "late", 45, 20, parent=root)  # ends 15 ms after its parent: skew
    second = otlp.new_trace("second")
    otlp.span("shop", second, "orphan", 0, 5, parent="00000000000000ff")
    return otlp


def spans_of(*paths: Path) -> tuple[list[object], ReadCounts]:
    counts = ReadCounts()
    return list(read_spans(paths, counts)), counts


def test_plain_gzip_and_zstd_files_read_alike(tmp_path: Path) -> None:
    lines = "\n".join(two_traces().lines()) + "\n"
    plain = tmp_path / "traces.jsonl"
    plain.write_text(lines)
    with gzip.open(tmp_path / "traces.jsonl.1.gz", "wt") as file:
        file.write(lines)
    with zstandard.open(tmp_path / "traces.jsonl.2.zst", "wt") as file:
        file.write(lines)

    found = [spans_of(path)[0] for path in sorted(tmp_path.iterdir())]
    assert len(found[0]) == 5 and found[0] == found[1] == found[2]
    assert expand_paths([str(tmp_path)]) == sorted(tmp_path.iterdir())


def test_a_truncated_last_line_is_counted_and_the_rest_read(tmp_path: Path) -> None:
    lines = two_traces().lines()
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join([*lines, lines[0][: len(lines[0]) // 2]]))
    spans, counts = spans_of(path)
    assert len(spans) == 5 and counts.bad_lines == 1 and counts.first_bad == f"{path}:{len(lines) + 1}"


def test_a_file_that_is_one_json_document(tmp_path: Path) -> None:
    requests = two_traces().requests()
    one = tmp_path / "one.json"
    one.write_text(json.dumps(requests[0], indent=2))
    many = tmp_path / "many.json"
    many.write_text(json.dumps(requests, indent=2))
    assert len(spans_of(one)[0]) == len(requests[0]["resourceSpans"][0]["scopeSpans"][0]["spans"])
    spans, counts = spans_of(many)
    assert len(spans) == 5 and counts.bad_lines == 0


def test_the_data_quality_is_counted(tmp_path: Path) -> None:
    spans, _ = spans_of(two_traces().write(tmp_path / "traces.jsonl"))
    quality = data_quality(TraceSet(spans))  # type: ignore[arg-type]
    assert (quality.spans, quality.traces) == (5, 2)
    assert (quality.orphans, quality.without_root, quality.skewed, quality.calls_without_detail) == (
        1,
        1,
        1,
        1,
    )
    assert not quality.clean
