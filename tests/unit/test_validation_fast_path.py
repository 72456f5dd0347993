"""The gateway's two validators of request bodies give the same verdicts: a body the fast compiled
check accepts must be one jsonschema (the reference, which explains refusals) accepts too, or the
gateway would let through what its schema forbids. Every request schema is tried with valid bodies
and with each of them changed at every place by values of every JSON type and at every limit."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.validation import _schema_validator, fast_check, validate
from shared.errors import ValidationFailed

WEBHOOK = {"url": "https://example.com/hook", "events": ["started", "completed"]}
RENDER = {
    "project": "demo",
    "kind": "image",
    "prompt": "a lighthouse",
    "negative_prompt": None,
    "chain_id": "ch_1",
    "params": {"width": 512, "height": 64, "steps": 20, "seed": 7},
    "reference": {"url": "https://example.com/a.png", "required": True},
    "webhook": WEBHOOK,
}
VIDEO = {
    "project": "demo",
    "kind": "video",
    "prompt": "waves",
    "params": {"duration_s": 2.5, "fps": 12},
    "reference": {"previous": True},
}
VALID: dict[str, list[dict[str, Any]]] = {
    "RenderRequest": [RENDER, VIDEO, {"project": "p1", "kind": "image", "prompt": "x"}],
    "ChainRenderRequest": [
        {"kind": "image", "prompt": "next", "reference": {"render_id": "r_1"}},
        {"kind": "video", "prompt": "on", "params": {"fps": 60}},
    ],
    "BatchRequest": [
        {"items": [RENDER, VIDEO]},
        {"items": [{**RENDER, "webhook": {"url": "https://example.com/h"}}], "webhook": WEBHOOK},
    ],
    "CreateProjectRequest": [{"slug": "my-project", "name": "Mine"}],
    "CreateChainRequest": [{"name": "story"}],
    "CreateRuleRequest": [{"text": "no text in images", "chain_id": None, "active": False}],
    "UpdateRuleRequest": [{"active": True}, {"text": "t"}],
    "CreateWebhookEndpointRequest": [
        {"url": "https://example.com/h", "events": ["queued", "completed"], "description": "ops"}
    ],
    "UpdateWebhookEndpointRequest": [{"enabled": False}, {**WEBHOOK, "description": ""}],
    "RotateWebhookSecretRequest": [{"overlap_s": 60}],
}
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 1.0, 0.5, 64, 63, 2048, 2049, 150, 151, 60, 61, 9007199254740992,
    2**64, 1e300, "", "x", "a\n", "a\x00b", "x" * 65, "x" * 2001, "Demo", "-demo", "ftp://x",
    "HTTPS://example.com/x", [], [RENDER], {}, {"url": "https://e/x", "previous": True},
]  # fmt: skip
"""Every JSON type, each limit of the schemas and one past it, and strings patterns refuse."""


def _places(document: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value inside `document` (not the document itself)."""
    items = document.items() if isinstance(document, dict) else enumerate(document)
    for key, value in items:
        yield (*path, key)
        if isinstance(value, dict | list):
            yield from _places(value, (*path, key))


def _at(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def _with(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    changed = copy.deepcopy(document)
    _at(changed, path[:-1])[path[-1]] = value
    return changed


def _without(document: Any, path: tuple[Any, ...]) -> Any:
    changed = copy.deepcopy(document)
    del _at(changed, path[:-1])[path[-1]]
    return changed


def _variants(document: dict[str, Any]) -> Iterator[Any]:
    yield document
    yield {**document, "unknown": 1}
    for path in _places(document):
        yield _without(document, path)
        for value in ODD_VALUES:
            yield _with(document, path, value)
        if isinstance(_at(document, path), dict):
            yield _with(document, (*path, "extra"), True)  # an unknown field inside an object


@pytest.mark.parametrize("schema_name", sorted(VALID))
def test_the_fast_check_accepts_only_what_jsonschema_accepts(schema_name: str) -> None:
    fast, reference = fast_check(schema_name), _schema_validator(schema_name)
    tried = accepted = 0
    for valid in VALID[schema_name]:
        assert fast(valid) and reference.is_valid(valid), valid  # the fast path is taken at all
        for body in _variants(valid):
            tried += 1
            if fast(body):
                accepted += 1
                assert reference.is_valid(body), body
    assert tried > 30 and 0 < accepted < tried


def test_a_refused_body_still_names_every_fault() -> None:
    body = {**RENDER, "prompt": "", "params": {"width": 1, "steps": 0}, "unknown": 1}
    with pytest.raises(ValidationFailed) as refused:
        validate(body, "RenderRequest")
    fields = {e.field for e in refused.value.errors}
    assert {"prompt", "params.width", "params.steps", "unknown"} <= fields
