"""Helpers of the generation tests: the client types of the fixtures (tests/integration/conftest.py),
the users they submit as, and small clients of the RPCs.

Generation resolves every render's project, chain and rules through the metadata service, so the
renders of these tests belong to real metadata users. `Accounts` makes them on first mention by
name, each with project PROJECT (and its default chain); the helpers below take a user's name (or
id) and submit as that user's id, carrying the freshness (`min_change_seq`) of the user's last
metadata write. A test calling an RPC itself asks `accounts.user("alice")` for the id.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from renderflow.v1 import generation_pb2 as pb
from renderflow.v1 import generation_pb2_grpc as pb_grpc
from renderflow.v1 import metadata_pb2 as metadata_pb
from renderflow.v1 import metadata_pb2_grpc

from services.generation.worker import Worker
from services.metadata.servicer import CHANGE_SEQ_KEY
from shared.rpc_errors import rpc_errors

# The async stub types exist only in the .pyi stubs.
Stub: TypeAlias = "pb_grpc.GenerationServiceAsyncStub"
MetadataStub: TypeAlias = "metadata_pb2_grpc.MetadataServiceAsyncStub"
TERMINAL = {"succeeded", "failed", "cancelled"}
PROJECT = "art"
"""The project every user of `Accounts` has, and the one `spec()` renders in."""

ServerFactory = Callable[..., Awaitable[Stub]]
"""`start_server(**settings)`: a client of a new generation server."""
WorkerFactory = Callable[..., Awaitable[Worker]]
"""`start_worker(backends=..., artifacts=..., **settings)`: a new in-process worker."""
ProcessFactory = Callable[..., subprocess.Popen[bytes]]
"""`spawn_worker(**env)`: a new worker process."""

_Reply = TypeVar("_Reply")


class Accounts:
    """Real metadata users of one test, made on first mention by name, each with project PROJECT;
    and their further projects, chains and rules. A user's id passes for its name everywhere."""

    def __init__(self, metadata: MetadataStub) -> None:
        self.metadata = metadata
        self._ids: dict[str, str] = {}
        self._seqs: dict[str, int] = {}
        self._lock = asyncio.Lock()  # racing first submits make one user
        self._chains = itertools.count(1)

    async def user(self, name: str = "alice") -> str:
        """The id of the user `name` (or `name` itself when it is a user's id), made with project
        PROJECT the first time."""
        async with self._lock:
            if name in self._ids.values():
                return name
            if name not in self._ids:
                with rpc_errors():
                    made = await self.metadata.CreateUser(metadata_pb.CreateUserRequest(name=name))
                await self._write(
                    made.user.id,
                    self.metadata.CreateProject(
                        metadata_pb.CreateProjectRequest(
                            user_id=made.user.id, slug=PROJECT, name=PROJECT.title()
                        )
                    ),
                )
                self._ids[name] = made.user.id
            return self._ids[name]

    async def project(self, user: str = "alice", slug: str = PROJECT) -> metadata_pb.Project:
        """The user's project `slug`, made when it does not exist yet."""
        user_id = await self.user(user)
        with rpc_errors():
            listed = await self.metadata.ListProjects(metadata_pb.ListProjectsRequest(user_id=user_id))
        for project in listed.projects:
            if project.slug == slug:
                return project
        request = metadata_pb.CreateProjectRequest(user_id=user_id, slug=slug, name=slug.title())
        return await self._write(user_id, self.metadata.CreateProject(request))

    async def default_chain(self, user: str = "alice", project: str = PROJECT) -> str:
        """The id of the default chain of the user's project."""
        return (await self.project(user, project)).default_chain_id

    async def chain(self, user: str = "alice", project: str = PROJECT, name: str = "") -> str:
        """The id of a new chain of the user's project."""
        user_id = await self.user(user)
        await self.project(user_id, project)
        name = name or f"chain {next(self._chains)}"
        request = metadata_pb.CreateChainRequest(user_id=user_id, project=project, name=name)
        return (await self._write(user_id, self.metadata.CreateChain(request))).id

    async def rule(
        self, text: str, user: str = "alice", chain_id: str = "", project: str = PROJECT
    ) -> metadata_pb.Rule:
        """A new active rule of the user's project: project-wide, or `chain_id`'s own."""
        user_id = await self.user(user)
        request = metadata_pb.CreateRuleRequest(
            user_id=user_id, project=project, chain_id=chain_id, text=text
        )
        return await self._write(user_id, self.metadata.CreateRule(request))

    async def pause_rule(self, rule: metadata_pb.Rule, user: str = "alice") -> metadata_pb.Rule:
        """The rule, made inactive."""
        user_id = await self.user(user)
        request = metadata_pb.UpdateRuleRequest(
            user_id=user_id, project=rule.project, rule_id=rule.id, active=False
        )
        return await self._write(user_id, self.metadata.UpdateRule(request))

    def change_seq(self, user_id: str) -> int:
        """The seq of the user's last metadata write (its `min_change_seq` from then on)."""
        return self._seqs.get(user_id, 0)

    async def _write(self, user_id: str, call: grpc.aio.UnaryUnaryCall[Any, _Reply]) -> _Reply:
        """The reply of a metadata write, noting the seq of the change it made."""
        with rpc_errors():
            reply = await call
            trailing = await call.trailing_metadata()
        for key, value in trailing or ():
            if key == CHANGE_SEQ_KEY:
                seq = int(value if isinstance(value, str) else value.decode())
                self._seqs[user_id] = max(self._seqs.get(user_id, 0), seq)
        return reply


_ACCOUNTS: weakref.WeakKeyDictionary[object, Accounts] = weakref.WeakKeyDictionary()


def serving(stub: Stub, accounts: Accounts) -> Stub:
    """`stub`, whose users the helpers below take from `accounts` (the fixtures do this)."""
    _ACCOUNTS[stub] = accounts
    return stub


def accounts_of(stub: Stub) -> Accounts:
    """The accounts of the users of `stub` (a fixture's)."""
    try:
        return _ACCOUNTS[stub]
    except KeyError:
        raise LookupError(
            "a stub the helpers do not know: take it from the `stub` or `start_server` fixture,"
            " or bind it to its users with `serving(stub, accounts)`"
        ) from None


_PARAMS = ("width", "height", "steps", "seed", "duration_s", "fps")


def spec(**fields: Any) -> pb.RenderSpec:
    """A small, valid image spec in project PROJECT; `params` entries may be given as width=...,
    steps=..., fps=... ."""
    params = {key: fields.pop(key) for key in _PARAMS if key in fields}
    fields.setdefault("prompt", "a red fox in the snow")
    fields.setdefault("kind", pb.RENDER_KIND_IMAGE)
    fields.setdefault("project", PROJECT)
    return pb.RenderSpec(
        params=pb.RenderParams(**{"width": 64, "height": 64, "steps": 4, **params}), **fields
    )


_REQUEST_FIELDS = ("idempotency_key", "request_hash", "traceparent", "min_change_seq")


async def _as(stub: Stub, user: str, request: dict[str, Any]) -> str:
    """The id of `user`, with `request`'s `min_change_seq` defaulted to the user's last write."""
    accounts = accounts_of(stub)
    user_id = await accounts.user(user)
    request.setdefault("min_change_seq", accounts.change_seq(user_id))
    return user_id


async def submit(stub: Stub, user: str = "alice", **fields: Any) -> pb.Render:
    """Submits `spec(**fields)` (SubmitRequest's own fields may be given too) as `user`."""
    request = {key: fields.pop(key) for key in _REQUEST_FIELDS if key in fields}
    user_id = await _as(stub, user, request)
    with rpc_errors():
        return await stub.Submit(pb.SubmitRequest(user_id=user_id, render=spec(**fields), **request))


async def submit_batch(
    stub: Stub, renders: list[pb.RenderSpec], user: str = "alice", **request: Any
) -> pb.Batch:
    """Submits `renders` as one batch of `user` (SubmitBatchRequest's own fields in `request`)."""
    user_id = await _as(stub, user, request)
    with rpc_errors():
        return await stub.SubmitBatch(pb.SubmitBatchRequest(user_id=user_id, renders=renders, **request))


async def user_id(stub: Stub, user: str = "alice") -> str:
    """The id of the user named `user` (made when new)."""
    return await accounts_of(stub).user(user)


async def events(stub: Stub, render_id: str, user: str = "alice", after_seq: int = 0) -> list[pb.RenderEvent]:
    """Every event of a Watch, until the server ends the stream."""
    request = pb.WatchRequest(user_id=await user_id(stub, user), render_id=render_id, after_seq=after_seq)
    with rpc_errors():
        return [event async for event in stub.Watch(request)]


async def finished(stub: Stub, render_id: str, user: str = "alice", timeout: float = 30.0) -> pb.Render:
    """The render once it has ended (waits by watching, bounded by `timeout`)."""
    await asyncio.wait_for(events(stub, render_id, user), timeout)
    return await get(stub, render_id, user)


async def get(stub: Stub, render_id: str, user: str = "alice") -> pb.Render:
    """The render as it is now."""
    request = pb.GetRenderRequest(user_id=await user_id(stub, user), render_id=render_id)
    with rpc_errors():
        return await stub.GetRender(request)


async def output(stub: Stub, render_id: str, user: str = "alice", **range_: int) -> list[pb.OutputChunk]:
    request = pb.GetOutputRequest(user_id=await user_id(stub, user), render_id=render_id, **range_)
    with rpc_errors():
        return [chunk async for chunk in stub.GetOutput(request)]


def status_name(render: pb.Render) -> str:
    return pb.RenderStatus.Name(render.status).removeprefix("RENDER_STATUS_").lower()
