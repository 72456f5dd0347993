"""The MetadataService gRPC servicer: protobuf in, one domain call, protobuf out.

Errors are raised as domain errors; the shared server interceptor turns them into statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
from renderflow.v1 import metadata_pb2 as pb
from renderflow.v1 import metadata_pb2_grpc

from services.metadata.changefeed import ChangeFeed
from services.metadata.domain import ApiKey, Chain, Change, Project, Rule, User
from services.metadata.service import Metadata
from services.metadata.store import LAST_CHANGE_SEQ
from shared.protobuf_time import timestamp

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["MetadataService"].full_name


def _user(user: User) -> pb.User:
    return pb.User(id=str(user.id), name=user.name, created_at=timestamp(user.created_at))


def _key(key: ApiKey) -> pb.ApiKeyInfo:
    info = pb.ApiKeyInfo(id=str(key.id), prefix=key.prefix, created_at=timestamp(key.created_at))
    if key.revoked_at is not None:
        info.revoked_at.CopyFrom(timestamp(key.revoked_at))
    return info


CHANGE_SEQ_KEY = "renderflow-change-seq"
"""Trailing metadata of a write: the seq of the change it made (see ResolveRender)."""


def _acknowledge(context: Context) -> None:
    # The write has committed: tell the caller which change it was, so that it can ask for reads
    # at least that fresh (SubmitRequest.min_change_seq).
    seq = LAST_CHANGE_SEQ.get()
    if seq:
        context.set_trailing_metadata(((CHANGE_SEQ_KEY, str(seq)),))


def _project(project: Project) -> pb.Project:
    return pb.Project(
        id=str(project.id),
        slug=project.slug,
        name=project.name,
        default_chain_id=str(project.default_chain_id),
        created_at=timestamp(project.created_at),
    )


def _chain(chain: Chain) -> pb.Chain:
    return pb.Chain(
        id=str(chain.id),
        project=chain.project,
        name=chain.name,
        is_default=chain.is_default,
        length=chain.length,
        created_at=timestamp(chain.created_at),
        project_id=str(chain.project_id),
    )


def _rule(rule: Rule) -> pb.Rule:
    return pb.Rule(
        id=str(rule.id),
        project=rule.project,
        chain_id=str(rule.chain_id) if rule.chain_id else "",
        text=rule.text,
        active=rule.active,
        created_at=timestamp(rule.created_at),
    )


def _change(change: Change) -> pb.Change:
    return pb.Change(
        seq=change.seq,
        entity=change.entity,
        action=change.action,
        entity_id=str(change.entity_id),
        user_id=str(change.user_id),
        at=timestamp(change.at),
    )


class MetadataServicer(metadata_pb2_grpc.MetadataServiceServicer):
    """Serves MetadataService from the domain and the change feed."""

    def __init__(self, metadata: Metadata, feed: ChangeFeed) -> None:
        self._metadata = metadata
        self._feed = feed

    async def CreateUser(self, request: pb.CreateUserRequest, context: Context) -> pb.CreateUserResponse:
        user, issued = await self._metadata.create_user(request.name)
        return pb.CreateUserResponse(user=_user(user), api_key=issued.secret, key=_key(issued.key))

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        issued = await self._metadata.create_api_key(request.user_name)
        return pb.CreateApiKeyResponse(api_key=issued.secret, key=_key(issued.key))

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Context) -> pb.ListApiKeysResponse:
        found = await self._metadata.list_api_keys(request.user_name)
        return pb.ListApiKeysResponse(keys=[_key(key) for key in found])

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        return pb.RevokeApiKeyResponse(key=_key(await self._metadata.revoke_api_key(request.key_id)))

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: Context
    ) -> pb.AuthenticateResponse:
        user, key_id = await self._metadata.authenticate(request.api_key)
        return pb.AuthenticateResponse(user=_user(user), key_id=str(key_id))

    async def CreateProject(self, request: pb.CreateProjectRequest, context: Context) -> pb.Project:
        project = await self._metadata.create_project(request.user_id, request.slug, request.name)
        _acknowledge(context)
        return _project(project)

    async def GetProject(self, request: pb.GetProjectRequest, context: Context) -> pb.Project:
        return _project(await self._metadata.get_project(request.user_id, request.slug))

    async def ListProjects(
        self, request: pb.ListProjectsRequest, context: Context
    ) -> pb.ListProjectsResponse:
        page = await self._metadata.list_projects(
            request.user_id, request.page.page_size, request.page.page_token
        )
        return pb.ListProjectsResponse(
            projects=[_project(p) for p in page.items], next_page_token=page.next_page_token
        )

    async def CreateChain(self, request: pb.CreateChainRequest, context: Context) -> pb.Chain:
        chain = await self._metadata.create_chain(request.user_id, request.project, request.name)
        _acknowledge(context)
        return _chain(chain)

    async def GetChain(self, request: pb.GetChainRequest, context: Context) -> pb.Chain:
        return _chain(await self._metadata.get_chain(request.user_id, request.project, request.chain_id))

    async def ListChains(self, request: pb.ListChainsRequest, context: Context) -> pb.ListChainsResponse:
        page = await self._metadata.list_chains(
            request.user_id, request.project, request.page.page_size, request.page.page_token
        )
        return pb.ListChainsResponse(
            chains=[_chain(c) for c in page.items], next_page_token=page.next_page_token
        )

    async def CreateRule(self, request: pb.CreateRuleRequest, context: Context) -> pb.Rule:
        active = request.active if request.HasField("active") else None
        rule = await self._metadata.create_rule(
            request.user_id, request.project, request.chain_id, request.text, active
        )
        _acknowledge(context)
        return _rule(rule)

    async def ListRules(self, request: pb.ListRulesRequest, context: Context) -> pb.ListRulesResponse:
        page = await self._metadata.list_rules(
            request.user_id, request.project, request.page.page_size, request.page.page_token
        )
        return pb.ListRulesResponse(
            rules=[_rule(r) for r in page.items], next_page_token=page.next_page_token
        )

    async def UpdateRule(self, request: pb.UpdateRuleRequest, context: Context) -> pb.Rule:
        rule = await self._metadata.update_rule(
            request.user_id,
            request.project,
            request.rule_id,
            request.text if request.HasField("text") else None,
            request.active if request.HasField("active") else None,
        )
        _acknowledge(context)
        return _rule(rule)

    async def DeleteRule(self, request: pb.DeleteRuleRequest, context: Context) -> pb.DeleteRuleResponse:
        await self._metadata.delete_rule(request.user_id, request.project, request.rule_id)
        _acknowledge(context)
        return pb.DeleteRuleResponse()

    async def ResolveRender(
        self, request: pb.ResolveRenderRequest, context: Context
    ) -> pb.ResolveRenderResponse:
        resolved = await self._metadata.resolve_render(request.user_id, request.project, request.chain_id)
        return pb.ResolveRenderResponse(
            project=_project(resolved.project),
            chain=_chain(resolved.chain),
            rules=[pb.RuleSnapshot(id=str(r.id), text=r.text) for r in resolved.rules],
            change_seq=resolved.change_seq,
        )

    async def WatchChanges(
        self, request: pb.WatchChangesRequest, context: Context
    ) -> AsyncIterator[pb.Change]:
        # Headers go out as soon as the watch is subscribed: they commit the call, so the client's
        # transparent retry of UNAVAILABLE cannot silently restart it (a watch "from now" would
        # then skip what happened in between), and they tell the client the watch has begun.
        async def started() -> None:
            await context.send_initial_metadata(())

        # aclosing: a cancelled stream unsubscribes now, not whenever the generator is collected.
        async with aclosing(self._feed.watch(request.after_seq, started)) as changes:
            async for change in changes:
                yield _change(change)
