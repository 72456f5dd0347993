"""The gateway over real HTTP, in front of real metadata and generation services on one database:
projects, chains, rules, auth, isolation between users, and the error contract."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import aiohttp
from opentelemetry.sdk.trace import TracerProvider

from gateway.app import running as gateway_running
from gateway.config import Settings as GatewaySettings
from services.metadata import admin
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.settings import Addresses
from tests.conftest import free_port
from tests.support.gateway_stack import HTTP_TIMEOUT, PROBLEM, LiveStack, assert_problem, eventually


async def test_projects_chains_and_rules(stack: LiveStack) -> None:
    alice = await stack.user("alice")
    response, project = await stack.call("POST", "/v1/projects", alice, json={"slug": "demo", "name": "Demo"})
    assert response.status == 201 and response.headers["Location"] == "/v1/projects/demo"
    assert set(project) == {"id", "slug", "name", "default_chain_id", "created_at"}
    assert project["created_at"].endswith("Z")
    response, got = await stack.call("GET", "/v1/projects/demo", alice)
    assert response.status == 200 and got == project

    response, body = await stack.call("POST", "/v1/projects", alice, json={"slug": "demo", "name": "Again"})
    assert_problem(response, body, 409, "conflict")
    response, body = await stack.call("POST", "/v1/projects", alice, json={"slug": "Bad Slug", "name": "x"})
    assert_problem(response, body, 422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == ["slug"]

    for slug in ("p-two", "p-three"):
        await stack.call("POST", "/v1/projects", alice, json={"slug": slug, "name": slug})
    response, first = await stack.call("GET", "/v1/projects?page_size=2", alice)
    assert response.status == 200 and len(first["projects"]) == 2 and first["next_page_token"]
    _, second = await stack.call(
        "GET", f"/v1/projects?page_size=2&page_token={first['next_page_token']}", alice
    )
    assert second["next_page_token"] is None
    slugs = {p["slug"] for p in first["projects"] + second["projects"]}
    assert slugs == {"demo", "p-two", "p-three"}

    response, chain = await stack.call("POST", "/v1/projects/demo/chains", alice, json={"name": "story"})
    assert response.status == 201 and chain["project"] == "demo" and chain["is_default"] is False
    assert chain["length"] == 0
    _, chains = await stack.call("GET", "/v1/projects/demo/chains", alice)
    assert {c["id"] for c in chains["chains"]} == {chain["id"], project["default_chain_id"]}
    response, _ = await stack.call("GET", f"/v1/projects/demo/chains/{chain['id']}", alice)
    assert response.status == 200

    response, wide = await stack.call("POST", "/v1/projects/demo/rules", alice, json={"text": "no people"})
    assert response.status == 201 and wide["chain_id"] is None and wide["active"] is True
    response, narrow = await stack.call(
        "POST",
        "/v1/projects/demo/rules",
        alice,
        json={"text": "sepia", "chain_id": chain["id"], "active": False},
    )
    assert response.status == 201 and narrow["chain_id"] == chain["id"] and narrow["active"] is False
    response, patched = await stack.call(
        "PATCH", f"/v1/projects/demo/rules/{narrow['id']}", alice, json={"active": True}
    )
    assert response.status == 200 and patched["active"] is True and patched["text"] == "sepia"
    response, body = await stack.call("PATCH", f"/v1/projects/demo/rules/{narrow['id']}", alice, json={})
    assert_problem(response, body, 422, "validation_failed")
    response, body = await stack.call("DELETE", f"/v1/projects/demo/rules/{wide['id']}", alice)
    assert response.status == 204 and body is None
    _, rules = await stack.call("GET", "/v1/projects/demo/rules", alice)
    assert [r["id"] for r in rules["rules"]] == [narrow["id"]]
    response, body = await stack.call("DELETE", f"/v1/projects/demo/rules/{wide['id']}", alice)
    assert_problem(response, body, 404, "not_found")


async def test_requests_need_a_valid_key_and_revoked_keys_stop_working_at_once(stack: LiveStack) -> None:
    for headers in (None, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic abc"}):
        response, body = await stack.call("GET", "/v1/projects", headers)
        assert_problem(response, body, 401, "unauthenticated")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/healthz", "/readyz", "/openapi.json"):
        response, body = await stack.call("GET", path)
        assert response.status == 200, path
    _, ready = await stack.call("GET", "/readyz")
    # No image fetcher in this stack: renders are still accepted.
    assert ready == {
        "status": "degraded",
        "checks": {"metadata": "serving", "generation": "serving", "imagefetch": "not_serving"},
    }

    bob = await stack.user("bob")
    response, _ = await stack.call("GET", "/v1/projects", bob)
    assert response.status == 200  # now cached
    [key] = await admin.list_keys(stack.database_url, "bob")
    await admin.revoke_key(stack.database_url, str(key["id"]))

    async def refused() -> bool:
        return (await stack.call("GET", "/v1/projects", bob))[0].status == 401

    # Far sooner than the cache's 30 s TTL: the change feed dropped the entry.
    await eventually(refused)


async def test_another_users_resources_do_not_exist(stack: LiveStack) -> None:
    alice, mallory = await stack.user("alice"), await stack.user("mallory")
    _, project = await stack.call("POST", "/v1/projects", alice, json={"slug": "mine", "name": "Mine"})
    chain_id = project["default_chain_id"]
    _, rule = await stack.call("POST", "/v1/projects/mine/rules", alice, json={"text": "t"})
    response, render = await stack.call(
        "POST", "/v1/renders", alice, json={"project": "mine", "kind": "image", "prompt": "p"}
    )
    assert response.status == 202
    attempts = [
        ("GET", "/v1/projects/mine", None),
        ("POST", "/v1/projects/mine/chains", {"name": "x"}),
        ("GET", "/v1/projects/mine/chains", None),
        ("GET", f"/v1/projects/mine/chains/{chain_id}", None),
        ("GET", f"/v1/projects/mine/chains/{chain_id}/renders", None),
        ("POST", "/v1/projects/mine/rules", {"text": "x"}),
        ("GET", "/v1/projects/mine/rules", None),
        ("PATCH", f"/v1/projects/mine/rules/{rule['id']}", {"text": "x"}),
        ("DELETE", f"/v1/projects/mine/rules/{rule['id']}", None),
        ("POST", "/v1/renders", {"project": "mine", "kind": "image", "prompt": "p"}),
        ("GET", f"/v1/renders/{render['id']}", None),
        ("GET", "/v1/renders?project=mine", None),
        ("GET", f"/v1/renders/{render['id']}/events", None),
        ("GET", f"/v1/renders/{render['id']}/output", None),
        ("POST", f"/v1/renders/{render['id']}:cancel", None),
    ]
    for method, path, payload in attempts:
        response, body = await stack.call(method, path, mallory, json=payload)
        assert response.status == 404, (method, path, body)
        assert body["code"] == "not_found"
    _, listed = await stack.call("GET", "/v1/renders", mallory)
    assert listed == {"renders": [], "next_page_token": None}
    _, still = await stack.call("GET", f"/v1/renders/{render['id']}", alice)
    assert still["status"] == "queued"


async def test_the_error_contract(stack: LiveStack) -> None:
    alice = await stack.user("alice")
    too_large = b"x" * (1024 * 1024 + 1)
    response, body = await stack.call("POST", "/v1/projects", alice, data=io.BytesIO(too_large))
    assert_problem(response, body, 413, "payload_too_large")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: stopped while reading
        for _ in range(17):
            yield b"x" * 65536

    response, body = await stack.call("POST", "/v1/projects", alice, data=chunked())
    assert_problem(response, body, 413, "payload_too_large")
    response, body = await stack.call(
        "POST", "/v1/projects", {**alice, "Content-Type": "application/json"}, data=b"{not json"
    )
    assert_problem(response, body, 422, "validation_failed")
    response, body = await stack.call(
        "POST", "/v1/projects", alice, json={"slug": "ok", "name": "x", "owner": 1}
    )
    assert_problem(response, body, 422, "validation_failed")
    assert body["errors"] == [{"field": "owner", "message": "is not a known field"}]
    response, body = await stack.call(
        "POST",
        "/v1/renders",
        alice,
        json={"project": "ok", "kind": "image", "prompt": "p", "params": {"width": 1}},
    )
    assert body["errors"] == [{"field": "params.width", "message": "must be at least 64"}]
    response, body = await stack.call("GET", "/v1/projects?page_size=500", alice)
    assert body["errors"][0]["field"] == "page_size"

    response, body = await stack.call("GET", "/v1/nothing-here", alice)
    assert_problem(response, body, 404, "not_found")
    response, body = await stack.call("PUT", "/v1/projects", alice, json={})
    assert_problem(response, body, 405, "method_not_allowed")
    assert {"GET", "POST"} <= set(response.headers["Allow"].split(", "))
    response, body = await stack.call("GET", "/v1/renders/some-id:cancel", alice)
    assert_problem(response, body, 405, "method_not_allowed")

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response, body = await stack.call(
        "GET",
        "/v1/projects/none",
        {**alice, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Request-Id": "client-req-1"},
    )
    assert_problem(response, body, 404, "not_found")
    assert body["trace_id"] == trace_id and body["request_id"] == "client-req-1"
    assert response.headers["traceparent"].split("-")[1] == trace_id
    response, _ = await stack.call("GET", "/healthz", {"X-Request-Id": "bad id with spaces"})
    assert response.headers["X-Request-Id"] != "bad id with spaces" and response.headers["traceparent"]
    assert "total;dur=" in response.headers["Server-Timing"]


async def test_not_ready_while_a_service_is_down() -> None:
    down = Addresses(metadata=f"127.0.0.1:{free_port()}", generation=f"127.0.0.1:{free_port()}")
    settings = GatewaySettings(port=0, addresses=down, shutdown_grace_s=0.5)
    async with gateway_running(settings) as port, aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
            body = await response.json(content_type=PROBLEM)
            assert response.status == 503 and body["code"] == "unavailable"
            assert int(response.headers["Retry-After"]) > 0
        async with http.get(
            f"http://127.0.0.1:{port}/v1/projects", headers={"Authorization": "Bearer k"}
        ) as response:
            assert response.status == 503  # cannot tell a key is good: unavailable, not unauthenticated


async def test_cached_keys_outlive_a_metadata_restart_and_missed_revocations_still_arrive(
    database_url: str,
) -> None:
    metadata = MetadataSettings(
        listen=f"127.0.0.1:{free_port()}", database_url=database_url, change_poll_s=0.2
    )
    addresses = Addresses(metadata=metadata.listen, generation=f"127.0.0.1:{free_port()}")
    settings = GatewaySettings(port=0, addresses=addresses, shutdown_grace_s=0.5)
    async with metadata_running(metadata):
        _, key = await admin.create_user(database_url, "carol")
        [info] = await admin.list_keys(database_url, "carol")
    carol = {"Authorization": f"Bearer {key}"}
    async with (
        gateway_running(settings, tracer_provider=TracerProvider()) as port,
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
    ):
        probe = f"http://127.0.0.1:{port}/v1/no-such-route"  # needs a key, then nothing else

        async def status() -> int:
            async with http.get(probe, headers=carol) as response:
                return response.status

        async with metadata_running(metadata):
            assert await status() == 404  # authenticated, and now cached
        assert await status() == 404  # metadata is down: the cache answers
        await admin.revoke_key(database_url, str(info["id"]))  # while the gateway cannot hear it
        async with metadata_running(metadata):

            async def refused() -> bool:
                return await status() == 401

            # The feed resumes after its last seq and replays the revocation it missed.
            await eventually(refused, 10)
