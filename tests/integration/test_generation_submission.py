"""Generation owns the submission: the caller names a project (and maybe a chain) of the user, and
generation resolves them and the active rules through metadata, allocates the chain's positions
(1, 2, 3, ... in submit order, never shared, no gap) and keeps what the render was made with.
Unknown users, projects and chains, or another's, are NOT_FOUND and leave nothing behind."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from renderflow.v1 import generation_pb2 as pb

from services.generation.servicer import REPLAYED_KEY
from shared.errors import NotFound, ValidationFailed
from shared.rpc_errors import rpc_errors
from tests.support.generation import (
    PROJECT,
    Accounts,
    Stub,
    get,
    spec,
    submit,
    submit_batch,
)


async def _lengths(stub: Stub, user_id: str, *chain_ids: str) -> dict[str, int]:
    with rpc_errors():
        answer = await stub.GetChainLengths(pb.GetChainLengthsRequest(user_id=user_id, chain_ids=chain_ids))
    return dict(answer.lengths)


async def _renders(stub: Stub, user_id: str) -> list[pb.Render]:
    with rpc_errors():
        return list((await stub.ListRenders(pb.ListRendersRequest(user_id=user_id))).renders)


async def _submitted(stub: Stub, request: pb.SubmitRequest) -> tuple[pb.Render, bool]:
    """The render, and whether the answer says it is a repeat's (its trailing metadata)."""
    call = stub.Submit(request)
    with rpc_errors():
        render = await call
        trailing = await call.trailing_metadata()
    return render, (REPLAYED_KEY, "true") in tuple(trailing or ())


def _rules(render: pb.Render) -> set[tuple[str, str]]:
    return {(rule.id, rule.text) for rule in render.rules}


async def test_a_submit_naming_only_its_project_gets_the_default_chain_positions_and_rules(
    stub: Stub, accounts: Accounts
) -> None:
    # What was broken: Submit(project="demo") went to chain "" at position 0, its rules not applied.
    project = await accounts.project()
    side_chain = await accounts.chain()
    wide = await accounts.rule("warm light")
    own = await accounts.rule("film grain", chain_id=project.default_chain_id)
    await accounts.rule("cold light", chain_id=side_chain)  # another chain's: not applied
    paused = await accounts.pause_rule(await accounts.rule("paused"))

    renders = [await submit(stub) for _ in range(3)]

    assert [(r.project, r.project_id, r.chain_id) for r in renders] == [
        (PROJECT, project.id, project.default_chain_id)
    ] * 3
    assert [r.position for r in renders] == [1, 2, 3]
    assert all(_rules(r) == {(wide.id, "warm light"), (own.id, "film grain")} for r in renders)
    assert paused.id not in {rule.id for r in renders for rule in r.rules}
    # As stored, not only as answered.
    stored = await get(stub, renders[2].id)
    assert (stored.chain_id, stored.position, _rules(stored)) == (
        project.default_chain_id,
        3,
        _rules(renders[2]),
    )


async def test_rules_are_the_ones_active_when_each_render_is_submitted(
    stub: Stub, accounts: Accounts
) -> None:
    chain = await accounts.chain()
    wide = await accounts.rule("warm light")
    before = await submit(stub, chain_id=chain)
    own = await accounts.rule("film grain", chain_id=chain)
    await accounts.pause_rule(wide)
    after = await submit(stub, chain_id=chain)  # the changes are acknowledged: they apply at once

    assert _rules(before) == {(wide.id, "warm light")}
    assert _rules(after) == {(own.id, "film grain")}
    assert _rules(await get(stub, before.id)) == {(wide.id, "warm light")}  # a snapshot, kept
    assert (before.position, after.position) == (1, 2)


async def test_the_project_may_be_named_by_its_id(stub: Stub, accounts: Accounts) -> None:
    project = await accounts.project()
    by_slug = await submit(stub)
    by_id = await submit(stub, project=project.id)
    assert (by_id.project, by_id.project_id, by_id.chain_id) == (
        PROJECT,
        project.id,
        project.default_chain_id,
    )
    assert (by_slug.position, by_id.position) == (1, 2)  # one chain, one sequence


async def test_each_chain_counts_its_own_positions(stub: Stub, accounts: Accounts) -> None:
    default = await accounts.default_chain()
    chain = await accounts.chain()
    other_project = await accounts.project(slug="other")
    order = [default, chain, default, chain, chain]
    renders = [await submit(stub, chain_id=c) for c in order]
    elsewhere = await submit(stub, project="other")
    bobs = await submit(stub, user="bob")  # bob's project `art` is his own

    assert [(r.chain_id, r.position) for r in renders] == [
        (default, 1),
        (chain, 1),
        (default, 2),
        (chain, 2),
        (chain, 3),
    ]
    assert (elsewhere.chain_id, elsewhere.position) == (other_project.default_chain_id, 1)
    assert bobs.position == 1 and bobs.chain_id not in (default, chain)


async def test_racing_submits_take_distinct_positions_without_gaps(stub: Stub, accounts: Accounts) -> None:
    chain = await accounts.chain()
    renders = await asyncio.gather(*(submit(stub, chain_id=chain) for _ in range(30)))
    assert sorted(r.position for r in renders) == list(range(1, 31))
    # Racing submits of one user commit in groups: every answer is a render that is really there.
    stored = await _renders(stub, await accounts.user("alice"))
    assert {(r.id, r.position) for r in stored} == {(r.id, r.position) for r in renders}
    assert await _lengths(stub, await accounts.user("alice"), chain) == {chain: 30}


async def test_an_unknown_user_or_project_is_not_found_and_makes_nothing(
    stub: Stub, accounts: Accounts
) -> None:
    alice = await accounts.user("alice")
    default = await accounts.default_chain()
    stranger = str(uuid.uuid4())  # no such user in metadata

    for user_id, render in [
        (stranger, spec()),
        ("not-a-user-id", spec()),
        (alice, spec(project="nowhere")),
        (alice, spec(project=str(uuid.uuid4()))),
    ]:
        with pytest.raises(NotFound, match="no such project"), rpc_errors():
            await stub.Submit(pb.SubmitRequest(user_id=user_id, render=render))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Submit(pb.SubmitRequest(user_id=alice, render=spec(project="nowhere")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    assert await _renders(stub, alice) == [] and await _renders(stub, stranger) == []
    assert await _lengths(stub, alice, default) == {}
    assert (await submit(stub)).position == 1  # the refused submits took no position


async def test_a_submit_without_a_project_is_invalid(stub: Stub, accounts: Accounts) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await submit(stub, project="")
    assert [e.field for e in caught.value.errors] == ["project"]
    assert await _renders(stub, await accounts.user("alice")) == []


async def test_a_chain_of_another_project_or_user_or_none_is_not_found(
    stub: Stub, accounts: Accounts
) -> None:
    alice = await accounts.user("alice")
    other = await accounts.project(slug="other")
    bobs = await accounts.chain(user="bob")

    for chain_id in [other.default_chain_id, bobs, str(uuid.uuid4()), "chain-1"]:
        with pytest.raises(NotFound, match="no such chain"):
            await submit(stub, chain_id=chain_id)
    assert await _renders(stub, alice) == []
    assert await _lengths(stub, alice, other.default_chain_id, bobs) == {}
    assert (await submit(stub, chain_id=bobs, user="bob")).position == 1


async def test_a_batch_naming_an_unknown_project_or_chain_makes_nothing(
    stub: Stub, accounts: Accounts
) -> None:
    alice = await accounts.user("alice")
    chain = await accounts.chain()
    bobs = await accounts.chain(user="bob")

    # A batch names the first item at fault, as it does any invalid item.
    with pytest.raises(ValidationFailed) as caught:
        await submit_batch(stub, [spec(chain_id=chain), spec(project="nowhere"), spec()])
    assert [(e.field, e.message) for e in caught.value.errors] == [("items[1].project", "no such project")]
    with pytest.raises(ValidationFailed) as caught:
        await submit_batch(stub, [spec(), spec(chain_id=chain), spec(chain_id=bobs)])
    assert [(e.field, e.message) for e in caught.value.errors] == [("items[2].chain_id", "no such chain")]

    assert await _renders(stub, alice) == []
    assert await _lengths(stub, alice, chain) == {}
    batch = await submit_batch(stub, [spec(chain_id=chain), spec(), spec(chain_id=chain)])
    assert [r.position for r in batch.renders] == [1, 1, 2]


async def test_a_keyed_repeat_is_the_same_render_and_takes_no_position(
    stub: Stub, accounts: Accounts
) -> None:
    alice = await accounts.user("alice")
    chain = await accounts.chain()
    first = await submit(stub, chain_id=chain, idempotency_key="k1", request_hash="h1")
    again = await submit(stub, chain_id=chain, idempotency_key="k1", request_hash="h1")
    by_id = await submit(stub, chain_id=chain, render_id="fixed")
    by_id_again = await submit(stub, chain_id=chain, render_id="fixed")
    racing = await asyncio.gather(
        *(submit(stub, chain_id=chain, idempotency_key="k2", request_hash="h2") for _ in range(10))
    )
    batch = await submit_batch(stub, [spec(chain_id=chain)] * 2, idempotency_key="k3", request_hash="h3")
    batch_again = await submit_batch(
        stub, [spec(chain_id=chain)] * 2, idempotency_key="k3", request_hash="h3"
    )
    following = await submit(stub, chain_id=chain)

    assert (again.id, again.position) == (first.id, first.position) == (first.id, 1)
    assert (by_id.position, by_id_again.id, by_id_again.position) == (2, "fixed", 2)
    assert {(r.id, r.position) for r in racing} == {(racing[0].id, 3)}
    assert [r.position for r in batch.renders] == [4, 5]
    assert [(r.id, r.position) for r in batch_again.renders] == [(r.id, r.position) for r in batch.renders]
    assert following.position == 6  # the next one: no gap
    assert len(await _renders(stub, alice)) == 6
    assert await _lengths(stub, alice, chain) == {chain: 6}
    # The answer to a repeat says so (the gateway's Idempotent-Replayed).
    request = pb.SubmitRequest(
        user_id=alice, render=spec(chain_id=chain), idempotency_key="k4", request_hash="h4"
    )
    made, replayed = await _submitted(stub, request)
    assert (made.position, replayed) == (7, False)
    repeated, replayed = await _submitted(stub, request)
    assert (repeated.id, repeated.position, replayed) == (made.id, 7, True)


async def test_chain_lengths_report_each_of_the_users_chains(stub: Stub, accounts: Accounts) -> None:
    alice, bob = await accounts.user("alice"), await accounts.user("bob")
    default = await accounts.default_chain()
    chain = await accounts.chain()
    unused = await accounts.chain()
    bobs = await accounts.default_chain(user="bob")
    for chain_id in (default, chain, chain):
        await submit(stub, chain_id=chain_id)
    await submit_batch(stub, [spec(chain_id=chain), spec()])
    await submit(stub, user="bob")

    assert await _lengths(stub, alice, default, chain, unused) == {default: 2, chain: 3}
    assert await _lengths(stub, alice, chain) == {chain: 3}
    assert await _lengths(stub, alice, bobs) == {}  # another user's chain is not told
    assert await _lengths(stub, bob, default, chain, bobs) == {bobs: 1}
    assert await _lengths(stub, alice, str(uuid.uuid4()), "not-a-chain") == {}
