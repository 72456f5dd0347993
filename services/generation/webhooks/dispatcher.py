"""The dispatcher: sends the deliveries the outbox made, one attempt at a time, off the render path.

Each generation process runs one (RENDERFLOW_WEBHOOKS_DISPATCH); they share the work through the
claim's lease and SKIP LOCKED, so a process killed mid-attempt only delays its deliveries until the
lease runs out. An attempt:

1. fixes the body the first time (`{type: "render.<event>", timestamp, data: <the render as GET
   /v1/renders/{id} shows it>}`); every later attempt sends the same bytes;
2. signs it as Standard Webhooks says (`webhook-id` the delivery's id, the same on every attempt,
   `webhook-timestamp`, `webhook-signature` `v1,<base64 HMAC-SHA256 of id.timestamp.body>`, one
   per secret while a rotation's overlap lasts), with the `standardwebhooks` package's own signer;
3. has the image fetcher POST it (the one process with egress to user-given URLs: its SSRF guard
   checks every connection, redirects are not followed);
4. records the attempt and what follows: delivered; or due again after an exponential backoff with
   jitter (a receiver's Retry-After honoured) until RENDERFLOW_WEBHOOKS_RETRY_FOR_S after the
   event; then failed. An endpoint failing without a break for RENDERFLOW_WEBHOOKS_DISABLE_AFTER_S
   is disabled.

Deliveries are at least once: an attempt whose outcome could not be recorded (a crash, the
database away) is made again with the same `webhook-id`, which receivers dedupe on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
from opentelemetry import metrics, trace
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from renderflow.v1 import generation_pb2, imagefetch_pb2
from standardwebhooks.webhooks import Webhook

from services.generation.webhooks.settings import WebhookSettings
from services.generation.webhooks.store import Delivery, Outcome, WebhookStore
from shared.errors import NotFound, RenderflowError
from shared.metrics import SCOPE
from shared.render_json import render_json
from shared.url_guard import DELIVERED

log = logging.getLogger(__name__)
tracer = trace.get_tracer(f"{SCOPE}.webhooks")

Send = Callable[[str, Mapping[str, str], bytes, float], Awaitable[imagefetch_pb2.DeliverResult]]
"""`await send(url, headers, body, timeout_s)`: one POST through the image fetcher."""
ReadRender = Callable[[str, str], Awaitable[generation_pb2.Render]]
"""`await read(user_id, render_id)`: the render as the API shows it; NotFound once it is gone."""
SECRETS_TTL_S = 5.0
"""How long the secrets of an endpoint or a user are used before they are read again."""
SECRETS_CACHED = 10_000
MAX_PAUSE_S = 2.0
"""The longest pause between two claims."""
BACKLOG_CHECK_S = 5.0
"""How often the backlog's age (a gauge) is read."""


@dataclass(frozen=True)
class Instruments:
    attempts: metrics.Counter
    duration: metrics.Histogram

    @classmethod
    def create(cls, meter_provider: metrics.MeterProvider | None = None) -> Instruments:
        meter = metrics.get_meter(f"{SCOPE}.webhooks", meter_provider=meter_provider)
        return cls(
            attempts=meter.create_counter(
                "renderflow.webhooks.attempts",
                unit="{attempt}",
                description="Delivery attempts, by outcome (delivered, timeout, http_500, ...) and event",
            ),
            duration=meter.create_histogram(
                "renderflow.webhooks.attempt.duration",
                unit="s",
                description="Time of one delivery attempt, the receiver's answer included",
            ),
        )


class Dispatcher:
    """Sends due deliveries (see the module docstring)."""

    def __init__(
        self,
        store: WebhookStore,
        read_render: ReadRender,
        send: Send,
        settings: WebhookSettings,
        instruments: Instruments | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._store = store
        self._read_render = read_render
        self._send = send
        self._settings = settings
        self._instruments = instruments or Instruments.create(meter_provider)
        self._tasks: set[asyncio.Task[None]] = set()
        self.backlog_age_s = 0.0
        self._next_backlog_check = 0.0
        self._secrets_cache: dict[str, tuple[float, list[str]]] = {}
        """{endpoint id or `user:<id>`: (valid until, secrets)}."""
        meter = metrics.get_meter(f"{SCOPE}.webhooks", meter_provider=meter_provider)
        meter.create_observable_gauge(
            "renderflow.webhooks.backlog_age",
            callbacks=[lambda options: [metrics.Observation(self.backlog_age_s)]],
            unit="s",
            description="How long the oldest due delivery has waited to be sent",
        )

    async def run(self) -> None:
        """Claims and sends due deliveries, for ever (cancel to stop; attempts in flight are
        cancelled too, and made again once their lease runs out)."""
        try:
            while True:
                free = self._settings.concurrency - len(self._tasks)
                started = time.monotonic()
                claimed = await self._claim(free) if free > 0 else []
                claim_s = time.monotonic() - started
                for delivery in claimed:
                    task = asyncio.create_task(self._attempt(delivery), name="webhook-delivery")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if len(claimed) < free or free <= 0:
                    # A claim over a long backlog of a receiver at its cap costs the database: the
                    # pause grows with it (claiming takes at most a tenth of the time), up to a cap
                    # that bounds how late a new delivery may start.
                    await asyncio.sleep(min(MAX_PAUSE_S, max(self._settings.poll_s, claim_s * 10)))
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _claim(self, limit: int) -> list[Delivery]:
        try:
            # The lease outlives the attempt: a delivery is claimed again only if its sender died.
            settings = self._settings
            claimed = await self._store.claim(limit, settings.timeout_s * 2 + 5, settings.per_receiver)
            if time.monotonic() >= self._next_backlog_check:
                self._next_backlog_check = time.monotonic() + BACKLOG_CHECK_S
                self.backlog_age_s = await self._store.backlog_age_s()
        except RenderflowError as exc:
            log.warning("cannot claim deliveries", extra={"error": str(exc)})
            return []
        return claimed

    async def _attempt(self, delivery: Delivery) -> None:
        extra = {"delivery_id": delivery.id, "render_id": delivery.render_id, "event": delivery.event}
        try:
            outcome = await self.deliver(delivery)
            disabled = await self._store.record(delivery, outcome, self._settings.disable_after_s)
        except RenderflowError as exc:  # the database: the lease runs out, the attempt is made again
            log.warning("delivery attempt not recorded", extra={**extra, "error": str(exc)})
            return
        except Exception:
            log.exception("delivery attempt failed unexpectedly", extra=extra)
            return
        level = logging.INFO if outcome.delivered else logging.WARNING
        log.log(
            level,
            "webhook delivered" if outcome.delivered else "webhook not delivered",
            extra={
                **extra,
                "attempt": delivery.attempts,
                "outcome": outcome.outcome,
                "status": outcome.status,
                "latency_ms": outcome.latency_ms,
                "next_attempt_at": outcome.next_attempt_at.isoformat() if outcome.next_attempt_at else None,
            },
        )
        if disabled:
            log.warning("webhook endpoint disabled", extra={**extra, "reason": disabled})

    async def deliver(self, delivery: Delivery) -> Outcome:
        """One attempt of `delivery`, and what is to follow it."""
        now = datetime.now(UTC)
        try:
            body = delivery.body or await self._body(delivery, now)
        except NotFound:
            return Outcome(now, "render_gone", 0, 0.0, "the render no longer exists", "", None)
        secrets = await self._secrets(delivery)
        if not secrets:
            return Outcome(now, "endpoint_deleted", 0, 0.0, "the endpoint no longer exists", "", None)
        headers = signed_headers(delivery.id, now, body, secrets)
        with tracer.start_as_current_span(
            "webhook delivery",
            kind=SpanKind.PRODUCER,
            links=_links(delivery.traceparent),
            attributes={
                "webhook.delivery_id": delivery.id,
                "webhook.event": delivery.event,
                "webhook.attempt": delivery.attempts,
                "render.id": delivery.render_id,
            },
        ) as span:
            try:
                result = await self._send(delivery.url, headers, body.encode(), self._settings.timeout_s)
            except RenderflowError as exc:  # the image fetcher is away: not the receiver's fault
                result = imagefetch_pb2.DeliverResult(outcome="unavailable", message=str(exc))
            span.set_attribute("webhook.outcome", result.outcome)
            if result.status:
                span.set_attribute("http.response.status_code", result.status)
        attributes = {"outcome": result.outcome, "event": delivery.event}
        self._instruments.attempts.add(1, attributes)
        self._instruments.duration.record(result.latency_ms / 1000, attributes)
        return Outcome(
            at=now,
            outcome=result.outcome,
            status=result.status,
            latency_ms=result.latency_ms,
            message=result.message,
            excerpt=result.response_excerpt,
            next_attempt_at=None if result.outcome == DELIVERED else self._next(delivery, now, result),
            # Progress is sent as it is when sent; the rest as it was first time, every time.
            body=body if delivery.body is None and delivery.event != "progress" else None,
        )

    async def _secrets(self, delivery: Delivery) -> list[str]:
        """The secrets that sign `delivery`, read at most every SECRETS_TTL_S per endpoint or user
        (a rotation keeps the old one signing far longer than that)."""
        key = delivery.endpoint_id or f"user:{delivery.user_id}"
        cached = self._secrets_cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        secrets = await self._store.signing_secrets(delivery)
        self._secrets_cache[key] = (time.monotonic() + SECRETS_TTL_S, secrets)
        if len(self._secrets_cache) > SECRETS_CACHED:
            self._secrets_cache.pop(next(iter(self._secrets_cache)))
        return secrets

    async def _body(self, delivery: Delivery, now: datetime) -> str:
        render = await self._read_render(delivery.user_id, delivery.render_id)
        body = orjson.dumps(
            {
                "type": f"render.{delivery.event}",
                "timestamp": (delivery.event_at or now).isoformat().replace("+00:00", "Z"),
                "data": render_json(render),
            }
        ).decode()
        return body

    def _next(
        self, delivery: Delivery, now: datetime, result: imagefetch_pb2.DeliverResult
    ) -> datetime | None:
        """When to try again: backoff with jitter (at least the receiver's Retry-After), or None
        once the delivery has been tried for long enough."""
        settings = self._settings
        backoff = min(settings.backoff_max_s, settings.backoff_s * 2 ** (delivery.attempts - 1))
        delay = max(backoff * random.uniform(0.5, 1.0), min(result.retry_after_s, settings.backoff_max_s))
        due = now + timedelta(seconds=delay)
        if due > delivery.created_at + timedelta(seconds=settings.retry_for_s):
            return None
        return due


def signed_headers(delivery_id: str, at: datetime, body: str, secrets: list[str]) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: a signature per secret, space-separated."""
    return {
        "content-type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(secret).sign(delivery_id, at, body) for secret in secrets),
    }


def _links(traceparent: str) -> list[Link]:
    """A link to the trace of the render's submit, so a delivery leads back to its render."""
    if not traceparent:
        return []
    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []
