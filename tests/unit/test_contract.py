"""One contract: the OpenAPI document, the gateway's submissions, generation's checks, the phase
budgets and the trace report all say what `shared.contract` says."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from renderflow.v1 import generation_pb2

from gateway.openapi import SPEC, query_parameters
from gateway.submission import render_params
from gateway.validation import validate
from services.generation.domain import TIMING_NAMES, Params, RenderSpec
from services.generation.validation import normalized, normalized_batch
from services.metadata import validation as metadata_validation
from shared import contract
from shared.contract import (
    KINDS,
    PARAMS,
    PHASE_BUDGETS_MS,
    PHASES,
    REQUEST_PHASES,
    SEED_MAX,
    TIMINGS,
    WAIT,
    Param,
)
from shared.errors import ValidationFailed
from shared.render_json import render_json
from shared.settings import Env
from shared.telemetry import Budgets
from tools.tracereport.model import ReadCounts, Span
from tools.tracereport.report import build_report

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = SPEC["components"]["schemas"]
ALL_PARAMS = {name: param for params in PARAMS.values() for name, param in params.items()}


def _http_fields(document: dict[str, Any], schema: str = "RenderRequest") -> set[str]:
    try:
        validate(document, schema)
    except ValidationFailed as failed:
        return {error.field for error in failed.errors}
    return set()


def _grpc_fields(spec: RenderSpec) -> set[str]:
    try:
        normalized(spec)
    except ValidationFailed as failed:
        return {error.field for error in failed.errors}
    return set()


def _request(kind: str, **params: Any) -> dict[str, Any]:
    return {"project": "demo", "kind": kind, "prompt": "p", "params": params}


def _spec(**fields: Any) -> RenderSpec:
    """What generation is given for a render of project `demo` (as `_request`'s)."""
    return RenderSpec(**{"project": "demo", **fields})


def test_the_openapi_document_states_the_contract_s_parameters() -> None:
    properties = SCHEMAS["RenderParamsInput"]["properties"]
    for name, param in ALL_PARAMS.items():
        stated = properties[name]
        assert (stated["minimum"], stated["maximum"], stated["default"]) == (
            param.minimum,
            param.maximum,
            param.default,
        ), name
    assert (properties["seed"]["minimum"], properties["seed"]["maximum"]) == (0, SEED_MAX)
    assert "default" not in properties["seed"]  # random


@pytest.mark.parametrize("kind", KINDS)
def test_omitted_parameters_get_the_contract_s_defaults_over_http_and_grpc(kind: str) -> None:
    defaults = {name: param.default for name, param in PARAMS[kind].items()}
    over_http = render_params(kind, {})
    over_grpc = normalized(_spec(kind=kind, prompt="p")).params
    assert {name: getattr(over_http, name) for name in defaults} == defaults
    assert {name: getattr(over_grpc, name) for name in defaults} == defaults


def _outside(param: Param[int] | Param[float]) -> tuple[float, float]:
    step = 1 if isinstance(param.minimum, int) else 0.01
    # Over gRPC 0 means "omitted": a value below the minimum must not be 0.
    return param.minimum - step or -step, param.maximum + step


def _params(name: str, value: float) -> Params:
    """gRPC params with `name` set to `value` (of the field's type or not: the point is to refuse it)."""
    fields: dict[str, Any] = {name: value}
    return Params(**fields)


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k in KINDS for n in PARAMS[k]])
def test_http_and_grpc_refuse_and_accept_the_same_values(kind: str, name: str) -> None:
    param = PARAMS[kind][name]
    for value in _outside(param):
        assert _http_fields(_request(kind, **{name: value})) == {f"params.{name}"}, value
        assert _grpc_fields(_spec(kind=kind, prompt="p", params=_params(name, value))) == {
            f"params.{name}"
        }, value
    for value in (param.minimum, param.maximum):
        assert _http_fields(_request(kind, **{name: value})) == set(), value
        assert _grpc_fields(_spec(kind=kind, prompt="p", params=_params(name, value))) == set()


def test_seeds_prompts_projects_and_batches_have_the_same_limits_over_http_and_grpc() -> None:
    for seed in (-1, SEED_MAX + 1):
        assert _http_fields(_request("image", seed=seed)) == {"params.seed"}
        assert _grpc_fields(_spec(prompt="p", params=Params(seed=seed))) == {"params.seed"}
    assert _grpc_fields(_spec(prompt="p", params=Params(seed=SEED_MAX))) == set()
    long = "x" * (contract.MAX_PROMPT + 1)
    for field, spec in [
        ("prompt", _spec(prompt=long)),
        ("negative_prompt", _spec(prompt="p", negative_prompt=long)),
    ]:
        assert _http_fields({**_request("image"), field: long}) == {field}
        assert _grpc_fields(spec) == {field}

    for project in ("", "p" * 201):
        assert _http_fields({**_request("image"), "project": project}) == {"project"}
        assert _grpc_fields(_spec(prompt="p", project=project)) == {"project"}

    too_many = [_request("image")] * (contract.MAX_BATCH + 1)
    assert _http_fields({"items": too_many}, "BatchRequest") == {"items"}
    assert _http_fields({"items": too_many[1:]}, "BatchRequest") == set()
    with pytest.raises(ValidationFailed, match="items"):
        normalized_batch([_spec(prompt="p")] * (contract.MAX_BATCH + 1))


def test_page_sizes_and_text_limits_are_the_contract_s() -> None:
    page_size = query_parameters("listRenders")["page_size"]
    assert page_size["maximum"] == contract.MAX_PAGE_SIZE
    assert metadata_validation.page_size(0) == contract.DEFAULT_PAGE_SIZE
    assert metadata_validation.page_size(10**6) == contract.MAX_PAGE_SIZE
    assert SCHEMAS["CreateProjectRequest"]["properties"]["name"]["maxLength"] == contract.MAX_NAME
    assert SCHEMAS["CreateProjectRequest"]["properties"]["slug"]["pattern"] == contract.SLUG_PATTERN
    assert SCHEMAS["CreateRuleRequest"]["properties"]["text"]["maxLength"] == contract.MAX_RULE_TEXT


def test_budgets_default_to_the_contract_s_and_each_phase_has_its_setting() -> None:
    assert {phase: Budgets().of(phase) for phase in PHASES} == {
        phase: PHASE_BUDGETS_MS.get(phase) for phase in PHASES
    }
    assert set(PHASE_BUDGETS_MS) <= set(PHASES)
    tuned = Budgets.from_env(Env({f"RENDERFLOW_BUDGET_{phase.upper()}_MS": "7" for phase in PHASES}))
    assert all(tuned.of(phase) == 7 for phase in PHASES)


def _phases_timed(*paths: Path) -> set[str]:
    """The phase names passed as literals to the code that times phases (`phase`, `_phase`,
    `_observe`) or reports them (`phase=` of an event)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            function = (
                node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            )
            arguments = node.args if function in ("phase", "_phase", "_observe") else []
            arguments += [keyword.value for keyword in node.keywords if keyword.arg == "phase"]
            names |= {a.value for a in arguments if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names


def test_the_gateway_and_the_worker_time_exactly_the_contract_s_phases() -> None:
    gateway = _phases_timed(*(ROOT / "gateway").rglob("*.py"))
    worker = _phases_timed(ROOT / "services/generation/runner.py")
    assert gateway == {*REQUEST_PHASES, WAIT} and worker == set(PHASES) - set(REQUEST_PHASES)


def test_timings_are_the_contract_s_phases_everywhere() -> None:
    names = [f"{name}_ms" for name in TIMINGS]
    assert list(TIMING_NAMES) == names
    assert [field.name for field in generation_pb2.Timings.DESCRIPTOR.fields] == names
    assert list(SCHEMAS["Render"]["properties"]["timings"]["properties"]) == names
    assert list(render_json(generation_pb2.Render())["timings"]) == names


def test_the_trace_report_orders_and_budgets_the_contract_s_phases() -> None:
    spans = [
        Span(f"{index:032x}", f"{index + 1:016x}", None, phase, "svc", "internal", 0, 10**6, "unset", "", {})
        for index, phase in enumerate(reversed((*PHASES, WAIT)))
    ]
    report = build_report(spans, ReadCounts())
    assert [stats.phase for stats in report.phases] == [*PHASES, WAIT]
    assert report.budgets == PHASE_BUDGETS_MS
