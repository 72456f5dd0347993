"""Group commit of one user's submits.

Every submit of a user locks that user's `tenants` row (the quota's counts) and its chain's
position row until it commits, and a durable commit waits for the WAL to reach the disk. So one
user's concurrent submits commit one after the other, each paying a whole WAL flush while the
others wait on its locks: under load, one user's submits ran at the pace of the disk's flushes
(`make bench`, 64 clients of one key: sampled backends spent two thirds of their time waiting for
a row lock, most of the rest in WALSync).

Here, submits of a user that arrive while one of that user's is being written wait, and are then
written together: one transaction, their statements in arrival order, one commit. Each still gets
its own answer (its render, or the error of its own statement); the quota and the chain positions
are exact because the statements run one after the other in the transaction, as they did one after
the other under the lock. Only submits of the same user are grouped, so a group holds one tenant's
rows and cannot deadlock with another group. A database error in a group (the transaction is lost)
writes each of its submits again on its own, so one bad submit costs the others only time.

A submit arriving when none of its user's is being written runs at once, alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import AsyncConnection

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[AsyncConnection[Any]], Coroutine[Any, Any, T]]
"""One submit's statements, run on the connection it is given (in a transaction when grouped)."""

_Queued = tuple[Work[T], "asyncio.Future[T]", contextvars.Context]
"""A submit waiting for a group: its work, its caller's future and its caller's context."""

MAX_GROUP = 64
"""The most submits written in one transaction (a group's locks are held until it commits)."""


class SubmitGroups(Generic[T]):
    """Runs each user's submits alone when nothing of that user's is being written, and in groups
    (one transaction each) when submits of that user queue up behind one another."""

    def __init__(self, connection: Callable[[], AbstractAsyncContextManager[AsyncConnection[Any]]]) -> None:
        self._connection = connection
        """An autocommit connection, for as long as the block lasts (with its errors translated)."""
        self._waiting: dict[str, list[_Queued[T]]] = {}
        """Per user being written: the submits waiting for the next group."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, user_id: str, work: Work[T]) -> T:
        """`work`'s result, once what it wrote has committed."""
        waiting = self._waiting.get(user_id)
        if waiting is not None:  # one of the user's is being written: join the next group
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            waiting.append((work, future, contextvars.copy_context()))
            return await future
        self._waiting[user_id] = []
        try:
            async with self._connection() as conn:
                return await work(conn)
        finally:
            self._hand_over(user_id)

    def _hand_over(self, user_id: str) -> None:
        """After a write of the user's: the submits that queued meanwhile go on in a task of their
        own (not in the caller's, whose cancellation must not cancel them)."""
        if self._waiting[user_id]:
            # A context of its own: the caller's trace is not the group's.
            task = asyncio.create_task(
                self._write_groups(user_id), name=f"submit-group-{user_id}", context=contextvars.Context()
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            del self._waiting[user_id]

    async def _write_groups(self, user_id: str) -> None:
        waiting = self._waiting[user_id]
        try:
            while waiting:
                group = waiting[:MAX_GROUP]
                del waiting[:MAX_GROUP]
                await self._write(group)
        finally:
            for _, future, _ in self._waiting.pop(user_id):
                future.cancel()

    async def _write(self, group: list[_Queued[T]]) -> None:
        try:
            await self._write_group(group)
        except BaseException:  # cancelled (the service is stopping): so are the submits waiting on it
            for _, future, _ in group:
                future.cancel()
            raise

    async def _write_group(self, group: list[_Queued[T]]) -> None:
        outcomes: list[tuple[T | None, BaseException | None]] = []
        try:
            async with self._connection() as conn, conn.transaction():
                for work, _, context in group:
                    try:
                        # In its caller's context, so that its statements' spans are in its caller's trace.
                        outcomes.append((await asyncio.create_task(work(conn), context=context), None))
                    except psycopg.Error:
                        raise  # the transaction is lost: every submit of the group goes again
                    except Exception as exc:  # this submit's own answer (a quota refusal, a conflict)
                        outcomes.append((None, exc))
        except Exception:
            log.warning("a group of submits failed; writing each on its own", exc_info=True)
            await asyncio.gather(
                *(
                    asyncio.create_task(self._write_alone(work, future), context=context)
                    for work, future, context in group
                )
            )
            return
        for (_, future, _), (result, error) in zip(group, outcomes, strict=True):
            if future.done():  # its caller has gone (what it wrote stays written)
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

    async def _write_alone(self, work: Work[T], future: asyncio.Future[T]) -> None:
        try:
            async with self._connection() as conn:
                result = await work(conn)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    def queued(self, user_id: str) -> int | None:
        """How many of the user's submits wait for the next group; None when none of the user's is
        being written."""
        waiting = self._waiting.get(user_id)
        return None if waiting is None else len(waiting)

    async def close(self) -> None:
        """Waits for the groups being written."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
