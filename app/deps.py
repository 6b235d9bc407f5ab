"""Request dependencies of the HTTP edge: one session per request, committed before the
response, and the jobs it wants sent once that commit succeeded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.engine.webhooks.events import queue_delivery_if_emitted
from app.queues import JobQueue


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    queue = JobQueue()
    request.state.job_queue = queue
    async with AsyncExitStack() as stack:
        # A route that checks its token before reading the body (TokenFirstRoute in
        # app/auth/deps.py) opened the request's session already: from here this owns it.
        session: AsyncSession | None = getattr(request.state, "session", None)
        if session is None:
            session = await stack.enter_async_context(sessionmaker())
        else:
            del request.state.session
            stack.push_async_callback(session.close)
        yield session
        await session.commit()
        queue_delivery_if_emitted(session, queue)
    await queue.flush(request.app.state.arq)


# scope="function": commit (and enqueue) before the response is sent, so a client never gets a
# success for a transaction that then fails, nor reads its own write too early.
_session = Depends(get_session, scope="function")


async def get_job_queue(request: Request, _: AsyncSession = _session) -> JobQueue:
    queue: JobQueue = request.state.job_queue
    return queue


SessionDep = Annotated[AsyncSession, _session]
JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]
