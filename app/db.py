"""Engine and session builders; sessions commit at the edge and jobs are enqueued after commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from arq.connections import ArqRedis
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import Settings


def build_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
    )


def build_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


FLUSH_CONCURRENCY = 100


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    function: str
    args: tuple[Any, ...]
    job_id: str | None
    queue_name: str
    # The row it works on says it is still waiting, and the scheduler tick sends the jobs of
    # such rows again (app.backups.lifecycle.redispatch_lost_jobs): losing this enqueue only
    # delays the work.
    redispatched: bool = False


@dataclass
class JobQueue:
    """Jobs a request wants enqueued; sent only after its transaction committed."""

    jobs: list[Job] = field(default_factory=list)

    def add(
        self,
        function: str,
        *args: Any,
        queue_name: str,
        job_id: str | None = None,
        redispatched: bool = False,
    ) -> None:
        self.jobs.append(Job(function, args, job_id, queue_name, redispatched))

    async def flush(self, redis: ArqRedis | None) -> None:
        """Enqueue everything; a job the tick sends again may fail to enqueue (logged), others
        raise (the request answers 503: nothing durable says the work is wanted)."""
        jobs, self.jobs = self.jobs, []
        if redis is None:
            return
        # Each enqueue is a few round trips; a tick may send a thousand, so overlap them.
        for start in range(0, len(jobs), FLUSH_CONCURRENCY):
            batch = jobs[start : start + FLUSH_CONCURRENCY]
            outcomes = await asyncio.gather(
                *(
                    redis.enqueue_job(
                        job.function, *job.args, _job_id=job.job_id, _queue_name=job.queue_name
                    )
                    for job in batch
                ),
                return_exceptions=True,
            )
            for job, outcome in zip(batch, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    continue
                if not (job.redispatched and isinstance(outcome, Exception)):
                    raise outcome
                log.warning(
                    "could not queue %s (%s: %s); the scheduler tick will send it again",
                    job.job_id or job.function,
                    type(outcome).__name__,
                    outcome,
                )


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    queue = JobQueue()
    request.state.job_queue = queue
    async with sessionmaker() as session:
        yield session
        await session.commit()
    await queue.flush(request.app.state.arq)


# scope="function": commit (and enqueue) before the response is sent, so a client never gets a
# success for a transaction that then fails, nor reads its own write too early.
_session = Depends(get_session, scope="function")


async def get_job_queue(request: Request, _: AsyncSession = _session) -> JobQueue:
    queue: JobQueue = request.state.job_queue
    return queue


SessionDep = Annotated[AsyncSession, _session]
JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]


async def flush_or_conflict(session: AsyncSession, message: str) -> None:
    """Flush, turning a unique-constraint violation into a 409 with the given words."""
    from sqlalchemy.exc import IntegrityError

    from app.errors import Conflict

    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(message) from exc
