"""The openai backend against a stand-in OpenAI-compatible images API on 127.0.0.1
(tests/support/openai_images.py): images as base64 or downloaded from a URL, the request as the API
wants it, sizes mapped to those a model accepts, failures mapped to transient or permanent, a cancel
that closes the request, and what the API cannot do refused at once."""

from __future__ import annotations

import asyncio
import functools
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    TransientBackendError,
)
from services.generation.backends.openai_images import OpenAiImagesBackend, OpenAiImagesSettings
from services.generation.backends.selection import BackendSettings
from shared.settings import ConfigError, Env
from tests.support.backends import connector, generate
from tests.support.openai_images import OpenAiImagesStandIn, png

TOKEN = "sk-test-8f7e6d5c4b3a"
IMAGE = GenerationInput(
    "r1", "image", "a red fox in the snow", "blurry", 64, 48, 8, 7, rules=("no text", "muted colours")
)
FAST = OpenAiImagesSettings(
    url="http://127.0.0.1:1",
    token=TOKEN,
    request_timeout_s=5.0,
    attempts=3,
    backoff_s=0.01,
    backoff_max_s=0.5,
)

Connect = Callable[..., Any]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """`await connect(settings={...}, **stand_in_behaviour)` -> (stand-in, backend), closed after."""
    async with connector(
        functools.partial(OpenAiImagesStandIn, token=TOKEN), OpenAiImagesBackend.open, FAST
    ) as start:
        yield start


async def _generate(backend: OpenAiImagesBackend, job: GenerationInput = IMAGE) -> tuple[Artifact, list[int]]:
    return await generate(backend, job)


def _size(artifact: Artifact) -> tuple[int, int]:
    with Image.open(io.BytesIO(artifact.data)) as image:
        return image.size


async def test_an_image_comes_back_as_base64_from_the_request_the_api_wants(connect: Connect) -> None:
    api, backend = await connect(settings={"model": "dall-e-2"})
    artifact, steps = await _generate(backend)
    [body] = api.requests
    assert body == {
        "prompt": "a red fox in the snow\nno text\nmuted colours\nAvoid: blurry",
        "n": 1,
        "size": "64x48",
        "model": "dall-e-2",
        "response_format": "b64_json",
    }
    assert api.headers[0]["Authorization"] == f"Bearer {TOKEN}"
    assert artifact.data == png(64, 48, body["prompt"]) and (artifact.width, artifact.height) == (64, 48)
    assert artifact.content_type == "image/png" and steps == [IMAGE.steps]
    assert artifact.provider_request_id == "req_1"  # the API's x-request-id, for its support


async def test_a_url_answer_is_downloaded_without_the_token(connect: Connect) -> None:
    api, backend = await connect(settings={"response_format": "url"})
    artifact, _ = await _generate(backend)
    assert _size(artifact) == (64, 48) and len(api.file_headers) == 1
    assert "Authorization" not in api.file_headers[0]  # another origin: the token stays home


async def test_a_gpt_image_model_gets_no_response_format_and_says_its_format(connect: Connect) -> None:
    api, backend = await connect(gpt_image=True, settings={"model": "gpt-image-1", "response_format": ""})
    artifact, _ = await _generate(backend)
    assert "response_format" not in api.requests[0] and artifact.content_type == "image/png"
    # Sending it anyway is the operator's mistake, refused by the API as permanent.
    _, strict = await connect(gpt_image=True, settings={"model": "gpt-image-1"})
    with pytest.raises(PermanentBackendError) as refused:
        await _generate(strict)
    assert refused.value.reason == "unknown_parameter"


async def test_the_size_sent_is_the_listed_one_nearest_the_renders_shape(connect: Connect) -> None:
    sizes = ("1024x1024", "1536x1024", "1024x1536")
    api, backend = await connect(settings={"sizes": sizes})
    for width, height in ((512, 256), (256, 512), (300, 310)):
        await _generate(backend, replace(IMAGE, width=width, height=height))
    assert [body["size"] for body in api.requests] == ["1536x1024", "1024x1536", "1024x1024"]


async def test_rate_limits_and_server_errors_are_retried_then_transient(connect: Connect) -> None:
    api, backend = await connect(failures=[(429, "rate_limit_exceeded", "0"), (503, None, None)])
    artifact, _ = await _generate(backend)
    assert _size(artifact) == (64, 48) and len(api.requests) == 3
    api, backend = await connect(failures=[(500, None, None)] * 3)
    with pytest.raises(TransientBackendError) as failed:
        await _generate(backend)
    assert failed.value.reason == "http_500" and len(api.requests) == 3


@pytest.mark.parametrize(
    ("behaviour", "token", "reason"),
    [
        ({}, "sk-wrong", "invalid_api_key"),
        ({"failures": [(400, "content_policy_violation", None)]}, TOKEN, "content_policy_violation"),
        ({"failures": [(400, None, None)]}, TOKEN, "http_400"),
    ],
    ids=["bad-token", "refused-prompt", "bad-request"],
)
async def test_refusals_are_permanent_with_the_apis_reason(
    connect: Connect, behaviour: dict[str, Any], token: str, reason: str
) -> None:
    api, backend = await connect(settings={"token": token}, **behaviour)
    with pytest.raises(PermanentBackendError) as refused:
        await _generate(backend)
    assert refused.value.reason == reason and len(api.requests) <= 1
    assert "sk-" not in str(refused.value)  # the token is never echoed


async def test_a_cancel_closes_the_request(connect: Connect) -> None:
    api, backend = await connect()
    api.hold = asyncio.Event()
    task = asyncio.create_task(_generate(backend))
    await asyncio.wait_for(api.held.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(api.gone.wait(), 5)  # the API saw its client leave


async def test_what_the_api_cannot_do_fails_at_once(connect: Connect) -> None:
    api, backend = await connect()
    for job, reason in (
        (replace(IMAGE, kind="video", duration_s=1.0, fps=4), "unsupported_kind"),
        (replace(IMAGE, reference=png(8, 8, "ref")), "reference_unsupported"),
    ):
        with pytest.raises(PermanentBackendError) as refused:
            await _generate(backend, job)
        assert refused.value.reason == reason
    assert api.requests == []


def test_settings_name_what_is_wrong() -> None:
    base = {"RENDERFLOW_BACKEND_IMAGE": "openai"}
    chosen = BackendSettings.from_env(
        Env(
            base
            | {
                "RENDERFLOW_BACKEND_OPENAI_URL": "https://api.example/v1",
                "RENDERFLOW_BACKEND_OPENAI_SIZES": "1024x1024, 1536x1024",
            }
        )
    )
    assert chosen.image == "openai" and chosen.openai is not None
    assert chosen.openai.sizes == ("1024x1024", "1536x1024") and chosen.openai.response_format == "b64_json"
    none = {
        "RENDERFLOW_BACKEND_OPENAI_URL": "https://a/v1",
        "RENDERFLOW_BACKEND_OPENAI_RESPONSE_FORMAT": "none",
    }
    assert (BackendSettings.from_env(Env(base | none)).openai or FAST).response_format == ""
    for env, says in (
        (base, "RENDERFLOW_BACKEND_OPENAI_URL is required"),
        (base | {"RENDERFLOW_BACKEND_OPENAI_URL": "https://k:s@api.example/v1"}, "must not hold credentials"),
        (
            base
            | {"RENDERFLOW_BACKEND_OPENAI_URL": "https://a/v1", "RENDERFLOW_BACKEND_OPENAI_SIZES": "big"},
            "WIDTHxHEIGHT",
        ),
        (
            base
            | {
                "RENDERFLOW_BACKEND_OPENAI_URL": "https://a/v1",
                "RENDERFLOW_BACKEND_OPENAI_RESPONSE_FORMAT": "png",
            },
            "b64_json, url or none",
        ),
        (
            {"RENDERFLOW_BACKEND": "openai", "RENDERFLOW_BACKEND_OPENAI_URL": "https://a/v1"},
            "RENDERFLOW_BACKEND_VIDEO cannot be openai",
        ),
    ):
        with pytest.raises(ConfigError, match=says):
            BackendSettings.from_env(Env(env))
