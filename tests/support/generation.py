"""Helpers of the generation tests: the client types of the fixtures (tests/integration/conftest.py)
and small clients of the RPCs."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from renderflow.v1 import generation_pb2 as pb
from renderflow.v1 import generation_pb2_grpc as pb_grpc

from services.generation.worker import Worker
from shared.rpc_errors import rpc_errors

# The async stub type exists only in the .pyi stubs.
Stub: TypeAlias = "pb_grpc.GenerationServiceAsyncStub"
TERMINAL = {"succeeded", "failed", "cancelled"}

ServerFactory = Callable[..., Awaitable[Stub]]
"""`start_server(**settings)`: a client of a new generation server."""
WorkerFactory = Callable[..., Awaitable[Worker]]
"""`start_worker(backends=..., **settings)`: a new in-process worker."""
ProcessFactory = Callable[..., subprocess.Popen[bytes]]
"""`spawn_worker(**env)`: a new worker process."""


def spec(**fields: Any) -> pb.RenderSpec:
    """A small, valid image spec; `params` entries may be given as width=..., steps=... ."""
    params = {key: fields.pop(key) for key in ("width", "height", "steps", "seed") if key in fields}
    fields.setdefault("prompt", "a red fox in the snow")
    fields.setdefault("kind", pb.RENDER_KIND_IMAGE)
    return pb.RenderSpec(
        params=pb.RenderParams(**{"width": 64, "height": 64, "steps": 4, **params}), **fields
    )


async def submit(stub: Stub, user: str = "alice", **fields: Any) -> pb.Render:
    request_fields = {
        k: fields.pop(k) for k in ("idempotency_key", "request_hash", "traceparent") if k in fields
    }
    with rpc_errors():
        return await stub.Submit(pb.SubmitRequest(user_id=user, render=spec(**fields), **request_fields))


async def events(stub: Stub, render_id: str, user: str = "alice", after_seq: int = 0) -> list[pb.RenderEvent]:
    """Every event of a Watch, until the server ends the stream."""
    with rpc_errors():
        call = stub.Watch(pb.WatchRequest(user_id=user, render_id=render_id, after_seq=after_seq))
        return [event async for event in call]


async def finished(stub: Stub, render_id: str, user: str = "alice", timeout: float = 30.0) -> pb.Render:
    """The render once it has ended (waits by watching, bounded by `timeout`)."""
    await asyncio.wait_for(events(stub, render_id, user), timeout)
    with rpc_errors():
        return await stub.GetRender(pb.GetRenderRequest(user_id=user, render_id=render_id))


async def output(stub: Stub, render_id: str, user: str = "alice", **range_: int) -> list[pb.OutputChunk]:
    with rpc_errors():
        call = stub.GetOutput(pb.GetOutputRequest(user_id=user, render_id=render_id, **range_))
        return [chunk async for chunk in call]


def status_name(render: pb.Render) -> str:
    return pb.RenderStatus.Name(render.status).removeprefix("RENDER_STATUS_").lower()
