"""The tracer and metric instruments of the image-fetch service (exporters are wired elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import metrics, trace

from shared.metrics import DURATION_BUCKETS_S

SCOPE = "renderflow.imagefetch"


@dataclass(frozen=True)
class Instruments:
    """Spans and metrics the service records; built from the global providers unless given others."""

    tracer: trace.Tracer
    cache_hits: metrics.Counter
    cache_misses: metrics.Counter
    coalesced: metrics.Counter
    attempts: metrics.Counter
    failures: metrics.Counter
    retries: metrics.Counter
    origin_duration: metrics.Histogram
    deliveries: metrics.Counter
    delivery_duration: metrics.Histogram

    @classmethod
    def create(
        cls,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> Instruments:
        meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
        return cls(
            tracer=trace.get_tracer(SCOPE, tracer_provider=tracer_provider),
            cache_hits=meter.create_counter(
                "imagefetch.cache.hits", unit="{fetch}", description="Fetches answered from the cache"
            ),
            cache_misses=meter.create_counter(
                "imagefetch.cache.misses", unit="{fetch}", description="Fetches the cache could not answer"
            ),
            coalesced=meter.create_counter(
                "imagefetch.coalesced",
                unit="{fetch}",
                description="Fetches that waited for an identical fetch already in flight",
            ),
            attempts=meter.create_counter(
                "imagefetch.attempts", unit="{attempt}", description="Attempts at origins, retries included"
            ),
            failures=meter.create_counter(
                "imagefetch.failures", unit="{fetch}", description="Failed fetches, by reason"
            ),
            retries=meter.create_counter(
                "imagefetch.retries",
                unit="{attempt}",
                description="Attempts at an origin that failed and were tried again, by reason",
            ),
            origin_duration=meter.create_histogram(
                "imagefetch.origin.duration",
                unit="s",
                description="Time of one attempt at an origin, redirects and body included, by outcome",
            ),
            deliveries=meter.create_counter(
                "renderflow.imagefetch.deliveries",
                unit="{delivery}",
                description="Webhook delivery attempts, by outcome (delivered, http_<status>, timeout, ...)",
            ),
            delivery_duration=meter.create_histogram(
                "renderflow.imagefetch.delivery.duration",
                unit="s",
                description="Time of one webhook delivery attempt, answer included, by outcome",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
            ),
        )
