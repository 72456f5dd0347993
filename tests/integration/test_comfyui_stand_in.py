"""The ComfyUI stand-in (tests/support/comfyui.py) driven with plain aiohttp, as a client of ComfyUI
would: it queues, streams, stores, interrupts and dies as ComfyUI does."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from PIL import Image

from tests.support.comfyui import (
    WORKFLOW_IMG2IMG,
    WORKFLOW_TXT2IMG,
    WORKFLOW_VIDEO,
    ComfyUIStandIn,
    graph_with,
)

SMALL: dict[str, dict[str, Any]] = {
    "5": {"width": 64, "height": 48},
    "3": {"steps": 3, "seed": 5},
    "6": {"text": "a red fox"},
}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def queue(
    http: aiohttp.ClientSession, comfy: ComfyUIStandIn, graph: dict[str, Any], client_id: str = "c1"
) -> str:
    prompt_id = str(uuid.uuid4())
    body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
    async with http.post(f"{comfy.url}/prompt", json=body) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer == {"prompt_id": prompt_id, "number": answer["number"], "node_errors": {}}
    return prompt_id


async def until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> list[dict[str, Any]]:
    """The messages up to `executing` {node: null} for `prompt_id`."""
    seen = []
    async for message in ws:
        assert message.type == aiohttp.WSMsgType.TEXT
        seen.append(json.loads(message.data))
        data = seen[-1]["data"]
        if seen[-1]["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
            return seen
    raise AssertionError(f"the socket closed after {seen}")


async def test_a_prompt_streams_in_comfyuis_order_and_is_cached_the_second_time(
    http: aiohttp.ClientSession,
) -> None:
    async with ComfyUIStandIn() as comfy, http.ws_connect(f"{comfy.url}/ws?clientId=c1") as ws:
        hello = await ws.receive_json()
        assert hello == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "c1"},
        }
        graph = graph_with(WORKFLOW_TXT2IMG, SMALL)
        first = await queue(http, comfy, graph)
        messages = await until_done(ws, first)
        kinds = [(m["type"], m["data"].get("node")) for m in messages if m["type"] != "progress_state"]
        assert kinds == [
            ("status", None),  # queued
            ("status", None),  # taken from the queue
            ("execution_start", None),
            ("execution_cached", None),
            *[("executing", node) for node in ("4", "5", "7", "6", "3")],  # ExecutionList's order
            *[("progress", "3")] * 3,
            ("executing", "8"),
            ("executing", "9"),
            ("executed", "9"),
            ("execution_success", None),
            ("status", None),
            ("executing", None),
        ]
        progress = [m["data"] for m in messages if m["type"] == "progress"]
        assert progress[-1] == {"value": 3, "max": 3, "prompt_id": first, "node": "3"}
        assert messages[2]["data"]["prompt_id"] == first and "timestamp" in messages[2]["data"]

        async with http.get(f"{comfy.url}/history/{first}") as response:
            entry = (await response.json())[first]
        images = entry["outputs"]["9"]["images"]
        assert images == [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == [
            "execution_start",
            "execution_cached",
            "execution_success",
        ]
        assert entry["prompt"][1] == first and entry["prompt"][3]["client_id"] == "c1"
        async with http.get(f"{comfy.url}/view", params=images[0]) as response:
            assert response.content_type == "image/png"
            png = await response.read()
        assert Image.open(io.BytesIO(png)).size == (64, 48)
        async with http.get(f"{comfy.url}/view", params={"filename": "nope.png"}) as response:
            assert response.status == 404

        again = await queue(http, comfy, graph)
        messages = await until_done(ws, again)
        cached = next(m["data"] for m in messages if m["type"] == "execution_cached")
        assert sorted(cached["nodes"]) == sorted(graph)
        assert [m["type"] for m in messages if m["type"] in ("executing", "executed", "progress")] == [
            "executed",
            "executing",
        ]
        assert comfy.prompts[again] == graph
        assert comfy.hits["POST /prompt"] == 2


async def test_validation_uploads_and_img2img(http: aiohttp.ClientSession) -> None:
    async with ComfyUIStandIn() as comfy:
        unknown = graph_with(WORKFLOW_TXT2IMG, SMALL)
        unknown["12"] = {"class_type": "FancyUpscaler", "inputs": {}}
        async with http.post(f"{comfy.url}/prompt", json={"prompt": unknown}) as response:
            assert response.status == 400
            body = await response.json()
        assert body["error"]["type"] == "invalid_prompt" and body["node_errors"] == {}

        img2img = graph_with(WORKFLOW_IMG2IMG, {"3": {"steps": 2}, "10": {"image": "ref.png"}})
        async with http.post(f"{comfy.url}/prompt", json={"prompt": img2img}) as response:
            assert response.status == 400
            body = await response.json()
        assert body["error"]["type"] == "prompt_outputs_failed_validation"
        assert body["node_errors"]["10"]["errors"][0]["details"] == "image - Invalid image file: ref.png"
        assert body["node_errors"]["10"]["dependent_outputs"] == ["9"]

        reference = io.BytesIO()
        Image.new("RGB", (40, 24), (0, 0, 255)).save(reference, "PNG")
        form = aiohttp.FormData()
        form.add_field("image", reference.getvalue(), filename="ref.png", content_type="image/png")
        form.add_field("overwrite", "true")
        async with http.post(f"{comfy.url}/upload/image", data=form) as response:
            assert await response.json() == {"name": "ref.png", "subfolder": "", "type": "input"}
        assert comfy.uploads == {"ref.png": reference.getvalue()}

        prompt_id = await queue(http, comfy, img2img)
        entry = await comfy.finished(prompt_id)
        image = entry["outputs"]["9"]["images"][0]
        async with http.get(f"{comfy.url}/view", params=image) as response:
            assert Image.open(io.BytesIO(await response.read())).size == (40, 24)


async def test_interrupt_by_prompt_id_and_queue_delete(http: aiohttp.ClientSession) -> None:
    async with ComfyUIStandIn(hold_at_step=1) as comfy:
        graph = graph_with(WORKFLOW_TXT2IMG, SMALL)
        running = await queue(http, comfy, graph)
        waiting = await queue(http, comfy, graph_with(graph, {"3": {"seed": 6}}))
        assert await comfy.started(step=1) == running
        async with http.get(f"{comfy.url}/queue") as response:
            state = await response.json()
        assert [item[1] for item in state["queue_running"]] == [running]
        assert [item[1] for item in state["queue_pending"]] == [waiting]

        async with http.post(f"{comfy.url}/interrupt", json={"prompt_id": waiting}):
            pass  # not the running one: nothing happens
        async with http.post(f"{comfy.url}/queue", json={"delete": [waiting, running]}):
            pass  # the running one cannot be deleted
        assert comfy.removed == [waiting] and comfy.deleted == [waiting, running]
        async with http.post(f"{comfy.url}/interrupt", json={"prompt_id": running}):
            pass
        entry = await comfy.finished(running)
        assert comfy.interrupts == [running]
        assert comfy.interrupt_requests == [waiting, running]
        assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
        kind, data = entry["status"]["messages"][-1]
        assert kind == "execution_interrupted"
        assert (data["node_id"], data["node_type"]) == ("3", "KSampler")
        async with http.get(f"{comfy.url}/history/{waiting}") as response:
            assert await response.json() == {}


async def test_a_failing_node_and_a_video(http: aiohttp.ClientSession) -> None:
    async with ComfyUIStandIn(fail_at_node="8", fail_with="CUDA out of memory") as comfy:
        failing = await queue(http, comfy, graph_with(WORKFLOW_TXT2IMG, SMALL))
        entry = await comfy.finished(failing)
        kind, data = entry["status"]["messages"][-1]
        assert kind == "execution_error" and data["node_id"] == "8"
        assert data["exception_message"] == "CUDA out of memory\n"
        assert data["executed"] == ["4", "5", "7", "6", "3"] and data["exception_type"] == "RuntimeError"

        comfy.fail_at_node = None
        comfy.fail_with = ""
        video = graph_with(
            WORKFLOW_VIDEO,
            {"40": {"width": 64, "height": 48, "length": 9}, "3": {"steps": 2}, "49": {"fps": 8}},
        )
        prompt_id = await queue(http, comfy, video)
        entry = await comfy.finished(prompt_id)
        output = entry["outputs"]["50"]
        assert output["animated"] == [True]
        assert output["images"] == [
            {"filename": "ComfyUI_00001_.mp4", "subfolder": "video", "type": "output"}
        ]
        async with http.get(f"{comfy.url}/view", params=output["images"][0]) as response:
            assert response.content_type == "video/mp4"
            assert (await response.read())[4:8] == b"ftyp"


async def test_a_dead_instance_drops_everything_and_refuses(http: aiohttp.ClientSession) -> None:
    async with ComfyUIStandIn(hold_at_step=2, silent_ws=True) as comfy:
        async with http.ws_connect(f"{comfy.url}/ws?clientId=c1") as ws:
            assert (await ws.receive_json())["type"] == "status"
            prompt_id = await queue(http, comfy, graph_with(WORKFLOW_TXT2IMG, SMALL))
            await comfy.started(prompt_id, step=2)
            await comfy.die()
            message = await ws.receive()
            assert message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            assert ws.close_code != 1000
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"{comfy.url}/system_stats"):
                pass
        await comfy.revive()
        async with http.get(f"{comfy.url}/system_stats") as response:
            assert (await response.json())["system"]["comfyui_version"] == comfy.version
        async with http.get(f"{comfy.url}/history/{prompt_id}") as response:
            assert await response.json() == {}


async def test_rejections_drops_and_a_replaced_socket(http: aiohttp.ClientSession) -> None:
    async with ComfyUIStandIn(reject_prompts=1, hold_at_step=1) as comfy:
        graph = graph_with(WORKFLOW_TXT2IMG, SMALL)
        async with http.post(f"{comfy.url}/prompt", json={"prompt": graph}) as response:
            assert response.status == 500
        assert comfy.prompts == {}

        old = await http.ws_connect(f"{comfy.url}/ws?clientId=c1")
        await old.receive_json()
        prompt_id = await queue(http, comfy, graph)
        await comfy.started(prompt_id, step=1)
        async with http.ws_connect(f"{comfy.url}/ws?clientId=c1") as new:
            assert (await new.receive_json())["type"] == "status"
            assert await new.receive_json() == {"type": "executing", "data": {"node": "3"}}
            await old.close()  # ComfyUI then forgets c1: the new socket gets nothing more, not even status
            await comfy.wait_for(lambda: comfy.clients == set())
            comfy.hold_at_step = None
            comfy.release()
            await comfy.finished(prompt_id)
            comfy.drop_ws_after = 2
            async with http.ws_connect(f"{comfy.url}/ws?clientId=c2") as dropped:
                assert (await dropped.receive_json())["type"] == "status"
                await queue(http, comfy, graph_with(graph, {"3": {"seed": 7}}), client_id="c2")
                assert (await dropped.receive_json())["type"] == "status"
                assert (await dropped.receive()).type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            assert comfy.ws_drops == 1 and comfy.clients == set()
