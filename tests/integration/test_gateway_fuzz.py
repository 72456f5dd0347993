"""Property-based fuzzing of every operation of the served OpenAPI document (schemathesis), against
the real stack: no 5xx, and every status code, content type, header and body as the spec says.

Each operation gets generated requests that fit the spec (positive), requests that do not
(negative), and, when it has path parameters, fitting requests aimed at real resources of the
caller. Runs are derandomized, so that a failure is reproducible and CI is not flaky.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.config import Settings as GatewaySettings
from gateway.openapi import SPEC
from tests.integration.test_gateway_renders import read_events
from tests.support.gateway_stack import (
    RENDER,
    LiveStack,
    Resources,
    assert_problem,
    procedural_worker,
    running_stack,
    seed_resources,
)

pytestmark = pytest.mark.filterwarnings(
    # schemathesis's negative generation draws from `random` inside strategies (schemathesis 4.32).
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
)
OPERATIONS = sorted(op["operationId"] for ops in SPEC["paths"].values() for op in ops.values())
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 8}
REAL_EXAMPLES = 8
REQUEST_TIMEOUT_S = 15


@dataclass
class Target:
    """The running stack, its caller's resources, and the spec as the gateway serves it."""

    stack: LiveStack
    resources: Resources
    served: dict[str, Any]
    schema: Any


@pytest.fixture(scope="module")
async def target(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    # Generous limits: the fuzzer submits fast, and 429s would hide the submit paths.
    gateway = GatewaySettings(rate_limit_per_s=1000, rate_limit_burst=100_000, shutdown_grace_s=0.5)
    work_dir = tmp_path_factory.mktemp("fuzz")
    async with running_stack(module_database_url, work_dir, gateway, procedural_worker("fuzz")) as stack:
        resources = await seed_resources(stack, "fuzzer", "fuzz")
        _, served = await stack.call("GET", "/openapi.json")
        yield Target(stack, resources, served, schemathesis.openapi.from_dict(served))


def _real_path_parameters(path: str, resources: Resources) -> dict[str, str]:
    values = {
        "slug": resources.slug,
        "chain_id": resources.chain_id,
        "rule_id": resources.rule_id,
        "id": resources.batch_id if path.startswith("/v1/batches/") else resources.render_id,
    }
    return {name: values[name] for name in values if "{" + name + "}" in path}


def _fuzz(operation: Any, target: Target) -> None:
    """Runs the operation's generated cases; raises the first failure (with a curl to replay it)."""
    session = requests.Session()
    headers = target.resources.headers
    runs: list[tuple[GenerationMode, Any, int]] = [
        (mode, operation.as_strategy(generation_mode=mode), examples) for mode, examples in EXAMPLES.items()
    ]
    real = _real_path_parameters(operation.path, target.resources)
    if real:
        runs.append((GenerationMode.POSITIVE, operation.as_strategy(path_parameters=real), REAL_EXAMPLES))
    try:
        for mode, strategy, examples in runs:

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def check(case: Any) -> None:
                case.call_and_validate(
                    base_url=target.stack.base,
                    session=session,
                    headers=headers,
                    checks=CHECKS,
                    timeout=REQUEST_TIMEOUT_S,
                )

            try:
                check()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise
                # Nothing of the operation can be invalid (no body, free-form strings): no negative case.
    finally:
        session.close()


def test_every_served_operation_is_fuzzed(target: Target) -> None:
    assert target.served == SPEC
    served = {target.schema.get_operation_id(result.ok()) for result in target.schema.get_all_operations()}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize("operation_id", OPERATIONS)
async def test_operation_conforms_to_the_spec(target: Target, operation_id: str) -> None:
    operation = target.schema.find_operation_by_id(operation_id)
    await asyncio.to_thread(_fuzz, operation, target)


# Inputs a hostile client sent that once answered 500: each is refused as the client's mistake.
_DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
_DEEP_OBJECT = '{"a":' * 50_000 + "1" + "}" * 50_000
_LONE_SURROGATE = "\\ud800"  # valid JSON, but no text UTF-8 can carry


def _surrogate_bodies(r: Resources) -> list[tuple[str, str, str, str]]:
    """(method, path, JSON body with a lone surrogate, the field named) for every write route."""
    chain = f"/v1/projects/{r.slug}/chains/{r.chain_id}"
    render = f'"project":"{r.slug}","kind":"image","prompt":"{_LONE_SURROGATE}"'
    return [
        ("POST", "/v1/projects", f'{{"slug":"x","name":"{_LONE_SURROGATE}"}}', "name"),
        ("POST", f"/v1/projects/{r.slug}/chains", f'{{"name":"{_LONE_SURROGATE}"}}', "name"),
        ("POST", f"/v1/projects/{r.slug}/rules", f'{{"text":"{_LONE_SURROGATE}"}}', "text"),
        ("PATCH", f"/v1/projects/{r.slug}/rules/{r.rule_id}", f'{{"text":"{_LONE_SURROGATE}"}}', "text"),
        ("POST", "/v1/renders", f"{{{render}}}", "prompt"),
        ("POST", "/v1/renders:batch", f'{{"items":[{{{render}}}]}}', "items[0].prompt"),
        ("POST", f"{chain}/renders", f'{{"kind":"image","prompt":"{_LONE_SURROGATE}"}}', "prompt"),
        ("POST", "/render", f"{{{render}}}", "prompt"),
        ("POST", "/v1/renders", f'{{"{_LONE_SURROGATE}":1}}', ""),
    ]


async def test_hostile_bodies_are_the_clients_mistake(target: Target) -> None:
    stack, r = target.stack, target.resources
    json_headers = {**r.headers, "Content-Type": "application/json"}

    async def everything() -> list[Any]:
        lists = [
            "/v1/projects?page_size=100",
            f"/v1/projects/{r.slug}/chains?page_size=100",
            f"/v1/projects/{r.slug}/rules?page_size=100",
            f"/v1/renders?project={r.slug}&page_size=100",
        ]
        found = []
        for path in lists:
            _, listed = await stack.call("GET", path, r.headers)
            name = next(key for key in listed if key != "next_page_token")
            # What exists and what it says, not how far a render has come meanwhile.
            found.append(sorted((item["id"], item.get("name"), item.get("text")) for item in listed[name]))
        return found

    before = await everything()
    for body in (_DEEP_ARRAY, _DEEP_OBJECT):
        response, problem = await stack.call("POST", "/v1/renders", json_headers, data=body)
        assert_problem(response, problem, 422, "validation_failed")
        assert "nested" in problem["detail"]
    for method, path, body, field in _surrogate_bodies(r):
        response, problem = await stack.call(method, path, json_headers, data=body.encode())
        assert_problem(response, problem, 422, "validation_failed")
        assert problem["errors"][0]["field"] == field, (path, problem)
    assert await everything() == before  # nothing was made or changed


async def test_hostile_stream_cursors_are_the_clients_mistake(target: Target) -> None:
    stack, r = target.stack, target.resources
    for cursor in ("\u00b3", "9" * 5000, "1" * 19, "-1", "\u0663"):
        for path in (f"/v1/renders/{r.render_id}/events", f"/v1/batches/{r.batch_id}/events"):
            header = {**r.headers, "Last-Event-ID": cursor}
            response, problem = await stack.call("GET", path, header)
            assert_problem(response, problem, 422, "validation_failed")
            response, problem = await stack.call("GET", path, r.headers, params={"last_event_id": cursor})
            assert_problem(response, problem, 422, "validation_failed")


async def test_hostile_ranges_are_ignored_or_unsatisfiable(target: Target) -> None:
    stack, r = target.stack, target.resources
    # A render of its own: the fuzzer may have deleted the output of the seeded one.
    render = await stack.created("POST", "/v1/renders", r.headers, json={**RENDER, "project": r.slug})
    async with stack.http.get(f"{stack.base}/v1/renders/{render['id']}/events", headers=r.headers) as stream:
        assert (await asyncio.wait_for(read_events(stream), 20)).events[-1]["type"] == "succeeded"
    path = f"/v1/renders/{render['id']}/output"
    full, _ = await stack.call("GET", path, r.headers)
    assert full.status == 200
    for header, status in (
        ("bytes=\u00b3-5", 200),
        ("bytes=0-" + "9" * 5000, 206),
        ("bytes=" + "9" * 5000 + "-5", 416),
    ):
        response, _ = await stack.call("GET", path, {**r.headers, "Range": header})
        assert response.status == status, header
