"""Invalid requests are refused with every offending field named; the OpenAPI document is complete."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from jsonschema import Draft202012Validator

from gateway.app import create_app
from gateway.config import Settings
from gateway.openapi import SPEC
from gateway.routes import docs
from gateway.submission import render_params
from gateway.validation import field_path, read_query, validate
from shared.errors import ValidationFailed


def _fields(document: Any, schema: str) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as caught:
        validate(document, schema)
    return {e.field: e.message for e in caught.value.errors}


def test_field_paths_read_like_code() -> None:
    assert field_path(["params", "width"]) == "params.width"
    assert field_path(["items", 3, "prompt"]) == "items[3].prompt"
    assert field_path([]) == ""


def test_a_valid_render_request_passes() -> None:
    validate({"project": "demo", "kind": "image", "prompt": "a red fox"}, "RenderRequest")
    validate(
        {
            "project": "demo",
            "chain_id": None,
            "kind": "video",
            "prompt": "waves",
            "params": {"width": 256, "height": 128, "steps": 4, "seed": 7, "duration_s": 1.5, "fps": 8},
            "reference": {"url": "https://example.com/a.png", "required": True},
        },
        "RenderRequest",
    )


@pytest.mark.parametrize("url", ["HTTP://example.com/a.png", "HtTpS://example.com/a.png", "http://x/y"])
def test_a_reference_url_scheme_is_read_in_any_case(url: str) -> None:
    # RFC 3986: schemes are case-insensitive.
    validate({"project": "demo", "kind": "image", "prompt": "p", "reference": {"url": url}}, "RenderRequest")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.png", "HTTPX://example.com/", "example.com/a.png", "http:/x"]
)
def test_a_reference_url_must_be_http_or_https(url: str) -> None:
    document = {"project": "demo", "kind": "image", "prompt": "p", "reference": {"url": url}}
    assert _fields(document, "RenderRequest") == {
        "reference.url": "must be an http or https URL, without NUL characters"
    }


def test_every_bad_field_is_named_with_its_path() -> None:
    fields = _fields(
        {
            "project": "demo",
            "kind": "gif",
            "prompt": "",
            "params": {"width": 5000, "height": "tall", "sharpness": 3},
            "colour": "red",
        },
        "RenderRequest",
    )
    assert fields == {
        "kind": "must be one of image, video",
        "prompt": "must not be empty",
        "params.width": "must be at most 2048",
        "params.height": "must be an integer",
        "params.sharpness": "is not a known field",
        "colour": "is not a known field",
    }


def test_missing_fields_and_wrong_shapes() -> None:
    assert _fields({"slug": "ok"}, "CreateProjectRequest") == {"name": "is required"}
    assert _fields([], "CreateProjectRequest") == {"": "must be an object"}
    assert _fields({}, "UpdateRuleRequest") == {"": "must change text or active"}
    assert _fields({"slug": "Not A Slug", "name": "x"}, "CreateProjectRequest")["slug"].startswith(
        "must match"
    )
    both = {
        "project": "demo",
        "kind": "image",
        "prompt": "p",
        "reference": {"url": "https://x/y", "render_id": "r"},
    }
    assert _fields(both, "RenderRequest") == {
        "reference": "must have exactly one of url, render_id, previous and upload_id"
    }


def test_omitted_params_get_defaults_and_a_random_seed() -> None:
    image = render_params("image", {})
    assert (image.width, image.height, image.steps) == (512, 512, 20)
    assert image.fps == 0 and image.duration_s == 0
    assert len({render_params("image", {}).seed for _ in range(5)}) > 1
    video = render_params("video", {"seed": 3, "fps": 24})
    assert (video.seed, video.fps, video.duration_s) == (3, 24, 2.0)


def _query(path: str) -> dict[str, Any]:
    return read_query(make_mocked_request("GET", path), "listRenders")


def test_query_parameters_are_converted_and_checked() -> None:
    assert _query("/v1/renders?page_size=10&status=running&project=") == {
        "page_size": 10,
        "status": "running",
    }
    for bad, field in [
        ("page_size=0", "page_size"),
        ("page_size=201", "page_size"),
        ("page_size=ten", "page_size"),
        ("status=lost", "status"),
        ("colour=red", "colour"),
        ("page_size=1&page_size=2", "page_size"),
    ]:
        with pytest.raises(ValidationFailed) as caught:
            _query(f"/v1/renders?{bad}")
        assert [e.field for e in caught.value.errors] == [field], bad


def test_every_component_schema_is_valid_json_schema() -> None:
    for schema in SPEC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_every_route_is_described_in_the_openapi_document() -> None:
    app = create_app(Settings())
    described = {(path, method.upper()) for path, ops in SPEC["paths"].items() for method in ops}
    served = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        canonical = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical if route.resource else "")
        if not canonical.startswith(docs.PAGE):  # the page showing the document is no operation of it
            served.add((canonical, route.method))
    assert served == described
    assert web.Application.__name__ == "Application"  # the instrumentation left aiohttp unpatched
