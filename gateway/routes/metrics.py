"""The gateway's metrics: `GET /metrics` (Prometheus text, public like the health checks) and the
middleware that counts and times every request by route, method, status and error code, and logs
its slow-operation warnings once the request is over."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import metrics, trace

from gateway.conventions import CLIENT_CLOSED
from gateway.state import TIMER
from shared.errors import RenderflowError
from shared.metrics import DURATION_BUCKETS_S, SCOPE, exposition

routes = web.RouteTableDef()

_meter = metrics.get_meter(f"{SCOPE}.gateway")
_duration = _meter.create_histogram(
    "renderflow.http.server.duration",
    unit="s",
    description="Duration of HTTP requests served, by route, method and status (streams: until their end)",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
)
_requests = _meter.create_counter(
    "renderflow.http.server.requests",
    unit="{request}",
    description="HTTP requests served, by route, method, status class (2xx..5xx) and error code",
)
UNMATCHED = "unmatched"
"""The route label of requests no route matched (their paths would make unbounded label values)."""


@routes.get("/metrics")
async def metrics_text(request: web.Request) -> web.Response:
    body, content_type = exposition(request.headers.get("Accept"))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type  # it carries a version parameter
    return response


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Records the request's duration and outcome; a domain error's code also goes on the request's
    span as `error.code`. Placed inside the problem middleware, it sees errors before they become
    problem documents."""
    started = time.perf_counter()
    status, code = 500, "internal"
    try:
        response = await handler(request)
        status, code = response.status, ""
        return response
    except RenderflowError as exc:
        status, code = exc.http_status, exc.code
        raise
    except web.HTTPException as exc:
        status, code = exc.status, "" if exc.status < 400 else exc.reason.lower().replace(" ", "_")
        raise
    except asyncio.CancelledError:
        status, code = CLIENT_CLOSED, "client_closed"
        raise
    finally:
        resource = request.match_info.route.resource
        attributes: dict[str, str | int] = {
            "http.route": resource.canonical if resource is not None else UNMATCHED,
            "http.request.method": request.method,
            "http.response.status_code": status,
        }
        _duration.record(time.perf_counter() - started, attributes)
        outcome = {**attributes, "http.response.status_class": f"{status // 100}xx", "error.code": code}
        del outcome["http.response.status_code"]
        _requests.add(1, outcome)
        if code:
            trace.get_current_span().set_attribute("error.code", code)
        if (timer := request.get(TIMER)) is not None:
            timer.log_slow()
