"""How submits read `Prefer` and `Idempotency-Key`, fingerprint their bodies, and state their
references in a RenderSpec (what a key stands for is generation's: see its tests)."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from renderflow.v1 import generation_pb2

from gateway.idempotency import idempotency_key, request_hash
from gateway.submission import prefer_wait, reference
from shared.errors import ValidationFailed


def _request(*headers: tuple[str, str]) -> web.Request:
    return make_mocked_request("POST", "/v1/renders", headers=CIMultiDict(headers))


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ([], None),
        ([("Prefer", "wait=10")], 10.0),
        ([("Prefer", "respond-async, WAIT=3")], 3.0),
        ([("Prefer", "handling=lenient"), ("Prefer", 'wait="7"')], 7.0),
        ([("Prefer", "wait=600")], 60.0),  # clamped to the longest wait
        ([("Prefer", "wait=0")], 0.0),
        ([("Prefer", "wait=soon")], None),  # malformed preferences are ignored, not refused
        ([("Prefer", "wait=-1")], None),
        ([("Prefer", "wait=1.5")], None),
    ],
)
def test_prefer_wait(headers: list[tuple[str, str]], wait: float | None) -> None:
    assert prefer_wait(_request(*headers), 60.0) == wait


def test_idempotency_keys_and_request_fingerprints() -> None:
    assert idempotency_key(_request()) == ""
    assert idempotency_key(_request(("Idempotency-Key", "order-7"))) == "order-7"
    for bad in ("", "has space", "x" * 256, "é"):
        with pytest.raises(ValidationFailed):
            idempotency_key(_request(("Idempotency-Key", bad)))
    body = request_hash({"b": 1, "a": [1, 2]})
    assert body == request_hash({"a": [1, 2], "b": 1}) != request_hash({"a": [2, 1], "b": 1})


def test_references_of_a_request() -> None:
    assert reference(None) is None
    assert reference({"url": "https://x/a.png", "required": True}) == generation_pb2.Reference(
        url="https://x/a.png", required=True
    )
    assert reference({"render_id": "r0"}) == generation_pb2.Reference(render_id="r0")
    # Generation drops it for the first render of a chain, which has nothing before it.
    assert reference({"previous": True}) == generation_pb2.Reference(chain_previous=True)
