"""Tracing bootstrap: OTLP to a collector when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, otherwise
spans as OTLP-JSON lines appended to a local file (`<run dir>/traces.jsonl`)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from shared.settings import Env


class JsonLinesSpanExporter(SpanExporter):
    """Appends each batch of spans as one OTLP-JSON line (an ExportTraceServiceRequest).

    Ids are written in hex, as the OTLP/JSON encoding (and a collector's file exporter) does.
    One `write` per line on an O_APPEND descriptor keeps lines of several processes whole.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        request = MessageToDict(encode_spans(spans))
        for resource_spans in request.get("resourceSpans", []):
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    _ids_to_hex(span)
                    for link in span.get("links", []):
                        _ids_to_hex(link)
        line = (json.dumps(request, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            os.close(self._fd)


def _ids_to_hex(obj: dict[str, object]) -> None:
    import base64

    for key in ("traceId", "spanId", "parentSpanId"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            obj[key] = base64.b64decode(value).hex()


@dataclass
class Telemetry:
    """The process's tracer provider; `shutdown` flushes what is buffered."""

    provider: TracerProvider

    def shutdown(self) -> None:
        self.provider.shutdown()


def setup_telemetry(service: str, env: Env, run_dir: Path) -> Telemetry:
    """Installs the global tracer provider and the psycopg instrumentation for this process."""
    resource = Resource.create({"service.name": env.str("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if env.optional("OTEL_EXPORTER_OTLP_ENDPOINT") or env.optional("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    else:
        exporter = JsonLinesSpanExporter(run_dir / "traces.jsonl")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    instrumentor = PsycopgInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(enable_commenter=False, skip_dep_check=True)
    return Telemetry(provider)
