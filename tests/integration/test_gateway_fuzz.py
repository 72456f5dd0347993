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
from tests.support.gateway_stack import (
    LiveStack,
    Resources,
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
