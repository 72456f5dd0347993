"""A real stack (gateway, metadata, generation, a procedural worker) for the client to talk to, and
a user with a project; the stack runs on the tests' event loop, so blocking calls of the client
(and the `rf` command) are made from other threads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.gateway_stack import LiveStack, in_process_worker, running_stack

STEP_MS = 40.0
"""Each step of a render; a render of 20 steps takes about 0.8 s."""


@dataclass
class Account:
    """The stack, and a user of it with an API key and a project `demo`."""

    stack: LiveStack
    url: str
    api_key: str
    project: str = "demo"


@pytest.fixture
async def account(database_url: str, tmp_path: Path) -> AsyncIterator[Account]:
    # Quick retries: a reference that cannot be fetched (no image fetcher here) fails in moments.
    worker = in_process_worker(
        "client-worker", procedural_step_ms=STEP_MS, retry_base_s=0.05, retry_max_s=0.1
    )
    async with running_stack(database_url, tmp_path, start_worker=worker) as stack:
        yield await new_account(stack)


async def new_account(stack: LiveStack, name: str = "alice") -> Account:
    headers = await stack.user(name)
    await stack.created("POST", "/v1/projects", headers, json={"slug": "demo", "name": "Demo"})
    return Account(stack, stack.base, headers["Authorization"].removeprefix("Bearer "))
