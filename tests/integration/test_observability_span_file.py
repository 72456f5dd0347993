"""Processes sharing one span file: rotated by whichever writer fills it, and no line lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tools.tracereport.cli import expand_paths
from tools.tracereport.model import ReadCounts, read_spans

SPAN_WRITER = """
import sys
from pathlib import Path
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from shared.telemetry import JsonLinesSpanExporter
path, max_bytes, count, name = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
exporter = JsonLinesSpanExporter(path, max_bytes=max_bytes, backups=1000)
provider = TracerProvider(resource=Resource.create({"service.name": name}))
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("writer")
print("ready", flush=True)
sys.stdin.readline()
for n in range(count):
    with tracer.start_as_current_span(f"span-{n}"):
        pass
provider.shutdown()
"""


def test_processes_sharing_the_span_file_rotate_it_without_losing_a_line(tmp_path: Path) -> None:
    path, limit, count = tmp_path / "traces.jsonl", 32768, 1500
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", SPAN_WRITER, str(path), str(limit), str(count), f"writer-{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.close()
        assert [writer.wait(timeout=60) for writer in writers] == [0, 0, 0]
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
            for pipe in (writer.stdin, writer.stdout):
                if pipe is not None:
                    pipe.close()
    files = sorted(tmp_path.glob("traces.jsonl*"))
    assert len(files) > 10, files  # rotated, many times
    assert expand_paths([f"{path}*"]) == files  # what the trace report reads
    assert all(file.stat().st_size <= limit for file in files)
    counts = ReadCounts()
    spans = sorted((span.service, span.name) for span in read_spans(files, counts))
    assert counts.bad_lines == 0 and counts.lines == 3 * count
    assert spans == sorted((f"writer-{w}", f"span-{n}") for w in range(3) for n in range(count))
