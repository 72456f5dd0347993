"""The metadata service over gRPC: projects, chains, rules, ResolveRender, tenant isolation,
pagination and validation, against a real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from renderflow.v1 import common_pb2, metadata_pb2
from renderflow.v1 import metadata_pb2 as pb
from renderflow.v1.metadata_pb2_grpc import MetadataServiceStub

from services.metadata.config import Settings
from services.metadata.server import running
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.grpc_client import create_channel
from shared.rpc_errors import rpc_errors

if TYPE_CHECKING:
    from renderflow.v1.metadata_pb2_grpc import MetadataServiceAsyncStub


@pytest.fixture
async def stub(database_url: str) -> AsyncIterator[MetadataServiceAsyncStub]:
    settings = Settings(listen="127.0.0.1:0", database_url=database_url, drain_grace_s=1.0)
    async with running(settings) as port, create_channel(f"127.0.0.1:{port}") as channel:
        yield MetadataServiceStub(channel)


async def _user(stub: MetadataServiceAsyncStub, name: str) -> str:
    reply = await stub.CreateUser(pb.CreateUserRequest(name=name))
    return reply.user.id


async def _status(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    code: grpc.StatusCode = caught.value.code()
    return code


async def _invalid_fields(call: Awaitable[Any]) -> set[str]:
    with pytest.raises(ValidationFailed) as caught, rpc_errors():
        await call
    return {error.field for error in caught.value.errors}


async def test_project_comes_with_its_default_chain(stub: MetadataServiceAsyncStub) -> None:
    alice = await _user(stub, "alice")
    created = await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="poster", name="Poster"))
    fetched = await stub.GetProject(pb.GetProjectRequest(user_id=alice, slug="poster"))
    assert fetched == created
    chains = await stub.ListChains(pb.ListChainsRequest(user_id=alice, project="poster"))
    [chain] = chains.chains
    assert (chain.id, chain.name, chain.is_default, chain.length, chain.project) == (
        created.default_chain_id,
        "default",
        True,
        0,
        "poster",
    )
    assert chains.next_page_token == ""


async def test_taken_slug_is_already_exists_but_other_users_may_use_it(
    stub: MetadataServiceAsyncStub,
) -> None:
    alice, bob = await _user(stub, "alice"), await _user(stub, "bob")
    await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="poster", name="Poster"))
    retry = stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="poster", name="Again"))
    assert await _status(retry) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(Conflict), rpc_errors():
        await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="poster", name="Again"))
    await stub.CreateProject(pb.CreateProjectRequest(user_id=bob, slug="poster", name="Bob's"))


async def test_invalid_input_names_each_field(stub: MetadataServiceAsyncStub) -> None:
    alice = await _user(stub, "alice")
    assert await _invalid_fields(
        stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="Not a slug", name=""))
    ) == {"slug", "name"}
    assert await _invalid_fields(
        stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="-dash", name="x" * 201))
    ) == {"slug", "name"}
    await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="ok", name="Ok"))
    assert await _invalid_fields(
        stub.CreateChain(pb.CreateChainRequest(user_id=alice, project="ok", name=" "))
    ) == {"name"}
    assert await _invalid_fields(
        stub.CreateRule(pb.CreateRuleRequest(user_id=alice, project="ok", text="x" * 2001))
    ) == {"text"}
    assert await _invalid_fields(
        stub.ListRules(
            pb.ListRulesRequest(user_id=alice, project="ok", page=common_pb2.PageRequest(page_size=-1))
        )
    ) == {"page_size"}
    assert await _invalid_fields(stub.CreateUser(pb.CreateUserRequest(name="no spaces please"))) == {"name"}


async def test_rules_are_created_updated_and_deleted(stub: MetadataServiceAsyncStub) -> None:
    alice = await _user(stub, "alice")
    project = await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="poster", name="P"))
    rule = await stub.CreateRule(
        pb.CreateRuleRequest(user_id=alice, project="poster", chain_id=project.default_chain_id, text="warm")
    )
    assert (rule.active, rule.chain_id, rule.project) == (True, project.default_chain_id, "poster")
    renamed = await stub.UpdateRule(
        pb.UpdateRuleRequest(user_id=alice, project="poster", rule_id=rule.id, text="cold")
    )
    assert (renamed.text, renamed.active) == ("cold", True)
    paused = await stub.UpdateRule(
        pb.UpdateRuleRequest(user_id=alice, project="poster", rule_id=rule.id, active=False)
    )
    assert (paused.text, paused.active) == ("cold", False)
    await stub.DeleteRule(pb.DeleteRuleRequest(user_id=alice, project="poster", rule_id=rule.id))
    listed = await stub.ListRules(pb.ListRulesRequest(user_id=alice, project="poster"))
    assert list(listed.rules) == []
    again = stub.DeleteRule(pb.DeleteRuleRequest(user_id=alice, project="poster", rule_id=rule.id))
    assert await _status(again) == grpc.StatusCode.NOT_FOUND


async def test_another_users_resources_are_not_found(stub: MetadataServiceAsyncStub) -> None:
    alice, mallory = await _user(stub, "alice"), await _user(stub, "mallory")
    project = await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="secret", name="S"))
    chain_id = project.default_chain_id
    rule = await stub.CreateRule(pb.CreateRuleRequest(user_id=alice, project="secret", text="hidden"))
    await stub.CreateProject(pb.CreateProjectRequest(user_id=mallory, slug="mine", name="M"))

    calls: list[Awaitable[Any]] = []
    for slug in ("secret", "mine"):  # Alice's project, and Mallory's own naming Alice's ids
        calls += [
            stub.GetChain(pb.GetChainRequest(user_id=mallory, project=slug, chain_id=chain_id)),
            stub.CreateRule(pb.CreateRuleRequest(user_id=mallory, project=slug, chain_id=chain_id, text="t")),
            stub.UpdateRule(pb.UpdateRuleRequest(user_id=mallory, project=slug, rule_id=rule.id, text="x")),
            stub.DeleteRule(pb.DeleteRuleRequest(user_id=mallory, project=slug, rule_id=rule.id)),
            stub.ResolveRender(pb.ResolveRenderRequest(user_id=mallory, project=slug, chain_id=chain_id)),
        ]
    calls += [
        stub.GetProject(pb.GetProjectRequest(user_id=mallory, slug="secret")),
        stub.CreateChain(pb.CreateChainRequest(user_id=mallory, project="secret", name="c")),
        stub.ListChains(pb.ListChainsRequest(user_id=mallory, project="secret")),
        stub.ListRules(pb.ListRulesRequest(user_id=mallory, project="secret")),
        stub.ResolveRender(pb.ResolveRenderRequest(user_id=mallory, project="secret")),
        stub.ResolveRender(pb.ResolveRenderRequest(user_id=mallory, project=project.id)),
        # Malformed ids are as unknown as missing ones, never INTERNAL.
        stub.GetProject(pb.GetProjectRequest(user_id="not-a-uuid", slug="secret")),
        stub.GetChain(pb.GetChainRequest(user_id=alice, project="secret", chain_id="nope")),
        stub.UpdateRule(pb.UpdateRuleRequest(user_id=alice, project="secret", rule_id="nope", text="x")),
        stub.ResolveRender(pb.ResolveRenderRequest(user_id=alice, project="secret", chain_id="nope")),
        stub.CreateProject(pb.CreateProjectRequest(user_id=str(uuid.uuid4()), slug="ghost", name="G")),
    ]
    for call in calls:
        assert await _status(call) == grpc.StatusCode.NOT_FOUND

    # Nothing of Alice's changed, and Mallory's listing shows only her own project.
    kept = await stub.ListRules(pb.ListRulesRequest(user_id=alice, project="secret"))
    assert [(r.id, r.text) for r in kept.rules] == [(rule.id, "hidden")]
    chain = await stub.GetChain(pb.GetChainRequest(user_id=alice, project="secret", chain_id=chain_id))
    assert chain.length == 0
    mine = await stub.ListProjects(pb.ListProjectsRequest(user_id=mallory))
    assert [p.slug for p in mine.projects] == ["mine"]


async def test_pages_hold_every_item_exactly_once(stub: MetadataServiceAsyncStub) -> None:
    alice = await _user(stub, "alice")
    await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="poster", name="P"))
    created = [
        (await stub.CreateRule(pb.CreateRuleRequest(user_id=alice, project="poster", text=f"rule {i}"))).id
        for i in range(23)
    ]
    seen: list[str] = []
    tokens: list[str] = []
    token = ""
    while True:
        page = await stub.ListRules(
            pb.ListRulesRequest(
                user_id=alice, project="poster", page=common_pb2.PageRequest(page_size=10, page_token=token)
            )
        )
        seen += [rule.id for rule in page.rules]
        token = page.next_page_token
        if not token:
            break
        tokens.append(token)
    assert len(tokens) == 2
    assert seen == created

    for bad in ("garbage!", "bm90LWEtY3Vyc29y", tokens[0] + "x", tokens[0][:-3]):
        assert await _invalid_fields(
            stub.ListProjects(
                pb.ListProjectsRequest(user_id=alice, page=common_pb2.PageRequest(page_token=bad))
            )
        ) == {"page_token"}
    bad_call = stub.ListProjects(
        pb.ListProjectsRequest(user_id=alice, page=common_pb2.PageRequest(page_token="garbage!"))
    )
    assert await _status(bad_call) == grpc.StatusCode.INVALID_ARGUMENT


async def test_resolve_render_reads_project_chain_and_active_rules_at_once(
    stub: MetadataServiceAsyncStub,
) -> None:
    alice = await _user(stub, "alice")
    project = await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="poster", name="P"))
    chain = await stub.CreateChain(pb.CreateChainRequest(user_id=alice, project="poster", name="story"))

    async def rule(text: str, chain_id: str = "", active: bool = True) -> str:
        request = pb.CreateRuleRequest(
            user_id=alice, project="poster", chain_id=chain_id, text=text, active=active
        )
        return (await stub.CreateRule(request)).id

    wide = await rule("project-wide")
    await rule("paused", active=False)
    own = await rule("this chain", chain_id=chain.id)
    await rule("another chain", chain_id=project.default_chain_id)
    await rule("paused for this chain", chain_id=chain.id, active=False)
    later = await rule("later project-wide")

    # By slug or by id; the change seq says how fresh the answer is (every change so far).
    replies: list[metadata_pb2.ResolveRenderResponse] = [
        await stub.ResolveRender(pb.ResolveRenderRequest(user_id=alice, project=ref, chain_id=chain.id))
        for ref in ("poster", project.id)
    ]
    changes = stub.WatchChanges(pb.WatchChangesRequest(after_seq=0))
    last_seq = 0
    async for change in changes:
        last_seq = change.seq
        if change.entity == "rule" and change.entity_id == later:
            break
    changes.cancel()
    for reply in replies:
        assert reply.change_seq == last_seq
        assert [(r.id, r.text) for r in reply.rules] == [
            (wide, "project-wide"),
            (own, "this chain"),
            (later, "later project-wide"),
        ]
        assert (reply.project.id, reply.chain.id) == (project.id, chain.id)
    default = await stub.ResolveRender(pb.ResolveRenderRequest(user_id=alice, project="poster"))
    assert default.chain.id == project.default_chain_id
    assert [r.text for r in default.rules] == ["project-wide", "another chain", "later project-wide"]
    with pytest.raises(NotFound, match="no such project"), rpc_errors():
        await stub.ResolveRender(pb.ResolveRenderRequest(user_id=alice, project="missing"))
