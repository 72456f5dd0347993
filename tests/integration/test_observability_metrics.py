"""`/metrics` of the gateway and of a service parse as Prometheus text, and the figures an SRE
reads move when renders run: requests by route and status, RPC durations, phase durations, renders
finished by status and error, retries by reason, the queue gauges, image-fetch cache hits."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.generation.backends import (
    Backend,
)
from tests.support.backends import FlakyBackend
from tests.support.observed_stack import ObservedStack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def worker_backends() -> Mapping[str, Backend]:
    return {"procedural": FlakyBackend()}


async def scrape(stack: ObservedStack, url: str) -> Samples:
    """Every sample of the page, parsed as Prometheus text (a page that does not parse fails here)."""
    async with stack.http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


async def test_metrics_parse_and_move_when_renders_run(
    observed: ObservedStack, service_metrics_url: str
) -> None:
    gateway_url = f"{observed.base}/metrics"
    before = await scrape(observed, gateway_url)
    ids = []
    for prompt in ("plain", "flaky"):
        status, render = await observed.submit(prompt=prompt)
        assert status == 202
        ids.append(render["id"])
    image = observed.origin.url("/flaky/metrics")  # a 500 first: the image-fetch service retries
    for prompt in ("first", "second"):
        _, render = await observed.submit(prompt=prompt, reference={"url": image})
        ids.append(render["id"])
        await observed.finished(render["id"])
    _, failing = await observed.submit(
        prompt="failing", reference={"url": observed.origin.url("/status/404?m=1"), "required": True}
    )
    ids.append(failing["id"])
    await observed.finished(*ids)
    await observed.submit(project="nowhere", prompt="lost")

    after = await scrape(observed, gateway_url)
    service = await scrape(observed, service_metrics_url)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    submits = {"http_route": "/v1/renders", "http_request_method": "POST"}
    assert moved("renderflow_http_server_requests_total", **submits, http_response_status_class="2xx") == 5
    assert moved("renderflow_http_server_requests_total", **submits, error_code="not_found") == 1
    assert moved("renderflow_http_server_duration_seconds_count", **submits) == 6
    assert moved("rpc_server_duration_seconds_count", rpc_method="Submit", rpc_grpc_status="OK") == 5
    # The unknown project: generation asked metadata, which did not know it.
    for method in ("Submit", "ResolveRender"):
        assert moved("rpc_server_duration_seconds_count", rpc_method=method, rpc_grpc_status="NOT_FOUND") == 1
    # At least the first submit read project `obs` from metadata (later ones may be cached).
    assert moved("rpc_server_duration_seconds_count", rpc_method="ResolveRender", rpc_grpc_status="OK") >= 1
    # 6 submits to generation (the unknown project's too); 5 renders, one of them claimed twice;
    # 4 with an output; 3 with a reference.
    phases = {"enqueue": 6, "queue_wait": 6, "image_fetch": 3, "generation": 5, "store": 4}
    for phase, count in phases.items():
        assert moved("renderflow_phase_duration_seconds_count", phase=phase, render_kind="image") == count, (
            phase
        )
    for phase in ("auth", "validation"):
        assert moved("renderflow_phase_duration_seconds_count", phase=phase) >= 6, phase
    assert moved("renderflow_renders_finished_total", status="succeeded", render_kind="image") == 4
    failed = {"status": "failed", "error_code": "reference_fetch_failed", "error_reason": "http_404"}
    assert moved("renderflow_renders_finished_total", **failed) == 1
    assert (
        moved("renderflow_renders_retries_total", error_code="generation_failed", error_reason="overloaded")
        == 1
    )
    assert moved("imagefetch_retries_total", reason="http_500") == 1
    assert moved("imagefetch_cache_misses_total") >= 2 and moved("imagefetch_cache_hits_total") >= 1
    assert after[("renderflow_queue_depth", frozenset({("render_kind", "video")}))] == 0
    assert ("renderflow_renders_running", frozenset({("render_kind", "image")})) in after
    # The service's page is the same text format; in this one process, the same figures.
    assert total(service, "renderflow_renders_finished_total") == total(
        after, "renderflow_renders_finished_total"
    )
    assert total(service, "process_cpu_seconds_total") > 0
    # What the process uses: its pools (the in-process services' pools, by name), and the queue's age.
    assert after[("renderflow_queue_oldest_age_seconds", frozenset({("render_kind", "video")}))] == 0
    pools = {dict(labels).get("pool") for name, labels in after if name == "renderflow_db_pool_connections"}
    assert {"generation", "metadata"} <= pools, pools
    in_use_and_idle = total(after, "renderflow_db_pool_connections", pool="generation")
    assert 1 <= in_use_and_idle <= total(after, "renderflow_db_pool_max", pool="generation")
    assert after[("renderflow_db_pool_waiting", frozenset({("pool", "generation")}))] == 0
    assert total(after, "renderflow_db_pool_acquire_duration_seconds_count", pool="generation") > 0
    assert after[("renderflow_gateway_streams_open", frozenset())] == 0  # the renders' streams all ended
    ready = {
        dict(labels)["target"]
        for (name, labels), value in after.items()
        if name == "renderflow_grpc_channel_state" and dict(labels)["state"] == "ready" and value == 1
    }
    assert len(ready) >= 2, ready  # the gateway's channels to metadata and generation, at least
