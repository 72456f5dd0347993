"""The spans and metrics of one service under test, kept apart from the global providers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.imagefetch.instruments import Instruments


@dataclass
class Recorded:
    """What the image-fetch service under test records."""

    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    instruments: Instruments

    @classmethod
    def create(cls) -> Recorded:
        spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        instruments = Instruments.create(MeterProvider(metric_readers=[metrics]), tracer_provider)
        return cls(spans, metrics, instruments)

    def points(self, name: str, **attributes: Any) -> int:
        """The sum of a counter's points, or a histogram's count, over points with `attributes`."""
        data = self.metrics.get_metrics_data()
        total = 0
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            if attributes.items() <= dict(point.attributes or {}).items():
                                total += int(getattr(point, "value", getattr(point, "count", 0)))
        return total
